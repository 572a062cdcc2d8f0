"""Ops the non-finite step guard launches per step: ``StepGuard`` against a copy and a select
per tensor (issue 22: the guard was launch-bound, ~3 kernels per tensor).

    .venv/bin/python benchmarks/guard_ops.py                  # tips_b14 and tiny_cpu, CPU

For each recipe: the objective (student and EMA teacher) and its optimizer with its state,
built on the CPU as the worker builds them; then one guarded update with a NaN loss
(``begin_step``, ``before_update``, ``keep_if_finite``: everything saved and put back),
profiled with ``torch.profiler``. Counted: aten ops called from Python (no aten op above
them: a ``torch._foreach_*`` op counts once, though on the CPU it runs a loop over its
tensors; on CUDA it launches one multi-tensor kernel per chunk of tensors). The baseline is
the guard's former per-tensor form, written here: ``clone`` before the update, ``copy_`` of
``torch.where(finite, t, saved)`` after it. Both leave every tensor bit-identical (checked).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import top_level_aten  # noqa: E402
from orchestrator import config as config_lib  # noqa: E402
from orchestrator.recipes import find_recipe  # noqa: E402
from orchestrator.train.guard import StepGuard  # noqa: E402
from orchestrator.train.optim import build_optimizer  # noqa: E402
from tips_model.objectives import build_objective  # noqa: E402


def guarded(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What the guard saves: parameters, buffers, the optimizer state on the device."""
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [*module.parameters(), *module.buffers(), *state]


def per_tensor(tensors: list[torch.Tensor], finite: torch.Tensor) -> None:
    """The baseline: a clone, then a select and a copy back, per tensor."""
    pairs = [(t.detach(), t.detach().clone()) for t in tensors]
    with torch.no_grad():
        for t, old in pairs:
            t.copy_(torch.where(finite, t, old))


def step_guard(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    guard = StepGuard(torch.device("cpu"))

    def run() -> None:
        guard.begin_step(module)
        guard.keep_if_finite(guard.before_update(torch.tensor(float("nan")), module, optimizer))

    return run


def top_level_ops(fn: Callable[[], None]) -> int:
    fn()  # the guard makes its views once
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if top_level_aten(e))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["tips_b14", "tiny_cpu"])
    args = ap.parse_args()
    print("| recipe | tensors guarded | per-tensor copy + select (baseline) | StepGuard | ratio |")
    print("|---|---:|---:|---:|---:|")
    for recipe in args.recipes:
        cfg = config_lib.load(
            find_recipe(recipe),
            ["data.train_uri=/unused", "model.tokenizer=bpe", "model.tokenizer_path=null"],
        )
        torch.manual_seed(0)
        module = build_objective(cfg.objective, cfg.model, 1000)
        optimizer = build_optimizer(module, cfg)
        for p in module.student.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # creates the state
        tensors = guarded(module, optimizer)
        before = [t.detach().clone() for t in tensors]
        finite = torch.tensor(False)
        base = top_level_ops(lambda: per_tensor(tensors, finite))  # noqa: B023
        ours = top_level_ops(step_guard(module, optimizer))
        assert all(torch.equal(a, b) for a, b in zip(before, tensors)), "a value changed"
        print(f"| {recipe} | {len(tensors)} | {base} | {ours} | {ours / base:.3f} |")


if __name__ == "__main__":
    main()
