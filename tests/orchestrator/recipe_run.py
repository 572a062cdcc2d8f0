"""A recipe's optimizer steps in this process, without Ray: what the worker loop does per
step (``orchestrator/train/loop.py``: forward, backward, clip, last-layer freeze, lr, optimizer,
EMA teacher; the interval meter and the collapse monitor at the log cadence) on the same
stream the Ray pipeline makes (``iter_local_batches``). One torch thread, so the numbers
do not depend on the machine's core count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from orchestrator import config as config_lib
from orchestrator.data.local import iter_local_batches
from orchestrator.data.pipeline import pop_data_stats
from orchestrator.recipes import RECIPES_DIR
from orchestrator.train.metrics import IntervalMeter, collapse_monitor
from orchestrator.train.optim import build_optimizer, build_schedules, set_lr
from tips_model.objectives import StepState, build_objective
from tips_model.tokenizer import build_tokenizer

RECIPES = RECIPES_DIR


@dataclass
class RecipeRun:
    losses: list[dict[str, float]] = field(default_factory=list)  # per step: terms + total
    metrics: list[dict[str, float]] = field(default_factory=list)  # per step: diagnostics
    logged: list[dict[str, float]] = field(default_factory=list)  # per log interval
    warnings: list[str] = field(default_factory=list)


def run_recipe(recipe: str, data_uri: str, overrides: list[str], steps: int) -> RecipeRun:
    cfg = config_lib.load(
        RECIPES / recipe, [f"data.train_uri={data_uri}", f"train.total_steps={steps}", *overrides]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg, steps)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Any, steps: int) -> RecipeRun:
    tok = build_tokenizer(cfg.model.tokenizer, cfg.model.tokenizer_path, cfg.model.max_text_len)
    torch.manual_seed(cfg.train.seed)
    objective = build_objective(cfg.objective, cfg.model, tok.vocab_size)
    optimizer = build_optimizer(objective, cfg)
    schedules = build_schedules(cfg)
    monitor = collapse_monitor(cfg)
    stream = iter_local_batches(
        cfg,
        config_lib.patch_size(cfg.model),
        objective.required_batch_keys(),
        cfg.train.global_batch_size,
    )
    run, meter = RecipeRun(), IntervalMeter()
    for step in range(steps):
        batch = next(stream)
        pop_data_stats(batch)
        batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
        sched = schedules.at(step)
        state = StepState(step=step, teacher_temp=sched["teacher_temp"], progress=step / steps)
        out = objective(batch, state)
        out.loss.backward()
        if cfg.optim.grad_clip_norm > 0:
            params = list(objective.student.parameters())
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip_norm)
        if step < cfg.optim.freeze_last_layer_steps:
            for name, p in objective.student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        set_lr(optimizer, sched["lr"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.update_teacher(sched["ema_momentum"])
        run.losses.append(
            {**{k: float(v) for k, v in out.losses.items()}, "total": float(out.loss)}
        )
        run.metrics.append({k: float(v) for k, v in out.metrics.items()})
        meter.add("loss", {**out.losses, "total": out.loss.detach()})
        meter.add("metric", out.metrics)
        if (step + 1) % cfg.train.log_every_steps == 0:
            logged = {**meter.pop(), "train/step": step + 1}
            warning = monitor.update(logged) if monitor is not None else None
            if warning:
                run.warnings.append(warning)
            run.logged.append(logged)
    return run
