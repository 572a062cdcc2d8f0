"""Zero-shot classification and dense (patch-text) prediction helpers.

Contracts:

* ``encode_class_texts(text_model, tokenizer, class_names, templates) -> [C,D]``: the mean of
  L2-normalised text embeddings over the templates, re-normalised;
* ``zero_shot_logits(image_emb [B,D], class_emb [C,D], temperature) -> [B,C]``: cosine /
  temperature (the temperature divides, it is not a log-scale:
  docs/method.md, "Similarity and temperature");
* ``dense_patch_logits(vision, images, class_emb) -> [B,C,h,w]``: cosine between L2-normalised
  MaskCLIP "values trick" patch tokens and the class embeddings;
* ``sliding_window_segmentation(...) -> [B,C,H,W]`` class probabilities.

The dense protocol is the authors' zero-shot segmentation notebook (google-deepmind/tips
``pytorch/TIPS_zeroshot_segmentation.ipynb``; docs/method.md, "Evaluation protocols"): 448-px
windows with stride 336; a window whose side is not a multiple of the patch is resized (bicubic)
up to the next multiple; per window the patch cosines are upsampled (bilinear) to the window
size and soft-maxed over classes (no temperature); overlapping windows are averaged. The 9 TCL
prompt templates come from the same notebook (7 ImageNet templates used by TCL + 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tips_model.tokenizer import Tokenizer
from tips_model.vision import VisionTransformer

# TIPS_zeroshot_segmentation.ipynb ``_SUB_IMAGENET_PROMPTS`` (the ImageNet subset used by TCL,
# https://github.com/khanrc/tcl datasets/templates.py) ...
IMAGENET_SUBSET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
# ... plus the two TCL additions: ``_TCL_PROMPTS`` in the same notebook.
TCL_TEMPLATES: tuple[str, ...] = IMAGENET_SUBSET_TEMPLATES + (
    "a photo of many {}.",
    "a photo of {}s.",
)
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a photo of the {}.", "an image of a {}.")


@torch.no_grad()
def encode_class_texts(
    text_model: nn.Module,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = TCL_TEMPLATES,
    batch_size: int = 256,
) -> Tensor:
    """Class embeddings from prompt templates.

    Args:
        text_model: maps ids [B,T] int64 -> [B,D].
        tokenizer: strings -> ids [B,T].
        class_names: C names.
        templates: K format strings with one ``{}``.
        batch_size: texts per forward pass.

    Returns:
        [C,D] float, unit L2 norm per row.
    """
    if not class_names or not templates:
        raise ValueError("need at least one class name and one template")
    device = next(text_model.parameters()).device
    texts = [t.format(c) for c in class_names for t in templates]
    embs = []
    for i in range(0, len(texts), batch_size):
        ids = torch.as_tensor(tokenizer(texts[i : i + batch_size]), device=device)
        embs.append(F.normalize(text_model(ids).float(), dim=-1))
    emb = torch.cat(embs).reshape(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def zero_shot_logits(image_emb: Tensor, class_emb: Tensor, temperature: float) -> Tensor:
    """Cosine similarity / temperature.

    Args:
        image_emb: [B,D] image embeddings (e.g. ``cls_alt``), normalised here.
        class_emb: [C,D] class embeddings, normalised here.
        temperature: positive scalar (released models: ~0.0036-0.0051).

    Returns:
        [B,C] logits.
    """
    return F.normalize(image_emb, dim=-1) @ F.normalize(class_emb, dim=-1).T / temperature


def dense_patch_logits(vision: VisionTransformer, images: Tensor, class_emb: Tensor) -> Tensor:
    """Per-patch cosine to each class with the MaskCLIP values trick.

    Args:
        vision: the image tower.
        images: [B,3,H,W] float in [0,1], H and W multiples of the patch.
        class_emb: [C,D].

    Returns:
        [B,C,h,w] cosines with h = H/p, w = W/p.
    """
    b, _, hh, ww = images.shape
    p = vision.patch_size
    tokens = F.normalize(vision.forward_value_only_last(images).float(), dim=-1)  # [B,N,D]
    cos = torch.einsum("bnd,cd->bcn", tokens, F.normalize(class_emb.float(), dim=-1))
    return cos.reshape(b, -1, hh // p, ww // p)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window origins covering [0,size): last window flush with the end (TCL / notebook)."""
    n = max(size - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, size) - window, 0) for i in range(n)]


@torch.no_grad()
def sliding_window_segmentation(
    vision: VisionTransformer,
    images: Tensor,
    class_emb: Tensor,
    window: int = 448,
    stride: int = 336,
    out_size: tuple[int, int] | None = None,
) -> Tensor:
    """Zero-shot segmentation probabilities by sliding windows.

    Protocol: docs/method.md, "Evaluation protocols".

    Args:
        vision: the image tower.
        images: [B,3,H,W] float in [0,1] (any H, W).
        class_emb: [C,D] class embeddings.
        window: window side in pixels.
        stride: step between windows.
        out_size: (H_out, W_out) of the result; None = (H, W).

    Returns:
        [B,C,H_out,W_out] per-pixel class probabilities (softmax per window, averaged over
        overlapping windows, bilinear resize to ``out_size``).
    """
    b, _, hh, ww = images.shape
    p = vision.patch_size
    probs = images.new_zeros((b, class_emb.shape[0], hh, ww), dtype=torch.float32)
    counts = images.new_zeros((hh, ww), dtype=torch.float32)
    for y in _window_starts(hh, window, stride):
        for x in _window_starts(ww, window, stride):
            crop = images[:, :, y : y + window, x : x + window]
            h, w = crop.shape[-2:]
            size = (math.ceil(h / p) * p, math.ceil(w / p) * p)
            if size != (h, w):
                crop = F.interpolate(crop, size=size, mode="bicubic", align_corners=False)
            cos = dense_patch_logits(vision, crop, class_emb)
            cos = F.interpolate(cos, size=(h, w), mode="bilinear", align_corners=False)
            probs[:, :, y : y + h, x : x + w] += cos.softmax(dim=1)
            counts[y : y + h, x : x + w] += 1
    probs = probs / counts
    if out_size is not None and tuple(out_size) != (hh, ww):
        probs = F.interpolate(probs, size=tuple(out_size), mode="bilinear", align_corners=False)
    return probs
