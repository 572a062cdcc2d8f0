"""The evaluation suite: tasks, metrics, dataset readers, results and plots.

``tips eval`` is orchestrator/cli/eval.py over ``run_eval`` in orchestrator/eval/suite.py; periodic
evaluation during training is ``evaluate_during_training`` (``periodic.py``). One module per
task (``zero_shot_cls``, ``retrieval``, ``zero_shot_seg``, ``linear_seg``, ``depth``,
``knn``), each ``run(encoders, dataset, options) -> EvalResult``.
"""

from __future__ import annotations

from orchestrator.eval.loader import Encoders, LoadError, encoders_from_objective, load_encoders
from orchestrator.eval.options import EvalOptions
from orchestrator.eval.periodic import PERIODIC_TASKS, evaluate_during_training
from orchestrator.eval.readers import EvalDataset, ReaderError, Split, open_dataset
from orchestrator.eval.result import EvalResult, flat_metrics, format_table
from orchestrator.eval.tasks import ALL_TASKS, DENSE_TASKS, TASKS, get_task

__all__ = [
    "ALL_TASKS",
    "DENSE_TASKS",
    "PERIODIC_TASKS",
    "TASKS",
    "Encoders",
    "EvalDataset",
    "EvalOptions",
    "EvalResult",
    "LoadError",
    "ReaderError",
    "Split",
    "encoders_from_objective",
    "evaluate_during_training",
    "flat_metrics",
    "format_table",
    "get_task",
    "load_encoders",
    "open_dataset",
]
