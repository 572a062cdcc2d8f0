"""Adafactor step cost: ours (sync-free, shape-grouped) vs its per-parameter form vs torch's.

    .venv/bin/python benchmarks/adafactor_step.py                          # tips_b14, CPU
    .venv/bin/python benchmarks/adafactor_step.py --device cuda --steps 20 # on a GPU

Builds the recipe's objective (default ``tips_b14``: ViT-B/14 + text_b + the
65536-prototype heads, ~250M trained parameters), gives every parameter a fixed random
gradient, and times ``optimizer.step()`` of four optimizers in one run, interleaved:

* baseline: ``torch.optim.Adafactor(foreach=True)`` (what the recipes used before);
* ``torch.optim.Adafactor(foreach=False)``;
* ours per parameter: ``orchestrator.train.adafactor.Adafactor`` with the loop over
  parameters it had before its step was grouped (``PerParameterAdafactor`` below);
* ours: ``orchestrator.train.adafactor.Adafactor`` (same-shape parameters stacked, the rest
  as ``torch._foreach_*`` ops).

Per step it counts with ``torch.profiler`` the ops launched from Python (``aten::`` ops not
inside another ``aten::`` op: on a GPU each launches one kernel or a few, so a step made of
many small ops is launch-bound) and the host reads of a tensor value
(``aten::_local_scalar_dense``; on a GPU each is a sync that drains the launch queue).
On the CPU the time column says little about a GPU (no launch cost, no syncs to wait on);
the counts carry over. Prints a table with ratios against the baseline.
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
from orchestrator.train.adafactor import Adafactor, _init_state  # noqa: E402
from tips_model.objectives import build_objective  # noqa: E402
from tips_model.tokenizer import build_tokenizer  # noqa: E402


class PerParameterAdafactor(Adafactor):
    """Our Adafactor with its step as it was before grouping: kernels per parameter."""

    def _device_step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, d, wd = float(group["lr"]), group["d"], group["weight_decay"]
            eps1, eps2 = group["eps"]
            states = [_init_state(self.state[p], p, sharded=False) for p in params]
            for st in states:
                st["step"] += 1
            steps = [float(st["step"]) for st in states]
            p_norms = torch._foreach_norm(params)
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            updates = []
            for p, st, s in zip(params, states, steps):
                updates.append(_one_update(p.grad, st, s ** group["beta2_decay"], eps1, p))
            u_norms = torch._foreach_norm(updates)
            dev = params[0].device
            sqrt_n = torch.tensor([p.numel() ** 0.5 for p in params], dtype=torch.float64)
            rho = torch.tensor([min(lr, 1 / s**0.5) for s in steps], dtype=torch.float64)
            sqrt_n, rho = sqrt_n.to(dev), rho.to(dev)
            alpha = (torch.stack(p_norms).double() / sqrt_n).clamp_(min=eps2) * rho
            denom = (torch.stack(u_norms).double() / (sqrt_n * d)).clamp_(min=1.0)
            scale = (alpha / denom).neg_().to(updates[0].dtype)
            torch._foreach_mul_(updates, list(scale.unbind(0)))
            torch._foreach_add_(params, updates)


def _one_update(g: torch.Tensor, st: dict, omb: float, eps1: float | None, p) -> torch.Tensor:
    """One parameter's update direction, as the per-parameter step computed it."""
    e1 = eps1 if eps1 is not None else torch.finfo(p.dtype).eps
    if g.dim() > 1:
        row_var, col_var = st["row_var"], st["col_var"]
        row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_()
        row_var.lerp_(row_mean.div_(g.size(-1)), omb)
        col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True).square_()
        col_var.lerp_(col_mean.div_(g.size(-2)), omb)
        var = row_var @ col_var
        var.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=e1))
    else:
        st["variance"].lerp_(g * g, omb)
        var = st["variance"].clone()
    return var.clamp_(min=e1 * e1).rsqrt_().mul_(g)


def launched(prof: profile) -> int:
    """``aten::`` ops called from Python (not from inside another ``aten::`` op)."""
    n = 0
    for e in prof.events():
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        n += e.name.startswith("aten::") and parent is None
    return n


def fresh(groups: list[dict]) -> list[dict]:
    """Copies of the parameter groups: an optimizer writes its defaults (``foreach``...)
    into the dicts it is given, which the next optimizer would otherwise inherit."""
    return [dict(g) for g in groups]


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
            fresh(groups), lr=cfg.optim.lr, foreach=True
        ),
        "torch Adafactor, single-tensor": torch.optim.Adafactor(
            fresh(groups), lr=cfg.optim.lr, foreach=False
        ),
        "ours, per parameter (before grouping)": PerParameterAdafactor(
            fresh(groups), lr=cfg.optim.lr
        ),
        "ours (orchestrator.train.adafactor)": Adafactor(fresh(groups), lr=cfg.optim.lr),
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
        reads = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
        counts[name] = (launched(prof), reads)
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
    print("| optimizer | ms/step | ratio vs baseline | ops launched/step | host reads/step |")
    print("|---|---:|---:|---:|---:|")
    base = best[next(iter(opts))]
    for name in opts:
        ms, ratio = best[name] * 1e3, best[name] / base
        ops, reads = counts[name]
        print(f"| {name} | {ms:.1f} | {ratio:.2f} | {ops} | {reads} |")


if __name__ == "__main__":
    main()
