"""Metric namespacing, interval averaging, throughput meters and the rank-0 log line.

Keys are flat and namespaced (docs/design.md, "Metric keys"): ``loss/<term>`` (unweighted),
``weight/<term>``, ``sched/lr``, ``sched/ema_momentum``, ``sched/teacher_temp``,
``data/samples_seen``, ``data/skipped_<reason>``, ``perf/samples_per_s``,
``perf/data_wait_frac``, ``train/step``.
Metrics leave a worker only through ``ray.train.report``; rank 0 also prints a progress
line and writes TensorBoard event files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from orchestrator.config import TipsConfig

logger = logging.getLogger(__name__)


class IntervalMeter:
    """Averages scalar tensors over a logging interval on their device; ``pop`` (at log
    steps) is the only host read."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int | torch.Tensor] = defaultdict(int)

    def add(
        self, prefix: str, values: dict[str, torch.Tensor], keep: bool | torch.Tensor = True
    ) -> None:
        """Add one step's values; ``keep`` False (a bool, or a 0-d bool device tensor, so
        no read) leaves this step out of the averages, e.g. a skipped non-finite step."""
        for k, v in values.items():
            key = f"{prefix}/{k}"
            v = v.detach().float()
            if isinstance(keep, torch.Tensor):
                v = torch.where(keep, v, 0.0)
                self._counts[key] = self._counts[key] + keep.float()
            elif keep:
                self._counts[key] += 1
            else:
                continue
            self._sums[key] = self._sums[key] + v if key in self._sums else v.clone()

    def pop(self) -> dict[str, float]:
        """The interval's means (NaN for a value every step of it left out); resets."""
        out = {k: _mean(v, self._counts[k]) for k, v in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return out


def _mean(total: torch.Tensor, count: int | torch.Tensor) -> float:
    n = float(count)
    return float(total) / n if n > 0 else math.nan


class Throughput:
    """Samples/s and the fraction of wall time spent waiting for data in an interval."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._samples = 0
        self._wait = 0.0

    def data_wait(self, seconds: float) -> None:
        self._wait += seconds

    def samples(self, n: int) -> None:
        self._samples += n

    def pop(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self._t0, 1e-9)
        out = {"perf/samples_per_s": self._samples / dt, "perf/data_wait_frac": self._wait / dt}
        self.reset()
        return out


def progress_line(metrics: dict[str, Any], total_steps: int) -> str:
    step = int(metrics.get("train/step", 0))
    parts = [f"step {step}/{total_steps}", f"loss {metrics.get('loss/total', float('nan')):.4f}"]
    for k in sorted(metrics):
        if k.startswith("loss/") and k != "loss/total":
            parts.append(f"{k[5:]} {metrics[k]:.4f}")
    for term in ("dino", "ibot"):  # teacher target entropy (log K = uniform = collapse)
        if f"metric/{term}/entropy" in metrics:
            parts.append(f"{term} target H {metrics[f'metric/{term}/entropy']:.2f}")
    parts.append(f"lr {metrics.get('sched/lr', 0):.2e}")
    skipped = sum(v for k, v in metrics.items() if k.startswith("data/skipped_"))
    if skipped:  # cumulative since the start of the run
        parts.append(f"skipped {int(skipped)} records")
    parts.append(f"{metrics.get('perf/samples_per_s', 0):.1f} samples/s")
    parts.append(f"data wait {100 * metrics.get('perf/data_wait_frac', 0):.0f}%")
    return " | ".join(parts)


class TensorBoardWriter:
    """Rank-0 TensorBoard scalars; a no-op when disabled or the directory is not local."""

    def __init__(self, log_dir: str | None) -> None:
        self._writer = None
        if log_dir and "://" not in log_dir:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=log_dir)
            logger.info("TensorBoard event files: %s", log_dir)

    def write(self, metrics: dict[str, Any], step: int) -> None:
        if self._writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, int | float):
                self._writer.add_scalar(k, v, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MetricsHistory:
    """Rank-0 ``metrics.jsonl`` in the run directory: one JSON line per report, appended, so a
    resumed run continues the same file (``tips train`` prints its loss curve from it)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path and "://" not in path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def drop_after(self, step: int) -> None:
        """Forget the rows after ``step`` (a resume replays them): one row per step."""
        if self.path is None or not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and int(json.loads(line).get("train/step", 0)) <= step
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(self.path)

    def write(self, metrics: dict[str, Any]) -> None:
        if self.path is None:
            return
        row = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if isinstance(metrics.get("warning"), str):
            row["warning"] = metrics["warning"]
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_history(path: str | Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.jsonl``; a later row for a step replaces an earlier one (a
    restart replays the steps after its checkpoint)."""
    rows: dict[int, dict[str, float]] = {}
    p = Path(path)
    if not p.is_file():
        return []
    for line in p.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row.get("train/step", len(rows)))] = row
    return [rows[k] for k in sorted(rows)]


class CollapseMonitor:
    """Watches the self-distillation targets and warns when they collapse (one line).

    Reads the objective's ``metric/<term>/entropy`` (mean per-row entropy of the teacher
    targets) and ``metric/<term>/mean_entropy`` (entropy of the batch-mean target) for the
    terms ``dino`` and ``ibot`` (``tips_model.losses.target_stats``), averaged over a logging
    interval. After ``after_step`` (the warm-ups), a term whose targets are

    * near-uniform: entropy >= ``uniform_frac`` * log K (the student is taught nothing), or
    * near-one-hot on one prototype: mean_entropy <= ``onehot_frac`` * log K (every image
      gets the same target),

    for ``patience`` intervals in a row gets one warning (again only after it recovered), and
    every interval sets ``collapse/<term>``: 0 healthy, 1 near-uniform, 2 near-one-hot.
    Objectives without these metrics (CLOC, MUG, alpha = beta = 0) are left alone.
    """

    TERMS = ("dino", "ibot")
    UNIFORM, ONE_HOT = 1, 2

    def __init__(
        self,
        num_prototypes: int,
        after_step: int,
        patience: int = 2,
        uniform_frac: float = 0.95,
        onehot_frac: float = 0.1,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.log_k = math.log(max(num_prototypes, 2))
        self.after_step = after_step
        self.patience = max(1, patience)
        self.uniform_frac, self.onehot_frac = uniform_frac, onehot_frac
        self.settings = settings or {}
        self._streak: dict[str, int] = defaultdict(int)
        self._last: dict[str, int] = {}
        self._warned: dict[str, int] = {}

    def _state(self, metrics: dict[str, Any], term: str) -> int | None:
        ent = metrics.get(f"metric/{term}/entropy")
        mean_ent = metrics.get(f"metric/{term}/mean_entropy")
        if ent is None or mean_ent is None:
            return None
        if ent >= self.uniform_frac * self.log_k:
            return self.UNIFORM
        if mean_ent <= self.onehot_frac * self.log_k:
            return self.ONE_HOT
        return 0

    def update(self, metrics: dict[str, Any]) -> str | None:
        """Add ``collapse/<term>`` to ``metrics``; return a warning line or None."""
        step = int(metrics.get("train/step", 0))
        lines = []
        for term in self.TERMS:
            state = self._state(metrics, term)
            if state is None:
                continue
            metrics[f"collapse/{term}"] = float(state)
            if step <= self.after_step or state == 0:
                self._streak[term] = 0
                self._last.pop(term, None)
                self._warned.pop(term, None)
                continue
            same = self._last.get(term) == state
            self._streak[term] = self._streak[term] + 1 if same else 1
            self._last[term] = state
            if self._streak[term] >= self.patience and self._warned.get(term) != state:
                self._warned[term] = state
                lines.append(self._message(term, state, metrics, step))
        return " ".join(lines) if lines else None

    def _message(self, term: str, state: int, metrics: dict[str, Any], step: int) -> str:
        s = self.settings
        ent = metrics[f"metric/{term}/entropy"]
        mean_ent = metrics[f"metric/{term}/mean_entropy"]
        spread = metrics.get(f"metric/{term}/logit_spread", float("nan"))
        name = {"dino": "DINO", "ibot": "iBOT"}[term]
        if state == self.UNIFORM:
            return (
                f"collapse: {name} teacher targets near-uniform at step {step} (entropy "
                f"{ent:.2f} of log K {self.log_k:.2f}, logit spread {spread:.2f} teacher "
                f"temperatures); usual causes: unnormalised pixels on a small model "
                f"(model.input_norm={s.get('input_norm')}), a teacher temperature above the "
                f"teacher's logit spread (teacher.temp={s.get('teacher_temp')}), an EMA that "
                f"freezes the teacher early (teacher.momentum_end={s.get('momentum_end')})"
            )
        return (
            f"collapse: {name} teacher targets near-one-hot at step {step} (batch-mean target "
            f"entropy {mean_ent:.2f} of log K {self.log_k:.2f}: every image gets the same "
            f"prototype); usual causes: a teacher temperature too low "
            f"(teacher.temp={s.get('teacher_temp')}), centring too slow "
            f"(objective.center_momentum={s.get('center_momentum')}), an EMA teacher that "
            f"follows the student too fast (teacher.momentum_start={s.get('momentum_start')}), "
            f"a learning rate too high (optim.lr={s.get('lr')})"
        )


def collapse_monitor(cfg: TipsConfig) -> CollapseMonitor | None:
    """The monitor for a run config, or None when the objective has no distillation head."""
    o = cfg.objective
    k = getattr(o, "head_out_dim", None)
    if (
        cfg.train.collapse_patience <= 0
        or not k
        or (getattr(o, "alpha", 0) <= 0 and getattr(o, "beta", 0) <= 0)
    ):
        return None
    t = cfg.teacher
    return CollapseMonitor(
        num_prototypes=int(k),
        after_step=max(int(t.temp_warmup_steps), int(cfg.optim.warmup_steps)),
        patience=int(cfg.train.collapse_patience),
        settings={
            "input_norm": cfg.model.input_norm,
            "teacher_temp": t.temp,
            "momentum_start": t.momentum_start,
            "momentum_end": t.momentum_end,
            "center_momentum": getattr(o, "center_momentum", None),
            "lr": cfg.optim.lr,
        },
    )
