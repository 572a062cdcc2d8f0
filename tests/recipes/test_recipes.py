"""Every recipe file validates; the count matches what is on disk (sub-folders included)."""

from __future__ import annotations

import pytest

from orchestrator.config import load
from orchestrator.recipes import RECIPES_DIR

RECIPES = RECIPES_DIR
FILL = ["data.train_uri=/tmp/shards", "model.tokenizer_path=/tmp/tokenizer.model"]
TRAIN_RECIPES = sorted(p for p in RECIPES.glob("*.yaml"))


def test_recipe_count_matches_disk():
    names = {p.name for p in TRAIN_RECIPES}
    assert {
        "tiny_cpu.yaml",
        "tips_b14.yaml",
        "tips_g14.yaml",
        "tips_g14_hr.yaml",
        "tipsv2_b14.yaml",
        "tipsv2_l14.yaml",
    } <= names
    assert len(TRAIN_RECIPES) == len(list(RECIPES.glob("*.yaml")))


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe):
    cfg = load(recipe, FILL)
    assert cfg.train.total_steps > 0
    header = recipe.read_text().splitlines()[0]
    assert header.startswith(f"# {recipe.stem}:"), "each recipe opens with what it reproduces"
    assert "Command:" in recipe.read_text()


def test_paper_recipes_restate_paper_values():
    for name in ("tips_b14.yaml", "tips_g14.yaml", "tipsv2_b14.yaml"):
        cfg = load(RECIPES / name, FILL)
        assert (cfg.objective.alpha, cfg.objective.beta) == (1.0, 2.0)  # TIPS §3 [paper]
        assert cfg.augment.num_global_crops == 1 and cfg.augment.num_local_crops == 6
        assert (cfg.augment.global_crop_size, cfg.augment.local_crop_size) == (224, 98)
        assert cfg.optim.name == "adafactor" and cfg.optim.lr == 5e-4
    hr = load(RECIPES / "tips_g14_hr.yaml", FILL)
    assert (hr.augment.global_crop_size, hr.augment.local_crop_size) == (448, 140)
    assert hr.train.global_batch_size == 4096


def test_giant_recipes_shard_with_fsdp_and_keep_adafactor():
    for name in ("tips_g14.yaml", "tips_g14_hr.yaml"):
        cfg = load(RECIPES / name, FILL)
        assert cfg.scaling.strategy == "fsdp" and cfg.optim.name == "adafactor"
        assert cfg.train.precision == "bf16" and cfg.model.grad_checkpointing
