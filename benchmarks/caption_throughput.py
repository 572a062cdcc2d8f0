"""Images/s of `tips data caption` (Ray Data actor pool) against a plain single-process loop.

Both caption the same shards with the same tiny, randomly initialised VisionEncoderDecoder
(tests/orchestrator/data/test_caption.py ``save_tiny_ved``, made wider with ``--width``)
and do the same work per shard: read, decode, caption, write a new shard. The loop runs in
this process with torch's default threads; the job runs ``--concurrency`` actors of
``--num-cpus`` CPUs each on a local Ray started beforehand (its start-up is not counted;
the actors' start, which imports transformers and loads the model, is).

    HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/caption_throughput.py \
        [--images 256] [--shard-size 32] [--batch-size 16] [--concurrency 2] [--width 32]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.data.caption import (  # noqa: E402
    CaptionModel,
    add_captions,
    caption_images,
    caption_shards,
    caption_spec,
)
from orchestrator.data.ingest import publish_shard  # noqa: E402
from orchestrator.data.shards import BadRecord, ShardWriter, iter_unit, list_shards  # noqa: E402


def make_shards(uri: str, n: int, shard_size: int, size: int = 96) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(uri, shard_size=shard_size, row_group_size=16) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
            w.write({"key": f"k{i:06d}", "image": buf.getvalue(), "alt_text": f"alt {i}"})


def plain_loop(src: str, out: str, model_dir: str, spec, batch_size: int) -> float:
    """The single-process baseline: returns seconds (model load included)."""
    start = time.perf_counter()
    model = CaptionModel(model_dir, spec, device="cpu")
    entry = {"model": model_dir, "prompt": spec.prompt}
    for info in list_shards(src).shards:
        records = [
            r
            for u in range(len(info.row_groups))
            for r in iter_unit(info, u, None)
            if not isinstance(r, BadRecord)
        ]
        texts: list[str] = []
        for i in range(0, len(records), batch_size):
            chunk = [r["image"] for r in records[i : i + batch_size]]
            texts += caption_images(model, chunk)[0]
        captioned = [add_captions(r, spec.kind, t, entry) if t else r
                     for r, t in zip(records, texts, strict=True)]  # fmt: skip
        name = info.uri.rsplit("/", 1)[-1]
        publish_shard(captioned, f"{out}/{name}", format=info.format,
                      row_group_size=info.row_groups[0])  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--width", type=int, default=32, help="hidden size of the tiny model")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    from tests.orchestrator.data.test_caption import save_tiny_ved

    tmp = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    model_dir = str(save_tiny_ved(tmp / "model", width=args.width))
    src = str(tmp / "src")
    make_shards(src, args.images, args.shard_size)
    spec = caption_spec("short", max_new_tokens=args.max_new_tokens)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False

    loop_s = plain_loop(src, str(tmp / "loop"), model_dir, spec, args.batch_size)
    start = time.perf_counter()
    report = caption_shards(
        src, str(tmp / "ray"), model=model_dir, spec=spec, batch_size=args.batch_size,
        concurrency=args.concurrency, num_cpus=args.num_cpus,
    )  # fmt: skip
    ray_s = time.perf_counter() - start
    assert report.written == args.images, report.summary()  # random weights: some captions empty
    ray.shutdown()
    n = args.images
    print(f"\n{n} images of 96x96 in {n // args.shard_size} shards, tiny VisionEncoderDecoder "
          f"width {args.width}, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")  # fmt: skip
    print(f"{'path':<44} {'seconds':>8} {'images/s':>9}")
    print(f"{'plain loop (1 process, torch threads ' + str(torch.get_num_threads()) + ')':<44} "
          f"{loop_s:8.1f} {n / loop_s:9.1f}")  # fmt: skip
    label = f"Ray Data ({args.concurrency} actors x {args.num_cpus:g} CPU)"
    print(f"{label:<44} {ray_s:8.1f} {n / ray_s:9.1f}")
    print(f"{'ratio (Ray Data / loop)':<44} {'':>8} {loop_s / ray_s:8.2f}x")


if __name__ == "__main__":
    main()
