"""The GPU recipes run one compiled step with static shapes (issue 22, items 1 and 3):
``train.compile`` on, the masked-iBOT ones on fixed-count slots; CPU and TPU recipes do not
compile with torch.compile; the config refuses a capacity that could drop masked tokens."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, load
from orchestrator.recipes import RECIPES_DIR

FILL = ["data.train_uri=/tmp/shards", "model.tokenizer_path=/tmp/tokenizer.model"]
GPU = ["tips_b14", "tips_g14", "tips_g14_hr", "tipsv2_b14", "tipsv2_l14", "cloc_b16", "mug_b16"]


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_torch_compile_is_on_exactly_for_the_gpu_recipes(name):
    cfg = load(RECIPES_DIR / f"{name}.yaml", FILL)
    assert cfg.train.compile == (name in GPU) == cfg.scaling.use_gpu
    obj = cfg.objective
    if cfg.scaling.use_gpu and getattr(obj, "mim_tokens", None) == "masked" and obj.beta > 0:
        assert obj.mim_masked_capacity == cfg.masking.ratio_max == 0.5


def test_capacity_below_the_largest_mask_ratio_is_refused():
    recipe = RECIPES_DIR / "tiny_cpu.yaml"
    cfg = load(recipe, [*FILL, "objective.mim_masked_capacity=0.5"])
    assert cfg.objective.mim_masked_capacity == 0.5
    with pytest.raises(ConfigError, match=r"mim_masked_capacity=0.4 must be >= masking.ratio_max"):
        load(recipe, [*FILL, "objective.mim_masked_capacity=0.4"])


def test_torch_compile_is_refused_on_xla():
    with pytest.raises(ConfigError, match=r"train.compile=true is torch.compile"):
        load(RECIPES_DIR / "tips_b14_tpu.yaml", [*FILL, "train.compile=true"])
