"""Zero-shot semantic segmentation from patch-text similarity (the TIPS protocol).

Protocol (docs/method.md, "Evaluation protocols"; google-deepmind/tips
``TIPS_zeroshot_segmentation.ipynb``):
class embeddings = mean of normalised text embeddings over the prompt templates (9 TCL
templates by default); patch tokens from the MaskCLIP "values trick" in the last block
(``vision.forward_value_only_last``), L2-normalised; cosine per patch and class; the image's
short side is resized to ``zs_short_side`` (default: the window), then sliding windows
(``zs_window`` default = the model's input size, as 448 for TIPS; ``zs_stride`` default 3/4
of it, as 336) with a per-window softmax over classes, averaged over overlaps, bilinearly
resized to the label's size; argmax; mIoU from the confusion matrix over the split (label
255 ignored). The window arithmetic lives in ``tips_model.zero_shot``.
"""

from __future__ import annotations

import numpy as np
import torch

from orchestrator.eval.loader import Encoders
from orchestrator.eval.metrics import confusion_matrix, iou_per_class, miou, pixel_accuracy
from orchestrator.eval.options import EvalOptions, templates_for
from orchestrator.eval.readers.base import EvalDataset, ReaderError
from orchestrator.eval.result import EvalResult
from orchestrator.eval.runtime import (
    autocast,
    index_batches,
    model_device,
    native_size,
    progress,
    resize,
    to_tensor,
)
from tips_model.zero_shot import encode_class_texts, sliding_window_segmentation

TASK = "zero_shot_seg"
# the eval/<task>/<name> keys it reports (sweeps check their metric against them)
METRICS = ("miou", "pixel_acc")
KIND = "segmentation"


def group_by_shape(items: list[tuple[int, np.ndarray, np.ndarray]]) -> list[list[int]]:
    """Positions of ``(index, image, target)`` items grouped by (image, target) shape, so
    that images of one size run as one batch."""
    groups: dict[tuple, list[int]] = {}
    for pos, (_, img, tgt) in enumerate(items):
        groups.setdefault((img.shape, tgt.shape), []).append(pos)
    return list(groups.values())


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    s = short / min(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def run(enc: Encoders, data: EvalDataset, opts: EvalOptions) -> EvalResult:
    """Zero-shot mIoU on the dataset's val split.

    Args:
        enc: encoders (eval mode, on their device).
        data: a segmentation dataset with ``class_names`` and per-image masks.
        opts: window, stride, short side, template set, batch size, image cap.

    Returns:
        EvalResult with ``miou`` and ``pixel_acc`` (percent); a few examples for plots.
    """
    split = data.split("val", "test").limit(opts.max_images)
    if split.mask_fn is None or not data.class_names:
        raise ReaderError(f"{data.name}: zero-shot segmentation needs class names and masks")
    num_classes = len(data.class_names)
    device = model_device(enc.vision)
    window = opts.zs_window or opts.image_size or native_size(enc.vision)
    stride = opts.zs_stride or max(1, window * 3 // 4)
    short = opts.zs_short_side or window
    with torch.no_grad():
        class_emb = encode_class_texts(
            enc.text, enc.tokenizer, data.class_names, templates_for(opts.templates)
        )  # [C, D]
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    examples = []
    with progress(len(split), TASK, opts.progress) as bar:
        for idx in index_batches(len(split), opts.batch_size):
            items = [(i, split.image(i), split.mask(i)) for i in idx]
            for group in group_by_shape(items):
                imgs = torch.stack([to_tensor(items[p][1]) for p in group])  # [B,3,H,W]
                h, w = imgs.shape[-2:]
                x = resize(imgs, short_side_size(h, w, short)).to(device)
                target_hw = items[group[0]][2].shape
                with torch.no_grad(), autocast(device):
                    probs = sliding_window_segmentation(
                        enc.vision,
                        x,
                        class_emb,
                        window=window,
                        stride=stride,
                        out_size=tuple(target_hw),
                    )  # [B, C, Ht, Wt]
                pred = probs.argmax(1).cpu()
                for j, p in enumerate(group):
                    conf += confusion_matrix(pred[j], items[p][2], num_classes, data.ignore_index)
                    if len(examples) < opts.plot_images:
                        examples.append(
                            {"image": items[p][1], "truth": items[p][2], "pred": pred[j].numpy()}
                        )
            bar.update(len(idx))
    names = data.class_names
    per_class = {n: float(v * 100) for n, v in zip(names, iou_per_class(conf))}
    return EvalResult(
        TASK,
        data.name,
        {"miou": miou(conf), "pixel_acc": pixel_accuracy(conf)},
        len(split),
        extra={
            "window": window,
            "stride": stride,
            "short_side": short,
            "templates": opts.templates,
            "num_classes": num_classes,
            "iou_per_class": per_class,
            "ignore_index": data.ignore_index,
        },
        examples=[{**e, "kind": "segmentation", "num_classes": num_classes} for e in examples],
    )
