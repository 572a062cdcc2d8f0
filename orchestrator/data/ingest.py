"""`tips data ingest`: img2dataset and Hugging Face-style data sets into our shards, on Ray Data.

    ingest(src, out, format=, columns=Columns(...), storage=, overwrite=) -> JobReport

Sources (local folder or ``s3://`` prefix, listed recursively):

* img2dataset ``--output_format webdataset``: ``NNNNN.tar`` with ``KEY.jpg|png|webp``,
  ``KEY.txt`` (the alt-text) and ``KEY.json`` (url, status, sizes, ...; kept as ``meta``).
  The ``NNNNN.parquet`` that img2dataset writes beside each tar holds metadata only (no image
  bytes): when a folder has tars, its Parquet files are ignored.
* Parquet with image bytes: img2dataset ``--output_format parquet`` (``key``, ``jpg``
  binary, ``txt``, ``status``, ...; rows whose ``status`` is not ``success`` hold no image
  and are counted as ``failed_download``) and Hugging Face-style Parquet (an ``image`` struct
  ``{bytes, path}`` or a binary column, a text column). ``Columns`` names them, else they
  are found by the usual names (``IMAGE_COLUMNS``, ``TEXT_COLUMNS``); a Parquet file without
  image bytes (img2dataset's metadata files, a URL list) is refused with the reason.

One Ray Data task per source file (``from_items`` -> ``map_batches``) converts it into one
output shard ``shard-NNNNN.parquet|tar`` (schema: orchestrator/data/shards.py), written with
``ShardWriter`` into a local temporary folder and published whole (``publish_shard``): a
local file is renamed into place, an S3 object appears when its upload completes. A rerun
skips the shards already published, so an interrupted job resumes file by file; the driver
merges ``_manifest.json`` at the end. Records that cannot be used are skipped and counted as
``tips data pack`` does (orchestrator/data/pack.py): ``corrupt_image``, ``missing_image``,
``failed_download``, ``duplicate_key``, ``unreadable``. ``tips data caption``
(orchestrator/data/caption.py) reuses the publishing, manifest and job helpers.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from orchestrator import storage as st
from orchestrator.data.pack import _key
from orchestrator.data.shards import (
    FORMAT_SUFFIX,
    IMAGE_EXTS,
    MANIFEST,
    BadRecord,
    Record,
    ShardError,
    ShardInfo,
    ShardWriter,
)

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
TEXT_COLUMNS = ("txt", "caption", "text", "alt_text", "TEXT", "CAPTION")
KEY_COLUMNS = ("key", "__key__", "id")
IMG2DATASET_META = ("url", "status", "error_message", "width", "height", "sha256")


@dataclass(frozen=True)
class Columns:
    """Source column names; None = find them by the usual names."""

    image: str | None = None
    text: str | None = None
    key: str | None = None


@dataclass
class JobReport:
    """What a shard job did: records written, shards published / skipped, skip reasons."""

    written: int = 0
    captioned: int = 0  # tips data caption / regions: records that got the new field
    shards_written: int = 0
    shards_skipped: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    infos: list[ShardInfo] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        """Count one task's stats row (``written``, ``skipped`` JSON, ``info`` JSON or "")."""
        self.written += int(row["written"])
        self.captioned += int(row.get("captioned", 0))
        self.skipped.update(json.loads(row["skipped"]))
        if row["info"]:
            info = json.loads(row["info"])
            self.infos.append(ShardInfo(**{**info, "row_groups": tuple(info["row_groups"])}))
            self.shards_written += 1

    def summary(self) -> str:
        total = sum(self.skipped.values())
        detail = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.written} records in {self.shards_written} shards "
            f"({self.shards_skipped} already done, skipped); skipped {total} records ({detail})"
        )


# --------------------------------------------------------------------------- publishing


def publish_shard(
    records: list[Record],
    dst: str,
    *,
    format: str,
    row_group_size: int,
    storage: Any | None = None,
) -> ShardInfo:
    """Write ``records`` as one shard with ``ShardWriter`` and put it at ``dst`` whole.

    The shard is written into a local temporary folder first; locally it is then moved to
    ``dst + ".partial"`` and renamed (atomic), on S3 uploaded (an object is visible only
    once complete). Extra binary columns (``class_mask``...) travel along.
    """
    extras = sorted({k for r in records for k in r if k not in _BASE_FIELDS and r[k]})
    tmp = tempfile.mkdtemp(prefix="tips-shard-")
    try:
        with ShardWriter(
            tmp,
            format=format,
            shard_size=len(records),
            row_group_size=row_group_size,
            extra_columns=tuple(extras),
        ) as writer:
            for rec in records:
                writer.write(rec)
        written = writer.shards[0]
        fs, path = st.filesystem(dst, storage)
        if st.is_s3(dst):
            pafs.copy_files(
                written.uri,
                path,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
            )
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(written.uri, path + ".partial")
            os.replace(path + ".partial", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ShardInfo(
        st.normalize_uri(dst), format, written.num_rows, written.row_groups, written.size
    )


_BASE_FIELDS = ("key", "image", "alt_text", "captions", "regions", "meta")


def finished_names(out: str, storage: Any | None = None) -> set[str]:
    """Names of the shard files already published at ``out`` (none if it does not exist)."""
    try:
        files = st.list_files(out, storage, suffixes=tuple(FORMAT_SUFFIX.values()))
    except FileNotFoundError:
        return set()
    base = st.normalize_uri(out)
    return {f.uri[len(base) + 1 :] for f in files if f.uri.startswith(base + "/")}


def clear_output(out: str, storage: Any | None = None) -> None:
    """Delete the shard files and manifest at ``out`` (``--overwrite``)."""
    try:
        files = st.list_files(out, storage)
    except FileNotFoundError:
        return
    for f in files:
        if f.uri.endswith((*FORMAT_SUFFIX.values(), MANIFEST, ".partial")):
            fs, path = st.filesystem(f.uri, storage)
            fs.delete_file(path)


def merge_manifest(out: str, infos: list[ShardInfo], storage: Any | None = None) -> None:
    """Add ``infos`` to ``out``'s ``_manifest.json`` (entries of earlier runs are kept while
    their files exist; ``list_shards`` trusts an entry only while the size matches)."""
    uri = st.join_uri(st.normalize_uri(out), MANIFEST)
    entries: dict[str, dict[str, Any]] = {}
    if st.exists(uri, storage):
        try:
            entries = {s["name"]: s for s in json.loads(st.read_text(uri, storage))["shards"]}
        except (ValueError, KeyError, TypeError):
            entries = {}
    done = finished_names(out, storage)
    entries = {name: e for name, e in entries.items() if name in done}
    base = st.normalize_uri(out)
    for s in infos:
        name = s.uri[len(base) + 1 :]
        entries[name] = {
            "name": name,
            "format": s.format,
            "size": s.size,
            "num_rows": s.num_rows,
            "row_groups": list(s.row_groups),
        }
    shards = [entries[n] for n in sorted(entries)]
    doc = {"version": 1, "num_rows": sum(e["num_rows"] for e in shards), "shards": shards}
    st.write_text(uri, json.dumps(doc, indent=1), storage)


def run_tasks(
    tasks: list[dict[str, Any]],
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    num_cpus: float,
    on_row: Callable[[dict[str, Any]], None],
) -> None:
    """Run ``fn(task) -> stats row`` once per task as a Ray Data job (one block per task, so
    the tasks spread over the cluster), calling ``on_row`` on the driver as each finishes."""
    import ray.data

    if not tasks:
        return

    def batch_fn(batch: dict[str, Any]) -> dict[str, Any]:
        rows = [fn({k: batch[k][i] for k in batch}) for i in range(len(batch["task"]))]
        return {k: [r[k] for r in rows] for k in rows[0]}

    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(batch_fn, batch_size=1, num_cpus=num_cpus, batch_format="numpy")
    for row in ds.iter_rows():
        on_row(row)


def init_ray() -> None:
    """Start or attach to Ray (``RAY_ADDRESS``), quiet like ``tips train``."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address, log_to_driver=False) if address else ray.init(log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    ctx.enable_progress_bars = False


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    uri: str
    kind: str  # "tar" | "parquet"


def list_sources(src: str, storage: Any | None = None) -> list[Source]:
    """The tars under ``src``, else its Parquet files (img2dataset's beside-tar Parquet
    files are metadata without images)."""
    files = st.list_files(src, storage)
    tars = [Source(f.uri, "tar") for f in files if f.uri.endswith(".tar")]
    if tars:
        return tars
    parquets = [Source(f.uri, "parquet") for f in files if f.uri.endswith(".parquet")]
    if not parquets:
        raise ShardError(f"{src}: no .tar or .parquet files to ingest")
    return parquets


def _status_ok(meta: dict[str, Any]) -> bool:
    return meta.get("status") in (None, "success")


def _img2dataset_tar(uri: str, storage: Any | None) -> Iterator[Record | BadRecord]:
    """Records of an img2dataset tar: members grouped by key, in order; a cut-short tar
    yields what it holds and one ``BadRecord`` for the rest."""
    fs, path = st.filesystem(uri, storage)
    key, parts = None, {}

    def record() -> Record | BadRecord:
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is None:
            return BadRecord(key, "missing_image", f"{uri}: {key} has no image member")
        try:
            meta = json.loads(parts["json"]) if "json" in parts else {}
        except ValueError:
            meta = {}
        if not isinstance(meta, dict) or not _status_ok(meta):
            return BadRecord(key, "failed_download", f"{uri}: {key} status")
        alt = parts.get("txt", b"").decode("utf-8", "replace")
        return {"key": key, "image": image, "alt_text": alt, "captions": [], "meta": meta}

    try:
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                head, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                k = f"{head}/{stem}" if head else stem
                if key is not None and k != key:
                    yield record()
                    parts = {}
                key = k
                data = tar.extractfile(member)
                parts[ext.lower()] = data.read() if data is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        logger.warning("%s: unreadable after key %r (%s)", uri, key, e)
        yield BadRecord(str(key), "unreadable", f"{uri}: {e}")
        return
    if key is not None:
        yield record()


def resolve_columns(schema: pa.Schema, columns: Columns, where: str) -> Columns:
    """The image / text / key columns of a Parquet source.

    Raises:
        ShardError: a named column is missing, or no column holds image bytes.
    """
    names = schema.names
    for name in (columns.image, columns.text, columns.key):
        if name is not None and name not in names:
            raise ShardError(f"{where}: no column {name!r} (columns: {names})")
    image = columns.image or next((c for c in IMAGE_COLUMNS if c in names), None)
    if image is None:
        hint = (
            " (an img2dataset metadata file: image bytes are in the .tar beside it, or in "
            "Parquet only with --output_format parquet)"
            if "url" in names
            else ""
        )
        raise ShardError(
            f"{where}: no image bytes column{hint}; name one with --image-column (columns: {names})"
        )
    t = schema.field(image).type
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t)):
        raise ShardError(f"{where}: column {image!r} is {t}, not image bytes")
    if pa.types.is_struct(t) and t.get_field_index("bytes") < 0:
        raise ShardError(f"{where}: struct column {image!r} has no 'bytes' field")
    text = columns.text or next((c for c in TEXT_COLUMNS if c in names), None)
    key = columns.key or next((c for c in KEY_COLUMNS if c in names), None)
    return Columns(image, text, key)


def _parquet_records(
    uri: str, storage: Any | None, columns: Columns
) -> Iterator[Record | BadRecord]:
    fs, path = st.filesystem(uri, storage)
    stem = uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        cols = resolve_columns(pf.schema_arrow, columns, uri)
        keep = [c for c in IMG2DATASET_META if c in pf.schema_arrow.names]
        wanted = list(dict.fromkeys(c for c in (cols.image, cols.text, cols.key, *keep) if c))
        row = 0
        for g in range(pf.num_row_groups):
            try:
                rows = pf.read_row_group(g, columns=wanted).to_pylist()
            except Exception as e:  # noqa: BLE001 (a bad row group loses its rows only)
                n = pf.metadata.row_group(g).num_rows
                yield BadRecord(f"{uri}#{g}", "unreadable", str(e), n)
                row += n
                continue
            for r in rows:
                yield _parquet_record(r, cols, keep, f"{stem}_{row:06d}")
                row += 1


def _parquet_record(r: dict[str, Any], cols: Columns, keep: list[str], key: str) -> Any:
    image = r[cols.image]
    if isinstance(image, dict):
        image = image.get("bytes")
    meta = {c: r[c] for c in keep if r.get(c) is not None}
    key = str(r[cols.key]) if cols.key and r.get(cols.key) not in (None, "") else key
    if not _status_ok(meta):
        return BadRecord(key, "failed_download", str(meta.get("error_message")))
    if not image:
        return BadRecord(key, "missing_image", "no image bytes")
    text = r.get(cols.text) if cols.text else None
    return {"key": key, "image": image, "alt_text": str(text or ""), "captions": [], "meta": meta}


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 (any decode failure: skip and count)
        return False


def convert_source(task: dict[str, Any], columns: Columns, storage: Any | None) -> dict[str, Any]:
    """One source file -> one published shard; returns ``{task, written, skipped}``."""
    source = Source(str(task["src"]), str(task["kind"]))
    skipped: Counter = Counter()
    records: list[Record] = []
    seen: set[str] = set()
    items = (
        _img2dataset_tar(source.uri, storage)
        if source.kind == "tar"
        else _parquet_records(source.uri, storage, columns)
    )
    for item in items:
        if isinstance(item, BadRecord):
            skipped[item.reason] += item.count
            continue
        item["key"] = _key(item["key"], "")
        if item["key"] in seen:
            skipped["duplicate_key"] += 1
        elif not _decodes(item["image"]):
            skipped["corrupt_image"] += 1
        else:
            seen.add(item["key"])
            records.append(item)
    info = None
    if records:
        info = publish_shard(
            records,
            str(task["dst"]),
            format=str(task["format"]),
            row_group_size=int(task["row_group_size"]),
            storage=storage,
        )
    return stats_row(int(task["task"]), len(records), skipped, info)


def stats_row(
    task: int, written: int, skipped: Counter, info: ShardInfo | None, captioned: int = 0
) -> dict[str, Any]:
    """What a shard task returns to the driver (``JobReport.add`` reads it)."""
    return {
        "task": task,
        "captioned": captioned,
        "written": written,
        "skipped": json.dumps(dict(skipped)),
        "info": json.dumps(dataclasses.asdict(info)) if info else "",
    }


# --------------------------------------------------------------------------- the job


def ingest(
    src: str,
    out: str,
    *,
    format: str = "parquet",
    columns: Columns | None = None,
    row_group_size: int = 64,
    storage: Any | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> JobReport:
    """Convert every source file under ``src`` into a shard under ``out`` (Ray Data job).

    Raises:
        ShardError: no sources, or a Parquet source without image bytes (checked on the
            driver before the job starts).
    """
    if format not in FORMAT_SUFFIX:
        raise ShardError(f"unknown shard format {format!r}; use parquet or webdataset")
    columns = columns or Columns()
    sources = list_sources(src, storage)
    for s in sources:
        if s.kind == "parquet":
            fs, path = st.filesystem(s.uri, storage)
            with fs.open_input_file(path) as f:
                resolve_columns(pq.ParquetFile(f).schema_arrow, columns, s.uri)
    out = st.normalize_uri(out)
    if overwrite:
        clear_output(out, storage)
    done = finished_names(out, storage)
    report = JobReport()
    tasks = []
    for i, s in enumerate(sources):
        name = f"shard-{i:05d}{FORMAT_SUFFIX[format]}"
        if name in done:
            report.shards_skipped += 1
            continue
        dst = st.join_uri(out, name)
        tasks.append(
            dict(
                task=i,
                src=s.uri,
                kind=s.kind,
                dst=dst,
                format=format,
                row_group_size=row_group_size,
            )
        )
    start = time.monotonic()
    init_ray()

    def on_row(row: dict[str, Any]) -> None:
        report.add(row)
        if progress:
            progress(1)

    run_tasks(tasks, lambda t: convert_source(t, columns, storage), num_cpus=1, on_row=on_row)
    report.seconds = time.monotonic() - start
    if finished_names(out, storage):
        merge_manifest(out, report.infos, storage)
    return report
