"""Periodic evaluation during training: a few cheap tasks on a small eval split.

Contract: ``evaluate_during_training(vision, text, tokenizer, temperature, eval_uri, tasks,
max_images) -> {"eval/<task>/<metric>": float}`` (flat keys, reported next to the training
metrics for Tune and plots). The towers are put in eval mode and restored to their
previous mode; nothing is drawn or written. ``eval_uri`` None (or "synthetic") is the
built-in synthetic set; otherwise any dataset spec ``tips eval data.<task>=`` accepts
(typically ``DIR/eval`` from ``tips data synth``). Datasets are cached per (spec, kind),
so only the first call reads them. Pass the unwrapped modules (not DDP wrappers), and call
it on one rank; under FSDP on every rank, inside ``Strategy.evaluating()`` (a sharded tower's
forward gathers its weights collectively; see orchestrator/train/parallel.py).

Cost on the tiny recipe (vit_test, 32 images, 2 CPU cores): about a second for the three
default tasks; linear probes and depth add ``probe_steps`` head steps each.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from orchestrator.eval.loader import Encoders
from orchestrator.eval.options import EvalOptions
from orchestrator.eval.readers import EvalDataset, open_dataset
from orchestrator.eval.result import flat_metrics
from orchestrator.eval.runtime import eval_mode
from orchestrator.eval.tasks import get_task

logger = logging.getLogger(__name__)

PERIODIC_TASKS: tuple[str, ...] = ("zero_shot_seg", "retrieval", "zero_shot_cls")
_CACHE: dict[tuple[str, str], EvalDataset] = {}


def cached_dataset(spec: str, kind: str) -> EvalDataset:
    """``open_dataset(spec, kind)``, read once per process."""
    key = (spec, kind)
    if key not in _CACHE:
        _CACHE[key] = open_dataset(spec, kind)
    return _CACHE[key]


def evaluate_during_training(
    vision: nn.Module,
    text: nn.Module,
    tokenizer: Any,
    temperature: float,
    eval_uri: str | None = None,
    tasks: Sequence[str] = PERIODIC_TASKS,
    max_images: int = 32,
    options: EvalOptions | None = None,
) -> dict[str, float]:
    """Run ``tasks`` on at most ``max_images`` images of the eval split.

    Args:
        vision: the image tower being trained (unwrapped), on its training device.
        text: the text tower.
        tokenizer: strings -> int64 ids.
        temperature: the contrastive temperature (float or 0-d tensor).
        eval_uri: dataset spec; None = the built-in synthetic set.
        tasks: task names (see ``orchestrator.eval.tasks``).
        max_images: cap on the evaluated split and on probe training splits.
        options: full task settings; default: no progress bars, no plots, 50 probe steps.

    Returns:
        ``{"eval/<task>/<metric>": value}``.
    """
    opts = options or EvalOptions(
        max_images=max_images,
        max_train_images=max_images,
        probe_steps=50,
        plot_images=0,
        progress=False,
    )
    opts.check()
    spec = eval_uri or "synthetic"
    enc = Encoders(vision, text, tokenizer, float(temperature), source="training")
    results = []
    with eval_mode(vision, text):
        for name in tasks:
            task = get_task(name)
            results.append(task.run(enc, cached_dataset(spec, task.KIND), opts))
    return flat_metrics(results)
