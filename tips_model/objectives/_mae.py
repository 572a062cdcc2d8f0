"""MAE-style token dropping for the TIPS vision tower: patchify, random masking, visible-only
encoding and the masked-patch reconstruction loss (used by MUG, docs/method.md, "MUG").

Different from iBOT's masking (``VisionTransformer.prepare_tokens(masks=...)`` substitutes a
mask token and still runs every patch through the encoder): here masked patches are *dropped*
and the encoder sees only the visible subset, as in MAE (He et al., CVPR 2022, §3):

    ids_keep, ids_restore, mask = random_masking(B, N, ratio)      # per-sample uniform shuffle
    out = encode_visible(vision, images, ids_keep)                  # [B, 2 + K, D] tokens
    L_rec = sum_{b,n} mask[b,n] * mean_j (pred - target)^2 / sum mask   (masked patches only)

with ``target`` the patch pixels, optionally normalised per patch (MAE ``norm_pix_loss``).

Only the encoder's public pieces are used (``prepare_tokens``, ``blocks``, ``norm``,
``grad_checkpointing``), so position embeddings (and their resizing) are exactly the tower's.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tips_model.vision import EncoderOutput, VisionTransformer


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Images -> per-patch pixel vectors in the encoder's row-major patch order.

    Args:
        images: [B, 3, H, W] float; H and W multiples of ``patch_size``.
        patch_size: p.

    Returns:
        [B, N, p*p*3] with N = (H/p)(W/p); each vector is ordered (row in patch, column, channel).
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)  # [B,3,gh,p,gw,p]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B,gh,gw,p,p,3]
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def normalize_patches(target: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE ``norm_pix_loss`` target: each patch vector minus its mean over its unbiased std.

    Args:
        target: [B, N, P] patch pixels.

    Returns:
        [B, N, P] ``(x - mean) / sqrt(var + eps)``, statistics per patch (unbiased var, as MAE).
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """K = int(N * (1 - ratio)) visible patches (MAE), at least one."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample uniform random subset of visible patches (MAE's shuffle-and-keep).

    Args:
        batch: B.
        num_patches: N.
        mask_ratio: fraction of patches dropped, in [0, 1).
        device: where the indices live.
        generator: explicit RNG; None uses torch's default generator for ``device`` (the
            training loop reseeds it from (seed, step, rank) every step, so that is resumable).

    Returns:
        ``ids_keep`` [B, K] int64 (visible patches, in shuffled order), ``ids_restore`` [B, N]
        int64 (inverse permutation: position of each patch in [visible; masked]) and ``mask``
        [B, N] bool (True = masked / dropped), with K = ``num_visible(N, mask_ratio)``.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    k = num_visible(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = noise.argsort(dim=1)  # [B,N] ascending noise: the first K are kept
    ids_restore = ids_shuffle.argsort(dim=1)  # [B,N]
    ids_keep = ids_shuffle[:, :k]  # [B,K]
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    mask[:, :k] = False
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return ids_keep, ids_restore, mask


def encode_visible(
    vision: VisionTransformer, images: Tensor, ids_keep: Tensor | None = None
) -> EncoderOutput:
    """Run the encoder on the two CLS tokens plus the kept patches only.

    Args:
        vision: the TIPS vision tower (its own position embeddings are used).
        images: [B, 3, H, W] float in [0, 1].
        ids_keep: [B, K] int64 patch indices to keep; None keeps all N.

    Returns:
        EncoderOutput with cls_alt [B, D], cls_syn [B, D] and patch_tokens [B, K, D] (in the
        order of ``ids_keep``), after the final LayerNorm.
    """
    x = vision.prepare_tokens(images)  # [B, 2+N, D], position embeddings already added
    if ids_keep is not None:
        d = x.shape[-1]
        kept = torch.gather(x[:, 2:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [B,K,D]
        x = torch.cat([x[:, :2], kept], dim=1)  # [B, 2+K, D]
    for blk in vision.blocks:
        if vision.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    x = vision.norm(x)
    return EncoderOutput(cls_alt=x[:, 0], cls_syn=x[:, 1], patch_tokens=x[:, 2:])


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over masked patches only (MAE eq.: per-patch mean, masked average).

    Args:
        pred: [B, N, P] predicted patch pixels.
        target: [B, N, P] targets (raw or ``normalize_patches``).
        mask: [B, N] bool, True = masked (these patches are scored; visible ones are not).

    Returns:
        Scalar float32; 0 (still attached to ``pred``) when nothing is masked.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B,N]
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)
