"""The Ray Data training stream: read -> decode -> multi-crop -> mask -> captions -> tokens.

    ds = build_dataset(cfg, patch_size=p, epoch=e, skip_samples=n, required_keys=keys)
    ds = build_train_stream(cfg, patch_size=p, start_sample=s, num_samples=k, required_keys=keys)
    for batch in ds.iter_torch_batches(batch_size=B): ...   # docs/design.md, "Batch contract"

Batch contract: ``global_crops [B, G, 3, H, W]`` uint8, ``local_crops [B, M, 3, h, w]`` uint8
(omitted when M = 0), ``masks [B, G, H/p, W/p]`` bool, ``alt_ids`` / ``syn_ids [B, T]``
int64, ``syn_kind [B]`` int64 (index into the sorted configured caption kinds), and for
CLOC ``regions [B, R, 4]`` float32 xyxy in global crop 0's frame, ``region_ids [B, R, T]``
int64, ``region_valid [B, R]`` bool (``R = objective.max_regions``); only the
``required_keys`` are made. Every row also carries ``sample_index`` and ``epoch`` (int64) and
the ``STAT_COLUMNS`` counters; no string column reaches ``iter_torch_batches``.

The stream (its plan: ``StreamPlan``, orchestrator/data/plan.py). Shards are listed once
(``plan_stream``); the read unit is a run of consecutive Parquet row groups of one shard
holding >= ``MIN_UNIT_ROWS`` rows, or a whole tar. Epoch ``e`` visits every unit once, in an
order shuffled by ``(seed, e)`` (``data.shuffle_files``); with
``data.local_shuffle_buffer_size = W > 0`` records are also permuted within windows of W
consecutive records of a unit. An epoch has ``N`` input records, and the stream over all
epochs is indexed by input position ``q = e * N + i``. Ray Data runs ``range(units)`` fused
with one map task per unit (a streaming repartition splits the ids when a long stream has
more units than blocks worth planning): each task re-derives its epoch's order from the seed
and reads its unit itself, so nothing is listed again per epoch, tasks are ~1 s (no
head-of-line blocking under preserve_order) and only uint8 crops cross the object store.

Determinism and exact resume. Every random choice for a record (crops, flips, mask, caption
kind) comes from ``record_rng(seed, epoch, key, stream)``, so a record's output does not
depend on process, batch or order. ``build_dataset(epoch=e, skip_samples=n)`` and
``build_train_stream(start_sample=s)`` rebuild the same seeded order and start at input
position ``e * N + n`` (or ``s``), dropping the skipped records before decoding. With
``DataContext.execution_options.preserve_order`` (the trainer sets it) the rows after a skip
are exactly the tail of the un-skipped stream; without it Ray may interleave task outputs
(faster when one task is slow, but the row order is then not reproducible). Positions count
input records: when records before the resume point were skipped as corrupt, the resumed
stream replays that many records; it never loses any.

Bad data is never fatal and never silent: a record whose image fails to decode
(``skipped_corrupt``), that has no text (``skipped_no_caption``) or that cannot be read
(truncated shard or row group: ``skipped_unreadable``) is dropped and counted on the next row
the same unit emits (the last row takes the unit's remainder); ``caption_fallback`` counts
caption fallbacks (``captions.py``). ``pop_data_stats(batch)`` turns them into the trainer's
``data/<name>`` metrics. A shard that cannot be opened at all is logged by name at build
time and listed in ``StreamPlan.unreadable``.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata

from orchestrator.data.augment import (
    STREAM_CAPTIONS,
    STREAM_CROPS,
    STREAM_MASKS,
    STREAM_REGIONS,
    CropSpec,
    apply_crops,
    crop_regions,
    decode_for_crops,
    record_rng,
)
from orchestrator.data.captions import CaptionSampler, cached_tokenizer, tokenize_pair
from orchestrator.data.plan import StreamPlan, plan_stream, unit_items
from orchestrator.data.shards import BadRecord

if TYPE_CHECKING:
    from orchestrator.config import TipsConfig

logger = logging.getLogger(__name__)

REGION_KEYS = ("regions", "region_ids", "region_valid")  # CLOC; R = objective.max_regions
BATCH_KEYS = (
    "global_crops",
    "local_crops",
    "masks",
    "alt_ids",
    "syn_ids",
    "syn_kind",
    *REGION_KEYS,
)
INDEX_COLUMNS = ("sample_index", "epoch")
SKIP_COLUMNS = ("skipped_corrupt", "skipped_unreadable", "skipped_no_caption")
STAT_COLUMNS = (*SKIP_COLUMNS, "caption_fallback")
_REASON_COLUMN = {"corrupt": "skipped_corrupt", "unreadable": "skipped_unreadable"}
_MAX_BLOCKS = 2000


class UnitIds(ray.data.Datasource):
    """The ids ``0 .. n-1`` in one int64 column ``id``, in order: read task ``k`` makes one
    block of the ``max(1, n // parallelism)`` consecutive ids from ``k * that`` (the last
    task the remainder), i.e. one id per block whenever ``n <= parallelism``. The same tasks
    and blocks as Ray's own range read (``ray.data.range``), which takes no ``num_cpus`` /
    ``resources`` and so would not fuse with the map (see ``_dataset``).
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = int(n)

    def estimate_inmemory_data_size(self) -> int:
        return 8 * self.n

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: ray.data.DataContext | None = None,
    ) -> list[ray.data.ReadTask]:
        size = max(1, self.n // max(1, parallelism))
        schema = pa.schema([("id", pa.int64())])
        tasks = []
        for start in range(0, self.n, size):
            count = min(size, self.n - start)
            meta = BlockMetadata(
                num_rows=count, size_bytes=8 * count, input_files=None, exec_stats=None
            )
            tasks.append(
                ray.data.ReadTask(
                    functools.partial(_unit_id_block, start, count),
                    meta,
                    schema=schema,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


def _unit_id_block(start: int, count: int) -> list[pa.Table]:
    return [pa.table({"id": np.arange(start, start + count, dtype=np.int64)})]


@dataclass(frozen=True)
class RecordSettings:
    """Everything a map task needs to turn records into rows (hashable: cached per worker)."""

    spec: CropSpec
    keys: frozenset[str]
    patch_size: int
    mask: tuple[float, float, float, int, float]  # probability, ratio min/max, min patches, aspect
    caption_ratios: tuple[tuple[str, float], ...]
    tokenizer: tuple[str, str | None, int]  # kind, path, max_len
    map_batch_size: int
    draft: bool
    threads: int
    max_regions: int = 0  # R of the region keys (objective.max_regions)


def record_settings(
    cfg: TipsConfig, patch_size: int, required_keys: set[str] | None
) -> RecordSettings:
    """The per-record settings from the config and the objective's batch keys.

    Raises:
        ValueError: a required key the pipeline cannot make.
    """
    keys = set(BATCH_KEYS if required_keys is None else required_keys)
    unknown = keys - set(BATCH_KEYS)
    if unknown:
        raise ValueError(
            f"the data pipeline cannot make batch keys {sorted(unknown)}; "
            f"it makes {list(BATCH_KEYS)}"
        )
    if cfg.augment.num_local_crops == 0:
        keys.discard("local_crops")  # M = 0: the key is omitted, never [B, 0, ...]
    if "syn_ids" in keys:
        keys.add("syn_kind")
    if keys & set(REGION_KEYS):
        keys.update(REGION_KEYS, {"global_crops"})
    m, model = cfg.masking, cfg.model
    return RecordSettings(
        spec=CropSpec.from_config(cfg.augment),
        keys=frozenset(keys),
        patch_size=int(patch_size),
        mask=(m.mask_probability, m.ratio_min, m.ratio_max, m.min_num_patches, m.min_aspect),
        caption_ratios=tuple(
            sorted((str(k), float(v)) for k, v in cfg.data.caption_ratios.items())
        ),
        tokenizer=(model.tokenizer, model.tokenizer_path, int(model.max_text_len)),
        map_batch_size=int(cfg.data.map_batch_size),
        draft=bool(cfg.data.decode_draft),
        threads=max(1, int(cfg.data.num_cpus_per_map_task)),
        max_regions=int(getattr(cfg.objective, "max_regions", 8)),
    )


def _dataset(
    plan: StreamPlan, settings: RecordSettings, cfg: TipsConfig, preserve_order: bool | None
) -> ray.data.Dataset:
    if plan.stop <= plan.start:
        raise ValueError(f"empty stream: positions [{plan.start}, {plan.stop})")
    first, last = plan.unit_at(plan.start), plan.unit_at(plan.stop - 1)
    count = last - first + 1
    blocks = min(count, cfg.data.read_parallelism or _MAX_BLOCKS)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    if preserve_order is not None:  # a Dataset captures the context at creation
        ctx.execution_options.preserve_order = preserve_order
    try:
        # One unit id per block, so each map task (fused with the range read) reads one unit:
        # short tasks keep preserve_order from serialising the stream. Planning cost grows
        # with the block count, so long streams plan <= 2000 blocks and split them into one
        # id per block with a streaming repartition (its tiny tasks are not fused).
        # The range read asks for the same resources as the map (e.g. {data_node: 0.01},
        # Ray Data on CPU-only data nodes): Ray fuses the two only when they match, and an
        # unfused read would run anywhere.
        placement = {
            "num_cpus": cfg.data.num_cpus_per_map_task,
            "resources": dict(cfg.data.resources_per_map_task) or None,
        }
        ds = ray.data.read_datasource(
            UnitIds(count),
            override_num_blocks=blocks,
            **placement,
        )
        if blocks < count:
            ds = ds.repartition(target_num_rows_per_block=1)
        return ds.map_batches(
            _process_units,
            batch_size=None,
            fn_kwargs={"plan": plan, "settings": settings, "first_unit": first},
            **placement,
        )
    finally:
        ctx.execution_options.preserve_order = saved


def build_dataset(
    cfg: TipsConfig,
    *,
    split: str = "train",
    patch_size: int,
    epoch: int = 0,
    skip_samples: int = 0,
    required_keys: set[str] | None = None,
    preserve_order: bool | None = None,
) -> ray.data.Dataset:
    """One epoch of ``split`` as a lazy Ray Dataset of batch-contract rows.

    Args:
        cfg: the run config (``TipsConfig``).
        split: "train" or "eval".
        patch_size: the vision tower's patch size (mask grid = crop size / patch size).
        epoch: which epoch's seeded order and augmentations.
        skip_samples: input records of this epoch already consumed (exact mid-epoch resume).
        required_keys: the objective's batch keys (None = all of ``BATCH_KEYS``).
        preserve_order: set ``DataContext.execution_options.preserve_order`` for this
            dataset (None = leave the current context as it is).
    """
    plan = plan_stream(cfg, split)
    n = plan.epoch_rows
    plan = plan.with_range(epoch * n + skip_samples, (epoch + 1) * n)
    return _dataset(plan, record_settings(cfg, patch_size, required_keys), cfg, preserve_order)


def build_train_stream(
    cfg: TipsConfig,
    *,
    patch_size: int,
    start_sample: int = 0,
    num_samples: int | None = None,
    required_keys: set[str] | None = None,
    preserve_order: bool | None = None,
) -> ray.data.Dataset:
    """A multi-epoch training stream from input position ``start_sample`` on.

    The stream covers ``num_samples`` positions plus one extra epoch, so records skipped as
    bad never leave the trainer short of rows (it stops at ``train.total_steps``).
    ``num_samples`` None = to the end of the epoch holding ``start_sample``.
    """
    plan = plan_stream(cfg)
    n = plan.epoch_rows
    stop = (start_sample // n + 1) * n if num_samples is None else start_sample + num_samples + n
    plan = plan.with_range(start_sample, stop)
    return _dataset(plan, record_settings(cfg, patch_size, required_keys), cfg, preserve_order)


def pop_data_stats(batch: dict[str, Any]) -> dict[str, float]:
    """Remove the ``STAT_COLUMNS`` from a batch; return ``{"data/<name>": sum}``."""
    return {f"data/{c}": float(batch.pop(c).sum()) for c in STAT_COLUMNS if c in batch}


# --------------------------------------------------------------------------- map task


class RecordProcessor:
    """Per-worker state: tokenizer, mask generator, caption sampler (built once)."""

    def __init__(self, s: RecordSettings) -> None:
        import torch

        from tips_model.masking import BlockMaskGenerator

        torch.set_num_threads(s.threads)
        self.s = s
        self.sampler = CaptionSampler(dict(s.caption_ratios))
        texts = {"alt_ids", "syn_ids", "region_ids"}
        self.tokenizer = cached_tokenizer(*s.tokenizer) if s.keys & texts else None
        grid = s.spec.global_size // s.patch_size
        self.masker = BlockMaskGenerator(
            grid=(grid, grid), min_num_patches=s.mask[3], min_aspect=s.mask[4]
        )
        self.decode = bool(s.keys & {"global_crops", "local_crops"})

    def row(self, rec: dict[str, Any], seed: int, epoch: int) -> tuple[dict[str, Any] | None, str]:
        """One record -> a row dict (texts untokenized) or ``(None, reason)``."""
        from tips_model.masking import sample_mask

        key = str(rec["key"])
        choice = self.sampler.choose(
            rec.get("alt_text"), rec.get("captions"), record_rng(seed, epoch, key, STREAM_CAPTIONS)
        )
        if choice is None:
            return None, "skipped_no_caption"
        out: dict[str, Any] = {
            "alt": choice.alt,
            "syn": choice.syn,
            "syn_kind": choice.kind,
            "caption_fallback": int(choice.fallback),
        }
        if self.decode:
            try:
                rng = record_rng(seed, epoch, key, STREAM_CROPS)
                image, plan, scale = decode_for_crops(rec["image"], self.s.spec, rng, self.s.draft)
                out["global_crops"], out["local_crops"] = apply_crops(
                    image, plan, self.s.spec, scale
                )
            except Exception as e:  # noqa: BLE001 (corrupt image: lose this record only)
                logger.debug("record %s: image does not decode (%s)", key, e)
                return None, "skipped_corrupt"
            if "regions" in self.s.keys:
                rng = record_rng(seed, epoch, key, STREAM_REGIONS)
                out["regions"], out["region_texts"], out["region_valid"] = crop_regions(
                    rec.get("regions"), plan, self.s.max_regions, rng
                )
        if "masks" in self.s.keys:
            rng = record_rng(seed, epoch, key, STREAM_MASKS)
            prob, lo, hi = self.s.mask[:3]
            out["masks"] = np.stack(
                [sample_mask(self.masker, rng, prob, lo, hi) for _ in range(self.s.spec.num_global)]
            )
        return out, ""

    def assemble(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        keys = self.s.keys
        out = {
            c: np.asarray([r[c] for r in rows], dtype=np.int64)
            for c in (*INDEX_COLUMNS, *STAT_COLUMNS)
        }
        for c in ("global_crops", "local_crops", "masks", "regions", "region_valid"):
            if c in keys:
                out[c] = np.stack([r[c] for r in rows])
        if "region_ids" in keys:
            texts = [t for r in rows for t in r["region_texts"]]  # B * R, "" = padding
            ids = np.zeros((len(texts), self.s.tokenizer[2]), dtype=np.int64)
            used = [i for i, t in enumerate(texts) if t]
            if used:
                ids[used] = self.tokenizer([texts[i] for i in used])
            out["region_ids"] = ids.reshape(len(rows), self.s.max_regions, -1)
        if keys & {"alt_ids", "syn_ids"}:
            alt_ids, syn_ids = tokenize_pair(
                self.tokenizer, [r["alt"] for r in rows], [r["syn"] for r in rows]
            )
            if "alt_ids" in keys:
                out["alt_ids"] = alt_ids
            if "syn_ids" in keys:
                out["syn_ids"] = syn_ids
                out["syn_kind"] = np.asarray([r["syn_kind"] for r in rows], dtype=np.int64)
        return out


@functools.lru_cache(maxsize=4)
def record_processor(settings: RecordSettings) -> RecordProcessor:
    """The worker process's processor for ``settings`` (tokenizer etc. built once)."""
    return RecordProcessor(settings)


def _process_units(
    batch: dict[str, np.ndarray], *, plan: StreamPlan, settings: RecordSettings, first_unit: int
) -> Iterator[dict[str, np.ndarray]]:
    """Map task: global unit ids -> batch-contract row batches (see the module doc)."""
    proc = record_processor(settings)
    columns = ["key", "alt_text", "captions"] + (["image"] if proc.decode else [])
    columns += ["regions"] if "regions" in settings.keys else []
    for gid in batch["id"]:
        g = first_unit + int(gid)
        epoch, k = divmod(g, plan.num_units)
        order, offsets = plan.order(epoch)
        unit = int(order[k])
        base = epoch * plan.epoch_rows + int(offsets[k])
        yield from process_unit(proc, plan, unit, epoch, base, columns)


def process_unit(
    proc: RecordProcessor,
    plan: StreamPlan,
    unit: int,
    epoch: int,
    base: int,
    columns: list[str] | None,
) -> Iterator[dict[str, np.ndarray]]:
    """One read unit -> row batches of <= ``map_batch_size`` rows (the map task's body; the
    benchmark's non-Ray baselines call it too).

    Args:
        proc: the worker's ``record_processor(settings)``.
        plan: the stream plan; only positions in ``[plan.start, plan.stop)`` are emitted.
        unit: unit index (into ``plan.unit_rows``).
        epoch: the epoch this visit belongs to.
        base: input position of the unit's first record in this visit.
        columns: Parquet columns to read (None = all).
    """
    pending: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    held: dict[str, np.ndarray] | None = None
    pos = base
    for item, width in unit_items(plan, unit, epoch, plan.storage, columns):
        lo, hi = max(pos, plan.start), min(pos + width, plan.stop)
        pos += width
        if hi <= lo:
            if pos >= plan.stop:
                break
            continue
        if isinstance(item, BadRecord):
            pending[_REASON_COLUMN.get(item.reason, "skipped_unreadable")] += hi - lo
            logger.debug("skipped %d record(s) at %s: %s", hi - lo, item.key, item.detail)
            continue
        row, reason = proc.row(item, plan.seed, epoch)
        if row is None:
            pending[reason] += 1
            continue
        row.update(sample_index=lo, epoch=epoch)
        for c in SKIP_COLUMNS:
            row[c] = pending.pop(c, 0)
        rows.append(row)
        if len(rows) == proc.s.map_batch_size:
            if held is not None:
                yield held
            held, rows = proc.assemble(rows), []
    if rows:
        if held is not None:
            yield held
        held = proc.assemble(rows)
    if held is not None:
        for c, n in pending.items():
            held[c][-1] += n
        yield held
    elif pending:
        info = plan.shards[int(plan.unit_shard[unit])]
        logger.warning(
            "%s unit %d: no usable record; skipped %s (not in batch stats)",
            info.uri,
            int(plan.unit_index[unit]),
            dict(pending),
        )
