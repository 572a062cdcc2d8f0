"""Image-text shards: the schema, Parquet and WebDataset writers, listing and record readers.

Schema (docs/design.md, "Shard schema"): ``key`` string, ``image`` binary (JPEG/PNG/WebP),
``alt_text`` string, ``captions`` list<struct<kind, text>>, ``regions``
list<struct<box: list<float32>[4] xyxy in [0, 1], text>> (optional), ``meta`` JSON string
(optional). Extra binary columns pass through (the synthetic eval split's ``class_mask`` and
``depth`` PNGs). WebDataset tars carry the same fields per key: ``KEY.jpg|png|webp``,
``KEY.txt`` (alt_text), ``KEY.json`` ({captions, regions, meta}), ``KEY.<extra>.png``.

A shard set is a directory (or S3 prefix) of ``shard-NNNNN.parquet|tar`` files plus a
``_manifest.json`` (names, sizes, row counts) that lets ``list_shards`` skip opening every
file; a manifest entry is trusted only when the file's size still matches.

The unit of reading is a *row group*: a Parquet row group, or a whole tar (read as one
stream). ``iter_unit(info, i)`` yields ``Record`` dicts, or ``BadRecord`` for a record (or a
run of records) that cannot be read; callers count those, nothing is dropped silently.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import storage as st

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FORMAT_SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}
REQUIRED_COLUMNS = ("key", "image", "alt_text", "captions")

CAPTION_TYPE = pa.list_(pa.struct([("kind", pa.string()), ("text", pa.string())]))
REGION_TYPE = pa.list_(pa.struct([("box", pa.list_(pa.float32(), 4)), ("text", pa.string())]))
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("alt_text", pa.string()),
        ("captions", CAPTION_TYPE),
        ("regions", REGION_TYPE),
        ("meta", pa.string()),
    ]
)

Record = dict[str, Any]  # key, image, alt_text, captions, regions, meta, extras...


class ShardError(ValueError):
    """A shard or record does not follow the schema; the message names file and column."""


@dataclass(frozen=True)
class BadRecord:
    """``count`` records at ``key`` that could not be read (``reason``: corrupt | unreadable)."""

    key: str
    reason: str
    detail: str
    count: int = 1


@dataclass(frozen=True)
class ShardInfo:
    uri: str
    format: str  # "parquet" | "webdataset"
    num_rows: int
    row_groups: tuple[int, ...]  # rows per read unit (a tar is one unit)
    size: int


@dataclass
class ShardListing:
    uri: str
    shards: list[ShardInfo]
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)


def image_ext(data: bytes) -> str:
    """File extension from magic bytes: jpg, png or webp (else "bin")."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


# --------------------------------------------------------------------------- schema


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _struct_fields_ok(t: pa.DataType, fields: dict[str, Any]) -> bool:
    if not (_is_list(t) and pa.types.is_struct(t.value_type)):
        return False
    struct = t.value_type
    names = {struct.field(i).name: struct.field(i).type for i in range(struct.num_fields)}
    return all(name in names and check(names[name]) for name, check in fields.items())


def check_schema(schema: pa.Schema, where: str) -> None:
    """Check a Parquet schema against the shard schema.

    Raises:
        ShardError: naming the file and the missing or mistyped column.
    """
    names = set(schema.names)
    for col in REQUIRED_COLUMNS:
        if col not in names:
            raise ShardError(f"{where}: missing column {col!r} (required: {REQUIRED_COLUMNS})")
    checks = {
        "key": _is_string,
        "alt_text": _is_string,
        "meta": _is_string,
        "image": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
        "captions": lambda t: _struct_fields_ok(t, {"kind": _is_string, "text": _is_string}),
        "regions": lambda t: _struct_fields_ok(
            t,
            {
                "box": lambda b: _is_list(b) and pa.types.is_floating(b.value_type),
                "text": _is_string,
            },
        ),
    }
    for col, ok in checks.items():
        if col in names and not ok(schema.field(col).type):
            raise ShardError(
                f"{where}: column {col!r} has type {schema.field(col).type}, expected "
                f"{SCHEMA.field(col).type}"
            )


def _normalize(rec: Record, where: str) -> Record:
    """Fill optional fields and check the types of one record before writing."""
    for col in ("key", "image"):
        if not rec.get(col):
            raise ShardError(f"{where}: record {rec.get('key')!r}: column {col!r} is empty")
    out = dict(rec)
    out["alt_text"] = rec.get("alt_text") or ""
    caps = rec.get("captions") or []
    if not all(isinstance(c, dict) and {"kind", "text"} <= set(c) for c in caps):
        raise ShardError(
            f"{where}: record {rec['key']!r}: column 'captions' must be a list of {{kind, text}}"
        )
    out["captions"] = [{"kind": str(c["kind"]), "text": str(c["text"])} for c in caps]
    regions = rec.get("regions") or []
    for r in regions:
        if len(r.get("box", ())) != 4:
            raise ShardError(
                f"{where}: record {rec['key']!r}: column 'regions' box must be xyxy (4 floats)"
            )
    out["regions"] = [
        {"box": [float(v) for v in r["box"]], "text": str(r.get("text", ""))} for r in regions
    ]
    meta = rec.get("meta")
    out["meta"] = meta if meta is None or isinstance(meta, str) else json.dumps(meta)
    return out


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Write records into numbered shards of ``shard_size`` records plus a manifest.

    Args:
        uri: output directory or ``s3://bucket/prefix``.
        format: "parquet" or "webdataset".
        shard_size: records per shard.
        row_group_size: Parquet rows per row group (the unit of parallel reading).
        extra_columns: names of extra binary columns (e.g. ``("class_mask", "depth")``).
        storage: ``cfg.storage`` or None.
        overwrite: delete existing shards of this set first (else refuse to mix sets).

    Raises:
        ShardError: existing shards at ``uri`` without ``overwrite``; a malformed record.
    """

    def __init__(
        self,
        uri: str,
        *,
        format: str = "parquet",
        shard_size: int = 1000,
        row_group_size: int = 64,
        extra_columns: tuple[str, ...] = (),
        storage: Any | None = None,
        overwrite: bool = False,
    ) -> None:
        if format not in FORMAT_SUFFIX:
            raise ShardError(f"unknown shard format {format!r}; use parquet or webdataset")
        if shard_size < 1 or row_group_size < 1:
            raise ShardError("shard_size and row_group_size must be >= 1")
        self.uri = st.normalize_uri(uri)
        self.format, self.shard_size, self.row_group_size = format, shard_size, row_group_size
        self.extra_columns = tuple(extra_columns)
        self.storage = storage
        self.shards: list[ShardInfo] = []
        self._buffer: list[Record] = []
        st.makedirs(self.uri)
        existing = [
            f
            for f in _list_or_empty(self.uri, storage)
            if f.uri.endswith((".parquet", ".tar", MANIFEST))
        ]
        if existing and not overwrite:
            raise ShardError(
                f"{self.uri}: already holds {len(existing)} shard files; "
                "choose an empty location or overwrite"
            )
        for f in existing:
            fs, path = st.filesystem(f.uri, storage)
            fs.delete_file(path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()

    def write(self, record: Record) -> None:
        where = f"{self.uri} (shard {len(self.shards)})"
        self._buffer.append(_normalize(record, where))
        if len(self._buffer) >= self.shard_size:
            self._flush()

    def close(self) -> list[ShardInfo]:
        """Write the last shard and the manifest; returns what was written."""
        if self._buffer:
            self._flush()
        if not self.shards:  # nothing written: leave nothing that blocks the next attempt
            return self.shards
        manifest = {
            "version": 1,
            "num_rows": sum(s.num_rows for s in self.shards),
            "shards": [
                {
                    "name": s.uri.rsplit("/", 1)[-1],
                    "format": s.format,
                    "size": s.size,
                    "num_rows": s.num_rows,
                    "row_groups": list(s.row_groups),
                }
                for s in self.shards
            ],
        }
        st.write_text(st.join_uri(self.uri, MANIFEST), json.dumps(manifest, indent=1), self.storage)
        return self.shards

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}{FORMAT_SUFFIX[self.format]}"
        uri = st.join_uri(self.uri, name)
        fs, path = st.filesystem(uri, self.storage)
        rows = self._buffer
        if self.format == "parquet":
            fields = list(SCHEMA) + [pa.field(c, pa.binary()) for c in self.extra_columns]
            table = pa.Table.from_pylist(
                [{f.name: r.get(f.name) for f in fields} for r in rows], schema=pa.schema(fields)
            )
            compression = {f.name: "snappy" for f in fields}
            for col in ("image", *self.extra_columns):
                compression[col] = "none"  # already compressed images
            with fs.open_output_stream(path) as sink:
                pq.write_table(
                    table, sink, row_group_size=self.row_group_size, compression=compression
                )
            groups = [
                min(self.row_group_size, len(rows) - i)
                for i in range(0, len(rows), self.row_group_size)
            ]
        else:
            with fs.open_output_stream(path) as sink:
                _write_tar(sink, rows, self.extra_columns, uri)
            groups = [len(rows)]
        size = int(fs.get_file_info(path).size or 0)
        self.shards.append(ShardInfo(uri, self.format, len(rows), tuple(groups), size))
        self._buffer = []


def _write_tar(sink: Any, rows: list[Record], extras: tuple[str, ...], where: str) -> None:
    with tarfile.open(fileobj=sink, mode="w|") as tar:
        for r in rows:
            key = r["key"]
            if "." in key.rsplit("/", 1)[-1]:
                raise ShardError(f"{where}: key {key!r} contains '.', not allowed in WebDataset")
            doc = {"captions": r["captions"], "regions": r["regions"]}
            if r.get("meta") is not None:
                doc["meta"] = r["meta"]
            members = [
                (image_ext(r["image"]), r["image"]),
                ("txt", r["alt_text"].encode("utf-8")),
                ("json", json.dumps(doc).encode("utf-8")),
            ]
            members += [(f"{c}.{image_ext(r[c])}", r[c]) for c in extras if r.get(c)]
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _list_or_empty(uri: str, storage: Any | None) -> list[st.FileEntry]:
    try:
        return st.list_files(uri, storage)
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------- listing


def _read_manifest(uri: str, files: list[st.FileEntry], storage: Any | None) -> dict[str, Any]:
    entry = next((f for f in files if f.uri.endswith("/" + MANIFEST)), None)
    if entry is None:
        return {}
    try:
        doc = json.loads(st.read_text(entry.uri, storage))
        base = entry.uri.rsplit("/", 1)[0]
        return {st.join_uri(base, s["name"]): s for s in doc.get("shards", [])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s: ignoring unreadable manifest (%s)", entry.uri, e)
        return {}


def _probe(entry: st.FileEntry, fmt: str, storage: Any | None) -> ShardInfo:
    fs, path = st.filesystem(entry.uri, storage)
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            check_schema(meta.schema.to_arrow_schema(), entry.uri)
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        return ShardInfo(entry.uri, fmt, sum(groups), groups, entry.size)
    keys = 0
    previous = None
    with fs.open_input_stream(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    key = _split_member(member.name)[0]
                    if member.isfile() and key != previous:
                        keys, previous = keys + 1, key
        except (tarfile.TarError, EOFError, OSError) as e:
            if keys == 0:
                raise
            logger.warning("%s: tar ends early after %d records (%s)", entry.uri, keys, e)
    return ShardInfo(entry.uri, fmt, keys, (keys,), entry.size)


def list_shards(
    uri: str, storage: Any | None = None, format: str = "auto", threads: int = 8
) -> ShardListing:
    """List the shards under ``uri`` with their row counts (schema checked, in parallel).

    Args:
        uri: a shard directory / S3 prefix, or one shard file.
        storage: ``cfg.storage`` or None.
        format: "auto" (by extension), "parquet" or "webdataset".
        threads: parallel metadata reads (I/O bound).

    Returns:
        The readable shards sorted by URI, and ``(uri, reason)`` for each unreadable one.

    Raises:
        ShardError: a shard's schema is wrong (a data-set error, not a corrupt file), or no
            shard is found.
    """
    if format not in ("auto", *FORMAT_SUFFIX):
        raise ShardError(f"unknown shard format {format!r}")
    formats = list(FORMAT_SUFFIX) if format == "auto" else [format]
    files = st.list_files(uri, storage)
    manifest = _read_manifest(uri, files, storage)
    todo: list[tuple[st.FileEntry, str]] = [
        (f, fmt) for f in files for fmt in formats if f.uri.endswith(FORMAT_SUFFIX[fmt])
    ]
    if not todo:
        raise ShardError(f"{uri}: no {' or '.join(formats)} shards found")

    def probe(item: tuple[st.FileEntry, str]) -> ShardInfo | tuple[str, str]:
        entry, fmt = item
        known = manifest.get(entry.uri)
        if known and known.get("size") == entry.size and known.get("format") == fmt:
            groups = tuple(int(n) for n in known["row_groups"])
            return ShardInfo(entry.uri, fmt, sum(groups), groups, entry.size)
        try:
            return _probe(entry, fmt, storage)
        except ShardError:
            raise
        except Exception as e:  # truncated footer, I/O error, not a tar: report by name
            return (entry.uri, f"{type(e).__name__}: {e}")

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(probe, todo))
    listing = ShardListing(
        uri,
        [r for r in results if isinstance(r, ShardInfo)],
        [r for r in results if isinstance(r, tuple)],
    )
    for bad_uri, reason in listing.unreadable:
        logger.warning("unreadable shard skipped: %s (%s)", bad_uri, reason)
    return listing


# --------------------------------------------------------------------------- reading


def _split_member(name: str) -> tuple[str, str]:
    """``dir/abc.class_mask.png`` -> (``dir/abc``, ``class_mask.png``)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def _tar_record(key: str, parts: dict[str, bytes], where: str) -> Record | BadRecord:
    image_ext_found = next((e for e in IMAGE_EXTS if e in parts), None)
    if image_ext_found is None:
        return BadRecord(key, "corrupt", f"{where}: no image member")
    try:
        doc = json.loads(parts["json"]) if "json" in parts else {}
        rec: Record = {
            "key": key,
            "image": parts[image_ext_found],
            "alt_text": parts.get("txt", b"").decode("utf-8"),
            "captions": list(doc.get("captions") or []),
            "regions": list(doc.get("regions") or []),
            "meta": doc.get("meta"),
        }
    except (ValueError, AttributeError) as e:
        return BadRecord(key, "corrupt", f"{where}: bad txt/json member ({e})")
    for ext, data in parts.items():
        if "." in ext:  # KEY.<extra>.png
            rec[ext.rsplit(".", 1)[0]] = data
    return rec


def _iter_tar(info: ShardInfo, storage: Any | None) -> Iterator[Record | BadRecord]:
    """Records of a tar, streamed. A tar that ends without its end-of-archive block was cut
    short: its last record may lack members, so it is dropped (``iter_unit`` counts it)."""
    fs, path = st.filesystem(info.uri, storage)
    key, parts = None, {}
    try:
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_member(member.name)
                if k != key and key is not None:
                    yield _tar_record(key, parts, info.uri)
                    parts = {}
                key = k
                data = tar.extractfile(member)
                parts[ext.lower()] = data.read() if data is not None else b""
            clean = tar.offset + tarfile.BLOCKSIZE <= info.size
    except (tarfile.TarError, EOFError, OSError) as e:
        logger.warning("%s: truncated or unreadable tar after key %r (%s)", info.uri, key, e)
        return
    if not clean:
        logger.warning(
            "%s: tar has no end-of-archive block (truncated); dropping its last record %r",
            info.uri,
            key,
        )
    elif key is not None:
        yield _tar_record(key, parts, info.uri)


def _iter_raw(
    info: ShardInfo, unit: int, storage: Any | None, columns: list[str] | None
) -> Iterator[Record | BadRecord]:
    if info.format == "webdataset":
        yield from _iter_tar(info, storage)
        return
    fs, path = st.filesystem(info.uri, storage)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            cols = [c for c in columns if c in names] if columns else None
            table = pf.read_row_group(unit, columns=cols)
    except Exception as e:  # noqa: BLE001 (any read error loses this unit only)
        logger.warning("%s: row group %d unreadable (%s)", info.uri, unit, e)
        return
    yield from table.to_pylist()


def iter_unit(
    info: ShardInfo, unit: int, storage: Any | None = None, columns: list[str] | None = None
) -> Iterator[Record | BadRecord]:
    """Records of one read unit: Parquet row group ``unit``, or the whole tar (``unit`` 0).

    Exactly ``info.row_groups[unit]`` records are accounted for: a truncated unit ends with
    one ``BadRecord(reason="unreadable", count=missing)``, so stream positions stay fixed.

    Args:
        info: the shard, from ``list_shards``.
        unit: row-group index (0 for a tar).
        storage: ``cfg.storage`` or None.
        columns: Parquet columns to read (None = all); tars always carry every field.
    """
    expected, seen = info.row_groups[unit], 0
    for item in _iter_raw(info, unit, storage, columns):
        n = item.count if isinstance(item, BadRecord) else 1
        if seen + n > expected:
            logger.warning(
                "%s: unit %d has more records than listed (%d); the rest is "
                "ignored until the shard set is listed again",
                info.uri,
                unit,
                expected,
            )
            return
        seen += n
        yield item
    if seen < expected:
        yield BadRecord(
            f"{info.uri}#{unit}",
            "unreadable",
            f"{info.uri}: unit {unit} truncated",
            expected - seen,
        )


def iter_records(
    uri: str, storage: Any | None = None, format: str = "auto"
) -> Iterator[Record | BadRecord]:
    """Every record of a shard set, in shard and row-group order (no shuffling)."""
    for info in list_shards(uri, storage, format).shards:
        for unit in range(len(info.row_groups)):
            yield from iter_unit(info, unit, storage)
