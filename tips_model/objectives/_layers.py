"""Small transformer layers for the heads of the alternative objectives (CLOC, MUG).

Plumbing, not a model: pre-LN blocks whose self-attention takes an optional boolean mask or a
causal flag, and an optional cross-attention to a context sequence. Used by

* the CLOC Prompter (self-attention over [patch tokens; prompt tokens] with an isolation mask),
* the MUG pixel decoder (plain self-attention, as MAE's decoder) and caption decoder (causal
  self-attention + cross-attention to the image tokens, as CoCa's multimodal decoder).

The block is ``tips_model.layers.Block`` (the one attention / MLP / block of the towers too).
Initialisation follows the vision tower: trunc_normal(0.02) Linear weights, zero biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tips_model import layers


def init_linear_(module: nn.Module) -> None:
    """trunc_normal(std 0.02) for every Linear weight below ``module``, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Block(layers.Block):
    """Pre-LN head block: ``x += attn(ln1 x)``; ``x += xattn(ln2 x, ctx)`` if cross; ``x += mlp``.

    ``tips_model.layers.Block`` with the heads' settings: ``q``/``kv`` attention names, GELU
    MLP of ``mlp_ratio * dim``, LayerNorm eps 1e-6, no LayerScale, no stochastic depth.

    Args:
        dim: width D.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D (4 as ViT/MAE/CoCa).
        cross_attention: add a cross-attention sub-layer to a context sequence.
        context_dim: width of the context (default D).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        cross_attention: bool = False,
        context_dim: int | None = None,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            int(dim * mlp_ratio),
            attn_layout="q_kv",
            cross_attention=cross_attention,
            context_dim=context_dim,
        )


def sincos_1d(coords: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed sine-cosine features of scalar coordinates (Transformer / MAE / DETR style).

    Args:
        coords: [...] float coordinates (CLOC boxes: in [0, 1], scaled by 2*pi here).
        dim: output width; ``dim // 2`` frequencies, zero-padded to ``dim`` if odd.
        temperature: base of the geometric frequency ladder.

    Returns:
        [..., dim] float32: ``[sin(c * w_i), cos(c * w_i)]`` with ``w_i = temperature^(-i/F)``.
    """
    n_freq = max(dim // 2, 1)
    i = torch.arange(n_freq, dtype=torch.float32, device=coords.device)
    omega = temperature ** (-i / n_freq)  # [F]
    angles = coords.float().unsqueeze(-1) * omega  # [..., F]
    out = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(out, (0, dim - out.shape[-1]))


def sincos_2d(grid_h: int, grid_w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """MAE's fixed 2-D position embedding for a row-major ``grid_h x grid_w`` grid.

    Half the channels encode the row index, half the column index (MAE
    ``get_2d_sincos_pos_embed``; written here from its definition).

    Returns:
        [1, grid_h * grid_w, dim] float32.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float32, device=device)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")  # [h, w]
    emb = torch.cat([sincos_1d(rr.flatten(), dim // 2), sincos_1d(cc.flatten(), dim // 2)], -1)
    return emb.unsqueeze(0)


def sincos_box(boxes: Tensor, dim: int) -> Tensor:
    """Sine-cosine features of xyxy boxes in [0, 1]: ``dim // 4`` channels per coordinate.

    Coordinates are scaled by 2*pi first (DETR's normalised-coordinate convention) so the
    lowest frequency spans the unit square once.

    Args:
        boxes: [..., 4] float, xyxy in [0, 1].
        dim: output width (zero-padded when not a multiple of 4).

    Returns:
        [..., dim] float32.
    """
    per = dim // 4
    feats = [sincos_1d(boxes[..., j] * (2 * math.pi), per) for j in range(4)]
    out = torch.cat(feats, dim=-1)
    return F.pad(out, (0, dim - out.shape[-1]))
