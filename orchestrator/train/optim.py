"""Optimizer and per-step schedules built from the run config.

Every schedule is an array indexed by the global optimizer step (dinov2 / big_vision), so
an elastic restart at any world size resumes at exactly the same lr, EMA momentum and
teacher temperature. Sources: docs/method.md, "Optimizer and schedule" (Adafactor, lr 5e-4,
linear warm-up and decay [paper]) and docs/method.md, "Teacher EMA and schedules" (DINOv2
momentum / teacher-temperature fallbacks [open]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from orchestrator.train.adafactor import Adafactor
from tips_model.objectives.base import Objective
from tips_model.schedules import build_schedule, teacher_temp_schedule

if TYPE_CHECKING:
    from orchestrator.config import TipsConfig


@dataclass(frozen=True)
class Schedules:
    lr: np.ndarray  # [total_steps]
    momentum: np.ndarray  # [total_steps] EMA momentum of the teacher
    teacher_temp: np.ndarray  # [total_steps]

    def at(self, step: int) -> dict[str, float]:
        i = min(max(step, 0), len(self.lr) - 1)
        return {
            "lr": float(self.lr[i]),
            "ema_momentum": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[i]),
        }


def build_schedules(cfg: TipsConfig) -> Schedules:
    total = cfg.train.total_steps
    o, t = cfg.optim, cfg.teacher
    lr = build_schedule(o.lr_schedule, o.lr, o.final_lr, total, min(o.warmup_steps, total), 0.0)
    momentum = build_schedule(
        t.momentum_schedule, t.momentum_start, t.momentum_end, total, 0, t.momentum_start
    )
    temp = teacher_temp_schedule(
        warmup_start=t.temp_warmup_start,
        final=t.temp,
        warmup_steps=min(t.temp_warmup_steps, total),
        total_steps=total,
    )
    return Schedules(lr=lr, momentum=momentum, teacher_temp=temp)


def build_optimizer(objective: Objective, cfg: TipsConfig) -> torch.optim.Optimizer:
    """Adafactor (the paper's choice) or AdamW over the objective's parameter groups.

    Build it after ``orchestrator.train.parallel.wrap_for_distributed``: FSDP replaces the
    parameters with sharded ones. AdamW is elementwise, so torch's runs on shards as is;
    Adafactor factors whole matrices, so ``orchestrator.train.adafactor.Adafactor`` (torch's, plus
    a step that is exact on shards) is used.
    """
    o = cfg.optim
    groups = objective.param_groups(o.weight_decay)
    groups = [g for g in groups if g["params"]]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
    return Adafactor(groups, lr=o.lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
