"""`tips data synth|pack|inspect`: make, convert and check shard sets (local or s3://).

    tips data synth --out URI --n N --seed S [--image-size P] [--format parquet|webdataset]
                    [--shard-size K] [--n-eval M] [--overwrite]
    tips data pack --images DIR (--captions FILE.jsonl | --coco FILE.json) --out URI
                   [--shard-size N] [--format parquet|webdataset] [--coco-kind short]
    tips data inspect URI [--format auto|parquet|webdataset] [--no-decode] [--json]
    every verb: [--endpoint-url URL] [--region R]   (else AWS_ENDPOINT_URL / AWS_REGION)

``synth`` writes ``URI/train`` and ``URI/eval`` (synthetic.py). ``pack`` reads a folder of
images plus a JSONL of ``{"file", "alt_text", "captions", ["key", "regions", "meta"]}``
(``captions`` a list of ``{kind, text}`` or a ``{kind: text}`` map), or a COCO captions JSON
(the first caption becomes the alt-text, all of them captions of ``--coco-kind``); it skips
and counts entries with a missing or undecodable image, no text, a malformed line or a
duplicate key, and prints the summary. ``inspect`` counts shards, rows, bytes, caption kinds
and the records that fail to read or decode.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from PIL import Image

from orchestrator import storage as st
from orchestrator.data.shards import (
    BadRecord,
    ShardError,
    ShardWriter,
    iter_unit,
    list_shards,
)


def _storage(args: argparse.Namespace) -> Any:
    return SimpleNamespace(endpoint_url=args.endpoint_url, region=args.region)


def _progress(total: int | None, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rec", file=sys.stderr, disable=None)


# --------------------------------------------------------------------------- synth


def run_synth(args: argparse.Namespace) -> int:
    from orchestrator.data.synthetic import write_synthetic

    n_eval = args.n_eval if args.n_eval is not None else max(16, args.n // 8)
    with _progress(args.n + n_eval, "synth") as bar:
        written = write_synthetic(
            args.out,
            args.n,
            args.seed,
            image_size=args.image_size,
            format=args.format,
            shard_size=args.shard_size,
            n_eval=n_eval,
            storage=_storage(args),
            overwrite=args.overwrite,
            progress=bar.update,
        )
    for split, shards in written.items():
        rows = sum(s.num_rows for s in shards)
        print(
            f"{split}: {rows} records in {len(shards)} {args.format} shards at "
            f"{st.join_uri(st.normalize_uri(args.out), split)}"
        )
    return 0


# --------------------------------------------------------------------------- pack


def _key(key: str | None, file: str) -> str:
    """The given key, else the file path without its extension; [A-Za-z0-9_-] only."""
    if not key:
        key = file.rsplit(".", 1)[0] if "." in file.rsplit("/", 1)[-1] else file
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def _captions(value: Any) -> list[dict[str, str]]:
    if isinstance(value, dict):
        return [{"kind": str(k), "text": str(v)} for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(c, dict) and "text" in c for c in value):
        return [{"kind": str(c.get("kind", "default")), "text": str(c["text"])} for c in value]
    raise ValueError("captions must be a list of {kind, text} or a {kind: text} map")


def _jsonl_entries(path: str, storage: Any, skipped: Counter) -> Iterator[dict[str, Any]]:
    for n, line in enumerate(st.read_text(path, storage).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            yield {
                "file": str(row["file"]),
                "key": row.get("key"),
                "alt_text": str(row.get("alt_text") or ""),
                "captions": _captions(row.get("captions") or []),
                "regions": row.get("regions") or [],
                "meta": row.get("meta"),
            }
        except (ValueError, KeyError, TypeError) as e:
            skipped["bad_line"] += 1
            print(f"pack: {path}:{n}: skipped ({e})", file=sys.stderr)


def _coco_entries(path: str, storage: Any, kind: str, skipped: Counter) -> list[dict[str, Any]]:
    doc = json.loads(st.read_text(path, storage))
    texts: dict[Any, list[str]] = {}
    for ann in sorted(doc.get("annotations", []), key=lambda a: a.get("id", 0)):
        if str(ann.get("caption") or "").strip():
            texts.setdefault(ann["image_id"], []).append(str(ann["caption"]).strip())
    entries = []
    for img in doc.get("images", []):
        caps = texts.get(img["id"], [])
        if not caps:
            skipped["no_text"] += 1
            continue
        entries.append(
            {
                "file": img["file_name"],
                "key": None,
                "alt_text": caps[0],
                "captions": [{"kind": kind, "text": c} for c in caps],
                "regions": [],
                "meta": json.dumps({"coco_id": img["id"]}),
            }
        )
    return entries


def pack(
    images: str,
    out: str,
    *,
    captions: str | None = None,
    coco: str | None = None,
    shard_size: int = 1000,
    format: str = "parquet",
    coco_kind: str = "short",
    storage: Any | None = None,
    overwrite: bool = False,
) -> tuple[int, Counter]:
    """Pack a folder of images with JSONL or COCO captions into shards.

    Returns:
        ``(records written, skipped reason -> count)``.
    """
    skipped: Counter = Counter()
    if (captions is None) == (coco is None):
        raise ValueError("pack needs exactly one of --captions FILE.jsonl or --coco FILE.json")
    entries = (
        list(_jsonl_entries(captions, storage, skipped))
        if captions
        else _coco_entries(coco, storage, coco_kind, skipped)
    )
    seen: set[str] = set()
    written = 0
    with (
        ShardWriter(
            out, format=format, shard_size=shard_size, storage=storage, overwrite=overwrite
        ) as writer,
        _progress(len(entries), "pack") as bar,
    ):
        for e in entries:
            bar.update(1)
            key = _key(e["key"], e["file"])
            if key in seen:
                skipped["duplicate_key"] += 1
                continue
            if not e["alt_text"].strip() and not any(c["text"].strip() for c in e["captions"]):
                skipped["no_text"] += 1
                continue
            try:
                data = st.read_bytes(st.join_uri(images, e["file"]), storage)
            except (FileNotFoundError, OSError):
                skipped["missing_image"] += 1
                continue
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except Exception:  # noqa: BLE001 (any decode failure: skip and count)
                skipped["corrupt_image"] += 1
                continue
            try:
                writer.write({**e, "key": key, "image": data})
            except ShardError:
                skipped["bad_fields"] += 1
                continue
            seen.add(key)
            written += 1
    return written, skipped


def run_pack(args: argparse.Namespace) -> int:
    written, skipped = pack(
        args.images,
        args.out,
        captions=args.captions,
        coco=args.coco,
        shard_size=args.shard_size,
        format=args.format,
        coco_kind=args.coco_kind,
        storage=_storage(args),
        overwrite=args.overwrite,
    )
    total = sum(skipped.values())
    detail = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
    print(f"packed {written} records into {st.normalize_uri(args.out)}; skipped {total} ({detail})")
    return 0 if written else 1


# --------------------------------------------------------------------------- inspect


def inspect_shards(
    uri: str, storage: Any | None = None, format: str = "auto", decode: bool = True
) -> dict[str, Any]:
    """Counts over a shard set: shards, rows, bytes, caption kinds, failures."""
    listing = list_shards(uri, storage, format)
    report: dict[str, Any] = {
        "uri": st.normalize_uri(uri),
        "shards": len(listing.shards),
        "formats": dict(Counter(s.format for s in listing.shards)),
        "bytes": sum(s.size for s in listing.shards),
        "rows": listing.num_rows,
        "unreadable_shards": [u for u, _ in listing.unreadable],
    }
    kinds: Counter = Counter()
    counts: Counter = Counter()
    for info in listing.shards:
        for unit in range(len(info.row_groups)):
            for rec in iter_unit(info, unit, storage):
                if isinstance(rec, BadRecord):
                    counts[f"{rec.reason}_records"] += rec.count
                    continue
                counts["readable_records"] += 1
                counts["image_bytes"] += len(rec.get("image") or b"")
                kinds.update(c.get("kind") for c in rec.get("captions") or [])
                if not (rec.get("alt_text") or "").strip():
                    counts["empty_alt_text"] += 1
                if decode:
                    try:
                        with Image.open(io.BytesIO(rec["image"])) as im:
                            im.load()
                    except Exception:  # noqa: BLE001
                        counts["decode_failures"] += 1
    for name in (
        "readable_records",
        "image_bytes",
        "unreadable_records",
        "corrupt_records",
        "empty_alt_text",
        "decode_failures",
    ):
        report[name] = counts.get(name, 0)
    report["caption_kinds"] = dict(sorted(kinds.items()))
    return report


def run_inspect(args: argparse.Namespace) -> int:
    report = inspect_shards(args.uri, _storage(args), args.format, decode=not args.no_decode)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for name, value in report.items():
        print(f"{name:>20}: {value}")
    return 0


# --------------------------------------------------------------------------- argv


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tips data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("synth", help="write the synthetic spatial data set")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--n-eval", type=int, default=None)
    k = sub.add_parser("pack", help="pack images + captions into shards")
    k.add_argument("--images", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--captions", help="JSONL of {file, alt_text, captions}")
    k.add_argument("--coco", help="COCO-style captions JSON")
    k.add_argument("--coco-kind", default="short")
    for q in (s, k):
        q.add_argument("--format", choices=("parquet", "webdataset"), default="parquet")
        q.add_argument("--shard-size", type=int, default=1000 if q is k else 256)
        q.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("inspect", help="count shards, rows, kinds and bad records")
    i.add_argument("uri")
    i.add_argument("--format", choices=("auto", "parquet", "webdataset"), default="auto")
    i.add_argument("--no-decode", action="store_true")
    i.add_argument("--json", action="store_true")
    for q in (s, k, i):
        q.add_argument("--endpoint-url", default=None)
        q.add_argument("--region", default=None)
    return p


def main_data(argv: list[str]) -> int:
    """Entry point of ``tips data ...``; returns the process exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    try:
        return {"synth": run_synth, "pack": run_pack, "inspect": run_inspect}[args.verb](args)
    except (ShardError, ValueError, FileNotFoundError) as e:
        print(f"tips data {args.verb}: {e}", file=sys.stderr)
        return 2
