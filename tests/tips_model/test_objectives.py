"""TIPS / TIPSv2 objectives on tiny models: the weighted sum, teacher handling, learning."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tips_model.objectives import (
    ModelConfig,
    StepState,
    TipsObjectiveConfig,
    TipsV2ObjectiveConfig,
    build_objective,
    list_objectives,
)

MODEL = ModelConfig(vision="vit_test", text="text_test", max_text_len=16)
HEAD = dict(head_out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
VOCAB = 100


def make_batch(b: int = 8, m: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(b, 1, 4, 4, generator=g) < 0.3
    masks[0] = False  # one image without a mask
    ids = torch.randint(1, VOCAB, (b, 16), generator=g)
    ids[:, 10:] = 0  # padding
    return {
        "global_crops": torch.randint(0, 256, (b, 1, 3, 32, 32), generator=g, dtype=torch.uint8),
        "local_crops": torch.randint(0, 256, (b, m, 3, 16, 16), generator=g, dtype=torch.uint8),
        "masks": masks,
        "alt_ids": ids,
        "syn_ids": torch.roll(ids, 1, dims=1),
    }


def build(cfg=None):
    torch.manual_seed(0)
    cfg = cfg or TipsObjectiveConfig(**HEAD)
    return build_objective(cfg, MODEL, vocab_size=VOCAB)


def test_registry_lists_tips_and_tipsv2():
    assert {"tips", "tipsv2"} <= set(list_objectives())


def test_total_is_contrastive_plus_alpha_distill_plus_beta_mim():
    cfg = TipsObjectiveConfig(alpha=0.7, beta=1.3, contrastive_syn_weight=0.5, **HEAD)
    out = build(cfg)(make_batch(), StepState(step=0, teacher_temp=0.05))
    terms = out.losses
    assert set(terms) == {"contrastive_alt", "contrastive_syn", "dino", "ibot"}
    expected = (
        terms["contrastive_alt"]
        + 0.5 * terms["contrastive_syn"]
        + 0.7 * terms["dino"]
        + 1.3 * terms["ibot"]
    )
    torch.testing.assert_close(out.loss, expected)


def test_zero_weight_switches_term_and_its_head_off():
    obj = build(TipsObjectiveConfig(alpha=0.0, beta=0.0, **HEAD))
    out = obj(make_batch(), StepState(step=0))
    assert set(out.losses) == {"contrastive_alt", "contrastive_syn"}
    assert obj.student.dino_head is None and obj.student.ibot_head is None
    assert obj.required_batch_keys() == {"global_crops", "alt_ids", "syn_ids"}


def test_contrastive_at_init_is_near_log_batch():
    # Random tiny encoders give near-uniform similarities: InfoNCE ~ log(B).
    obj = build(TipsObjectiveConfig(alpha=0.0, beta=0.0, **HEAD))
    out = obj(make_batch(b=8), StepState(step=0))
    assert abs(out.losses["contrastive_alt"].item() - torch.log(torch.tensor(8.0)).item()) < 0.5


def test_teacher_gets_no_gradient_and_student_does():
    obj = build()
    out = obj(make_batch(), StepState(step=0))
    out.loss.backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert obj.student.vision.patch_embed.proj.weight.grad is not None
    assert obj.student.text.token_embedding.weight.grad is not None
    assert obj.student.temperature.log_temperature.grad is not None


def test_full_ema_teacher_is_a_copy_and_follows_by_momentum():
    obj = build()
    s_w = obj.student.vision.patch_embed.proj.weight
    t_w = obj.teacher["vision"].patch_embed.proj.weight
    assert t_w.data_ptr() != s_w.data_ptr()
    torch.testing.assert_close(t_w, s_w)
    with torch.no_grad():
        s_w.add_(1.0)
    before = t_w.clone()
    obj.update_teacher(0.9)
    torch.testing.assert_close(t_w, 0.9 * before + 0.1 * s_w)


def test_head_only_ema_shares_the_backbone():
    obj = build(TipsV2ObjectiveConfig(**HEAD))
    assert "vision" not in obj.teacher
    assert set(obj.teacher.keys()) == {"dino_head"}
    # teacher targets come from the student's own backbone, so no backbone copy exists
    n_teacher = sum(p.numel() for p in obj.teacher.parameters())
    n_heads = sum(p.numel() for p in obj.student.dino_head.parameters())
    assert n_teacher == n_heads


def test_tipsv2_uses_ibot_plus_plus_on_all_tokens():
    batch = make_batch()
    batch["masks"][:] = False  # no masked token anywhere
    v1 = build(TipsObjectiveConfig(**HEAD))(batch, StepState(step=0))
    v2 = build(TipsV2ObjectiveConfig(**HEAD))(batch, StepState(step=0))
    assert v1.losses["ibot"].item() == 0.0  # iBOT: nothing masked, nothing to predict
    assert v2.losses["ibot"].item() > 0.0  # iBOT++: visible tokens count too


def test_unmasked_contrastive_view_ignores_masks():
    batch = make_batch()
    cfg = TipsObjectiveConfig(contrastive_view="unmasked", alpha=0.0, **HEAD)
    a = build(cfg)(batch, StepState(step=0)).losses["contrastive_alt"]
    batch["masks"][:] = True
    b = build(cfg)(batch, StepState(step=0)).losses["contrastive_alt"]
    torch.testing.assert_close(a, b)


def test_learning_over_30_steps_on_a_fixed_batch():
    """The contrastive terms fall, and the student closes its gap to the teacher.

    The DINO cross-entropy is bounded below by the entropy of the teacher's target, which
    moves (centering spreads it on a fixed batch), so the raw total is not monotone; the
    distillation gap CE - H(teacher) = KL(teacher || student) is what must fall.
    """
    obj = build()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=2e-3)
    batch = make_batch(b=8)
    contrastive, gap = [], []
    for step in range(30):
        out = obj(batch, StepState(step=step, teacher_temp=0.05))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.update_teacher(0.9)
        assert torch.isfinite(out.loss)
        contrastive.append((out.losses["contrastive_alt"] + out.losses["contrastive_syn"]).item())
        gap.append((out.losses["dino"] - out.metrics["dino/entropy"]).item())
    assert sum(contrastive[-3:]) / 3 < 0.5 * sum(contrastive[:3]) / 3, contrastive
    assert sum(gap[-3:]) / 3 < 0.7 * sum(gap[:3]) / 3, gap


def test_dino_needs_local_crops_or_several_globals():
    obj = build()
    batch = make_batch(m=0)
    out = obj(batch, StepState(step=0))
    assert out.losses["dino"].item() == 0.0  # one global crop, no students: nothing to distil


def test_import_tips_model_does_not_import_ray():
    code = "import sys, tips_model, tips_model.objectives; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["tips", "tipsv2"])
def test_state_dict_round_trip_is_exact(name):
    cfg = TipsObjectiveConfig(**HEAD) if name == "tips" else TipsV2ObjectiveConfig(**HEAD)
    a = build(cfg)
    a(make_batch(), StepState(step=0))  # moves the centres
    b = build(cfg)
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)


def test_ibot_distills_masked_tokens_only_and_centres_on_them():
    """iBOT (TIPS v1): heads run on masked tokens only (DINOv2), and the result equals running
    them on every token and selecting; the patch centre averages the masked tokens only."""
    from tips_model.objectives.base import images_to_float

    obj = build()
    batch = make_batch()
    glob = images_to_float(batch["global_crops"].flatten(0, 1))
    masks = batch["masks"].flatten(0, 1).flatten(1)  # [B,N]
    assert 0 < masks.sum() < masks.numel()
    with torch.no_grad():
        t_logits = obj.teacher["dino_head"](obj.teacher["vision"](glob).patch_tokens).float()
        t_probs = obj.ibot_loss.softmax_center_teacher(t_logits, 0.05)  # centre still 0
        locs = images_to_float(batch["local_crops"].flatten(0, 1))
        s = obj.student(glob, masks, locs, batch["alt_ids"], batch["syn_ids"], 1)
        s_logits = obj.student.patch_head()(s.glob.patch_tokens)  # every token
        expected = obj.ibot_loss.forward_masked(s_logits, t_probs, masks)
        out = obj(batch, StepState(step=0, teacher_temp=0.05))
    torch.testing.assert_close(out.losses["ibot"], expected)
    center = obj.ibot_loss.center.flatten()
    torch.testing.assert_close(center, 0.1 * t_logits[masks].mean(0))  # momentum 0.9 from 0
    assert not torch.allclose(center, 0.1 * t_logits.flatten(0, 1).mean(0))


def test_fixed_shape_ibot_is_the_masked_ibot_loss_centre_and_diagnostics():
    """``mim_fixed_shapes`` (TPU recipes: no shape that depends on the masks) computes the
    same iBOT loss, teacher centre, target diagnostics and per-token loss as ``x[masks]``."""
    batch = make_batch()
    step = StepState(step=0, teacher_temp=0.04, progress=0.0)
    runs = []
    for fixed in (False, True):
        obj = build(TipsObjectiveConfig(**HEAD, mim_fixed_shapes=fixed, koleo_weight=0.1))
        out = obj(batch, step)
        out.loss.backward()
        grad = torch.cat([p.grad.flatten() for p in obj.student.parameters() if p.grad is not None])
        runs.append((out, obj.ibot_loss.center.clone(), grad))
    (a, ca, ga), (b, cb, gb) = runs
    assert set(a.losses) == set(b.losses)
    for k in a.losses:
        torch.testing.assert_close(a.losses[k], b.losses[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ca, cb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    for k in ("ibot/entropy", "ibot/mean_entropy", "ibot/logit_spread", "ibot/token_loss"):
        torch.testing.assert_close(a.metrics[k], b.metrics[k], rtol=1e-4, atol=1e-6)


def test_fixed_shape_ibot_refuses_sinkhorn():
    with pytest.raises(ValueError, match="mim_fixed_shapes=true needs objective.centering"):
        TipsObjectiveConfig(**HEAD, mim_fixed_shapes=True, centering="sinkhorn")
