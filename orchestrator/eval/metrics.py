"""Evaluation metrics: pure functions of tensors, each checked against hand-computed cases.

Contract and conventions (percent for accuracies, recalls and IoU; metres for depth):

* segmentation: ``confusion_matrix`` (rows = true class, columns = predicted; pixels whose
  target is ``ignore_index`` (255) are dropped) -> ``miou`` (per-class IoU =
  TP / (TP + FP + FN); a class with an empty union, absent from both target and prediction, is NaN
  and left out of the mean; one that is only predicted scores 0; the mmsegmentation convention, also
  the TIPS notebook's confusion-matrix mIoU, docs/method.md, "Evaluation protocols");
* classification: ``topk_accuracy`` (a hit if the label is among the k highest scores);
* retrieval: ``retrieval_recall`` with several captions per image (COCO 5, Flickr30k 5):
  image->text is a hit at k when any of the image's captions ranks in the top k; text->image
  when the caption's own image ranks in the top k (the CLIP / ALIGN protocol); rank = the
  number of strictly more similar candidates, so exact ties count in the query's favour;
* depth: ``depth_metrics`` per image on valid pixels (``min_depth < gt <= max_depth``):
  RMSE, abs-rel = mean(|p - g| / g), delta_i = fraction with max(p/g, g/p) < 1.25^i
  (Eigen et al. 2014, NYU protocol); tasks average them over images;
* k-NN: ``knn_scores`` is DINO's weighted k-NN (Caron et al. 2021, ``eval_knn.py``):
  cosine similarities, the k nearest training points vote for their class with weight
  exp(sim / T), T = 0.07.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = 255


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def confusion_matrix(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Pixel confusion matrix.

    Args:
        pred: predicted class ids, any shape, int.
        target: true class ids, same shape; ``ignore_index`` pixels are dropped, and so are
            ids outside ``[0, num_classes)``.
        num_classes: C.
        ignore_index: target value to ignore.

    Returns:
        int64 [C, C]; ``conf[t, p]`` counts pixels of true class t predicted as p.
    """
    p = _as_tensor(pred).reshape(-1).long().cpu()
    t = _as_tensor(target).reshape(-1).long().cpu()
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in size: {p.numel()} vs {t.numel()}")
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    idx = t[keep] * num_classes + p[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def iou_per_class(conf: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-class IoU in [0, 1] from a confusion matrix; NaN where the union is empty.

    Args:
        conf: int [C, C], rows true, columns predicted.

    Returns:
        float64 [C].
    """
    c = _as_tensor(conf).double().numpy()
    tp = np.diag(c)
    union = c.sum(0) + c.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1e-300), np.nan)


def miou(conf: torch.Tensor | np.ndarray) -> float:
    """Mean IoU in percent over classes with a non-empty union (NaN if there are none)."""
    ious = iou_per_class(conf)
    if np.all(np.isnan(ious)):
        return float("nan")
    return float(np.nanmean(ious) * 100.0)


def pixel_accuracy(conf: torch.Tensor | np.ndarray) -> float:
    """Fraction of counted pixels predicted correctly, in percent."""
    c = _as_tensor(conf).double()
    total = float(c.sum())
    return float(torch.diag(c).sum() / total * 100.0) if total > 0 else float("nan")


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in percent.

    Args:
        scores: [N, C] logits or votes (higher = more likely).
        labels: [N] int64 true class ids.
        ks: the k values; a k larger than C is clipped to C.

    Returns:
        ``{"top1": ..., "top5": ...}``.
    """
    n, c = scores.shape
    if n == 0:
        return {f"top{k}": float("nan") for k in ks}
    order = scores.float().topk(min(max(ks), c), dim=-1).indices  # [N, kmax]
    hit = order == labels.reshape(-1, 1).to(order.device)
    return {f"top{k}": float(hit[:, : min(k, c)].any(-1).float().mean() * 100.0) for k in ks}


def retrieval_recall(
    sim: torch.Tensor, text_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in both directions for an image-text similarity matrix.

    Args:
        sim: [I, T] similarity of image i and caption t.
        text_image: [T] int64, the index of the image each caption belongs to.
        ks: the k values.

    Returns:
        ``{"i2t_r1", "i2t_r5", ..., "t2i_r1", ...}`` in percent.
    """
    sim = sim.float().cpu()
    text_image = text_image.long().cpu()
    n_img, n_txt = sim.shape
    # image -> text: rank of the best-ranked correct caption of each image
    owner = text_image.reshape(1, -1) == torch.arange(n_img).reshape(-1, 1)  # [I, T]
    best_correct = sim.masked_fill(~owner, float("-inf")).max(1).values  # [I]
    i2t_rank = (sim > best_correct.reshape(-1, 1)).sum(1)  # strictly better captions
    # text -> image: rank of each caption's own image
    own = sim[text_image, torch.arange(n_txt)]  # [T]
    t2i_rank = (sim.T > own.reshape(-1, 1)).sum(1)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean() * 100.0)
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean() * 100.0)
    return out


def depth_metrics(
    pred: torch.Tensor, gt: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 10.0
) -> dict[str, float] | None:
    """Monocular depth errors on one image's valid pixels.

    Args:
        pred: [H, W] predicted depth in metres (clamped to ``[min_depth, max_depth]``).
        gt: [H, W] true depth in metres; pixels outside ``(min_depth, max_depth]`` are invalid.
        min_depth, max_depth: the valid range (NYU: 1e-3, 10 m).

    Returns:
        ``{"rmse", "abs_rel", "delta1", "delta2", "delta3"}`` (deltas in percent), or None
        when the image has no valid pixel.
    """
    gt = gt.float()
    valid = (gt > min_depth) & (gt <= max_depth)
    if not bool(valid.any()):
        return None
    p = pred.float()[valid].clamp(min_depth, max_depth)
    g = gt[valid]
    ratio = torch.maximum(p / g, g / p)
    out = {
        "rmse": float(torch.sqrt(((p - g) ** 2).mean())),
        "abs_rel": float(((p - g).abs() / g).mean()),
    }
    for i in (1, 2, 3):
        out[f"delta{i}"] = float((ratio < 1.25**i).float().mean() * 100.0)
    return out


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """DINO's weighted k-NN class votes.

    Args:
        train_feats: [Ntr, D] features (L2-normalised here).
        train_labels: [Ntr] int64.
        query_feats: [Nq, D] features (L2-normalised here).
        num_classes: C.
        k: neighbours (clipped to Ntr).
        temperature: vote weight exp(sim / temperature).
        chunk: queries per similarity block (bounds memory).

    Returns:
        [Nq, C] float32 vote totals; feed them to ``topk_accuracy``.
    """
    tr = torch.nn.functional.normalize(train_feats.float(), dim=-1)
    q_all = torch.nn.functional.normalize(query_feats.float(), dim=-1)
    k = min(k, tr.shape[0])
    labels = train_labels.long().to(tr.device)
    out = []
    for start in range(0, q_all.shape[0], chunk):
        q = q_all[start : start + chunk]
        top_sim, top_idx = (q @ tr.T).topk(k, dim=-1)  # [q, k]
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=tr.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        out.append(votes)
    if not out:
        return torch.zeros(0, num_classes)
    return torch.cat(out)


class MeanMeter:
    """Running means of named floats (e.g. per-image depth metrics)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for name, v in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(v)
        self.count += 1

    def means(self) -> dict[str, float]:
        return {n: s / self.count for n, s in self.sums.items()} if self.count else {}
