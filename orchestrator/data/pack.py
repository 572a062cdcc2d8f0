"""Packing images with their texts into shards, and counting what a shard set holds.

    pack(images, out, captions=JSONL | coco=JSON, ...) -> (written, skipped counts)
    inspect_shards(uri, storage, format, decode) -> report dict

``pack`` reads a folder of images plus a JSONL of ``{"file", "alt_text", "captions",
["key", "regions", "meta"]}`` (``captions`` a list of ``{kind, text}`` or a ``{kind: text}``
map), or a COCO captions JSON (the first caption becomes the alt-text, all of them captions
of ``coco_kind``); it skips and counts entries with a missing or undecodable image, no text,
a malformed line or a duplicate key. ``inspect_shards`` counts shards, rows, bytes, caption
kinds and the records that fail to read or decode. The command line is ``tips data``
(orchestrator/cli/data.py).
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
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


def _progress(total: int | None, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rec", file=sys.stderr, disable=None)


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
