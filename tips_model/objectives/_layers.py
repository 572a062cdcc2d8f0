"""Small transformer layers for the heads of the alternative objectives (CLOC, MUG).

Plumbing, not a model: pre-LN blocks whose self-attention takes an optional boolean mask or a
causal flag, and an optional cross-attention to a context sequence. Used by

* the CLOC Prompter (self-attention over [patch tokens; prompt tokens] with an isolation mask),
* the MUG pixel decoder (plain self-attention, as MAE's decoder) and caption decoder (causal
  self-attention + cross-attention to the image tokens, as CoCa's multimodal decoder).

All attention goes through ``F.scaled_dot_product_attention`` (one path on CPU and GPU).
Initialisation follows the vision tower: trunc_normal(0.02) Linear weights, zero biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def init_linear_(module: nn.Module) -> None:
    """trunc_normal(std 0.02) for every Linear weight below ``module``, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head attention: queries from ``x``, keys/values from ``context`` (default ``x``).

    Args:
        dim: width of ``x`` and of the output.
        num_heads: heads; ``dim`` must divide by it.
        context_dim: width of ``context`` (default ``dim``).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Args: x [B,L,D]; context [B,S,Dc] or None; attn_mask [L,S] bool (True = attend)."""
        b, n, d = x.shape
        ctx = x if context is None else context
        h, hd = self.num_heads, d // self.num_heads
        q = self.q(x).reshape(b, n, h, hd).transpose(1, 2)  # [B,h,L,hd]
        k, v = self.kv(ctx).reshape(b, ctx.shape[1], 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN block: ``x += attn(ln1 x)``; ``x += xattn(ln2 x, context)`` if cross; ``x += mlp``.

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
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if cross_attention else None
        self.cross = Attention(dim, num_heads, context_dim) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Args: x [B,L,D]; context [B,S,Dc] (needed iff cross); attn_mask [L,L] bool."""
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        if self.cross is not None:
            if context is None:
                raise ValueError("this block cross-attends: pass a context sequence")
            x = x + self.cross(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


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
