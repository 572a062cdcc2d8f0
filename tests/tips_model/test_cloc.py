"""CLOC objective on tiny models: padded region InfoNCE, GIoU, the Prompter, learning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import tips_model.objectives.cloc  # noqa: F401  (registers "cloc" until objectives/__init__ does)
from orchestrator.recipes import RECIPES_DIR
from tests.gloo import run_gloo
from tips_model.objectives import ModelConfig, StepState, build_objective, list_objectives
from tips_model.objectives._regions import (
    box_losses,
    generalized_box_iou,
    region_contrastive_loss,
)
from tips_model.objectives.base import objective_config_class
from tips_model.objectives.cloc import Prompter, isolation_mask
from tips_model.objectives.cloc_config import ClocObjectiveConfig

MODEL = ModelConfig(vision="vit_test", text="text_test", max_text_len=16)
VOCAB = 100
R = 3
RECIPES = RECIPES_DIR


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is shared: tiny models run fastest on one thread
    yield
    torch.set_num_threads(before)


def make_batch(b: int = 8, r: int = R, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, 16), generator=gen)
    ids[:, 10:] = 0
    x0 = torch.rand(b, r, 2, generator=gen) * 0.5
    wh = torch.rand(b, r, 2, generator=gen) * 0.4 + 0.1
    region_ids = torch.randint(1, VOCAB, (b, r, 16), generator=gen)
    region_ids[..., 5:] = 0
    valid = torch.rand(b, r, generator=gen) < 0.7
    valid[0] = True
    region_ids[~valid] = 0  # padded regions carry no text, as the pipeline pads them
    return {
        "global_crops": torch.randint(0, 256, (b, 1, 3, 32, 32), generator=gen, dtype=torch.uint8),
        "alt_ids": ids,
        "syn_ids": ids.roll(2, dims=1),
        "regions": torch.cat([x0, x0 + wh], -1) * valid[..., None],
        "region_ids": region_ids,
        "region_valid": valid,
    }


def build(**kw):
    torch.manual_seed(0)
    return build_objective(ClocObjectiveConfig(max_regions=R, **kw), MODEL, vocab_size=VOCAB)


# --------------------------------------------------------------------------- registry, config


def test_registered_with_its_config():
    assert "cloc" in list_objectives()
    assert objective_config_class("cloc") is ClocObjectiveConfig


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"clip_captions": "none"}, "objective.clip_captions"),
        ({"box_encoding": "fourier"}, "objective.box_encoding"),
        ({"grounding_prompter": "x"}, "objective.grounding_prompter"),
        ({"region_weight": -1.0}, "objective.region_weight"),
        ({"max_regions": 0}, "objective.max_regions"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        ClocObjectiveConfig(**kw)


# --------------------------------------------------------------------------- region losses


def test_region_infonce_with_uniform_logits_is_log_of_valid_regions():
    m, d = 10, 6
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)  # 6 valid
    same = torch.ones(m, d)  # every similarity equal: uniform logits over valid columns
    loss = region_contrastive_loss(same, same.clone(), valid, temperature=0.1, gather=False)
    assert loss.item() == pytest.approx(math.log(6), rel=1e-6)  # not log(10): padding excluded


def test_region_infonce_ignores_padded_rows_and_columns():
    gen = torch.Generator().manual_seed(0)
    r, t = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    valid = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    loss = region_contrastive_loss(r, t, valid, 0.2, gather=False)
    r2, t2 = r.clone(), t.clone()
    r2[~valid] = torch.randn(3, 5, generator=gen) * 10
    t2[~valid] = r[valid][:3]  # even a padded copy of a positive must not compete
    torch.testing.assert_close(region_contrastive_loss(r2, t2, valid, 0.2, gather=False), loss)
    # equal to the plain InfoNCE on the valid subset
    sub = region_contrastive_loss(r[valid], t[valid], torch.ones(5, dtype=torch.bool), 0.2, False)
    torch.testing.assert_close(sub, loss)
    assert region_contrastive_loss(r, t, torch.zeros(8, dtype=torch.bool), 0.2, False).item() == 0


def test_giou_identical_disjoint_and_contained_boxes():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.5, 1.0]])
    giou = generalized_box_iou(a, b)
    # identical: 1; disjoint, union 2 inside a 3x1 hull: 0 - 1/3; contained: IoU 0.5, hull = a
    torch.testing.assert_close(giou, torch.tensor([1.0, -1.0 / 3.0, 0.5]), atol=1e-6, rtol=0)
    valid = torch.tensor([True, True, False])
    l1, g = box_losses(a, b, valid)
    torch.testing.assert_close(l1, torch.tensor((0.0 + 4.0) / 2))  # sum |dx| per box: 0, 2+2
    torch.testing.assert_close(g, torch.tensor((0.0 + 4.0 / 3.0) / 2), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- Prompter


def test_isolation_mask_and_joint_prompts_equal_one_region_at_a_time():
    mask = isolation_mask(2, 2, torch.device("cpu"))
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]).bool()
    assert torch.equal(mask, expected)
    torch.manual_seed(0)
    prompter = Prompter(32, depth=2, heads=2, box_encoding="sincos", kinds=("box",)).eval()
    tokens = torch.randn(2, 16, 32)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.2, 0.1, 0.9, 0.4]]] * 2)
    joint = prompter(tokens, (4, 4), prompter.box_prompts(boxes))  # [2,3,32]
    for i in range(3):
        alone = prompter(tokens, (4, 4), prompter.box_prompts(boxes[:, i : i + 1]))
        torch.testing.assert_close(joint[:, i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(joint[:, 0], joint[:, 1])  # different boxes, different embeddings


# --------------------------------------------------------------------------- objective


def test_total_and_terms():
    cfg = dict(region_weight=0.5, region_contrastive_weight=2.0, grounding_weight=0.3)
    obj = build(**cfg)
    out = obj(make_batch(), StepState(step=0))
    t = out.losses
    assert set(t) == {
        "contrastive_alt",
        "contrastive_syn",
        "region_contrastive",
        "grounding_l1",
        "grounding_giou",
    }
    grounding = 5.0 * t["grounding_l1"] + 2.0 * t["grounding_giou"]
    expected = (
        t["contrastive_alt"]
        + t["contrastive_syn"]
        + 0.5 * (2.0 * t["region_contrastive"] + 0.3 * grounding)
    )
    torch.testing.assert_close(out.loss, expected)
    n_valid = int(make_batch()["region_valid"].sum())
    assert abs(t["region_contrastive"].item() - math.log(n_valid)) < 0.7  # near-uniform at init
    assert obj.teacher is None
    obj.update_teacher(0.5)


def test_required_keys_and_zero_weights_switch_modules_off():
    full = build()
    assert full.required_batch_keys() == {
        "global_crops",
        "alt_ids",
        "syn_ids",
        "regions",
        "region_ids",
        "region_valid",
    }
    clip = build(region_weight=0.0, clip_captions="alt")
    assert clip.required_batch_keys() == {"global_crops", "alt_ids"}
    assert clip.student.prompter is None and clip.student.box_head is None
    assert set(clip(make_batch(), StepState(step=0)).losses) == {"contrastive_alt"}
    no_ground = build(grounding_weight=0.0)
    assert no_ground.student.box_head is None and no_ground.student.prompter.text_embed is None
    assert "grounding_l1" not in no_ground(make_batch(), StepState(step=0)).losses
    sep = build(grounding_prompter="separate", share_temperature=False)
    out = sep(make_batch(), StepState(step=0))
    assert sep.student.grounding_prompter is not None and "grounding_giou" in out.losses


@pytest.mark.parametrize("kw", [{}, {"grounding_prompter": "separate", "box_encoding": "linear"}])
def test_every_trainable_parameter_gets_a_gradient(kw):
    obj = build(**kw)
    obj(make_batch(), StepState(step=0)).loss.backward()
    missing = [n for n, p in obj.student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP without find_unused_parameters needs this


def test_predicted_boxes_are_ordered_and_inside_the_image():
    obj = build()
    batch = make_batch()
    s = obj.student(
        batch["global_crops"][:, 0].float() / 255,
        batch["alt_ids"],
        batch["syn_ids"],
        batch["regions"],
        batch["region_ids"],
    )
    assert s.boxes.shape == (8 * R, 4) and s.region_emb.shape == (8 * R, 32)
    assert (s.boxes[:, 2:] >= s.boxes[:, :2]).all()
    assert (s.boxes >= -0.5).all() and (s.boxes <= 1.5).all()  # centre +- half size, in [0,1]


def test_all_terms_fall_over_30_steps_on_a_fixed_batch():
    obj = build()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=2e-3)
    batch = make_batch()
    hist: dict[str, list[float]] = {}
    for step in range(30):
        out = obj(batch, StepState(step=step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss)
        for k, v in out.losses.items():
            hist.setdefault(k, []).append(v.item())
    for k, v in hist.items():
        assert sum(v[-3:]) / 3 < 0.9 * sum(v[:3]) / 3, (k, v)
    assert out.metrics["region_acc"] > 0.5


def test_state_dict_round_trip_is_exact():
    a = build(share_temperature=False)
    opt = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    a(make_batch(), StepState(step=0)).loss.backward()
    opt.step()
    torch.manual_seed(123)
    cfg = ClocObjectiveConfig(max_regions=R, share_temperature=False)
    b = build_objective(cfg, MODEL, vocab_size=VOCAB)
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
    a.eval()
    b.eval()
    la = a(make_batch(), StepState(step=1)).loss
    torch.testing.assert_close(b(make_batch(), StepState(step=1)).loss, la, rtol=0, atol=0)


# --------------------------------------------------------------------------- distributed

WORLD, PER_RANK = 2, 4


def _dist_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    valid = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)  # 3 valid vs 1 valid
    return {
        "r": torch.randn(WORLD * PER_RANK, 6, generator=gen),
        "t": torch.randn(WORLD * PER_RANK, 6, generator=gen),
        "pred": torch.rand(WORLD * PER_RANK, 4, generator=gen).sort(-1).values,
        "box": torch.rand(WORLD * PER_RANK, 4, generator=gen).sort(-1).values,
        "valid": valid,
    }


def _dist_worker(rank: int, out_dir: str) -> None:
    data = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in _dist_inputs().items()}
    r = data["r"].clone().requires_grad_(True)
    pred = data["pred"].clone().requires_grad_(True)
    loss = region_contrastive_loss(r, data["t"], data["valid"], 0.1)
    l1, giou = box_losses(pred, data["box"], data["valid"])
    (loss + l1 + giou).backward()
    torch.save(
        {"loss": loss.detach(), "l1": l1.detach(), "r_grad": r.grad, "p_grad": pred.grad},
        f"{out_dir}/rank{rank}.pt",
    )


def test_distributed_region_losses_equal_the_global_batch(tmp_path):
    """Uneven valid counts per rank: the mean over ranks is the global mean, and DDP's
    averaged gradients equal the global-batch gradients."""
    run_gloo(_dist_worker, WORLD, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(WORLD)]
    data = _dist_inputs()
    r = data["r"].clone().requires_grad_(True)
    pred = data["pred"].clone().requires_grad_(True)
    full = region_contrastive_loss(r, data["t"], data["valid"], 0.1, gather=False)
    l1, giou = box_losses(pred, data["box"], data["valid"])
    (full + l1 + giou).backward()
    torch.testing.assert_close(torch.stack([o["loss"] for o in ranks]).mean(), full.detach())
    torch.testing.assert_close(torch.stack([o["l1"] for o in ranks]).mean(), l1.detach())
    for i, out in enumerate(ranks):
        rows = slice(i * PER_RANK, (i + 1) * PER_RANK)
        torch.testing.assert_close(out["r_grad"] / WORLD, r.grad[rows])
        torch.testing.assert_close(out["p_grad"] / WORLD, pred.grad[rows])


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["cloc_tiny.yaml", "cloc_b16.yaml"])
def test_recipe_validates(name, monkeypatch):
    from orchestrator import config
    from tips_model.registry import VISION

    monkeypatch.setattr(config, "_OBJECTIVE_CONFIGS", None)  # pick up "cloc" if cached before
    overrides = ["data.train_uri=/tmp/shards", "model.tokenizer_path=/tmp/tokenizer.model"]
    if "vit_b16" not in VISION and "b16" in name:  # not registered yet: check with B/14
        overrides.append("model.vision=vit_b14")
    cfg = config.load(RECIPES / name, overrides)
    assert cfg.objective.name == "cloc" and isinstance(cfg.objective, ClocObjectiveConfig)
    assert cfg.augment.num_local_crops == 0
    text = (RECIPES / name).read_text()
    assert text.splitlines()[0].startswith(f"# {Path(name).stem}:") and "Command:" in text
