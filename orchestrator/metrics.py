"""Metric namespacing, interval averaging, throughput meters and the rank-0 log line.

Keys are flat and namespaced (STYLE.md 4): ``loss/<term>`` (unweighted), ``weight/<term>``,
``sched/lr``, ``sched/ema_momentum``, ``sched/teacher_temp``, ``data/samples_seen``,
``data/skipped_<reason>``, ``perf/samples_per_s``, ``perf/data_wait_frac``, ``train/step``.
Metrics leave a worker only through ``ray.train.report``; rank 0 also prints a progress
line and writes TensorBoard event files.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class IntervalMeter:
    """Averages scalar tensors over a logging interval, syncing to the host once."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, prefix: str, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            key = f"{prefix}/{k}"
            v = v.detach().float()
            self._sums[key] = self._sums[key] + v if key in self._sums else v.clone()
            self._counts[key] += 1

    def pop(self) -> dict[str, float]:
        out = {k: float(v) / self._counts[k] for k, v in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return out


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
    parts.append(f"lr {metrics.get('sched/lr', 0):.2e}")
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

    def write(self, metrics: dict[str, Any]) -> None:
        if self.path is None:
            return
        row = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
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
