"""Linear probes on frozen patch tokens, shared by ``linear_seg`` and ``depth``.

Protocol (DINOv2 "linear" dense evaluation, Oquab et al. 2023 §7.3 / its
``eval/segmentation`` linear head): the backbone is frozen; images are resized to S x S;
the last layer's normalised patch tokens (optionally with the CLS token concatenated to
every patch, DINOv2's depth "lin. 1") go through BatchNorm + a 1x1 convolution; the
prediction is upsampled bilinearly to the target's resolution before the loss and before
the metric (each task's loss does the upsampling: ``upsample``).
Train-split features are computed once and cached on the CPU in fp16 (N x D x h x w), so a
probe costs one backbone pass per image plus ``probe_steps`` cheap head steps (AdamW,
cosine to 0, seeded batches). TIPS's exact probe settings are [open] (TIPS_NOTES 10.1, 13.10).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.eval.readers.base import Split
from orchestrator.eval.runtime import (
    autocast,
    index_batches,
    model_device,
    progress,
    resize,
    to_tensor,
)


class LinearHead(nn.Module):
    """BatchNorm2d + 1x1 conv: [B, D, h, w] -> [B, C, h, w] (DINOv2's ``BNHead`` linear)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


@torch.no_grad()
def dense_features(vision: nn.Module, images: torch.Tensor, with_cls: bool) -> torch.Tensor:
    """Frozen last-layer patch features as a map.

    Args:
        vision: image tower.
        images: [B, 3, S, S] float in [0, 1] on the tower's device.
        with_cls: concatenate ``cls_alt`` to every patch (channels 2D).

    Returns:
        [B, D or 2D, h, w] float32.
    """
    p = vision.patch_size
    b, _, hh, ww = images.shape
    with autocast(images.device):
        out = vision(images)
    tok = out.patch_tokens.float()  # [B, N, D]
    feats = tok.transpose(1, 2).reshape(b, -1, hh // p, ww // p)  # [B, D, h, w]
    if with_cls:
        cls = out.cls_alt.float()[:, :, None, None].expand(-1, -1, hh // p, ww // p)
        feats = torch.cat([feats, cls], dim=1)
    return feats


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [B, K, h, w] predictions to ``size`` (no-op when equal)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_target(t: np.ndarray, size: int) -> torch.Tensor:
    """Nearest resize of an [H, W] label or depth map to [size, size] (keeps 255 and 0)."""
    x = torch.from_numpy(np.ascontiguousarray(t)).float()[None, None]
    return F.interpolate(x, size=(size, size), mode="nearest-exact")[0, 0]


def cache_features(
    vision: nn.Module,
    split: Split,
    size: int,
    batch_size: int,
    target_fn: Callable[[int], np.ndarray],
    with_cls: bool,
    desc: str,
    show_progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and S x S targets for a whole (training) split.

    Returns:
        (feats fp16 [N, D', h, w] on CPU, targets float32 [N, S, S] on CPU).
    """
    device = model_device(vision)
    feats, targets = [], []
    with progress(len(split), desc, show_progress) as bar:
        for idx in index_batches(len(split), batch_size):
            x = torch.stack([resize(to_tensor(split.image(i)), (size, size)) for i in idx])
            feats.append(dense_features(vision, x.to(device), with_cls).half().cpu())
            targets += [resize_target(target_fn(i), size) for i in idx]
            bar.update(len(idx))
    return torch.cat(feats), torch.stack(targets)


def train_head(
    head: nn.Module,
    feats: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> list[float]:
    """Fit ``head`` on cached features: AdamW (wd 1e-4), cosine lr to 0, seeded batches.

    Args:
        head: maps [B, D', h, w] -> [B, K, h, w]; trained in place on its device.
        feats: [N, D', h, w] cached features.
        targets: [N, S, S] targets.
        loss_fn: (head output [B, K, h, w], targets [B, S, S]) -> scalar; it upsamples.
        steps, lr, batch_size, seed: the fixed budget.

    Returns:
        The loss at every step (for tests and logs).
    """
    device = next(head.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    n = feats.shape[0]
    losses = []
    head.train()
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        f = feats[idx].to(device).float()
        t = targets[idx].to(device)
        loss = loss_fn(head(f), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    head.eval()
    return losses
