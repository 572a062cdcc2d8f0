"""The stream plan: which records a training stream reads, in which order (pipeline.py runs it).

    plan = plan_stream(cfg)                       # list the shards once, fix the unit order
    plan.with_range(start, stop)                  # the input positions of one stream
    order, offsets = plan.order(epoch)            # units in visiting order, first positions
    for item, width in unit_items(plan, unit, epoch, storage, columns): ...

The read unit is a run of consecutive Parquet row groups of one shard holding >=
``MIN_UNIT_ROWS`` rows, or a whole tar. Epoch ``e`` visits every unit once, in an order
shuffled by ``(seed, e)`` (``data.shuffle_files``); with ``data.local_shuffle_buffer_size =
W > 0`` records are also permuted within windows of W consecutive records of a unit. An epoch
has ``N`` input records, and the stream over all epochs is indexed by input position
``q = e * N + i``. Everything here is derived from the seed, so a map task re-derives its
epoch's order itself and nothing is listed again per epoch (orchestrator/data/pipeline.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator import storage as st
from orchestrator.data.shards import BadRecord, ShardError, ShardInfo, iter_unit, list_shards

if TYPE_CHECKING:
    from orchestrator.config import TipsConfig

logger = logging.getLogger(__name__)

# A map task reads one unit: consecutive row groups of a shard holding >= this many rows.
# Ray Data loses ~0.1 s of a CPU slot between two tasks (its scheduling loop), so tasks
# should run ~1 s: 256 rows x ~4 ms (1x224 + 6x98 crops of a ~500x400 JPEG). Measured on
# 2 cores: 32-row tasks 0.5x, 256-row tasks 0.9x of a torch DataLoader (benchmarks/).
MIN_UNIT_ROWS = 256


@dataclass(frozen=True)
class StreamPlan:
    """The seeded unit order of every epoch and the input-position range of one stream."""

    shards: tuple[ShardInfo, ...]
    unit_shard: np.ndarray  # [U] shard index of each unit
    unit_index: np.ndarray  # [U] first row group of the unit inside its shard
    unit_groups: np.ndarray  # [U] consecutive row groups in the unit
    unit_rows: np.ndarray  # [U] records per unit
    seed: int
    shuffle: bool
    local_shuffle: int
    start: int  # first input position (inclusive)
    stop: int  # last input position (exclusive)
    storage: st.S3Settings
    unreadable: tuple[tuple[str, str], ...] = ()

    @property
    def epoch_rows(self) -> int:
        return int(self.unit_rows.sum())

    @property
    def num_units(self) -> int:
        return len(self.unit_rows)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(units in visiting order [U], their first position within the epoch [U])``."""
        cache = self._orders
        if epoch not in cache:
            if len(cache) >= 4:
                cache.clear()
            cache[epoch] = _epoch_order(self.seed, self.shuffle, epoch, self.unit_rows)
        return cache[epoch]

    @functools.cached_property
    def _orders(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {}  # per-instance cache (cached_property writes __dict__: fine when frozen)

    def with_range(self, start: int, stop: int) -> StreamPlan:
        return dataclasses.replace(self, start=int(start), stop=int(stop))

    def unit_at(self, position: int) -> int:
        """Global unit index (``epoch * U + k``) of the unit holding input ``position``."""
        epoch, within = divmod(position, self.epoch_rows)
        _, offsets = self.order(epoch)
        k = int(np.searchsorted(offsets, within, side="right")) - 1
        return epoch * self.num_units + k


def _epoch_order(
    seed: int, shuffle: bool, epoch: int, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    order = np.arange(len(rows))
    if shuffle:
        order = np.random.default_rng([seed % 2**63, epoch, 0x5EED]).permutation(len(rows))
    offsets = np.concatenate([[0], np.cumsum(rows[order])[:-1]]).astype(np.int64)
    return order, offsets


def _group_units(shard: int, groups: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Consecutive row groups of one shard, >= ``MIN_UNIT_ROWS`` each (shard end: fewer).

    Returns:
        ``(shard, first row group, number of row groups, rows)`` per unit.
    """
    units, first, rows = [], 0, 0
    for g, n in enumerate(groups):
        rows += n
        if rows >= MIN_UNIT_ROWS or g == len(groups) - 1:
            if rows:
                units.append((shard, first, g + 1 - first, rows))
            first, rows = g + 1, 0
    return units


def plan_stream(cfg: TipsConfig, split: str = "train") -> StreamPlan:
    """List the shards of ``split`` once and fix the seeded unit order (positions: epoch 0).

    Args:
        cfg: the run config.
        split: "train" (``data.train_uri``) or "eval" (``data.eval_uri``, never shuffled).

    Raises:
        ShardError: no readable record, or a shard with the wrong schema.
    """
    uri = cfg.data.train_uri if split == "train" else cfg.data.eval_uri
    if not uri:
        raise ShardError(f"data.{split}_uri is not set")
    uri = st.normalize_uri(uri)
    listing = list_shards(uri, cfg.storage, cfg.data.format)
    shards = tuple(s for s in listing.shards if s.num_rows > 0)
    if not shards:
        raise ShardError(f"{uri}: no readable records (unreadable shards: {listing.unreadable})")
    units = [u for i, s in enumerate(shards) for u in _group_units(i, s.row_groups)]
    unit_shard, unit_index, unit_groups, unit_rows = (
        np.asarray(c, dtype=np.int64) for c in zip(*units)
    )
    total = int(unit_rows.sum())
    logger.info(
        "%s: %d shards, %d read units, %d records per epoch%s",
        uri,
        len(shards),
        len(unit_rows),
        total,
        f"; {len(listing.unreadable)} unreadable shards" if listing.unreadable else "",
    )
    return StreamPlan(
        shards=shards,
        unit_shard=unit_shard,
        unit_index=unit_index,
        unit_groups=unit_groups,
        unit_rows=unit_rows,
        seed=int(cfg.data.seed),
        shuffle=bool(cfg.data.shuffle_files) and split == "train",
        local_shuffle=int(cfg.data.local_shuffle_buffer_size) if split == "train" else 0,
        start=0,
        stop=total,
        storage=st.s3_settings(cfg.storage),
        unreadable=tuple(listing.unreadable),
    )


def unit_items(
    plan: StreamPlan, unit: int, epoch: int, storage: Any, columns: list[str] | None
) -> Iterator[tuple[Any, int]]:
    """``(item, width)`` of one unit in stream order (windows permuted when configured)."""
    info = plan.shards[int(plan.unit_shard[unit])]
    first = int(plan.unit_index[unit])
    items = (
        item
        for g in range(first, first + int(plan.unit_groups[unit]))
        for item in iter_unit(info, g, storage, columns)
    )
    w = plan.local_shuffle
    if w <= 0:
        for item in items:
            yield item, item.count if isinstance(item, BadRecord) else 1
        return
    window: list[Any] = []
    total, seen = int(plan.unit_rows[unit]), 0
    for n, item in enumerate(items, 1):
        window.append(item)
        seen += item.count if isinstance(item, BadRecord) else 1
        if len(window) == w or seen >= total:
            rng = np.random.default_rng([plan.seed % 2**63, epoch, unit, n, 0x5BF])
            for j in rng.permutation(len(window)):
                it = window[j]
                yield it, it.count if isinstance(it, BadRecord) else 1
            window = []
    for it in window:
        yield it, it.count if isinstance(it, BadRecord) else 1
