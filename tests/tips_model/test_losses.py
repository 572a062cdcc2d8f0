"""Losses: closed forms, hand-computed cases, bf16 autocast and a 2-rank gloo run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.gloo import run_gloo
from tips_model.losses import (
    DINOLoss,
    IBOTPatchLoss,
    contrastive_loss,
    koleo_loss,
    sinkhorn_knopp,
)

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- contrastive


def test_contrastive_equal_logits_is_log_batch():
    batch = 6
    image = torch.ones(batch, 4)
    text = torch.ones(batch, 4) * 3.0
    loss = contrastive_loss(image, text, torch.tensor(0.07))
    torch.testing.assert_close(loss, torch.tensor(math.log(batch)))


def test_contrastive_each_direction_is_log_batch_when_its_logits_are_equal():
    torch.manual_seed(0)
    batch = 5
    image = torch.ones(batch, 8)  # every text row sees identical image columns
    text = torch.randn(batch, 8)
    temp = torch.tensor(0.2)
    logits_i2t = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t() / temp
    i2t = -torch.diagonal(torch.log_softmax(logits_i2t, dim=1)).mean()
    expected = 0.5 * (i2t + math.log(batch))
    torch.testing.assert_close(contrastive_loss(image, text, temp), expected)


def test_contrastive_aligned_with_tiny_temperature_is_zero():
    emb = torch.eye(4, 6)
    loss = contrastive_loss(emb * 2.0, emb, torch.tensor(1e-3))
    assert loss.item() < 1e-6


def test_contrastive_hand_computed_two_by_two():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits (tau = 0.5): i2t [[2, 1.2], [0, 1.6]]; t2i = transpose
    i2t = (math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))) / 2
    t2i = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.4))) / 2
    loss = contrastive_loss(image, text * 5.0, 0.5)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (i2t + t2i)))


def test_contrastive_temperature_gets_gradient():
    torch.manual_seed(0)
    temp = torch.tensor(0.05, requires_grad=True)
    contrastive_loss(torch.randn(4, 8), torch.randn(4, 8), temp).backward()
    assert temp.grad is not None and temp.grad.abs() > 0


def test_contrastive_bf16_autocast_computes_in_float32():
    torch.manual_seed(0)
    image = torch.randn(8, 16).bfloat16()
    text = torch.randn(8, 16).bfloat16()
    temp = torch.tensor(0.005)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(image, text, temp)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, contrastive_loss(image.float(), text.float(), temp))


def test_contrastive_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        contrastive_loss(torch.randn(4, 8), torch.randn(3, 8), 0.1)


# --------------------------------------------------------------------------- DINO


def test_dino_loss_equals_teacher_entropy_when_student_matches():
    torch.manual_seed(0)
    loss_fn = DINOLoss(out_dim=10, student_temp=0.1)
    target = torch.softmax(torch.randn(4, 10), dim=-1)  # [B, K]
    student = (0.1 * target.log()).expand(3, 4, 10)  # softmax(s / 0.1) == target
    entropy = -(target * target.log()).sum(-1).mean()
    torch.testing.assert_close(loss_fn(student, target), entropy)


def test_dino_loss_is_mean_over_crops():
    torch.manual_seed(0)
    loss_fn = DINOLoss(out_dim=8, student_temp=0.1)
    target = torch.softmax(torch.randn(5, 8), dim=-1)
    matching = 0.1 * target.log()
    uniform = torch.zeros(5, 8)  # CE against a uniform student is log K
    entropy = -(target * target.log()).sum(-1).mean()
    loss = loss_fn(torch.stack([matching, uniform]), target)
    torch.testing.assert_close(loss, (entropy + math.log(8)) / 2)


def test_softmax_centering_subtracts_the_centre():
    loss_fn = DINOLoss(out_dim=4)
    loss_fn.center.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, -2.0, 0.5, 3.0]])
    probs = loss_fn.softmax_center_teacher(logits, teacher_temp=0.5)
    torch.testing.assert_close(probs[0], torch.softmax((logits[0] - loss_fn.center[0]) / 0.5, -1))
    torch.testing.assert_close(probs[1], torch.full((4,), 0.25))  # logits == centre


def test_update_center_ema_arithmetic():
    loss_fn = DINOLoss(out_dim=2, center_momentum=0.9)
    loss_fn.update_center(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))  # batch mean [2, 4]
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.2, 0.4]]))
    loss_fn.update_center(torch.tensor([[10.0, -10.0]]))
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.9 * 0.2 + 1.0, 0.9 * 0.4 - 1.0]]))


def _reference_sinkhorn(logits: torch.Tensor, temp: float, iters: int) -> torch.Tensor:
    """SwAV/DINOv2 formulation on the K x B matrix, float64."""
    q = torch.exp(logits.double() / temp).t()  # [K, B]
    num_k, num_b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / num_k
        q = q / q.sum(dim=0, keepdim=True) / num_b
    return (q * num_b).t().float()


def test_sinkhorn_rows_are_distributions_and_columns_reach_b_over_k():
    torch.manual_seed(0)
    logits = torch.randn(12, 4)
    probs = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(12))
    torch.testing.assert_close(probs, _reference_sinkhorn(logits, 0.5, 3))
    gap_3 = (probs.sum(dim=0) - 12 / 4).abs().max()
    converged = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((4,), 3.0), atol=1e-4, rtol=0)
    assert gap_3 > (converged.sum(dim=0) - 3.0).abs().max()


def test_sinkhorn_is_stable_for_large_logits():
    torch.manual_seed(0)
    logits = torch.randn(8, 6) * 5 + 40.0  # exp(40 / 0.04) overflows float32 without the shift
    probs = DINOLoss(6).sinkhorn_knopp_teacher(logits, teacher_temp=0.04)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(8))
    shifted = sinkhorn_knopp(logits - 40.0, teacher_temp=0.04)
    torch.testing.assert_close(probs, shifted)


def test_dino_bf16_autocast_matches_float32():
    torch.manual_seed(0)
    loss_fn = DINOLoss(out_dim=16)
    student = torch.randn(2, 4, 16).bfloat16()
    teacher = loss_fn.softmax_center_teacher(torch.randn(4, 16).bfloat16(), 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(student, teacher)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(student.float(), teacher))


# --------------------------------------------------------------------------- iBOT / iBOT++

# Per-token cross-entropies, in units of ln 2, built so that CE_bn = CE_GRID[b, n] * ln 2.
CE_GRID = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
MASKS = torch.tensor(
    [[True, True, False, False], [False, False, False, True], [False, False, False, False]]
)


def _ibot_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher one-hot on prototype 0; student (tau_s = 1) softmax puts 2^-CE on it."""
    k = 3
    teacher = F.one_hot(torch.zeros(3, 4, dtype=torch.long), k).float()  # [B, N, K]
    p0 = 2.0**-CE_GRID  # [B, N]
    rest = (1 - p0) / (k - 1)
    student = torch.stack([p0, rest, rest], dim=-1).log()  # [B, N, K]
    return student, teacher


def test_ibot_masked_per_image_weighting_and_all_images_divisor():
    student, teacher = _ibot_case()
    loss = IBOTPatchLoss(3, student_temp=1.0).forward_masked(student, teacher, MASKS)
    # ((1 + 2) / 2 + 3 / 1 + 0) / 3 images = 1.5; a plain masked mean would give 2.0, dividing
    # by the two masked images only 2.25
    torch.testing.assert_close(loss, torch.tensor(1.5 * LN2))


def test_ibot_masked_accepts_preselected_rows():
    student, teacher = _ibot_case()
    loss_fn = IBOTPatchLoss(3, student_temp=1.0)
    loss = loss_fn.forward_masked(student[MASKS], teacher[MASKS], MASKS)
    torch.testing.assert_close(loss, torch.tensor(1.5 * LN2))


def test_ibot_masked_without_masks_is_zero():
    student, teacher = _ibot_case()
    loss = IBOTPatchLoss(3).forward_masked(student, teacher, torch.zeros(3, 4, dtype=torch.bool))
    torch.testing.assert_close(loss, torch.tensor(0.0))


def test_ibot_plus_plus_averages_all_tokens():
    student, teacher = _ibot_case()
    loss_fn = IBOTPatchLoss(3, student_temp=1.0)
    # row means 2.5, 1.5, 2.0 -> 2.0; the masks do not matter at 1:1 weights
    torch.testing.assert_close(loss_fn.forward_all(student, teacher), torch.tensor(2.0 * LN2))
    torch.testing.assert_close(
        loss_fn.forward_all(student, teacher, MASKS), torch.tensor(2.0 * LN2)
    )


def test_ibot_plus_plus_masked_and_visible_weights():
    student, teacher = _ibot_case()
    loss_fn = IBOTPatchLoss(3, student_temp=1.0)
    loss = loss_fn.forward_all(student, teacher, MASKS, masked_weight=2.0, visible_weight=1.0)
    # image 0: (2*1 + 2*2 + 3 + 4) / 6; image 1: (1 + 1 + 1 + 2*3) / 5; image 2: 2
    expected = (13 / 6 + 9 / 5 + 2.0) / 3
    torch.testing.assert_close(loss, torch.tensor(expected * LN2))
    masked_only = loss_fn.forward_all(student, teacher, MASKS, visible_weight=0.0)
    torch.testing.assert_close(masked_only, loss_fn.forward_masked(student, teacher, MASKS))
    with pytest.raises(ValueError, match="not both 0"):
        loss_fn.forward_all(student, teacher, MASKS, masked_weight=0.0, visible_weight=0.0)


def test_ibot_softmax_center_on_patches():
    loss_fn = IBOTPatchLoss(3)
    loss_fn.center.copy_(torch.tensor([[[1.0, 2.0, 3.0]]]))
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [1, 2, 3]
    probs = loss_fn.softmax_center_teacher(logits, teacher_temp=1.0)
    torch.testing.assert_close(probs[0, 0], torch.full((3,), 1 / 3))
    torch.testing.assert_close(probs[0, 1], torch.softmax(-torch.tensor([1.0, 2.0, 3.0]), -1))


def test_ibot_sinkhorn_over_masked_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5)
    loss_fn = IBOTPatchLoss(5)
    probs = loss_fn.sinkhorn_knopp_teacher(logits, 0.1, masks=MASKS)
    assert probs.shape == (3, 4, 5)
    assert torch.count_nonzero(probs[~MASKS]) == 0
    torch.testing.assert_close(probs[MASKS], sinkhorn_knopp(logits[MASKS], 0.1))
    every = loss_fn.sinkhorn_knopp_teacher(logits, 0.1)
    torch.testing.assert_close(every.reshape(12, 5), sinkhorn_knopp(logits.reshape(12, 5), 0.1))


def test_ibot_update_center_over_masked_tokens():
    loss_fn = IBOTPatchLoss(3, center_momentum=0.5)
    logits = torch.arange(36, dtype=torch.float32).reshape(3, 4, 3)
    loss_fn.update_center(logits, MASKS)
    masked_mean = (logits[0, 0] + logits[0, 1] + logits[1, 3]) / 3
    torch.testing.assert_close(loss_fn.center, 0.5 * masked_mean.reshape(1, 1, 3))
    loss_fn.update_center(logits, torch.zeros(3, 4, dtype=torch.bool))  # nothing masked
    torch.testing.assert_close(loss_fn.center, 0.5 * masked_mean.reshape(1, 1, 3))
    loss_fn.update_center(logits)  # all tokens
    all_mean = logits.reshape(12, 3).mean(0).reshape(1, 1, 3)
    torch.testing.assert_close(loss_fn.center, 0.25 * masked_mean.reshape(1, 1, 3) + 0.5 * all_mean)


# --------------------------------------------------------------------------- KoLeo


def _on_circle(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1)


def test_koleo_square_on_the_circle():
    torch.testing.assert_close(
        koleo_loss(_on_circle([0, 90, 180, 270])), torch.tensor(-0.5 * LN2), atol=1e-6, rtol=0
    )


def test_koleo_uneven_points_and_scale_invariance():
    # nearest distances: 1 (0<->60), 1 (60<->0), sqrt(3) (180->60)
    points = _on_circle([0, 60, 180])
    expected = torch.tensor(-math.log(3) / 6)
    torch.testing.assert_close(koleo_loss(points), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(koleo_loss(points * 5.0), expected, atol=1e-6, rtol=0)


def test_koleo_duplicates_are_penalised_but_finite():
    loss = koleo_loss(_on_circle([0, 0, 90]))
    assert torch.isfinite(loss) and loss > 5.0


def test_koleo_needs_two_rows():
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))


# --------------------------------------------------------------------------- distributed

WORLD = 2
PER_RANK = 3


def _dist_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]] * 2, dtype=torch.bool)
    masks[3:] = False
    masks[5, 0] = True  # rank 0 has 3 masked tokens, rank 1 has 1
    return {
        "image": torch.randn(WORLD * PER_RANK, 8, generator=gen),
        "text": torch.randn(WORLD * PER_RANK, 8, generator=gen),
        "cls_logits": torch.randn(WORLD * PER_RANK, 5, generator=gen),
        "patch_logits": torch.randn(WORLD * PER_RANK, 4, 5, generator=gen),
        "masks": masks,
    }


def _dist_worker(rank: int, out_dir: str) -> None:
    data = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in _dist_inputs().items()}
    image = data["image"].clone().requires_grad_(True)
    text = data["text"].clone().requires_grad_(True)
    temp = torch.tensor(0.1, requires_grad=True)
    loss = contrastive_loss(image, text, temp)
    loss.backward()
    dino = DINOLoss(5)
    dino.update_center(data["cls_logits"])
    ibot = IBOTPatchLoss(5)
    ibot.update_center(data["patch_logits"], data["masks"])
    torch.save(
        {
            "loss": loss.detach(),
            "image_grad": image.grad,
            "text_grad": text.grad,
            "temp_grad": temp.grad,
            "dino_center": dino.center,
            "sinkhorn": dino.sinkhorn_knopp_teacher(data["cls_logits"], 0.1),
            "ibot_center": ibot.center,
            "ibot_sinkhorn": ibot.sinkhorn_knopp_teacher(
                data["patch_logits"], 0.1, masks=data["masks"]
            ),
        },
        f"{out_dir}/rank{rank}.pt",
    )


def test_distributed_gloo_matches_single_process_on_concatenated_batch(tmp_path):
    run_gloo(_dist_worker, WORLD, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    data = _dist_inputs()
    image = data["image"].clone().requires_grad_(True)
    text = data["text"].clone().requires_grad_(True)
    temp = torch.tensor(0.1, requires_grad=True)
    full = contrastive_loss(image, text, temp)
    full.backward()
    # 1. loss: mean of the local losses == global-batch loss (not a local-negatives loss)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), full.detach())
    local_only = contrastive_loss(data["image"][:PER_RANK], data["text"][:PER_RANK], 0.1)
    assert not torch.allclose(ranks[0]["loss"], local_only)
    # 2. gradients: after DDP's average over ranks they equal the global-batch gradients
    for r, out in enumerate(ranks):
        rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
        torch.testing.assert_close(out["image_grad"] / WORLD, image.grad[rows])
        torch.testing.assert_close(out["text_grad"] / WORLD, text.grad[rows])
    torch.testing.assert_close(torch.stack([r["temp_grad"] for r in ranks]).mean(), temp.grad)
    # 3. centres and Sinkhorn targets are computed over the global batch
    dino = DINOLoss(5)
    dino.update_center(data["cls_logits"])
    ibot = IBOTPatchLoss(5)
    ibot.update_center(data["patch_logits"], data["masks"])
    for out in ranks:
        torch.testing.assert_close(out["dino_center"], dino.center)
        torch.testing.assert_close(out["ibot_center"], ibot.center)
    torch.testing.assert_close(
        torch.cat([r["sinkhorn"] for r in ranks]), sinkhorn_knopp(data["cls_logits"], 0.1)
    )
    torch.testing.assert_close(
        torch.cat([r["ibot_sinkhorn"] for r in ranks]),
        ibot.sinkhorn_knopp_teacher(data["patch_logits"], 0.1, masks=data["masks"]),
    )
