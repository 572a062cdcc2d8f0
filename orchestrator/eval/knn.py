"""k-NN classification on frozen global embeddings (TIPS's "IN-KNN" column).

The published numbers: docs/method.md, "Published numbers".

Protocol: DINO's weighted k-NN (Caron et al. 2021, ``eval_knn.py``): L2-normalised
embeddings of the train split form the memory bank; each val image's k nearest neighbours
(cosine) vote for their class with weight exp(sim / T); k = 20, T = 0.07 by default
(``knn_k``, ``knn_temperature``). Top-1 / top-5 in percent. The embedding is ``cls_alt``
by default (``cls=syn`` switches). Needs "train" and "val" (or "test") splits.
"""

from __future__ import annotations

import torch

from orchestrator.eval.loader import Encoders
from orchestrator.eval.metrics import knn_scores, topk_accuracy
from orchestrator.eval.options import EvalOptions
from orchestrator.eval.readers.base import EvalDataset, ReaderError
from orchestrator.eval.result import EvalResult
from orchestrator.eval.runtime import encode_images, native_size

TASK = "knn"
# the eval/<task>/<name> keys it reports (sweeps check their metric against them)
METRICS = ("top1", "top5")
KIND = "classification"


def run(enc: Encoders, data: EvalDataset, opts: EvalOptions) -> EvalResult:
    """Weighted k-NN top-1 / top-5 of val images against the train split.

    Args:
        enc: encoders (only the vision tower is used).
        data: a classification dataset with "train" and "val"/"test" splits.
        opts: k, temperature, batch size, image size, CLS choice, image caps.

    Returns:
        EvalResult with ``top1``, ``top5`` (percent).
    """
    if not data.has_split("train"):
        raise ReaderError(
            f"{data.root or data.name}: k-NN needs a train split (e.g. ROOT/train/<class>/ and "
            "ROOT/val/<class>/ for an ImageFolder)"
        )
    train = data.split("train").limit(opts.max_train_images)
    val = data.split("val", "test").limit(opts.max_images)
    if train.labels is None or val.labels is None:
        raise ReaderError(f"{data.name}: k-NN needs per-image labels")
    num_classes = len(data.class_names) if data.class_names else int(train.labels.max()) + 1
    size = opts.image_size or native_size(enc.vision)
    bank = encode_images(
        enc.vision, train, size, opts.batch_size, opts.cls, "knn-train", opts.progress
    )
    query = encode_images(enc.vision, val, size, opts.batch_size, opts.cls, TASK, opts.progress)
    scores = knn_scores(
        bank,
        torch.as_tensor(train.labels),
        query,
        num_classes,
        k=opts.knn_k,
        temperature=opts.knn_temperature,
    )
    metrics = topk_accuracy(scores, torch.as_tensor(val.labels), ks=(1, 5))
    return EvalResult(
        TASK,
        data.name,
        metrics,
        len(val),
        extra={
            "k": min(opts.knn_k, len(train)),
            "temperature": opts.knn_temperature,
            "cls": opts.cls,
            "image_size": size,
            "train_images": len(train),
        },
    )
