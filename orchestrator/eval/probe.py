"""Linear probes on frozen patch tokens, shared by ``linear_seg`` and ``depth``.

``run_dense_probe`` is the whole probe (cache train features, fit the head, predict and score
val); a task passes only its parts (target, loss, prediction, metrics) as a ``DenseTask``.

Protocol (DINOv2 "linear" dense evaluation, Oquab et al. 2023 §7.3 / its
``eval/segmentation`` linear head): the backbone is frozen; images are resized to S x S;
the last layer's normalised patch tokens (optionally with the CLS token concatenated to
every patch, DINOv2's depth "lin. 1") go through BatchNorm + a 1x1 convolution; the
prediction is upsampled bilinearly to the target's resolution before the loss and before
the metric (each task's loss does the upsampling: ``upsample``).
Train-split features are computed once and cached on the CPU in fp16 (N x D x h x w), so a
probe costs one backbone pass per image plus ``probe_steps`` cheap head steps (AdamW,
cosine to 0, seeded batches). TIPS's exact probe settings are [open]
(docs/method.md, "Open questions", item 10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.eval.options import EvalOptions
from orchestrator.eval.readers.base import EvalDataset, Split
from orchestrator.eval.runtime import (
    autocast,
    index_batches,
    model_device,
    native_size,
    progress,
    resize,
    to_tensor,
)
from orchestrator.eval.zero_shot_seg import group_by_shape


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


@dataclass
class DenseTask:
    """What a dense probe task adds to the shared skeleton (``run_dense_probe``).

    Attributes:
        name: task name (progress bars: ``{name}-train`` while caching, ``name`` on val).
        kind: the plot kind of its examples ("segmentation", "depth").
        target: the ``Split`` method giving image i's [H, W] target ("mask", "depth").
        out_dim: head outputs K per patch (classes, depth bins).
        with_cls: concatenate the CLS token to every patch feature.
        loss: (head output [B, K, h, w], S x S targets [B, S, S]) -> scalar; it upsamples.
        predict: (head output [B, K, h, w], target size (H, W)) -> [B, H, W] prediction.
        score: (prediction [H, W] on the CPU, target [H, W]) -> None; accumulates metrics.
        example_extra: extra keys of every plotted example.
    """

    name: str
    kind: str
    target: str
    out_dim: int
    with_cls: bool
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    predict: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]
    score: Callable[[torch.Tensor, np.ndarray], None]
    example_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeRun:
    """What ``run_dense_probe`` did: sizes, the training losses, examples for plots."""

    image_size: int
    train_images: int
    val_images: int
    losses: list[float]
    examples: list[dict[str, Any]]

    @property
    def final_train_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def run_dense_probe(
    vision: nn.Module, data: EvalDataset, opts: EvalOptions, task: DenseTask
) -> ProbeRun:
    """Cache "train" features, fit a ``LinearHead``, then predict and score "val" images.

    Every val image is scored at its target's own resolution (images of one shape share a
    forward pass); the first ``opts.plot_images`` become examples.

    Args:
        vision: the frozen vision tower.
        data: a dataset with "train" and "val" (or "test") splits.
        opts: image size, probe budget, image caps, seed, progress.
        task: the task-specific parts.
    """
    train = data.split("train").limit(opts.max_train_images)
    val = data.split("val", "test").limit(opts.max_images)
    device = model_device(vision)
    size = opts.image_size or native_size(vision)
    # 1. frozen features of the train split
    feats, targets = cache_features(
        vision,
        train,
        size,
        opts.batch_size,
        getattr(train, task.target),
        with_cls=task.with_cls,
        desc=f"{task.name}-train",
        show_progress=opts.progress,
    )
    # 2. the head, on a fixed budget
    torch.manual_seed(opts.seed)
    head = LinearHead(feats.shape[1], task.out_dim).to(device)
    losses = train_head(
        head,
        feats,
        targets,
        task.loss,
        opts.probe_steps,
        opts.probe_lr,
        opts.probe_batch_size,
        opts.seed,
    )
    # 3. predictions on val at each target's resolution
    examples: list[dict[str, Any]] = []
    val_target = getattr(val, task.target)
    with progress(len(val), task.name, opts.progress) as bar, torch.no_grad():
        for idx in index_batches(len(val), opts.batch_size):
            items = [(i, val.image(i), val_target(i)) for i in idx]
            for group in group_by_shape(items):
                x = torch.stack([resize(to_tensor(items[p][1]), (size, size)) for p in group])
                logits = head(dense_features(vision, x.to(device), with_cls=task.with_cls))
                pred = task.predict(logits, tuple(items[group[0]][2].shape)).cpu()
                for j, p in enumerate(group):
                    task.score(pred[j], items[p][2])
                    if len(examples) < opts.plot_images:
                        examples.append(
                            {
                                "image": items[p][1],
                                "truth": items[p][2],
                                "pred": pred[j].numpy(),
                                "kind": task.kind,
                                **task.example_extra,
                            }
                        )
            bar.update(len(idx))
    return ProbeRun(size, len(train), len(val), losses, examples)
