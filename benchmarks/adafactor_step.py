"""Adafactor step cost: ours (sync-free, shape-stacked) vs torch's, on a recipe's parameters.

    .venv/bin/python benchmarks/adafactor_step.py                          # tips_b14, CPU
    .venv/bin/python benchmarks/adafactor_step.py --device cuda --steps 20 # on a GPU

Builds the recipe's objective (default ``tips_b14``: ViT-B/14 + text_b + the
65536-prototype heads, ~250M trained parameters), gives every parameter a fixed random
gradient, and times ``optimizer.step()`` of three optimizers in one run, interleaved:

* baseline: ``torch.optim.Adafactor(foreach=True)`` (what the recipes used before);
* ``torch.optim.Adafactor(foreach=False)``;
* ours: ``orchestrator.train.adafactor.Adafactor``.

Besides ms/step it counts, per step, with ``torch.profiler``, the host reads of a tensor
value (``aten::_local_scalar_dense``; on a GPU each is a sync that drains the launch queue).
On the CPU the time column says little about a GPU (no launch cost, no syncs to wait on);
the count carries over. Prints a table with ratios against the baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import config as config_lib  # noqa: E402
from orchestrator.recipes import find_recipe  # noqa: E402
from orchestrator.train.adafactor import Adafactor  # noqa: E402
from tips_model.objectives import build_objective  # noqa: E402
from tips_model.tokenizer import build_tokenizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="tips_b14", help="a packaged recipe name or a YAML path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = config_lib.load(
        find_recipe(args.recipe),
        ["data.train_uri=/unused", "model.tokenizer=bpe", "model.tokenizer_path=null"],
    )
    torch.manual_seed(0)
    vocab = build_tokenizer("bpe", max_len=cfg.model.max_text_len).vocab_size
    objective = build_objective(cfg.objective, cfg.model, vocab).to(device)
    groups = [g for g in objective.param_groups(cfg.optim.weight_decay) if g["params"]]
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    n_params = sum(p.numel() for p in params)
    opts = {
        "torch Adafactor, foreach (baseline)": torch.optim.Adafactor(
            groups, lr=cfg.optim.lr, foreach=True
        ),
        "torch Adafactor, single-tensor": torch.optim.Adafactor(
            groups, lr=cfg.optim.lr, foreach=False
        ),
        "ours (orchestrator.train.adafactor)": Adafactor(groups, lr=cfg.optim.lr),
    }
    best = {name: float("inf") for name in opts}
    counts = {}
    for name, opt in opts.items():  # state initialised, counts taken once
        opt.step()
        sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            opt.step()
            sync(device)
        counts[name] = sum(
            e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense"
        )
    for _ in range(args.rounds):
        for name, opt in opts.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    print()
    print(
        f"{Path(args.recipe).name}: {len(params)} tensors, {n_params / 1e6:.0f}M parameters, "
        f"{device}, torch {torch.__version__}, best of {args.rounds} rounds x {args.steps} steps"
    )
    print("| optimizer | ms/step | ratio vs baseline | host reads/step |")
    print("|---|---:|---:|---:|")
    base = best[next(iter(opts))]
    for name in opts:
        ms, ratio = best[name] * 1e3, best[name] / base
        print(f"| {name} | {ms:.1f} | {ratio:.2f} | {counts[name]} |")


if __name__ == "__main__":
    main()
