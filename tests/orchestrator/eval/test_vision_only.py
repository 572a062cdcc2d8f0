"""A vision-only objective (MUG) evaluates on vision tasks and refuses text tasks clearly."""

from __future__ import annotations

import pytest
import torch

from orchestrator.eval.loader import LoadError, encoders_from_objective
from orchestrator.eval.suite import run_eval
from tips_model.objectives import ModelConfig, MugObjectiveConfig, build_objective
from tips_model.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def mug_encoders():
    torch.manual_seed(0)
    tok = build_tokenizer("bpe", max_len=16)
    model = ModelConfig(vision="vit_test", text="text_test", max_text_len=16)
    objective = build_objective(MugObjectiveConfig(), model, tok.vocab_size)
    return encoders_from_objective(objective, tok, source="mug")


def test_vision_tasks_run_without_a_text_tower(mug_encoders):
    assert mug_encoders.text is None
    (result,) = run_eval(mug_encoders, tasks=["knn"])
    assert result.task == "knn" and result.num_images > 0
    assert all(v == v for v in result.metrics.values())  # finite numbers, not NaN


def test_text_tasks_are_refused_with_the_reason(mug_encoders):
    with pytest.raises(LoadError, match=r"no text tower.*\['retrieval'\]"):
        run_eval(mug_encoders, tasks=["retrieval"])
