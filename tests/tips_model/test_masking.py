"""Block masks: counts, bounds, aspect ratios, determinism, per-record and per-batch sampling."""

from __future__ import annotations

import numpy as np
import pytest

from tips_model.masking import BlockMaskGenerator, sample_batch_masks, sample_mask


def _bbox(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_defaults_follow_dinov2():
    gen = BlockMaskGenerator((16, 16))
    assert gen.num_patches == 256
    assert gen.max_num_patches == 128
    assert gen.min_num_patches == 4
    np.testing.assert_allclose(np.exp(gen.log_aspect_range), (0.3, 1 / 0.3))


def test_masked_count_is_close_to_target_and_never_above():
    gen = BlockMaskGenerator((16, 16))
    rng = np.random.default_rng(0)
    shortfalls = []
    for _ in range(400):
        target = int(rng.integers(0, 129))
        mask = gen(target, rng)
        assert mask.shape == (16, 16) and mask.dtype == bool
        count = int(mask.sum())
        assert count <= target
        shortfalls.append(target - count)
    assert max(shortfalls) <= 4
    assert np.mean(shortfalls) < 0.5


def test_zero_target_is_empty_and_negative_is_refused():
    gen = BlockMaskGenerator((16, 16))
    assert not gen(0, np.random.default_rng(0)).any()
    with pytest.raises(ValueError, match="num_masking_patches"):
        gen(-1, np.random.default_rng(0))


def test_deterministic_for_a_seed():
    gen = BlockMaskGenerator((14, 10))
    a = gen(50, np.random.default_rng(123))
    b = gen(50, np.random.default_rng(123))
    c = gen(50, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_one_block_is_a_rectangle_within_area_and_aspect_bounds():
    gen = BlockMaskGenerator((64, 64), min_num_patches=100, max_num_patches=400)
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = np.zeros((64, 64), dtype=bool)
        added = gen.place_block(mask, 300, rng)
        assert 0 < added == mask.sum() <= 300
        h, w = _bbox(mask)
        assert h * w == added  # one solid rectangle
        # h = round(sqrt(A r)), w = round(sqrt(A / r)) with r in [0.3, 1/0.3]: rounding slack 0.5
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3
        assert (h + 0.5) / (w - 0.5) >= 0.3


@pytest.mark.parametrize("aspect, ratio", [(1.0, 1.0), (4.0, 4.0)])
def test_fixed_aspect_ratio_is_respected(aspect, ratio):
    gen = BlockMaskGenerator((64, 64), min_num_patches=64, min_aspect=aspect, max_aspect=aspect)
    rng = np.random.default_rng(1)
    for _ in range(50):
        mask = np.zeros((64, 64), dtype=bool)
        gen.place_block(mask, 400, rng)
        h, w = _bbox(mask)
        assert abs(h / w - ratio) <= 0.5 * ratio * (1 / w + 1 / h) + 1e-9


def test_blocks_respect_the_per_block_cap():
    gen = BlockMaskGenerator((16, 16), max_num_patches=10)
    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = np.zeros((16, 16), dtype=bool)
        assert gen.place_block(mask, 10, rng) <= 10


def test_sample_mask_probability_and_ratio_bounds():
    gen = BlockMaskGenerator((16, 16))
    rng = np.random.default_rng(0)
    counts = np.array([sample_mask(gen, rng, 0.3, 0.1, 0.5).sum() for _ in range(2000)])
    masked = counts[counts > 0]
    assert abs(len(masked) / 2000 - 0.3) < 0.04  # binomial sd 0.010
    assert masked.max() <= int(0.5 * 256)
    assert masked.min() >= int(0.1 * 256) - 4
    assert abs(masked.mean() / 256 - 0.3) < 0.03  # U[0.1, 0.5] has mean 0.3
    assert not any(sample_mask(gen, rng, 0.0).any() for _ in range(50))
    assert all(sample_mask(gen, rng, 1.0).any() for _ in range(50))


def test_sample_mask_rejects_bad_ratios():
    gen = BlockMaskGenerator((4, 4))
    with pytest.raises(ValueError, match="ratio_min <= ratio_max"):
        sample_mask(gen, np.random.default_rng(0), 0.5, 0.6, 0.2)
    with pytest.raises(ValueError, match="mask_probability"):
        sample_mask(gen, np.random.default_rng(0), 1.5)


def test_sample_batch_masks_is_stratified_and_shuffled():
    gen = BlockMaskGenerator((16, 16))
    masks = sample_batch_masks(10, gen, np.random.default_rng(0), 0.5, 0.1, 0.5)
    assert masks.shape == (10, 16, 16) and masks.dtype == bool
    counts = masks.reshape(10, -1).sum(-1)
    assert (counts > 0).sum() == 5
    # the i-th smallest masked count lies in its stratum [r_i, r_{i+1}] * N (minus shortfall)
    bounds = np.linspace(0.1, 0.5, 6) * 256
    for i, count in enumerate(np.sort(counts[counts > 0])):
        assert int(bounds[i]) - 4 <= count <= int(bounds[i + 1])
    orders = {
        tuple(sample_batch_masks(10, gen, np.random.default_rng(s)).reshape(10, -1).any(-1))
        for s in range(5)
    }
    assert len(orders) > 1  # the masked images are not always the first ones
    np.testing.assert_array_equal(
        masks, sample_batch_masks(10, gen, np.random.default_rng(0), 0.5, 0.1, 0.5)
    )


def test_non_square_grid():
    gen = BlockMaskGenerator((8, 12))
    mask = gen(30, np.random.default_rng(0))
    assert mask.shape == (8, 12)
    assert 26 <= mask.sum() <= 30
