"""What a run reports is what sweeps are checked against before Ray starts: each objective's
``loss_terms()`` and each evaluation task's ``METRICS``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator import config as config_lib
from orchestrator.data.local import iter_local_batches
from orchestrator.eval.periodic import evaluate_during_training
from orchestrator.eval.tasks import ALL_TASKS, get_task
from orchestrator.recipes import RECIPES_DIR
from tips_model.objectives import StepState, build_objective
from tips_model.tokenizer import build_tokenizer


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("tiny_cpu", []),
        ("tiny_cpu", ["objective.alpha=0", "objective.koleo_weight=0"]),
        ("tiny_cpu", ["objective.beta=0"]),
        ("cloc_tiny", []),
        ("cloc_tiny", ["objective.grounding_weight=0", "objective.clip_captions=syn"]),
        ("mug_tiny", []),
        ("mug_tiny", ["objective.caption_weight=0"]),
    ],
)
def test_declared_loss_terms_are_the_ones_a_forward_reports(recipe, overrides, synth_data):
    """Sweeps check `metric=loss/<term>` against ``loss_terms()`` before Ray starts."""
    data = synth_data / "train"
    cfg = config_lib.load(RECIPES_DIR / f"{recipe}.yaml", [f"data.train_uri={data}", *overrides])
    tok = build_tokenizer(cfg.model.tokenizer, cfg.model.tokenizer_path, cfg.model.max_text_len)
    torch.manual_seed(0)
    objective = build_objective(cfg.objective, cfg.model, tok.vocab_size)
    keys = objective.required_batch_keys()
    batch = next(iter_local_batches(cfg, config_lib.patch_size(cfg.model), keys, 4))
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if k in keys}
    out = objective(batch, StepState(step=0, teacher_temp=0.04, progress=0.0))
    assert tuple(out.losses) == cfg.objective.loss_terms()


def test_declared_eval_metrics_are_the_ones_each_task_reports(synth_data):
    cfg = config_lib.load(RECIPES_DIR / "tiny_cpu.yaml", [f"data.train_uri={synth_data}/train"])
    tok = build_tokenizer(cfg.model.tokenizer, cfg.model.tokenizer_path, cfg.model.max_text_len)
    torch.manual_seed(0)
    student = build_objective(cfg.objective, cfg.model, tok.vocab_size).student
    got = evaluate_during_training(
        student.vision, student.text, tok, 0.07, f"{synth_data}/eval", ALL_TASKS, max_images=8
    )
    for task in ALL_TASKS:
        reported = sorted(k.split("/")[2] for k in got if k.split("/")[1] == task)
        assert reported == sorted(get_task(task).METRICS), task
