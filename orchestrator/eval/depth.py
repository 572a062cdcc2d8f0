"""Monocular depth linear probe on frozen features ("NYU depth RMSE" in TIPS_NOTES 10.2).

Protocol (DINOv2 depth "lin. 1", Oquab et al. 2023 §7.4, see ``probe.py``): last-layer
patch tokens with the CLS token concatenated to each, BatchNorm + 1x1 conv to
``depth_bins`` bins spread uniformly over the dataset's depth range (256 bins over
[0.001, 10] m for NYU, as the TIPS DPT depth head, TIPS_NOTES 9.5); depth = the bins'
softmax-weighted mean per patch (softmax instead of DINOv2's ReLU-normalisation: it cannot
collapse to all-zero weights on a short budget), then upsampled bilinearly (the depth map,
not the bin logits: 256x cheaper, and the same map where depth is smooth); trained with
the scale-invariant log loss (Eigen et al. 2014, variance focus 0.85 as in BTS / DINOv2) on
valid pixels. On "val" the prediction is upsampled bilinearly to the ground truth's size
and RMSE, abs-rel and delta < 1.25^i are averaged over images (``metrics.depth_metrics``).
No Eigen border crop.
"""

from __future__ import annotations

import torch

from orchestrator.eval.loader import Encoders
from orchestrator.eval.metrics import MeanMeter, depth_metrics
from orchestrator.eval.options import EvalOptions
from orchestrator.eval.probe import (
    LinearHead,
    cache_features,
    dense_features,
    train_head,
    upsample,
)
from orchestrator.eval.readers.base import EvalDataset, ReaderError
from orchestrator.eval.result import EvalResult
from orchestrator.eval.runtime import (
    index_batches,
    model_device,
    native_size,
    progress,
    resize,
    to_tensor,
)
from orchestrator.eval.zero_shot_seg import group_by_shape

TASK = "depth"
KIND = "depth"
SILOG_VARIANCE_FOCUS = 0.85  # BTS (Lee et al. 2019) / DINOv2 SigLoss


def bins_to_depth(logits: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] bin logits -> [B, H, W] depth = sum softmax(logits) * centres."""
    return torch.einsum("bkhw,k->bhw", logits.softmax(1), centres.to(logits.device))


def silog_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scale-invariant log loss sqrt(mean g^2 - 0.85 (mean g)^2), g = log pred - log gt.

    Args:
        pred: [B, H, W] positive depth; gt: [B, H, W]; valid: [B, H, W] bool.
    """
    if not bool(valid.any()):
        return pred.sum() * 0.0
    g = torch.log(pred[valid]) - torch.log(gt[valid])
    return torch.sqrt((g**2).mean() - SILOG_VARIANCE_FOCUS * g.mean() ** 2 + 1e-8)


def run(enc: Encoders, data: EvalDataset, opts: EvalOptions) -> EvalResult:
    """Train a linear depth head on "train", report depth errors on "val".

    Args:
        enc: encoders (only the vision tower is used, frozen).
        data: a depth dataset with "train" and "val" splits; ``depth_range`` in metres.
        opts: image size, bins, probe budget, image caps.

    Returns:
        EvalResult with ``rmse`` and ``abs_rel`` (metres / ratio) and ``delta1..3``
        (percent); a few examples for plots.
    """
    if not data.has_split("train"):
        raise ReaderError(f"{data.root or data.name}: the depth probe needs a train split")
    train = data.split("train").limit(opts.max_train_images)
    val = data.split("val", "test").limit(opts.max_images)
    lo, hi = data.depth_range
    vision, device = enc.vision, model_device(enc.vision)
    size = opts.image_size or native_size(vision)
    centres = torch.linspace(lo, hi, opts.depth_bins)
    # 1. frozen features of the train split
    feats, targets = cache_features(
        vision,
        train,
        size,
        opts.batch_size,
        train.depth,
        with_cls=True,
        desc="depth-train",
        show_progress=opts.progress,
    )

    def loss_fn(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        pred = upsample(bins_to_depth(logits, centres)[:, None], gt.shape[-2:])[:, 0]
        return silog_loss(pred, gt, (gt > lo) & (gt <= hi))

    # 2. the head, on a fixed budget
    torch.manual_seed(opts.seed)
    head = LinearHead(feats.shape[1], opts.depth_bins).to(device)
    losses = train_head(
        head,
        feats,
        targets,
        loss_fn,
        opts.probe_steps,
        opts.probe_lr,
        opts.probe_batch_size,
        opts.seed,
    )
    # 3. per-image errors on val at the ground truth's resolution
    meter, examples = MeanMeter(), []
    with progress(len(val), TASK, opts.progress) as bar, torch.no_grad():
        for idx in index_batches(len(val), opts.batch_size):
            items = [(i, val.image(i), val.depth(i)) for i in idx]
            for group in group_by_shape(items):
                x = torch.stack([resize(to_tensor(items[p][1]), (size, size)) for p in group])
                logits = head(dense_features(vision, x.to(device), with_cls=True))
                hw = tuple(items[group[0]][2].shape)
                pred = upsample(bins_to_depth(logits, centres)[:, None], hw)[:, 0].cpu()
                for j, p in enumerate(group):
                    m = depth_metrics(pred[j], torch.from_numpy(items[p][2]), lo, hi)
                    if m is not None:
                        meter.add(m)
                    if len(examples) < opts.plot_images:
                        examples.append(
                            {
                                "image": items[p][1],
                                "truth": items[p][2],
                                "pred": pred[j].numpy(),
                                "kind": "depth",
                                "depth_range": (lo, hi),
                            }
                        )
            bar.update(len(idx))
    metrics = meter.means() or {
        k: float("nan") for k in ("rmse", "abs_rel", "delta1", "delta2", "delta3")
    }
    return EvalResult(
        TASK,
        data.name,
        metrics,
        len(val),
        extra={
            "image_size": size,
            "train_images": len(train),
            "bins": opts.depth_bins,
            "depth_range": [lo, hi],
            "probe_steps": opts.probe_steps,
            "final_train_loss": losses[-1] if losses else None,
            "images_with_valid_depth": meter.count,
        },
        examples=examples,
    )
