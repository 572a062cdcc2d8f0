"""Linear-probe semantic segmentation on frozen patch tokens (TIPS's "PASCAL seg.").

The published numbers: docs/method.md, "Published numbers".

Protocol (DINOv2-style linear, see ``probe.py``): a BatchNorm + 1x1-conv head on the
frozen last-layer patch tokens, trained with cross-entropy (label 255 ignored) on the
"train" split resized to S x S for ``probe_steps`` steps; on "val" the logits are
upsampled bilinearly to each label's own size, argmax, and mIoU is taken from the
split's confusion matrix. TIPS reports it on PASCAL VOC 2012
(docs/method.md, "Evaluation protocols").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.eval.loader import Encoders
from orchestrator.eval.metrics import confusion_matrix, iou_per_class, miou, pixel_accuracy
from orchestrator.eval.options import EvalOptions
from orchestrator.eval.probe import DenseTask, run_dense_probe, upsample
from orchestrator.eval.readers.base import EvalDataset, ReaderError
from orchestrator.eval.result import EvalResult

TASK = "linear_seg"
# the eval/<task>/<name> keys it reports (sweeps check their metric against them)
METRICS = ("miou", "pixel_acc")
KIND = "segmentation"


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore: int) -> torch.Tensor:
    """Cross-entropy over labelled pixels; 0 (with a graph) when none is labelled.

    Args:
        logits: [B, C, H, W].
        target: [B, H, W] class ids (float or int); ids outside [0, C) count as ``ignore``.
    """
    t = target.long()
    t = torch.where((t >= 0) & (t < logits.shape[1]), t, torch.full_like(t, ignore))
    if not bool((t != ignore).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, t, ignore_index=ignore)


def run(enc: Encoders, data: EvalDataset, opts: EvalOptions) -> EvalResult:
    """Train a linear head on "train", report mIoU on "val".

    Args:
        enc: encoders (only the vision tower is used, frozen).
        data: a segmentation dataset with "train" and "val" splits and class names.
        opts: image size, probe budget (steps, lr, batch size, seed), image caps.

    Returns:
        EvalResult with ``miou`` and ``pixel_acc`` (percent); a few examples for plots.
    """
    if not data.has_split("train") or not data.class_names:
        raise ReaderError(
            f"{data.root or data.name}: the linear probe needs a train split "
            "with masks and class names"
        )
    num_classes, ignore = len(data.class_names), data.ignore_index
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def score(pred: torch.Tensor, truth: np.ndarray) -> None:
        conf.add_(confusion_matrix(pred, truth, num_classes, ignore))

    task = DenseTask(
        TASK,
        KIND,
        "mask",
        num_classes,
        with_cls=False,
        loss=lambda lg, t: masked_cross_entropy(upsample(lg, t.shape[-2:]), t, ignore),
        predict=lambda lg, hw: upsample(lg, hw).argmax(1),
        score=score,
        example_extra={"num_classes": num_classes},
    )
    probe = run_dense_probe(enc.vision, data, opts, task)
    per_class = {n: float(v * 100) for n, v in zip(data.class_names, iou_per_class(conf))}
    return EvalResult(
        TASK,
        data.name,
        {"miou": miou(conf), "pixel_acc": pixel_accuracy(conf)},
        probe.val_images,
        extra={
            "image_size": probe.image_size,
            "train_images": probe.train_images,
            "probe_steps": opts.probe_steps,
            "probe_lr": opts.probe_lr,
            "final_train_loss": probe.final_train_loss,
            "iou_per_class": per_class,
        },
        examples=probe.examples,
    )
