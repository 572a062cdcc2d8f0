"""Region-level losses for CLOC: padded region-text InfoNCE and box losses.

The method: docs/method.md, "CLOC".

Regions come padded to a fixed R per image with a validity mask, so every rank holds the
same ``[B*R, D]`` shapes and the gather is a plain all-gather.

Region-text InfoNCE over the valid regions of the (global) batch:

    L_rt = 1/(2 |V|) sum_{i in V} [ CE_i(r_i . t_V / tau) + CE_i(t_i . r_V / tau) ]

where V is the set of valid regions on all ranks, r / t are normalised region / region-caption
embeddings, and padded regions are excluded from rows *and* columns. With uniform logits every
valid row scores log|V| (the closed form the tests check).

Distributed (gather and world size W > 1): embeddings are gathered with gradient exactly as
``tips_model.losses.contrastive`` does (its ``_gather_with_grad``); each rank scores its own
rows against all columns and returns ``W * (sum of its rows) / |V|``. The usual DDP gradient
average (divide by W) then equals the gradient of the global mean, although ranks hold
different numbers of valid regions. The box losses use the same normalisation (DETR divides
its box losses by the number of boxes over all ranks).

Boxes are xyxy in [0, 1] relative to the image the patch tokens come from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tips_model.losses._distributed import all_reduce_, is_distributed, rank, world_size
from tips_model.losses.contrastive import _gather_with_grad

_NEG = -1e9  # logit of excluded (padded) columns: exp underflows to exactly 0 in float32


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1): ``torchvision.ops.box_convert``.

    Imported here, on first use: ``import torchvision`` takes seconds and only CLOC's
    grounding head needs it. Why IoU / GIoU below are not torchvision's: docs/design-changes.md
    (item 11).
    """
    from torchvision.ops import box_convert

    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(
        0
    )


def _iou_union(a: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = _area(a) + _area(b) - inter
    return inter / (union + eps), union


def box_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Paired IoU of xyxy boxes: [..., 4], [..., 4] -> [...] in [0, 1]."""
    return _iou_union(a.float(), b.float(), eps)[0]


def generalized_box_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Paired GIoU (Rezatofighi et al., CVPR 2019): IoU - |C \\ (A u B)| / |C|.

    Args:
        a: [..., 4] xyxy boxes.
        b: [..., 4] xyxy boxes, paired element-wise with ``a``.

    Returns:
        [...] GIoU in [-1, 1]: 1 for identical boxes, -> -1 for tiny boxes far apart.
    """
    a, b = a.float(), b.float()
    iou, union = _iou_union(a, b, eps)
    c_lt = torch.minimum(a[..., :2], b[..., :2])
    c_rb = torch.maximum(a[..., 2:], b[..., 2:])
    enclosing = (c_rb - c_lt).clamp_min(0).prod(-1)
    return iou - (enclosing - union) / (enclosing + eps)


def _global_count(valid: Tensor) -> Tensor:
    """Number of valid entries over all ranks (float32 scalar, no gradient)."""
    count = valid.sum().float().detach().clone()
    return all_reduce_(count) if is_distributed() else count


def masked_global_mean(values: Tensor, valid: Tensor) -> Tensor:
    """``W * sum_local(values[valid]) / |valid over all ranks|`` (the module-doc normalisation).

    Args:
        values: [M] per-entry losses.
        valid: [M] bool.

    Returns:
        Scalar float32; 0 (still attached to ``values``) when nothing is valid anywhere.
    """
    total = torch.where(valid, values.float(), torch.zeros_like(values, dtype=torch.float32))
    return total.sum() * world_size() / _global_count(valid).clamp_min(1.0)


def region_contrastive_loss(
    region_emb: Tensor,
    text_emb: Tensor,
    valid: Tensor,
    temperature: Tensor | float,
    gather: bool = True,
) -> Tensor:
    """Symmetric InfoNCE between region and region-caption embeddings, padding excluded.

    Args:
        region_emb: [M, D] region embeddings (M = B*R on this rank); normalised here.
        text_emb: [M, D] region-caption embeddings, row i pairs with region i.
        valid: [M] bool, False for padded regions (excluded as rows and as negatives).
        temperature: scalar tensor or float; logits = cos / temperature.
        gather: use the valid regions of all ranks as negatives when distributed.

    Returns:
        Scalar float32 (see the module doc for the distributed normalisation).

    Raises:
        ValueError: if the shapes do not match.
    """
    if region_emb.ndim != 2 or region_emb.shape != text_emb.shape:
        raise ValueError(
            f"region_emb and text_emb must both be [M, D], got {tuple(region_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    if valid.shape != region_emb.shape[:1]:
        raise ValueError(f"valid must be [M]={region_emb.shape[0]}, got {tuple(valid.shape)}")
    m = region_emb.shape[0]
    with torch.autocast(device_type=region_emb.device.type, enabled=False):
        r = F.normalize(region_emb.float(), dim=-1)  # [M,D]
        t = F.normalize(text_emb.float(), dim=-1)  # [M,D]
        if gather and is_distributed():
            all_r, all_t = _gather_with_grad(r), _gather_with_grad(t)  # [W*M,D]
            all_valid = _gather_with_grad(valid.float().detach()) > 0.5  # [W*M]
            offset = rank() * m
        else:
            all_r, all_t, all_valid, offset = r, t, valid, 0
        if isinstance(temperature, Tensor):
            temperature = temperature.float()
        excluded = ~all_valid[None, :]  # [1,W*M]
        logits_r2t = (r @ all_t.t() / temperature).masked_fill(excluded, _NEG)  # [M,W*M]
        logits_t2r = (t @ all_r.t() / temperature).masked_fill(excluded, _NEG)  # [M,W*M]
        labels = torch.arange(m, device=r.device) + offset
        labels = torch.where(valid, labels, torch.full_like(labels, -100))  # padded rows: ignored
        ce = F.cross_entropy(logits_r2t, labels, reduction="none", ignore_index=-100)
        ce = ce + F.cross_entropy(logits_t2r, labels, reduction="none", ignore_index=-100)
        return masked_global_mean(0.5 * ce, valid)


def box_losses(pred: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """DETR-style box regression terms over valid regions.

    Args:
        pred: [M, 4] predicted xyxy boxes in [0, 1].
        target: [M, 4] ground-truth xyxy boxes in [0, 1].
        valid: [M] bool.

    Returns:
        ``(l1, giou)``: mean over valid boxes of sum_coord |pred - target| and of (1 - GIoU).
    """
    l1 = (pred.float() - target.float()).abs().sum(-1)  # [M]
    giou = 1.0 - generalized_box_iou(pred, target)  # [M]
    return masked_global_mean(l1, valid), masked_global_mean(giou, valid)
