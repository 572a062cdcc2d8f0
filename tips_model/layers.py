"""Transformer layers shared by the vision tower, the text tower and the objectives' heads.

One attention (``Attention``), one GELU MLP (``Mlp``), LayerScale, stochastic depth and one
pre-LN block (``Block``). Parameter names are part of the contract: the released TIPS
checkpoints load strictly (``tips_model/checkpoints.py``), so each user picks the layout of
its own names and the computation stays the same:

* ``Attention(layout="qkv")``: fused ``qkv`` Linear and ``proj`` (the vision tower, DINOv2 and
  released vision names);
* ``Attention(layout="in_proj")``: ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj``, the
  ``nn.MultiheadAttention`` names of the released text tower (``tips_model/text.py``);
* ``Attention(layout="q_kv")``: ``q`` and ``kv`` Linears and ``proj``, which may
  cross-attend to a context of another width (the CLOC Prompter and MUG decoders,
  ``tips_model/objectives/_layers.py``).

All attention goes through ``F.scaled_dot_product_attention`` (one path on CPU and GPU).
The fused ``qkv`` / ``in_proj`` weight is one parameter projected as three views (q, k, v
rows), so that backward never stacks activation-sized q/k/v gradients (``Attention._project``).
timm's ``Attention`` / ``Mlp`` / ``LayerScale`` / ``DropPath`` are not used; why is written in
docs/design-changes.md (item 11).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_LAYOUTS = ("qkv", "in_proj", "q_kv")


class Attention(nn.Module):
    """Multi-head attention: queries from ``x``, keys/values from ``x`` or a ``context``.

    Args:
        dim: width of ``x`` and of the output; must divide by ``num_heads``.
        num_heads: heads.
        layout: parameter names, one of ``ATTENTION_LAYOUTS`` (see the module doc).
        qkv_bias: bias on the input projection (``layout="qkv"`` only).
        context_dim: width of ``context`` (``layout="q_kv"`` only; default ``dim``).
        dropout: attention-probability dropout while training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        layout: str = "qkv",
        qkv_bias: bool = True,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        if layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"layout must be one of {ATTENTION_LAYOUTS}, got {layout!r}")
        self.num_heads = num_heads
        self.layout = layout
        self.dropout = dropout
        # Registration order is the released state-dict order and the order in which the
        # Linear constructors draw from the RNG; keep it.
        if layout == "qkv":
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)
        elif layout == "in_proj":
            # zeros, not uninitialised memory, and no draw from the RNG (the text tower
            # initialises it, tips_model/text.py)
            self.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
            self.out_proj = nn.Linear(dim, dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim or dim, 2 * dim)
            self.proj = nn.Linear(dim, dim)

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q [B,h,L,hd], k and v [B,h,S,hd]."""
        b, n, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        if self.layout == "q_kv":
            ctx = x if context is None else context
            q = self.q(x).reshape(b, n, h, hd).transpose(1, 2)
            k, v = self.kv(ctx).reshape(b, ctx.shape[1], 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        if context is not None:
            raise ValueError(f"layout {self.layout!r} is self-attention only: no context")
        if self.layout == "qkv":
            weight, bias = self.qkv.weight, self.qkv.bias
        else:
            weight, bias = self.in_proj_weight, self.in_proj_bias
        # One [3D, D] parameter, projected as three [D, D] views of it: splitting one fused
        # output into q, k, v makes backward stack their gradients and copy the stack back
        # into the output's layout (two passes over 3 activation-sized tensors per block,
        # ~5 % of the H200 step, README "Performance"); split here, the gradient is
        # assembled weight-sized instead, and SDPA's gradients are the projections' own.
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        q, k, v = [
            F.linear(x, w, bi).view(b, n, h, hd).transpose(1, 2)
            for w, bi in zip(weight.chunk(3), biases)
        ]
        return q, k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        value_only: bool = False,
    ) -> Tensor:
        """Attend and project.

        Args:
            x: [B,L,D] queries (and keys/values without ``context``).
            context: [B,S,Dc] keys/values (``layout="q_kv"`` only).
            attn_mask: bool, True = may attend; broadcast to [B,h,L,S] (e.g. [L,S] or
                [B,1,1,S] for key padding).
            is_causal: causal self-attention.
            value_only: return ``proj(V)`` instead of attending (MaskCLIP's values trick for
                zero-shot segmentation, docs/method.md, "Evaluation protocols").

        Returns:
            [B,L,D].
        """
        b, n, d = x.shape
        q, k, v = self._project(x, context)
        if value_only:
            out = v
        else:
            p = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal
            )
        proj = self.out_proj if self.layout == "in_proj" else self.proj
        return proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (``gelu_approximate``: "none" exact erf, or "tanh")."""

    def __init__(self, dim: int, hidden: int, gelu_approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu_approximate = gelu_approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu_approximate))


def swiglu_hidden_dim(mlp_hidden_dim: int) -> int:
    """SwiGLU hidden width from the nominal MLP width (6144 -> 4096).

    docs/method.md, "Vision encoder".
    """
    return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``[a; b] = w12(x)`` (ViT-g only).

    docs/method.md, "Vision encoder".
    """

    def __init__(self, dim: int, mlp_hidden_dim: int) -> None:
        super().__init__()
        hidden = swiglu_hidden_dim(mlp_hidden_dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (CaiT / DINOv2), ``gamma`` initialised to ``init``."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Per-sample stochastic depth on a residual branch [B,...]."""
    if rate <= 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    """Pre-LN block: ``x += ls1(attn(norm1 x))``; ``x += cross(norm_cross x, context)`` when
    cross-attending; ``x += ls2(mlp(norm2 x))``; each residual branch under stochastic depth.

    Args:
        dim: width D.
        num_heads: attention heads.
        mlp_hidden_dim: MLP hidden width (SwiGLU derives its own, see ``swiglu_hidden_dim``).
        ffn: "mlp" (GELU) or "swiglu".
        gelu_approximate: "none" (exact erf) or "tanh".
        layerscale_init: LayerScale init value; None (or 0) = no LayerScale parameters.
        qkv_bias: bias on the qkv projection (``attn_layout="qkv"``).
        drop_path_rate: stochastic depth of both residual branches.
        ln_eps: LayerNorm epsilon.
        attn_layout: the attention's parameter names (``Attention``).
        cross_attention: add a cross-attention sub-layer (``q_kv`` layout) to a context.
        context_dim: width of the context (default D).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_dim: int,
        ffn: str = "mlp",
        gelu_approximate: str = "none",
        layerscale_init: float | None = None,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        ln_eps: float = 1e-6,
        attn_layout: str = "qkv",
        cross_attention: bool = False,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, attn_layout, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm_cross = nn.LayerNorm(dim, eps=ln_eps) if cross_attention else None
        self.cross = (
            Attention(dim, num_heads, "q_kv", context_dim=context_dim) if cross_attention else None
        )
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        if ffn == "mlp":
            self.mlp: nn.Module = Mlp(dim, mlp_hidden_dim, gelu_approximate)
        elif ffn == "swiglu":
            self.mlp = SwiGLU(dim, mlp_hidden_dim)
        else:
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def _branch(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_path_rate, self.training)

    def forward(
        self,
        x: Tensor,
        value_only: bool = False,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Args: x [B,L,D]; ``value_only`` (``Attention``); context [B,S,Dc] (needed iff
        cross-attending); attn_mask bool (True = attend); is_causal for the self-attention."""
        attn = self.attn(
            self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, value_only=value_only
        )
        x = x + self._branch(self.ls1(attn))
        if self.cross is not None:
            if context is None:
                raise ValueError("this block cross-attends: pass a context sequence")
            x = x + self._branch(self.cross(self.norm_cross(x), context))
        return x + self._branch(self.ls2(self.mlp(self.norm2(x))))
