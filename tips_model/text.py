"""TIPS / TIPSv2 text encoder: a bidirectional pre-LN transformer with masked mean pooling.

Contract: ``TextTransformer(ids [B,T] int64, 0 = padding) -> [B,D]`` (no projection head: D
equals the vision width, docs/method.md, "Text encoder"); ``forward_tokens`` also gives the
per-token outputs after ``ln_final`` and the padding mask.

Semantics follow the authors' PyTorch port (google-deepmind/tips ``pytorch/text_encoder.py``;
docs/method.md, "Text encoder"; docs/method.md, "Released checkpoint files"):

* token embedding times sqrt(D), plus a FIXED sinusoidal signal (not a parameter):
  ``num_ts = D/2``, ``inv_ts_i = exp(-i * ln(1e4) / (num_ts - 1))``,
  ``concat(sin(pos * inv_ts), cos(pos * inv_ts))``;
* pre-LN blocks ``x += MHA(ln_1 x)`` with a key-padding mask (no causal mask) and
  ``x += MLP(ln_2 x)`` with MLP = c_fc -> ReLU -> zero padded positions -> c_proj -> zero
  padded positions; LayerNorm eps 1e-5 (PyTorch default in the port);
* ``ln_final``, then masked mean pooling ``sum(x * valid) / (sum(valid) + 1e-8)``.

Parameter names are the released text layout (docs/method.md, "Released checkpoint files"):
``token_embedding``, ``transformer.resblocks.{i}.attn.{in_proj_weight,in_proj_bias,out_proj}``,
``ln_1``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_2``, ``ln_final``. Attention weights are held in
``nn.MultiheadAttention``-compatible names but computed with ``F.scaled_dot_product_attention``
(``tips_model.layers.Attention``, ``layout="in_proj"``).

A sequence that is entirely padding has no valid key; the reference then yields NaN. Here such
a row attends to all positions instead and its pooled output is 0 (all positions excluded).

Initialisation (training from scratch): normal(std 0.02) token embedding, trunc_normal(0.02)
for projection weights, zero biases, LayerNorm ones/zeros.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tips_model.layers import Attention
from tips_model.registry import TEXT

PAD_ID = 0  # right-padded with id 0; paddings = (ids == 0): docs/method.md, "Tokenizer"


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed position signal [length, dim] (docs/method.md, "Text encoder"), float32."""
    num_ts = dim // 2
    # float32 throughout, as the reference computes it (same rounding of the increment).
    # torch.full, not torch.tensor(1e4, device=): no host-to-device copy (a GPU sync) per call
    increment = torch.full((), 1e4, dtype=torch.float32, device=device).log() / max(num_ts - 1, 1)
    inv_ts = torch.exp(torch.arange(num_ts, dtype=torch.float32, device=device) * -increment)
    t = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_ts[None, :]
    signal = torch.cat([torch.sin(t), torch.cos(t)], dim=1)
    return F.pad(signal, (0, dim % 2))


class MaskedMlp(nn.Module):
    """c_fc -> ReLU -> mask -> c_proj -> mask (padded positions zeroed twice)."""

    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, mlp_dim)
        self.c_proj = nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """Args: x [B,T,D]; valid [B,T,1] float (1 = real token)."""
        return self.c_proj(F.relu(self.c_fc(x)) * valid) * valid


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, eps: float):
        super().__init__()
        self.attn = Attention(dim, num_heads, layout="in_proj", dropout=dropout)
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MaskedMlp(dim, mlp_dim)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attend: Tensor, valid: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), attn_mask=attend))
        return x + self.drop(self.mlp(self.ln_2(x), valid))


class _Transformer(nn.Module):
    """Holder so parameter names read ``transformer.resblocks.{i}``."""

    def __init__(self, blocks: list[ResidualAttentionBlock]) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)


class TextTransformer(nn.Module):
    """The TIPS text tower.

    Args:
        vocab_size: token vocabulary (32000 for the released SentencePiece model).
        width: model width D (equals the vision width).
        depth: number of blocks.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        max_len: longest accepted sequence (the tokenizer pads to it; 64 in TIPS:
            docs/method.md, "Tokenizer").
        dropout: residual and attention dropout (0 at inference; Scenic default 0.1 [open]).
        ln_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        max_len: int = 64,
        dropout: float = 0.0,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.width = width
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.transformer = _Transformer(
            [
                ResidualAttentionBlock(width, num_heads, mlp_dim, dropout, ln_eps)
                for _ in range(depth)
            ]
        )
        self.ln_final = nn.LayerNorm(width, eps=ln_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.token_embedding.weight.is_meta:  # shape-only build: nothing to initialise
            return
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        for blk in self.transformer.resblocks:
            nn.init.trunc_normal_(blk.attn.in_proj_weight, std=0.02)
            for lin in (blk.attn.out_proj, blk.mlp.c_fc, blk.mlp.c_proj):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (torch.utils.checkpoint, use_reentrant=False)."""
        self.grad_checkpointing = enable

    def forward_tokens(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token outputs.

        Args:
            ids: [B,T] int64 token ids, 0 = padding, T <= max_len.

        Returns:
            (tokens [B,T,D] after ``ln_final``, pad [B,T] bool with True at padding).
        """
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B,T], got {tuple(ids.shape)}")
        t = ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"ids have {t} tokens but the text model has max_len {self.max_len}")
        pad = ids == PAD_ID
        valid = ~pad
        # A row without any real token would have no key to attend to (NaN): let it see all.
        attend = (valid | ~valid.any(dim=1, keepdim=True))[:, None, None, :]
        x = self.token_embedding(ids) * math.sqrt(self.width)
        x = x + sinusoidal_positions(t, self.width, ids.device).to(x.dtype)
        valid_f = valid.unsqueeze(-1).to(x.dtype)
        for blk in self.transformer.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, attend, valid_f, use_reentrant=False)
            else:
                x = blk(x, attend, valid_f)
        return self.ln_final(x), pad

    def forward(self, ids: Tensor) -> Tensor:
        """Pooled text embedding.

        Args:
            ids: [B,T] int64 token ids, 0 = padding.

        Returns:
            [B,D] masked mean of the ``ln_final`` outputs over non-padding tokens.
        """
        x, pad = self.forward_tokens(ids)
        valid = (~pad).unsqueeze(-1).to(x.dtype)
        return (x * valid).sum(dim=1) / (valid.sum(dim=1) + 1e-8)


# ---- registered factories (docs/method.md, "Text encoder") ---------------------------------

_ARCHS: dict[str, dict[str, Any]] = {
    "text_s": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "text_b": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "text_l": dict(width=1024, depth=12, num_heads=16, mlp_dim=4096),
    "text_so400m": dict(width=1152, depth=27, num_heads=16, mlp_dim=4304),
    "text_g": dict(width=1536, depth=12, num_heads=24, mlp_dim=6144),
    "text_test": dict(width=32, depth=2, num_heads=2, mlp_dim=64),
}


def _make(name: str, overrides: dict[str, Any]) -> TextTransformer:
    kwargs: dict[str, Any] = dict(vocab_size=32000, max_len=64)
    kwargs.update(_ARCHS[name])
    kwargs.update(overrides)
    return TextTransformer(**kwargs)


@TEXT.register("text_s")
def text_s(**overrides: Any) -> TextTransformer:
    """S: width 384, 12 layers, 6 heads, MLP 1536."""
    return _make("text_s", overrides)


@TEXT.register("text_b")
def text_b(**overrides: Any) -> TextTransformer:
    """B: width 768, 12 layers, 12 heads, MLP 3072."""
    return _make("text_b", overrides)


@TEXT.register("text_l")
def text_l(**overrides: Any) -> TextTransformer:
    """L: width 1024, 12 layers, 16 heads, MLP 4096."""
    return _make("text_l", overrides)


@TEXT.register("text_so400m")
def text_so400m(**overrides: Any) -> TextTransformer:
    """So400m: width 1152, 27 layers, MLP 4304.

    Not Scenic's forced 12 layers: docs/method.md, "Text encoder".
    """
    return _make("text_so400m", overrides)


@TEXT.register("text_g")
def text_g(**overrides: Any) -> TextTransformer:
    """g: width 1536, 12 layers, 24 heads, MLP 6144 (ReLU MLP, no SwiGLU in text)."""
    return _make("text_g", overrides)


@TEXT.register("text_test")
def text_test(**overrides: Any) -> TextTransformer:
    """Tiny test model: width 32, 2 layers, 2 heads, MLP 64."""
    return _make("text_test", overrides)


def build_text(name: str, **overrides: Any) -> TextTransformer:
    """Build a registered text encoder by name (``TEXT.names()`` lists them)."""
    return TEXT.build(name, **overrides)
