"""Monocular depth linear probe on frozen features (TIPS's "NYU depth RMSE").

The published numbers: docs/method.md, "Published numbers".

Protocol (DINOv2 depth "lin. 1", Oquab et al. 2023 §7.4, see ``probe.py``): last-layer
patch tokens with the CLS token concatenated to each, BatchNorm + 1x1 conv to
``depth_bins`` bins spread uniformly over the dataset's depth range (256 bins over
[0.001, 10] m for NYU, as the TIPS DPT depth head, docs/method.md, "Dense heads"); depth =
the bins' softmax-weighted mean per patch (softmax instead of DINOv2's ReLU-normalisation:
it cannot collapse to all-zero weights on a short budget), then upsampled bilinearly (the
depth map, not the bin logits: 256x cheaper, and the same map where depth is smooth);
trained with the scale-invariant log loss (Eigen et al. 2014, variance focus 0.85 as in BTS /
DINOv2) on valid pixels. On "val" the prediction is upsampled bilinearly to the ground truth's size
and RMSE, abs-rel and delta < 1.25^i are averaged over images (``metrics.depth_metrics``).
No Eigen border crop.
"""

from __future__ import annotations

import numpy as np
import torch

from orchestrator.eval.loader import Encoders
from orchestrator.eval.metrics import MeanMeter, depth_metrics
from orchestrator.eval.options import EvalOptions
from orchestrator.eval.probe import DenseTask, run_dense_probe, upsample
from orchestrator.eval.readers.base import EvalDataset, ReaderError
from orchestrator.eval.result import EvalResult

TASK = "depth"
# the eval/<task>/<name> keys it reports (sweeps check their metric against them)
METRICS = ("rmse", "abs_rel", "delta1", "delta2", "delta3")
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
    lo, hi = data.depth_range
    centres = torch.linspace(lo, hi, opts.depth_bins)
    meter = MeanMeter()

    def loss(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        pred = upsample(bins_to_depth(logits, centres)[:, None], gt.shape[-2:])[:, 0]
        return silog_loss(pred, gt, (gt > lo) & (gt <= hi))

    def predict(logits: torch.Tensor, hw: tuple[int, ...]) -> torch.Tensor:
        return upsample(bins_to_depth(logits, centres)[:, None], hw)[:, 0]

    def score(pred: torch.Tensor, truth: np.ndarray) -> None:
        m = depth_metrics(pred, torch.from_numpy(truth), lo, hi)
        if m is not None:
            meter.add(m)

    task = DenseTask(
        TASK,
        KIND,
        "depth",
        opts.depth_bins,
        with_cls=True,
        loss=loss,
        predict=predict,
        score=score,
        example_extra={"depth_range": (lo, hi)},
    )
    probe = run_dense_probe(enc.vision, data, opts, task)
    metrics = meter.means() or {
        k: float("nan") for k in ("rmse", "abs_rel", "delta1", "delta2", "delta3")
    }
    return EvalResult(
        TASK,
        data.name,
        metrics,
        probe.val_images,
        extra={
            "image_size": probe.image_size,
            "train_images": probe.train_images,
            "bins": opts.depth_bins,
            "depth_range": [lo, hi],
            "probe_steps": opts.probe_steps,
            "final_train_loss": probe.final_train_loss,
            "images_with_valid_depth": meter.count,
        },
        examples=probe.examples,
    )
