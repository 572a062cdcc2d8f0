"""Linear-probe semantic segmentation on frozen patch tokens ("PASCAL seg." in TIPS_NOTES 10.2).

Protocol (DINOv2-style linear, see ``probe.py``): a BatchNorm + 1x1-conv head on the
frozen last-layer patch tokens, trained with cross-entropy (label 255 ignored) on the
"train" split resized to S x S for ``probe_steps`` steps; on "val" the logits are
upsampled bilinearly to each label's own size, argmax, and mIoU is taken from the
split's confusion matrix. TIPS reports it on PASCAL VOC 2012 (TIPS_NOTES 10.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orchestrator.eval.loader import Encoders
from orchestrator.eval.metrics import confusion_matrix, iou_per_class, miou, pixel_accuracy
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

TASK = "linear_seg"
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
    train = data.split("train").limit(opts.max_train_images)
    val = data.split("val", "test").limit(opts.max_images)
    num_classes, ignore = len(data.class_names), data.ignore_index
    vision, device = enc.vision, model_device(enc.vision)
    size = opts.image_size or native_size(vision)
    # 1. frozen features of the train split
    feats, targets = cache_features(
        vision,
        train,
        size,
        opts.batch_size,
        train.mask,
        with_cls=False,
        desc="linear_seg-train",
        show_progress=opts.progress,
    )
    # 2. the head, on a fixed budget
    torch.manual_seed(opts.seed)
    head = LinearHead(feats.shape[1], num_classes).to(device)
    losses = train_head(
        head,
        feats,
        targets,
        lambda lg, t: masked_cross_entropy(upsample(lg, t.shape[-2:]), t, ignore),
        opts.probe_steps,
        opts.probe_lr,
        opts.probe_batch_size,
        opts.seed,
    )
    # 3. mIoU on val at each label's resolution
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    examples = []
    with progress(len(val), TASK, opts.progress) as bar, torch.no_grad():
        for idx in index_batches(len(val), opts.batch_size):
            items = [(i, val.image(i), val.mask(i)) for i in idx]
            for group in group_by_shape(items):
                x = torch.stack([resize(to_tensor(items[p][1]), (size, size)) for p in group])
                logits = head(dense_features(vision, x.to(device), with_cls=False))
                hw = tuple(items[group[0]][2].shape)
                pred = upsample(logits, hw)
                pred = pred.argmax(1).cpu()
                for j, p in enumerate(group):
                    conf += confusion_matrix(pred[j], items[p][2], num_classes, ignore)
                    if len(examples) < opts.plot_images:
                        examples.append(
                            {
                                "image": items[p][1],
                                "truth": items[p][2],
                                "pred": pred[j].numpy(),
                                "kind": "segmentation",
                                "num_classes": num_classes,
                            }
                        )
            bar.update(len(idx))
    per_class = {n: float(v * 100) for n, v in zip(data.class_names, iou_per_class(conf))}
    return EvalResult(
        TASK,
        data.name,
        {"miou": miou(conf), "pixel_acc": pixel_accuracy(conf)},
        len(val),
        extra={
            "image_size": size,
            "train_images": len(train),
            "probe_steps": opts.probe_steps,
            "probe_lr": opts.probe_lr,
            "final_train_loss": losses[-1] if losses else None,
            "iou_per_class": per_class,
        },
        examples=examples,
    )
