"""The training stream in this process, without Ray: for the driver's checks, tests, probes
and benchmarks. Same records, order, crops, masks, captions and tokens as the ordered Ray
stream (``orchestrator/data/pipeline.py``), built from its pieces.

    iter_local_batches(cfg, patch_size, keys, batch_size) -> batch-contract numpy dicts
    scan_for_usable_record(cfg, patch_size, keys) -> (found, skip counts)
    caption_kinds_sample(cfg, limit) -> (records per caption kind, records read)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.data.pipeline import (
    _REASON_COLUMN,
    process_unit,
    record_processor,
    record_settings,
)
from orchestrator.data.plan import plan_stream, unit_items
from orchestrator.data.shards import BadRecord

if TYPE_CHECKING:
    from orchestrator.config import TipsConfig


def iter_local_batches(
    cfg: TipsConfig,
    patch_size: int,
    required_keys: set[str] | None,
    batch_size: int,
    start_sample: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """The training stream without Ray, in this process: the same records, order, crops,
    masks, captions and tokens as the ordered Ray stream (``preserve_order``), cut into
    batches of ``batch_size`` rows (the last partial batch of the stream is never reached:
    epochs follow each other without end). For tests, probes and benchmarks on one core.

    Yields:
        Batch-contract dicts of numpy arrays (plus ``sample_index``, ``epoch`` and the
        ``STAT_COLUMNS``), as ``iter_torch_batches`` would give them before the tensor cast.
    """
    plan = plan_stream(cfg)
    settings = record_settings(cfg, patch_size, required_keys)
    proc = record_processor(settings)
    columns = ["key", "alt_text", "captions"] + (["image"] if proc.decode else [])
    columns += ["regions"] if "regions" in settings.keys else []
    plan = plan.with_range(start_sample, np.iinfo(np.int64).max)
    pending: list[dict[str, np.ndarray]] = []
    rows = 0
    g = plan.unit_at(start_sample)
    while True:
        epoch, k = divmod(g, plan.num_units)
        order, offsets = plan.order(epoch)
        base = epoch * plan.epoch_rows + int(offsets[k])
        for part in process_unit(proc, plan, int(order[k]), epoch, base, columns):
            pending.append(part)
            rows += len(part["sample_index"])
            while rows >= batch_size:
                merged = {c: np.concatenate([p[c] for p in pending]) for c in pending[0]}
                yield {c: v[:batch_size] for c, v in merged.items()}
                rest = {c: v[batch_size:] for c, v in merged.items()}
                rows -= batch_size
                pending = [rest] if rows else []
        g += 1


def scan_for_usable_record(
    cfg: TipsConfig, patch_size: int, required_keys: set[str] | None
) -> tuple[bool, dict[str, int]]:
    """Read the epoch-0 stream on this process until the first record that makes a row.

    For the driver, before any worker starts: a data set with no usable record at all
    (every image corrupt, every caption empty) is refused with the counts. A healthy set
    stops at its first record; only a wholly bad one is read to the end.

    Returns:
        ``(found, counts)``: counts by reason of the records skipped before it.
    """
    plan = plan_stream(cfg)
    proc = record_processor(record_settings(cfg, patch_size, required_keys))
    columns = ["key", "alt_text", "captions"] + (["image"] if proc.decode else [])
    counts: Counter[str] = Counter()
    order, _ = plan.order(0)
    for unit in order:
        for item, width in unit_items(plan, int(unit), 0, plan.storage, columns):
            if isinstance(item, BadRecord):
                counts[_REASON_COLUMN.get(item.reason, "skipped_unreadable")] += width
                continue
            row, reason = proc.row(item, plan.seed, 0)
            if row is not None:
                return True, dict(counts)
            counts[reason] += 1
    if plan.unreadable:  # shards that cannot be opened at all (named in plan_stream's log)
        counts["skipped_unreadable"] += len(plan.unreadable)
    return False, dict(counts)


def caption_kinds_sample(cfg: TipsConfig, limit: int = 256) -> tuple[Counter, int]:
    """Caption kinds among the first ``limit`` readable records of the epoch-0 stream.

    For the driver's check that every kind named in ``data.caption_ratios`` exists in the
    shards: a misspelt or missing kind is never an error while training (the record falls
    back to another kind or to its alt-text, counted as ``caption_fallback``), so without
    this check a typo silently trains the synthetic-caption branch on alt-text.

    Returns:
        ``(records per kind, records read)``.
    """
    plan = plan_stream(cfg)
    kinds: Counter[str] = Counter()
    read = 0
    order, _ = plan.order(0)
    for unit in order:
        for item, _width in unit_items(plan, int(unit), 0, plan.storage, ["captions"]):
            if isinstance(item, BadRecord):
                continue
            read += 1
            kinds.update({c.get("kind") for c in item.get("captions") or [] if c.get("text")})
            if read >= limit:
                return kinds, read
    return kinds, read
