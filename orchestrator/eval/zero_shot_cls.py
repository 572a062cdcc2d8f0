"""Zero-shot classification: class-name prompts vs one global image embedding.

Protocol (CLIP; TIPS demos; docs/method.md, "Similarity and temperature" and
docs/method.md, "Evaluation protocols"): each class embedding is the mean of the
L2-normalised text embeddings of its prompts (templates filled with the class name),
re-normalised; logits = cosine(image CLS, class) / temperature; top-1 / top-5 accuracy in
percent. The CLS is ``cls_alt`` by default (TIPS uses the 1st CLS for zero-shot
classification) and ``cls=syn`` switches it. Evaluated split: "val" (or "test").
"""

from __future__ import annotations

import logging

import torch

from orchestrator.eval.loader import Encoders
from orchestrator.eval.metrics import topk_accuracy
from orchestrator.eval.options import EvalOptions, templates_for
from orchestrator.eval.readers.base import EvalDataset, ReaderError
from orchestrator.eval.result import EvalResult
from orchestrator.eval.runtime import encode_images, native_size
from tips_model.zero_shot import encode_class_texts, zero_shot_logits

logger = logging.getLogger(__name__)

TASK = "zero_shot_cls"
# the eval/<task>/<name> keys it reports (sweeps check their metric against them)
METRICS = ("top1", "top5")
KIND = "classification"


def run(enc: Encoders, data: EvalDataset, opts: EvalOptions) -> EvalResult:
    """Zero-shot top-1 / top-5 on the dataset's val split.

    Args:
        enc: encoders (eval mode, on their device).
        data: a classification dataset with ``class_names`` and per-image ``labels``.
        opts: batch size, image size, CLS choice, template set, image cap.

    Returns:
        EvalResult with metrics ``top1``, ``top5`` (percent).
    """
    split = data.split("val", "test").limit(opts.max_images)
    if split.labels is None or not data.class_names:
        raise ReaderError(f"{data.name}: zero-shot classification needs class names and labels")
    size = opts.image_size or native_size(enc.vision)
    with torch.no_grad():
        class_emb = encode_class_texts(
            enc.text, enc.tokenizer, data.class_names, templates_for(opts.templates)
        ).cpu()  # [C, D]
    img = encode_images(enc.vision, split, size, opts.batch_size, opts.cls, TASK, opts.progress)
    logits = zero_shot_logits(img, class_emb, enc.temperature)  # [N, C]
    metrics = topk_accuracy(logits, torch.as_tensor(split.labels), ks=(1, 5))
    return EvalResult(
        TASK,
        data.name,
        metrics,
        len(split),
        extra={
            "cls": opts.cls,
            "templates": opts.templates,
            "image_size": size,
            "num_classes": len(data.class_names),
        },
    )
