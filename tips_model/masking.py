"""Block-wise patch masks for masked image modelling (iBOT / iBOT++), numpy only.

Contract:
    BlockMaskGenerator(grid=(h, w))(num_masking_patches, rng) -> bool [h, w]
    sample_mask(generator, rng, ...) -> bool [h, w]              one record (data pipeline)
    sample_batch_masks(batch_size, generator, rng, ...) -> bool [B, h, w]   DINOv2 collate

The TIPS masking recipe is [open] (docs/method.md, "Masking"; docs/method.md, "Open questions",
item 2); every default here is DINOv2's (``dinov2/data/masking.py`` MaskingGenerator,
``dinov2/data/collate.py``, ``dinov2/train/train.py``): rectangles of area ~U[min_num_patches,
remaining budget] with a log-uniform aspect ratio in [0.3, 1/0.3], at most 0.5*N patches per
rectangle, up to 10 tries per rectangle, stopping at the target count or when a rectangle adds
nothing; masks are drawn for a fraction 0.5 of the images with a ratio in [0.1, 0.5].

Randomness is an explicit ``np.random.Generator`` (docs/design.md, "Randomness"); the data
pipeline seeds one per record so masks are reproducible and resumable. The masked count never
exceeds the target and may fall short of it when no further rectangle fits (typically by a few
patches). A record therefore has at most ``int(N * ratio_max)`` masked patches: the static
bound the fixed-count iBOT (``objective.mim_masked_capacity``) relies on.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BlockMaskGenerator", "sample_mask", "sample_batch_masks"]

_TRIES_PER_BLOCK = 10  # dinov2/data/masking.py MaskingGenerator._mask


class BlockMaskGenerator:
    """DINOv2 / BEiT block-wise mask generator on a patch grid.

    Args:
        grid: Patch grid ``(h, w)``, e.g. ``(16, 16)`` for 224 px at patch 14.
        min_num_patches: Smallest rectangle area drawn (DINOv2: 4).
        max_num_patches: Largest area of one rectangle; None means ``0.5 * h * w`` (DINOv2's
            training setting).
        min_aspect: Smallest height/width ratio (DINOv2: 0.3).
        max_aspect: Largest height/width ratio; None means ``1 / min_aspect``.

    Raises:
        ValueError: On a non-positive grid, patch bounds or aspect ratios.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = int(grid[0]), int(grid[1])
        if self.height < 1 or self.width < 1:
            raise ValueError(f"BlockMaskGenerator grid must be positive, got {grid}")
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = (
            int(0.5 * self.num_patches) if max_num_patches is None else max_num_patches
        )
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if min_num_patches < 1 or self.max_num_patches < 1:
            raise ValueError(
                "BlockMaskGenerator min_num_patches and max_num_patches must be >= 1, got "
                f"{min_num_patches} and {self.max_num_patches}"
            )
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(
                f"BlockMaskGenerator needs 0 < min_aspect <= max_aspect, got {min_aspect}, "
                f"{max_aspect}"
            )
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        aspect = tuple(round(math.exp(a), 3) for a in self.log_aspect_range)
        return (
            f"BlockMaskGenerator(grid=({self.height}, {self.width}), patches per block "
            f"[{self.min_num_patches}, {self.max_num_patches}], aspect {aspect})"
        )

    def place_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        """Try up to 10 rectangles; mask the first that adds between 1 and ``max_new`` patches.

        Args:
            mask: ``[h, w]`` bool mask, updated in place.
            max_new: Most patches this rectangle may add (the remaining budget, capped).
            rng: Random generator.

        Returns:
            Number of patches newly masked (0 when no try succeeded).
        """
        for _ in range(_TRIES_PER_BLOCK):
            # a + (b - a) * U[0, 1) like Python's random.uniform: well defined when the budget
            # max_new is below min_num_patches (numpy's uniform leaves high < low undefined).
            area = self.min_num_patches + (max_new - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect_range))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            # Strict inequalities as in DINOv2: a block never spans the full grid side.
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_new:
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """Mask about ``num_masking_patches`` patches with rectangles.

        Args:
            num_masking_patches: Target count (0 gives an empty mask).
            rng: Random generator.

        Returns:
            ``[h, w]`` bool mask with at most ``num_masking_patches`` True entries.
        """
        if num_masking_patches < 0:
            raise ValueError(f"num_masking_patches must be >= 0, got {num_masking_patches}")
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_new = min(num_masking_patches - count, self.max_num_patches)
            added = self.place_block(mask, max_new, rng)
            if added == 0:
                break
            count += added
        return mask


def _check_ratios(mask_probability: float, ratio_min: float, ratio_max: float) -> None:
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if not 0.0 <= ratio_min <= ratio_max <= 1.0:
        raise ValueError(
            f"mask ratios need 0 <= ratio_min <= ratio_max <= 1, got {ratio_min}, {ratio_max}"
        )


def sample_mask(
    generator: BlockMaskGenerator,
    rng: np.random.Generator,
    mask_probability: float = 0.5,
    ratio_min: float = 0.1,
    ratio_max: float = 0.5,
) -> np.ndarray:
    """Independent per-record mask: masked with probability ``mask_probability``.

    A masked record gets ``int(N * U[ratio_min, ratio_max])`` target patches; the expected
    fraction of masked records and the ratio range match DINOv2's per-batch collate, without
    its stratification across the batch.

    Args:
        generator: Block generator of the record's patch grid.
        rng: The record's own generator (seeded from base seed, epoch and record key).
        mask_probability: Probability that the record is masked at all (DINOv2: 0.5).
        ratio_min: Lower bound of the masked fraction (DINOv2: 0.1).
        ratio_max: Upper bound of the masked fraction (DINOv2: 0.5).

    Returns:
        ``[h, w]`` bool mask (all False for an unmasked record).
    """
    _check_ratios(mask_probability, ratio_min, ratio_max)
    if rng.random() >= mask_probability:
        return np.zeros((generator.height, generator.width), dtype=bool)
    target = int(generator.num_patches * rng.uniform(ratio_min, ratio_max))
    return generator(target, rng)


def sample_batch_masks(
    batch_size: int,
    generator: BlockMaskGenerator,
    rng: np.random.Generator,
    mask_probability: float = 0.5,
    ratio_min: float = 0.1,
    ratio_max: float = 0.5,
) -> np.ndarray:
    """DINOv2's collate-time masks: stratified ratios over a fixed share of the batch.

    Exactly ``int(batch_size * mask_probability)`` images are masked; the i-th of them draws
    its ratio from ``[r_i, r_{i+1}]`` with ``r = linspace(ratio_min, ratio_max, n + 1)``; the
    rest are empty; the order is then shuffled.

    Args:
        batch_size: Number of images B.
        generator: Block generator of the patch grid.
        rng: Random generator for the whole batch.
        mask_probability: Share of masked images (DINOv2: 0.5).
        ratio_min: Lower end of the ratio range (DINOv2: 0.1).
        ratio_max: Upper end of the ratio range (DINOv2: 0.5).

    Returns:
        ``[B, h, w]`` bool masks.
    """
    _check_ratios(mask_probability, ratio_min, ratio_max)
    num_masked = int(batch_size * mask_probability)
    bounds = np.linspace(ratio_min, ratio_max, num_masked + 1)
    masks = np.zeros((batch_size, generator.height, generator.width), dtype=bool)
    for i in range(num_masked):
        target = int(generator.num_patches * rng.uniform(bounds[i], bounds[i + 1]))
        masks[i] = generator(target, rng)
    return masks[rng.permutation(batch_size)]
