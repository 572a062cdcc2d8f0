"""Ray Train overhead: steps/s of our worker loop under Ray Train vs a plain PyTorch loop.

    .venv/bin/python benchmarks/train_overhead.py [--steps 300] [--rounds 2] [--recipe PATH]

Both sides run the same tiny TIPS objective (the recipe's model and objective) on the same
pre-made batches (the batch contract, random uint8 pixels and token ids), in one run on the
same machine:

* baseline: a plain loop in this process: forward, backward, clip, AdamW/Adafactor, EMA;
* ray: ``orchestrator.train.driver.build_trainer`` with 1 worker and the recipe's defaults
  (resources per worker, torch threads, log cadence), fed from a materialised Ray Dataset
  of the same rows, so data cost is the same small constant on both sides.

Prints a table: steady-state steps/s of each and their ratio (target >= 0.95), and the
seconds from ``fit()`` to the first completed step (target <= 8 s; the worker's
``time/first_step_unix``). Steady state skips the first ``--warmup`` steps on both sides. A
second plain row runs with the worker's torch thread count, to separate what threads cost
from what Ray costs. Rounds are interleaved and each row keeps its best, because the two
cores are shared with whatever else runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]


def make_rows(cfg, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    a, p = cfg.augment, 8
    g, gl, m, ll = a.num_global_crops, a.global_crop_size, a.num_local_crops, a.local_crop_size
    t = cfg.model.max_text_len
    rows = []
    for i in range(n):
        ids = rng.integers(1, 1000, size=t)
        ids[t // 2 :] = 0
        rows.append({
            "global_crops": rng.integers(0, 256, (g, 3, gl, gl), dtype=np.uint8),
            "local_crops": rng.integers(0, 256, (m, 3, ll, ll), dtype=np.uint8),
            "masks": rng.random((g, gl // p, gl // p)) < 0.3,
            "alt_ids": ids.astype(np.int64),
            "syn_ids": np.roll(ids, 1).astype(np.int64),
            "syn_kind": np.int64(0),
            "sample_index": np.int64(i),
        })  # fmt: skip
    return rows


def plain_loop(cfg, rows, steps: int, warmup: int) -> float:
    from orchestrator.train.optim import build_optimizer, build_schedules, set_lr
    from tips_model.objectives import StepState, build_objective
    from tips_model.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.model.tokenizer, cfg.model.tokenizer_path, cfg.model.max_text_len)
    torch.manual_seed(0)
    obj = build_objective(cfg.objective, cfg.model, tok.vocab_size)
    opt = build_optimizer(obj, cfg)
    sched = build_schedules(cfg)
    b = cfg.train.global_batch_size
    keys = ("global_crops", "local_crops", "masks", "alt_ids", "syn_ids")
    batches = [
        {k: torch.from_numpy(np.stack([r[k] for r in rows[i : i + b]])) for k in keys}
        for i in range(0, len(rows) - b + 1, b)
    ]
    t0 = 0.0
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        s = sched.at(step)
        out = obj(
            batches[step % len(batches)], StepState(step=step, teacher_temp=s["teacher_temp"])
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(obj.student.parameters(), cfg.optim.grad_clip_norm)
        set_lr(opt, s["lr"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.update_teacher(s["ema_momentum"])
        float(out.loss)  # the loop logs the loss: sync like the Ray side does
    return (steps - warmup) / (time.perf_counter() - t0)


def ray_loop(cfg, rows, steps: int, warmup: int) -> tuple[float, float]:
    import ray
    import ray.data

    from orchestrator.train.driver import absolutize, build_trainer, metrics_path
    from orchestrator.train.metrics import read_history

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    repeats = -(-steps * cfg.train.global_batch_size // len(rows)) + 1
    ds = ray.data.from_items(rows * repeats).materialize()
    cfg = absolutize(cfg)
    trainer = build_trainer(cfg, train_dataset=ds)
    t_fit = time.time()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    hist = read_history(metrics_path(cfg))
    first = hist[0]["time/first_step_unix"] - t_fit
    by_step = {int(r["train/step"]): r["time/unix"] for r in hist}
    steps = sorted(by_step)
    start = min(s for s in steps if s >= warmup)
    rate = (steps[-1] - start) / (by_step[steps[-1]] - by_step[start])
    return rate, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="tiny_cpu", help="a packaged recipe name or a YAML path")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best kept")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for both sides")
    args = ap.parse_args()

    from orchestrator import config as config_lib
    from orchestrator.recipes import find_recipe
    from orchestrator.train.loop import _threads

    def load(round_: int):
        runs = tempfile.mkdtemp(prefix="tips-bench-")
        return config_lib.load(
            find_recipe(args.recipe),
            [
                f"data.train_uri={runs}/unused",
                f"run.storage_uri={runs}",
                f"run.name=overhead-{round_}",  # a fresh run: the same name would resume
                f"train.total_steps={args.steps}",
                f"train.checkpoint_every_steps={args.steps}",
                "train.eval_every_steps=0",
                "run.tensorboard=false",
                *args.overrides,
            ],
        )

    cfg = load(0)
    rows = make_rows(cfg, n=cfg.train.global_batch_size * 8)
    threads_here, threads_worker = torch.get_num_threads(), _threads(cfg)
    best = {"plain": 0.0, "plain_w": 0.0, "ray": 0.0}
    firsts = []
    for round_ in range(args.rounds):
        best["plain"] = max(best["plain"], plain_loop(cfg, rows, args.steps, args.warmup))
        torch.set_num_threads(threads_worker)
        best["plain_w"] = max(best["plain_w"], plain_loop(cfg, rows, args.steps, args.warmup))
        torch.set_num_threads(threads_here)
        rate, first = ray_loop(load(round_ + 1), rows, args.steps, args.warmup)
        best["ray"] = max(best["ray"], rate)
        firsts.append(first)
    base = best["plain"]
    print()
    print(
        f"recipe {Path(args.recipe).name}, {args.steps} steps (first {args.warmup} excluded), "
        f"global batch {cfg.train.global_batch_size}, best of {args.rounds} interleaved rounds"
    )
    print("| run | steps/s | ratio vs plain | fit() -> first step (s) |")
    print("|---|---|---|---|")
    plain = f"plain PyTorch loop, one process, {threads_here} torch threads"
    print(f"| {plain} | {base:.2f} | 1.00 | - |")
    print(
        f"| plain loop, {threads_worker} torch thread(s) (the worker's) | {best['plain_w']:.2f} | "
        f"{best['plain_w'] / base:.2f} | - |"
    )
    print(
        f"| Ray Train, 1 worker (recipe defaults) | {best['ray']:.2f} | {best['ray'] / base:.2f} "
        f"| {min(firsts):.1f} |"
    )


if __name__ == "__main__":
    main()
