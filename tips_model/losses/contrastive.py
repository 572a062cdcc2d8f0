"""Symmetric image-text InfoNCE with optional all-gathered negatives.

Contract:
    contrastive_loss(image_emb [B, D], text_emb [B, D], temperature) -> scalar
    = 1/2 [CE(image -> text) + CE(text -> image)], logits = cos / temperature.

Sources: docs/method.md, "Dual-caption contrastive loss" (L_NCE, one call per CLS/caption pair:
``contrastive_alt`` with alt-text, ``contrastive_syn`` with the synthetic caption) and
docs/method.md, "Similarity and temperature" (TIPS *divides* cosine similarity by a plain scalar
temperature; released values 0.0036-0.0051, i.e. logit scales above CLIP's clamp of 100, so no clamp
here).

Distributed (gather=True and world size > 1): embeddings of all ranks are gathered *with*
gradient (functional ``all_gather_single``, or ``torch.distributed.nn.functional.all_gather``
on older torch); this rank's B rows are scored
against all W*B columns with labels ``rank * B + arange(B)`` (open_clip's ``local_loss``).
The returned value is this rank's local mean. Because the gather's backward sums the
gradients of all ranks, the usual DDP gradient average (divide by W) gives exactly the
gradient of the global-batch loss, and the mean of the W local losses equals it.
Requires the same B on every rank.

Numerics: normalisation and the logits matmul run in float32 with autocast disabled; at
logit scale ~200 a bf16 matmul would put ~1 logit of rounding error on every pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tips_model.losses._distributed import is_distributed, rank

__all__ = ["contrastive_loss"]


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` on each of W ranks -> ``[W * B, D]`` in rank order, differentiable.

    The backward of either implementation sums the gradients of all ranks for each slice.
    ``torch.distributed.nn.functional.all_gather`` is deprecated (FutureWarning) from torch
    2.10-ish on in favour of the autograd-aware functional collective, which older torch
    lacks, hence the probe.
    """
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    if hasattr(funcol, "all_gather_single"):
        return funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD)
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    temperature: torch.Tensor | float,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE between paired image and text embeddings.

    Args:
        image_emb: ``[B, D]`` image embeddings (e.g. ``cls_alt``); normalised here.
        text_emb: ``[B, D]`` paired text embeddings; row i matches image row i.
        temperature: Scalar tensor (learnable) or float; logits = cos / temperature.
        gather: Use the negatives of all ranks when torch.distributed is initialised.

    Returns:
        Scalar float32 loss (this rank's mean over its rows, both directions averaged).

    Raises:
        ValueError: If the embeddings are not matching ``[B, D]`` tensors.
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            "contrastive_loss expects image_emb and text_emb of the same [B, D] shape, got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    batch = image_emb.shape[0]
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        image = F.normalize(image_emb.float(), dim=-1)  # [B, D]
        text = F.normalize(text_emb.float(), dim=-1)  # [B, D]
        if gather and is_distributed():
            all_image = _gather_with_grad(image)  # [W * B, D]
            all_text = _gather_with_grad(text)  # [W * B, D]
            offset = rank() * batch
        else:
            all_image, all_text, offset = image, text, 0
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.float()
        logits_i2t = image @ all_text.t() / temperature  # [B, W * B]
        logits_t2i = text @ all_image.t() / temperature  # [B, W * B]
        labels = torch.arange(batch, device=image_emb.device) + offset  # [B]
        return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
