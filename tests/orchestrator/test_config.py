"""Config schema, merging and validation: errors name the dotted key and the file."""

from __future__ import annotations

import pytest

from orchestrator import config as config_lib
from orchestrator.config import ConfigError, derive, load
from orchestrator.recipes import RECIPES_DIR
from tips_model.objectives import TipsObjectiveConfig, TipsV2ObjectiveConfig

RECIPES = RECIPES_DIR
TINY = RECIPES / "tiny_cpu.yaml"
DATA = ["data.train_uri=/tmp/shards"]


def test_tiny_recipe_loads_with_overrides_last():
    cfg = load(TINY, [*DATA, "objective.alpha=0.5", "train.total_steps=7"])
    assert cfg.model.vision == "vit_test"
    assert isinstance(cfg.objective, TipsObjectiveConfig)
    assert cfg.objective.alpha == 0.5 and cfg.objective.beta == 2.0
    assert cfg.train.total_steps == 7
    assert cfg.data.train_uri == "/tmp/shards"


def test_objective_name_selects_its_dataclass():
    cfg = load(TINY, [*DATA, "objective.name=tipsv2"])
    assert isinstance(cfg.objective, TipsV2ObjectiveConfig)
    assert cfg.objective.mim_tokens == "all" and cfg.objective.teacher == "head_ema"


def test_unknown_key_is_refused_with_dotted_path_and_source():
    with pytest.raises(ConfigError, match=r"overrides: key 'objective\.alfa'"):
        load(TINY, [*DATA, "objective.alfa=1"])


def test_unknown_key_in_recipe_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: key 'optim\.lrr'"):
        load(bad, DATA)


def test_wrong_type_is_refused_with_key_and_value():
    with pytest.raises(ConfigError, match=r"train\.total_steps.*abc|abc.*train\.total_steps"):
        load(TINY, [*DATA, "train.total_steps=abc"])


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match=r"data\.train_uri"):
        load(TINY, [])


def test_crop_not_divisible_by_patch_is_refused():
    with pytest.raises(ConfigError, match=r"augment\.global_crop_size=30 .*patch size 8"):
        load(TINY, [*DATA, "augment.global_crop_size=30"])


def test_global_batch_smaller_than_workers_is_refused():
    with pytest.raises(ConfigError, match=r"global_batch_size=2 is smaller.*max_workers=4"):
        load(TINY, [*DATA, "train.global_batch_size=2", "scaling.max_workers=4"])


def test_uneven_world_size_keeps_equal_rank_batches():
    cfg = load(TINY, [*DATA, "train.global_batch_size=32", "scaling.max_workers=3"])
    plan = derive(cfg, 3)
    assert plan.per_rank_batch == 10 and plan.global_batch_size == 30  # < ws samples short


def test_choice_fields_are_checked():
    with pytest.raises(ConfigError, match=r"objective\.centering='sinkorn'"):
        load(TINY, [*DATA, "objective.centering=sinkorn"])
    with pytest.raises(ConfigError, match=r"optim\.name='sgd'"):
        load(TINY, [*DATA, "optim.name=sgd"])


@pytest.mark.parametrize("optim", ["adafactor", "adamw"])
def test_fsdp_strategy_validates_with_both_optimizers(optim):
    cfg = load(TINY, [*DATA, "scaling.strategy=fsdp", f"optim.name={optim}"])
    assert cfg.scaling.strategy == "fsdp" and cfg.optim.name == optim


def test_unknown_strategy_is_refused_with_its_key():
    with pytest.raises(ConfigError, match=r"scaling\.strategy='fsdp1': must be one of"):
        load(TINY, [*DATA, "scaling.strategy=fsdp1"])


def test_fsdp_params_mixed_precision_needs_a_sharding_strategy():
    cfg = load(TINY, [*DATA, "scaling.strategy=ddp", "train.mixed_precision=fsdp_params"])
    assert cfg.train.mixed_precision == "fsdp_params"
    assert load(TINY, DATA).train.mixed_precision == "autocast"  # the default
    with pytest.raises(ConfigError, match=r"mixed_precision=fsdp_params .*not none"):
        load(TINY, [*DATA, "scaling.strategy=none", "train.mixed_precision=fsdp_params"])
    with pytest.raises(ConfigError, match=r"train\.mixed_precision='bf16': must be one of"):
        load(TINY, [*DATA, "train.mixed_precision=bf16"])


def test_unregistered_objective_and_encoder_are_refused():
    with pytest.raises(ConfigError, match=r"objective\.name='clipp'.*registered"):
        load(TINY, [*DATA, "objective.name=clipp"])
    with pytest.raises(ConfigError, match=r"model\.vision='vit_zz'"):
        load(TINY, [*DATA, "model.vision=vit_zz"])


def test_free_form_dicts_take_new_keys():
    cfg = load(
        TINY, [*DATA, "data.caption_ratios.medium=0.2", "scaling.resources_per_worker.GPU=1"]
    )
    assert cfg.data.caption_ratios["medium"] == 0.2
    assert cfg.scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1}


def test_base_recipe_is_one_level(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  total_steps: 5\n  seed: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  total_steps: 9\n")
    cfg = load(tmp_path / "b.yaml", DATA)
    assert (cfg.train.total_steps, cfg.train.seed) == (9, 3)
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="one level"):
        load(tmp_path / "c.yaml", DATA)


def test_round_trip_through_dict_and_config_is_frozen():
    cfg = load(TINY, DATA)
    again = config_lib.from_dict(config_lib.to_dict(cfg))
    assert again == cfg
    with pytest.raises(AttributeError):
        cfg.train.total_steps = 3  # type: ignore[misc]


def test_with_overrides_revalidates():
    cfg = load(TINY, DATA)
    assert config_lib.with_overrides(cfg, {"objective.beta": 0.0}).objective.beta == 0.0
    with pytest.raises(ConfigError, match="objective.beta"):
        config_lib.with_overrides(cfg, {"objective.beta": -1.0})


@pytest.mark.parametrize("world_size", range(1, 9))
def test_derive_keeps_global_batch_invariant(world_size):
    cfg = load(TINY, [*DATA, "train.global_batch_size=840", "train.batch_size_per_worker=64"])
    plan = derive(cfg, world_size)
    assert plan.micro_batch * plan.accum_steps * plan.world_size == 840
    assert plan.micro_batch <= 64
    assert plan.per_rank_batch == 840 // world_size


def test_distillation_without_student_crops_is_refused():
    with pytest.raises(ConfigError, match=r"objective\.alpha=1\.0 needs student crops"):
        load(TINY, [*DATA, "augment.num_local_crops=0"])
    cfg = load(TINY, [*DATA, "augment.num_local_crops=0", "objective.alpha=0"])
    assert cfg.augment.num_local_crops == 0


def test_input_norm_is_validated_and_paper_recipes_state_it():
    with pytest.raises(ConfigError, match="model.input_norm"):
        config_lib.load(RECIPES / "tiny_cpu.yaml", ["data.train_uri=/x", "model.input_norm=foo"])
    for recipe in sorted(RECIPES.glob("*.yaml")):  # itself or the recipe it extends
        layers = config_lib._recipe_layers(recipe)
        stated = [src for src, layer in layers if "input_norm" in layer.get("model", {})]
        assert stated, f"{recipe.name} does not state its input normalisation"
    b14 = load(RECIPES / "tips_b14.yaml", ["data.train_uri=/x", "model.tokenizer_path=/t.model"])
    assert b14.model.input_norm == "none"


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("augment.global_crop_size=0", "augment.global_crop_size"),
        ("augment.local_crop_size=0", "augment.local_crop_size"),
        ("run.num_checkpoints_to_keep=0", "run.num_checkpoints_to_keep"),
        ("teacher.temp=0", "teacher.temp"),
        ("teacher.temp=-1", "teacher.temp"),
        ("teacher.temp_warmup_start=0", "teacher.temp_warmup_start"),
        ("model.max_text_len=0", "model.max_text_len"),
        ("model.vision=vit_s14", "model.vision=vit_s14 (width 384)"),
        ("train.total_steps=[1", "'train.total_steps=[1'"),
    ],
)
def test_values_that_used_to_fail_inside_ray_are_refused_naming_the_override(override, key):
    """Issue 17: each of these passed --dry-run and then failed deep inside Ray."""
    with pytest.raises(ConfigError) as info:
        load(RECIPES / "tiny_cpu.yaml", ["data.train_uri=/x", override])
    msg = str(info.value)
    assert msg.startswith("overrides:"), msg  # the override, not the recipe file, set it
    assert key in msg and "\n" not in msg


def test_a_bad_value_in_a_recipe_names_that_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {RECIPES / 'tiny_cpu.yaml'}\noptim:\n  lr: 0\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: optim.lr=0.0 must be > 0$"):
        load(bad, ["data.train_uri=/x"])


def test_preemption_restart_is_checkpoint_or_deadline():
    assert load(TINY, DATA).train.preemption_restart == "checkpoint"
    assert load(TINY, [*DATA, "train.preemption_restart=deadline"]).train.preemption_restart == (
        "deadline"
    )
    with pytest.raises(ConfigError, match=r"train\.preemption_restart='soon'"):
        load(TINY, [*DATA, "train.preemption_restart=soon"])
