"""MUG objective on tiny models: MAE token dropping, masked MSE, teacher-forced caption CE."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import tips_model.objectives.mug  # noqa: F401  (registers "mug" until objectives/__init__ does)
from orchestrator.recipes import RECIPES_DIR
from tips_model.objectives import ModelConfig, StepState, build_objective, list_objectives
from tips_model.objectives._mae import (
    encode_visible,
    masked_mse,
    normalize_patches,
    patchify,
    random_masking,
)
from tips_model.objectives.base import objective_config_class
from tips_model.objectives.mug import CaptionDecoder, caption_loss
from tips_model.objectives.mug_config import MugObjectiveConfig
from tips_model.vision import build_vision

MODEL = ModelConfig(vision="vit_test", text="text_test", max_text_len=16)
TINY = dict(
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=2,
    caption_dim=32,
    caption_depth=1,
    caption_heads=2,
)
VOCAB = 100
RECIPES = RECIPES_DIR


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is shared: tiny models run fastest on one thread
    yield
    torch.set_num_threads(before)


def make_batch(b: int = 8, g: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, 16), generator=gen)
    ids[:, 10:] = 0
    crops = torch.randint(0, 256, (b, g, 3, 32, 32), generator=gen, dtype=torch.uint8)
    return {"global_crops": crops, "alt_ids": ids, "syn_ids": ids.roll(2, dims=1)}


def build(**kw):
    torch.manual_seed(0)
    return build_objective(MugObjectiveConfig(**{**TINY, **kw}), MODEL, vocab_size=VOCAB)


# --------------------------------------------------------------------------- registry, config


def test_registered_with_its_config():
    assert "mug" in list_objectives()
    assert objective_config_class("mug") is MugObjectiveConfig


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"caption": "both"}, "objective.caption"),
        ({"mask_ratio": 1.0}, "objective.mask_ratio"),
        ({"caption_weight": -1.0}, "objective.caption_weight"),
        ({"reconstruction_weight": 0.0, "caption_weight": 0.0}, "objective.reconstruction_weight"),
        ({"decoder_dim": 30}, "objective.decoder_dim"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        MugObjectiveConfig(**kw)


# --------------------------------------------------------------------------- MAE pieces


def test_patchify_follows_row_major_patch_order():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)  # grid 2 x 3
    assert patches.shape == (2, 6, 8 * 8 * 3)
    r, c = 1, 2
    expected = images[:, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].permute(0, 2, 3, 1)
    torch.testing.assert_close(patches[:, r * 3 + c], expected.reshape(2, -1))


def test_normalize_patches_has_zero_mean_unit_unbiased_variance():
    x = normalize_patches(torch.randn(2, 5, 48) * 3 + 7, eps=0.0)
    torch.testing.assert_close(x.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.var(-1), torch.ones(2, 5), atol=1e-4, rtol=0)


def test_random_masking_keeps_k_per_row_and_inverts():
    gen = torch.Generator().manual_seed(3)
    ids_keep, ids_restore, mask = random_masking(4, 16, 0.75, generator=gen)
    assert ids_keep.shape == (4, 4) and mask.shape == (4, 16)
    assert (mask.sum(1) == 12).all()
    for b in range(4):
        assert not mask[b, ids_keep[b]].any()  # kept patches are the visible ones
    shuffle = ids_restore.argsort(1)
    torch.testing.assert_close(shuffle[:, :4], ids_keep)
    # an explicit generator and the reseeded default generator both reproduce the draw
    again = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again[2], mask)
    torch.manual_seed(5)
    a = random_masking(4, 16, 0.75)[2]
    torch.manual_seed(5)
    assert torch.equal(random_masking(4, 16, 0.75)[2], a)


def test_encode_visible_with_all_patches_equals_the_full_forward():
    torch.manual_seed(0)
    vision = build_vision("vit_test").eval()
    images = torch.rand(2, 3, 32, 32)
    full = vision(images)
    out = encode_visible(vision, images, torch.arange(16).expand(2, -1))
    torch.testing.assert_close(out.patch_tokens, full.patch_tokens)
    torch.testing.assert_close(out.cls_alt, full.cls_alt)
    # dropping patches changes the CLS tokens: the encoder really sees fewer tokens
    part = encode_visible(vision, images, torch.arange(4).expand(2, -1))
    assert part.patch_tokens.shape == (2, 4, 32)
    assert not torch.allclose(part.cls_alt, full.cls_alt)


def test_masked_mse_scores_masked_patches_only():
    pred, target = torch.randn(2, 6, 12), torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    loss = masked_mse(pred, target, mask)
    moved = pred.clone()
    moved[~mask] += 100.0  # visible-patch predictions do not count
    torch.testing.assert_close(masked_mse(moved, target, mask), loss)
    moved[mask] += 1.0
    assert masked_mse(moved, target, mask) > loss
    # closed form: constant error e on masked patches -> e^2
    torch.testing.assert_close(masked_mse(target + 0.5, target, mask), torch.tensor(0.25))
    assert masked_mse(pred, target, torch.zeros_like(mask)).item() == 0.0


# --------------------------------------------------------------------------- caption


def test_caption_ce_matches_a_hand_computation_and_ignores_padding():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [5.0, 5.0, 5.0]]])  # [1,3,3]
    ids = torch.tensor([[2, 1, 0]])  # last position is padding
    lse0 = math.log(math.exp(2) + 1 + math.exp(1))
    lse1 = math.log(2 + math.exp(3))
    expected = ((lse0 - 1.0) + (lse1 - 3.0)) / 2
    assert caption_loss(logits, ids).item() == pytest.approx(expected, rel=1e-6)
    logits[0, 2] = torch.tensor([-9.0, 40.0, 3.0])  # logits at padding do not matter
    assert caption_loss(logits, ids).item() == pytest.approx(expected, rel=1e-6)


def test_caption_decoder_is_causal_and_teacher_forced():
    torch.manual_seed(0)
    dec = CaptionDecoder(VOCAB, enc_dim=24, dim=32, depth=2, heads=2, max_len=8).eval()
    image = torch.randn(2, 5, 24)
    ids = torch.randint(1, VOCAB, (2, 8))
    base = dec(ids, image)
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % VOCAB + 1
    out = dec(changed, image)
    # position t sees ids[:, :t] (BOS first): positions <= 4 are unchanged, 5.. change
    torch.testing.assert_close(out[:, :5], base[:, :5])
    assert not torch.allclose(out[:, 5:], base[:, 5:])
    assert not torch.allclose(dec(ids, image + 1.0), base)  # it reads the image


# --------------------------------------------------------------------------- objective


def test_total_is_weighted_sum_and_no_teacher():
    obj = build(reconstruction_weight=0.7, caption_weight=1.3)
    out = obj(make_batch(), StepState(step=0))
    assert set(out.losses) == {"reconstruction", "caption"}
    expected = 0.7 * out.losses["reconstruction"] + 1.3 * out.losses["caption"]
    torch.testing.assert_close(out.loss, expected)
    assert obj.teacher is None
    obj.update_teacher(0.5)  # a no-op, not an error
    assert out.metrics["mask_ratio"].item() == pytest.approx(0.75)
    # random init: caption CE ~ log(V)
    assert abs(out.losses["caption"].item() - math.log(VOCAB)) < 0.5


def test_required_keys_and_zero_weights_switch_modules_off():
    assert build().required_batch_keys() == {"global_crops", "alt_ids"}
    assert build(caption="syn").required_batch_keys() == {"global_crops", "syn_ids"}
    no_cap = build(caption_weight=0.0)
    assert no_cap.student.caption_decoder is None
    assert no_cap.required_batch_keys() == {"global_crops"}
    assert set(no_cap(make_batch(), StepState(step=0)).losses) == {"reconstruction"}
    no_rec = build(reconstruction_weight=0.0)
    assert no_rec.student.pixel_decoder is None
    assert set(no_rec(make_batch(), StepState(step=0)).losses) == {"caption"}


def test_every_trainable_parameter_gets_a_gradient():
    obj = build()
    obj(make_batch(g=2), StepState(step=0)).loss.backward()
    missing = [n for n, p in obj.student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP without find_unused_parameters needs this
    assert not obj.student.vision.mask_token.requires_grad  # token dropping never uses it


def test_same_seed_same_masks_same_loss():
    obj, batch = build(), make_batch()
    torch.manual_seed(11)
    a = obj(batch, StepState(step=0)).loss
    torch.manual_seed(11)
    torch.testing.assert_close(obj(batch, StepState(step=0)).loss, a, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(1)
    b = obj(batch, StepState(step=0), generator=gen).loss
    c = obj(batch, StepState(step=0), generator=torch.Generator().manual_seed(1)).loss
    torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_both_losses_fall_over_30_steps_on_a_fixed_batch():
    obj = build()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=2e-3)
    batch = make_batch()
    rec, cap = [], []
    for step in range(30):
        gen = torch.Generator().manual_seed(0)  # fixed masks: a fixed target to fit
        out = obj(batch, StepState(step=step), generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss)
        rec.append(out.losses["reconstruction"].item())
        cap.append(out.losses["caption"].item())
    assert sum(rec[-3:]) / 3 < 0.95 * sum(rec[:3]) / 3, rec
    assert sum(cap[-3:]) / 3 < 0.8 * sum(cap[:3]) / 3, cap


def test_state_dict_round_trip_is_exact():
    a = build()
    opt = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    a(make_batch(), StepState(step=0)).loss.backward()
    opt.step()
    torch.manual_seed(123)  # b starts from other weights
    b = build_objective(MugObjectiveConfig(**TINY), MODEL, vocab_size=VOCAB)
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
    gen = torch.Generator
    la = a(make_batch(), StepState(step=1), generator=gen().manual_seed(0)).loss
    lb = b(make_batch(), StepState(step=1), generator=gen().manual_seed(0)).loss
    torch.testing.assert_close(la, lb, rtol=0, atol=0)


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["mug_tiny.yaml", "mug_b16.yaml"])
def test_recipe_validates(name, monkeypatch):
    from orchestrator import config
    from tips_model.registry import VISION

    monkeypatch.setattr(config, "_OBJECTIVE_CONFIGS", None)  # pick up "mug" if cached before
    overrides = ["data.train_uri=/tmp/shards", "model.tokenizer_path=/tmp/tokenizer.model"]
    if "vit_b16" not in VISION and "b16" in name:  # not registered yet: check with B/14
        overrides.append("model.vision=vit_b14")
    cfg = config.load(RECIPES / name, overrides)
    assert cfg.objective.name == "mug" and isinstance(cfg.objective, MugObjectiveConfig)
    assert cfg.objective.mask_ratio == 0.75
    text = (RECIPES / name).read_text()
    assert text.splitlines()[0].startswith(f"# {Path(name).stem}:") and "Command:" in text
