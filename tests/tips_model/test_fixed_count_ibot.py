"""Fixed-count iBOT (``objective.mim_masked_capacity``): the heads run on a fixed number of
gathered token slots per image, and the loss, teacher centre, gradients and diagnostics equal
the ``x[masks]`` path on pipeline masks (the padding slots weigh 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tips_model.masking import BlockMaskGenerator, sample_mask
from tips_model.objectives import ModelConfig, StepState, TipsObjectiveConfig, build_objective
from tips_model.objectives.tips import mask_slots

MODEL = ModelConfig(vision="vit_test", text="text_test", max_text_len=16)
HEAD = dict(head_out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
VOCAB = 100


def pipeline_masks(b: int, seed: int, ratio_max: float = 0.5) -> torch.Tensor:
    """[B, 1, 4, 4] masks drawn as the data pipeline draws them (one record at a time)."""
    gen = BlockMaskGenerator(grid=(4, 4), min_num_patches=1)
    rng = np.random.default_rng(seed)
    masks = np.stack([sample_mask(gen, rng, 0.7, 0.1, ratio_max)[None] for _ in range(b)])
    return torch.from_numpy(masks)


def make_batch(b: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = pipeline_masks(b, seed)
    masks[0] = False  # an image without a mask
    masks[1, 0, :2, :4] = True  # one at the bound: int(16 * 0.5) = 8 tokens
    masks[1, 0, 2:] = False
    ids = torch.randint(1, VOCAB, (b, 16), generator=g)
    ids[:, 10:] = 0
    return {
        "global_crops": torch.randint(0, 256, (b, 1, 3, 32, 32), generator=g, dtype=torch.uint8),
        "local_crops": torch.randint(0, 256, (b, 2, 3, 16, 16), generator=g, dtype=torch.uint8),
        "masks": masks,
        "alt_ids": ids,
        "syn_ids": torch.roll(ids, 1, dims=1),
    }


def run(capacity: float | None, batch: dict[str, torch.Tensor]):
    torch.manual_seed(0)
    cfg = TipsObjectiveConfig(**HEAD, mim_masked_capacity=capacity, koleo_weight=0.1)
    obj = build_objective(cfg, MODEL, vocab_size=VOCAB)
    out = obj(batch, StepState(step=0, teacher_temp=0.04))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in obj.student.named_parameters() if p.grad is not None}
    return out, obj.ibot_loss.center.clone(), grads


@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_count_ibot_equals_the_masked_ibot(seed):
    batch = make_batch(seed=seed)
    assert batch["masks"].sum() > 0
    a, ca, ga = run(None, batch)
    b, cb, gb = run(0.5, batch)
    assert set(a.losses) == set(b.losses)
    for k in a.losses:
        torch.testing.assert_close(a.losses[k], b.losses[k], rtol=1e-5, atol=1e-6)
    assert a.losses["ibot"] > 0
    torch.testing.assert_close(ca, cb, rtol=1e-5, atol=1e-6)
    assert ca.abs().sum() > 0  # the centre moved
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)
    for k in ("ibot/entropy", "ibot/mean_entropy", "ibot/logit_spread", "ibot/token_loss"):
        torch.testing.assert_close(a.metrics[k], b.metrics[k], rtol=1e-4, atol=1e-6)
    assert b.metrics["ibot/dropped_tokens"] == 0


def test_slots_have_one_shape_whatever_the_masks():
    shapes = set()
    for seed in range(5):
        masks = pipeline_masks(6, seed).flatten(1)  # [6, 16]
        slots = mask_slots(masks, 0.5)
        shapes.add((slots.index.shape, slots.valid.shape, slots.weight.shape))
        # every masked token is in a slot, once; the padding weighs 0
        picked = slots.index[slots.valid > 0]
        assert sorted(picked.tolist()) == masks.flatten().nonzero().flatten().tolist()
        assert (slots.weight[slots.valid == 0] == 0).all()
        per_image = slots.weight.view(6, -1).sum(1)
        torch.testing.assert_close(per_image, (masks.sum(1) > 0).float())
    assert shapes == {(torch.Size([48]),) * 3}  # 6 images x int(0.5 * 16) slots


def test_capacity_below_the_masked_count_reports_dropped_tokens():
    batch = make_batch()
    batch["masks"][2] = True  # 16 masked tokens, 8 slots
    b, _, _ = run(0.5, batch)
    assert b.metrics["ibot/dropped_tokens"] == 8


def test_capacity_is_validated():
    with pytest.raises(ValueError, match="mim_masked_capacity=1.5 must be in"):
        TipsObjectiveConfig(**HEAD, mim_masked_capacity=1.5)
    with pytest.raises(ValueError, match="mim_masked_capacity needs objective.mim_tokens"):
        TipsObjectiveConfig(**HEAD, mim_masked_capacity=0.5, mim_tokens="all")
    with pytest.raises(ValueError, match="mim_masked_capacity needs"):
        TipsObjectiveConfig(**HEAD, mim_masked_capacity=0.5, mim_fixed_shapes=True)
