"""Data throughput: images/s delivered as ready batches (1x224 + 6x98 crops, masks, tokens).

    .venv/bin/python benchmarks/data_throughput.py [--images 2048] [--cpus 2] [--rounds 3]

One run, one process tree, the same cores, on Parquet shards of real-size JPEGs (about
500x400, made from scikit-image's bundled photos: cropped, resized, flipped, re-encoded;
2048 images = ~96 MB in shards of 256 images with 32-row row groups, read as 256-row units):

(a) decode only, one plain process (PIL, full size);
(b) decode + multi-crop + masks + captions + tokens, one plain process: the per-core ceiling
    (the pipeline's own per-unit code, no Ray);
(c) a torch DataLoader with ``--cpus`` workers running the same code over the same units;
(d) our Ray Data pipeline (``build_train_stream``, preserve_order on, as the trainer runs
    it), on ``ray.init(num_cpus=--cpus)``; (d') the same with preserve_order off.
(c) and (d) stream 2 epochs; "epoch 1" includes start-up (for (d) in round 1: Ray workers
importing torch and the tokenizer), "epoch 2" is steady state. All settings run in
``--rounds`` interleaved rounds and each row keeps its best, because the cores are shared
with other work and a single pass mostly measures the neighbours.

Ratios printed: each row / (c) epoch 2, and each row / ((b) x cpus). Issue 3 target: (d)
epoch 2 >= 1.0x (c) and >= 0.9x (b) x cores. Not a test: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import config as config_lib  # noqa: E402
from orchestrator.data import pipeline  # noqa: E402
from orchestrator.data.shards import BadRecord, ShardWriter, iter_unit, list_shards  # noqa: E402

PATCH = 14
COLUMNS = ["key", "alt_text", "captions", "image"]  # what the pipeline reads


# --------------------------------------------------------------------------- corpus


def _sources() -> list[np.ndarray]:
    import skimage.data as d

    out = []
    for name in (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "colorwheel",
        "camera",
        "brick",
        "grass",
        "gravel",
    ):
        img = getattr(d, name)()
        out.append(np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3])
    left, right, _ = d.stereo_motorcycle()
    return out + [left, right]


def make_corpus(out: Path, n: int, seed: int = 0) -> str:
    """``n`` JPEGs of about 500x400 in Parquet shards (reused when already there)."""
    from PIL import Image

    uri = str(out / f"jpeg{n}")
    try:
        if list_shards(uri).num_rows == n:
            return uri
    except Exception:  # noqa: BLE001 (not there yet)
        pass
    rng = np.random.default_rng(seed)
    sources = _sources()
    with ShardWriter(uri, shard_size=256, row_group_size=32, overwrite=True) as writer:
        for i in range(n):
            src = sources[i % len(sources)]
            h, w = src.shape[:2]
            ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            im = Image.fromarray(src[y : y + ch, x : x + cw])
            im = im.resize(
                (int(rng.integers(470, 530)), int(rng.integers(370, 430))), Image.BICUBIC
            )
            if rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=int(rng.integers(85, 93)))
            writer.write(
                {
                    "key": f"img-{i:06d}",
                    "image": buf.getvalue(),
                    "alt_text": f"photo {i} from the web",
                    "captions": [
                        {"kind": "short", "text": f"a photo of thing {i % 14}"},
                        {
                            "kind": "long",
                            "text": f"a detailed photo of thing {i % 14} "
                            "with its surroundings, colours and textures described",
                        },
                    ],
                }
            )
    return uri


# --------------------------------------------------------------------------- settings


def _config(uri: str, batch: int, cpus_per_task: float) -> Any:
    return config_lib.load(
        None,
        [
            f"data.train_uri={uri}",
            f"data.map_batch_size={batch}",
            f"data.num_cpus_per_map_task={cpus_per_task}",
            "data.seed=0",
        ],
    )


def _records(plan: pipeline.StreamPlan, units: list[int]):
    for u in units:
        info = plan.shards[int(plan.unit_shard[u])]
        for rec in iter_unit(info, int(plan.unit_index[u])):
            if not isinstance(rec, BadRecord):
                yield rec


# --------------------------------------------------------------------------- settings (a)-(d)


def bench_decode(plan: pipeline.StreamPlan) -> float:
    from PIL import Image

    n, t0 = 0, time.perf_counter()
    for rec in _records(plan, list(range(plan.num_units))):
        with Image.open(io.BytesIO(rec["image"])) as im:
            im.convert("RGB").load()
        n += 1
    return n / (time.perf_counter() - t0)


def bench_single(plan: pipeline.StreamPlan, settings: pipeline.RecordSettings) -> float:
    proc = pipeline.record_processor(settings)
    n, t0 = 0, time.perf_counter()
    order, offsets = plan.order(0)
    for k, unit in enumerate(order):
        for batch in pipeline.process_unit(proc, plan, int(unit), 0, int(offsets[k]), COLUMNS):
            n += len(batch["sample_index"])
    return n / (time.perf_counter() - t0)


def _epoch_rates(batches, n_epoch: int, epochs: int) -> list[float]:
    """Images/s of each epoch, from the row count of an iterator of batches."""
    marks, n, t0 = [], 0, time.perf_counter()
    for batch in batches:
        n += len(batch["sample_index"])
        while len(marks) < epochs and n >= (len(marks) + 1) * n_epoch:
            marks.append(time.perf_counter())
        if len(marks) == epochs:
            break
    times = np.diff([t0, *marks])
    return [n_epoch / t for t in times]


class _UnitStream:
    """torch IterableDataset body: worker w runs units w, w+W, ... of each epoch's order."""

    def __init__(self, plan: pipeline.StreamPlan, settings, epochs: int) -> None:
        self.plan, self.settings, self.epochs = plan, settings, epochs

    def __iter__(self):
        import torch.utils.data as tud

        info = tud.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        proc = pipeline.record_processor(self.settings)
        for epoch in range(self.epochs):
            order, offsets = self.plan.order(epoch)
            for k in range(wid, len(order), nw):
                base = epoch * self.plan.epoch_rows + int(offsets[k])
                unit = int(order[k])
                yield from pipeline.process_unit(proc, self.plan, unit, epoch, base, COLUMNS)


def bench_dataloader(plan, settings, workers: int, epochs: int) -> list[float]:
    import torch.utils.data as tud

    class _DS(_UnitStream, tud.IterableDataset):
        pass

    loader = tud.DataLoader(
        _DS(plan, settings, epochs), batch_size=None, num_workers=workers, prefetch_factor=4
    )
    return _epoch_rates(iter(loader), plan.epoch_rows, epochs)


def bench_ray(cfg: Any, batch: int, epochs: int, preserve_order: bool) -> list[float]:
    n_epoch = pipeline.plan_stream(cfg).epoch_rows
    # num_samples=(E-1)N: the stream ends after exactly E epochs (it adds one of slack)
    ds = pipeline.build_train_stream(
        cfg,
        patch_size=PATCH,
        start_sample=0,
        num_samples=(epochs - 1) * n_epoch,
        preserve_order=preserve_order,
    )
    batches = ds.iter_torch_batches(batch_size=batch, prefetch_batches=2)
    return _epoch_rates(batches, n_epoch, epochs)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best of each")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "tips-bench"))
    args = p.parse_args(argv)
    import ray
    import torch

    torch.set_num_threads(1)
    uri = make_corpus(Path(args.out), args.images)
    listing = list_shards(uri)
    mb = sum(s.size for s in listing.shards) / 2**20
    print(
        f"corpus: {listing.num_rows} JPEGs, {mb:.0f} MB, {len(listing.shards)} shards, "
        f"{sum(len(s.row_groups) for s in listing.shards)} row groups; cpus={args.cpus}",
        flush=True,
    )
    cfg = _config(uri, 32, 1.0)
    plan = pipeline.plan_stream(cfg).with_range(0, 2**62)  # (b), (c): any epoch
    settings = pipeline.record_settings(cfg, PATCH, None)
    ray.init(
        num_cpus=args.cpus, include_dashboard=False, object_store_memory=2**30, log_to_driver=False
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    c, d, d2 = (f"(c) DataLoader, {args.cpus} workers", "(d) Ray Data", "(d') Ray Data, no order")
    rows: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        rows[name] = max(rows.get(name, 0.0), value)

    for r in range(args.rounds):  # interleaved rounds, best of each: the cores are shared
        keep("(a) decode only, 1 process", bench_decode(plan))
        keep("(b) decode+crops+masks+tokens, 1 process", bench_single(plan, settings))
        dl = bench_dataloader(plan, settings, args.cpus, 2)
        ray_rates = {o: bench_ray(cfg, args.batch_size, 2, o) for o in (True, False)}
        if r == 0:  # epoch 1 of the first round: cold worker start-up included
            rows[f"{c}, epoch 1"] = dl[0]
            rows[f"{d}, epoch 1 (cold start)"] = ray_rates[True][0]
            rows[f"{d2}, epoch 1"] = ray_rates[False][0]
        if r > 0 or args.rounds == 1:  # round 1's epoch 2 may drain what ran ahead at start
            keep(f"{c}, epoch 2", dl[1])
            keep(f"{d}, epoch 2", ray_rates[True][1])
            keep(f"{d2}, epoch 2", ray_rates[False][1])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in rows.items()), flush=True)
    ray.shutdown()
    ref_c = rows[f"{c}, epoch 2"]
    ref_b = rows["(b) decode+crops+masks+tokens, 1 process"] * args.cpus
    print(f"\n| setting | img/s | / (c) epoch 2 | / ((b) x {args.cpus}) |")
    print("|---|---:|---:|---:|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.0f} | {rate / ref_c:.2f} | {rate / ref_b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
