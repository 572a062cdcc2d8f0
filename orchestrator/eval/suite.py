"""The evaluation suite on a checkpoint or on the released TIPS weights (``tips eval``).

Python API: ``run_eval(model, tasks, data, options, out_dir)``; the command line is
orchestrator/cli/eval.py; periodic evaluation during training: ``evaluate_during_training``.

Output: ``out_dir/results.json`` (settings, per-task results and flat
``eval/<task>/<metric>`` keys), ``out_dir/results.md``, and ``out_dir/<task>.png`` for each
dense task (a few images: truth vs prediction).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.eval.loader import Encoders, LoadError, load_encoders
from orchestrator.eval.options import EvalOptions
from orchestrator.eval.periodic import PERIODIC_TASKS, evaluate_during_training
from orchestrator.eval.plots import save_examples_figure
from orchestrator.eval.readers import EvalDataset, open_dataset
from orchestrator.eval.result import EvalResult, write_results
from orchestrator.eval.runtime import eval_mode, pick_device
from orchestrator.eval.tasks import ALL_TASKS, DENSE_TASKS, get_task

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_TASKS",
    "PERIODIC_TASKS",
    "EvalRequest",
    "evaluate_during_training",
    "run_eval",
]


@dataclass
class EvalRequest:
    """What ``tips eval`` was asked to do (everything but the task settings)."""

    checkpoint: str | None = None
    released: str | None = None
    which: str = "student"
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    data: dict[str, str] = field(default_factory=dict)
    out: str = "eval_results"
    device: str | None = None

    @property
    def model_spec(self) -> str:
        return f"released={self.released}" if self.released else str(self.checkpoint)


TEXT_TASKS = ("zero_shot_cls", "retrieval", "zero_shot_seg")
VISION_TASKS = ("linear_seg", "depth", "knn")


def run_eval(
    model: Encoders | str,
    tasks: Sequence[str] = ALL_TASKS,
    data: Mapping[str, str | EvalDataset] | None = None,
    options: EvalOptions | None = None,
    out_dir: str | Path | None = None,
    device: str | None = None,
    which: str = "student",
) -> list[EvalResult]:
    """Evaluate a model on the given tasks.

    Args:
        model: loaded ``Encoders``, or a spec for ``load_encoders`` (checkpoint URI or
            ``released=...``).
        tasks: task names, in the order to run.
        data: task -> dataset spec or an ``EvalDataset``; missing tasks use "synthetic".
        options: task settings (default ``EvalOptions()``).
        out_dir: where to write results.json, results.md and the dense-task PNGs; None
            writes nothing.
        device: "cpu", "cuda", ...; default CUDA when available.
        which: "student" or "teacher" (checkpoints of full-EMA runs).

    Returns:
        One EvalResult per task.

    Raises:
        ValueError: unknown task or bad option. LoadError / ReaderError: see their messages.
    """
    opts = options or EvalOptions()
    opts.check()
    modules = [get_task(t) for t in tasks]  # unknown names fail before any loading
    enc = load_encoders(model, which=which) if isinstance(model, str) else model
    enc.to(pick_device(device))
    text_tasks = [m.TASK for m in modules if m.TASK in TEXT_TASKS]
    if enc.text is None and text_tasks:
        raise LoadError(
            f"{enc.source or 'model'} has no text tower (a vision-only objective such as mug): "
            f"tasks {text_tasks} need one; run {[t for t in VISION_TASKS if t in tasks]} instead"
        )
    datasets: dict[tuple[str, str], EvalDataset] = {}
    results = []
    with eval_mode(enc.vision, enc.text):
        for task in modules:
            spec = (data or {}).get(task.TASK, "synthetic")
            if isinstance(spec, EvalDataset):
                ds = spec
            else:
                key = (spec, "any" if spec == "synthetic" else task.KIND)
                if key not in datasets:
                    datasets[key] = open_dataset(spec, task.KIND)
                ds = datasets[key]
            t0 = time.perf_counter()
            result = task.run(enc, ds, opts)
            result.extra["seconds"] = round(time.perf_counter() - t0, 3)
            logger.info("%s on %s: %s", task.TASK, ds.name, result.metrics)
            results.append(result)
    if out_dir is not None:
        settings = {
            "options": dataclasses.asdict(opts),
            "tasks": list(tasks),
            "data": {k: v if isinstance(v, str) else v.name for k, v in (data or {}).items()},
        }
        for r in results:
            if r.task in DENSE_TASKS:
                figure = save_examples_figure(r, Path(out_dir) / f"{r.task}.png")
                if figure is not None:
                    r.extra["figure"] = figure.name
        write_results(results, out_dir, enc.source, settings)
    return results
