"""Test-only oracle: the TIPS reference forward, computed functionally from released weights.

An independent re-implementation of the authors' PyTorch inference code, from a flat dict of
numpy arrays in the released key layout (docs/method.md, "Released checkpoint files"), with
plain torch ops only:
conv2d, layer_norm, manual softmax attention (deliberately NOT scaled_dot_product_attention),
gelu/silu/relu, bilinear antialiased interpolation. Semantics as read in google-deepmind/tips:

* vision (``pytorch/image_encoder.py`` as used by ``pytorch/run_image_encoder_inference.py``
  with ``init_values=1.0, interpolate_antialias=True, interpolate_offset=0.0``):
  ``prepare_tokens_with_masks`` = patch conv -> mask_token substitution -> prepend cls_token ->
  add pos_embed (resized bilinearly with antialias to an explicit (H/p, W/p) size unless the
  grid is the stored square one) -> insert the register token after the CLS; blocks
  ``x + ls1*attn(norm1 x)``, ``x + ls2*ffn(norm2 x)`` with LayerNorm eps 1e-6, exact GELU or
  SwiGLU; final norm; outputs ``x_norm_1st_clstoken`` / ``x_norm_2nd_clstoken`` /
  ``x_norm_patchtokens``; MaskCLIP last block from ``pytorch/TIPS_zeroshot_segmentation.ipynb``
  ``encode_image_value_attention``;
* text (``pytorch/text_encoder.py``): embedding * sqrt(D) + sinusoid, attention with an additive
  -inf mask on padded keys, ReLU MLP with padded positions zeroed after each layer,
  LayerNorm eps 1e-5, ``ln_final``, masked mean with +1e-8.

Never imported by library code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

Weights = dict[str, np.ndarray]


def _t(w: Weights, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(w[key], dtype=np.float32))


def _num_blocks(w: Weights, prefix: str) -> int:
    n = 0
    while f"{prefix}{n}." + ("norm1.weight" if prefix == "blocks." else "ln_1.weight") in w:
        n += 1
    return n


def _attention(x: torch.Tensor, w_qkv, b_qkv, heads: int, key_bias=None, values_only=False):
    """Manual multi-head attention on [B,N,D]; ``key_bias`` [B,N] additive (0 / -inf)."""
    b, n, d = x.shape
    hd = d // heads
    wq, wk, wv = w_qkv.split(d, dim=0)
    bq, bk, bv = b_qkv.split(d, dim=0)

    def heads_of(y):
        return y.reshape(b, n, heads, hd).transpose(1, 2)  # [B,H,N,hd]

    v = heads_of(x @ wv.T + bv)
    if values_only:
        out = v
    else:
        q = heads_of(x @ wq.T + bq) * (1.0 / math.sqrt(hd))
        k = heads_of(x @ wk.T + bk)
        scores = q @ k.transpose(-1, -2)  # [B,H,N,N]
        if key_bias is not None:
            scores = scores + key_bias[:, None, None, :]
        probs = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        probs = probs / probs.sum(dim=-1, keepdim=True)
        out = probs @ v
    return out.transpose(1, 2).reshape(b, n, d)


def _vision_block(w: Weights, i: int, x, heads: int, values_only: bool = False):
    p = f"blocks.{i}."
    d = x.shape[-1]
    y = F.layer_norm(x, (d,), _t(w, p + "norm1.weight"), _t(w, p + "norm1.bias"), eps=1e-6)
    y = _attention(
        y, _t(w, p + "attn.qkv.weight"), _t(w, p + "attn.qkv.bias"), heads, values_only=values_only
    )
    y = y @ _t(w, p + "attn.proj.weight").T + _t(w, p + "attn.proj.bias")
    x = x + y * _t(w, p + "ls1.gamma")
    y = F.layer_norm(x, (d,), _t(w, p + "norm2.weight"), _t(w, p + "norm2.bias"), eps=1e-6)
    if p + "mlp.w12.weight" in w:  # SwiGLU (ViT-g)
        h = y @ _t(w, p + "mlp.w12.weight").T + _t(w, p + "mlp.w12.bias")
        gate, value = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2 :]
        y = (F.silu(gate) * value) @ _t(w, p + "mlp.w3.weight").T + _t(w, p + "mlp.w3.bias")
    else:
        h = F.gelu(y @ _t(w, p + "mlp.fc1.weight").T + _t(w, p + "mlp.fc1.bias"))
        y = h @ _t(w, p + "mlp.fc2.weight").T + _t(w, p + "mlp.fc2.bias")
    return x + y * _t(w, p + "ls2.gamma")


def _vision_tokens(w: Weights, images: torch.Tensor, masks=None) -> torch.Tensor:
    kernel = _t(w, "patch_embed.proj.weight")
    ps = kernel.shape[-1]
    x = F.conv2d(images, kernel, _t(w, "patch_embed.proj.bias"), stride=ps)  # [B,D,gh,gw]
    b, d, gh, gw = x.shape
    x = x.reshape(b, d, gh * gw).permute(0, 2, 1)
    if masks is not None:
        m = masks.reshape(b, gh * gw, 1)
        x = torch.where(m, _t(w, "mask_token").reshape(1, 1, d), x)
    pos = _t(w, "pos_embed")[0]  # [1+G*G, D]
    g = int(round(math.sqrt(pos.shape[0] - 1)))
    patch_pos = pos[1:]
    if (gh, gw) != (g, g):
        grid = patch_pos.T.reshape(1, d, g, g)
        grid = F.interpolate(
            grid, size=(gh, gw), mode="bilinear", align_corners=False, antialias=True
        )
        patch_pos = grid.reshape(d, gh * gw).T
    cls = _t(w, "cls_token").reshape(1, 1, d) + pos[0]
    reg = _t(w, "register_tokens").reshape(1, 1, d)
    return torch.cat([cls.expand(b, 1, d), reg.expand(b, 1, d), x + patch_pos], dim=1)


def reference_vision(w: Weights, images: torch.Tensor, heads: int, masks=None) -> dict:
    """Reference ``forward_features`` on float32 images [B,3,H,W] in [0,1]."""
    x = _vision_tokens(w, images, masks)
    for i in range(_num_blocks(w, "blocks.")):
        x = _vision_block(w, i, x, heads)
    d = x.shape[-1]
    x = F.layer_norm(x, (d,), _t(w, "norm.weight"), _t(w, "norm.bias"), eps=1e-6)
    return {
        "x_norm_1st_clstoken": x[:, :1],
        "x_norm_2nd_clstoken": x[:, 1:2],
        "x_norm_patchtokens": x[:, 2:],
    }


def reference_value_attention(w: Weights, images: torch.Tensor, heads: int) -> torch.Tensor:
    """Notebook ``encode_image_value_attention`` patch tokens, flattened to [B,N,D]."""
    x = _vision_tokens(w, images)
    depth = _num_blocks(w, "blocks.")
    for i in range(depth):
        x = _vision_block(w, i, x, heads, values_only=(i == depth - 1))
    d = x.shape[-1]
    x = F.layer_norm(x, (d,), _t(w, "norm.weight"), _t(w, "norm.bias"), eps=1e-6)
    return x[:, 2:]


def reference_text(w: Weights, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference ``TextEncoder(ids, paddings=(ids == 0))`` -> [B,D]."""
    emb = _t(w, "token_embedding.weight")
    d = emb.shape[1]
    b, n = ids.shape
    paddings = (ids == 0).float()
    keep = 1.0 - paddings
    x = emb[ids] * (d**0.5)
    half = d // 2
    step = torch.log(torch.tensor(10000.0)) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * freqs[None, :]
    x = x + torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[None]
    key_bias = torch.zeros(b, n).masked_fill(paddings > 0, float("-inf"))
    pre = "transformer.resblocks."
    for i in range(_num_blocks(w, pre)):
        p = f"{pre}{i}."
        y = F.layer_norm(x, (d,), _t(w, p + "ln_1.weight"), _t(w, p + "ln_1.bias"), eps=1e-5)
        y = _attention(
            y,
            _t(w, p + "attn.in_proj_weight"),
            _t(w, p + "attn.in_proj_bias"),
            heads,
            key_bias=key_bias,
        )
        x = x + y @ _t(w, p + "attn.out_proj.weight").T + _t(w, p + "attn.out_proj.bias")
        y = F.layer_norm(x, (d,), _t(w, p + "ln_2.weight"), _t(w, p + "ln_2.bias"), eps=1e-5)
        h = torch.relu(y @ _t(w, p + "mlp.c_fc.weight").T + _t(w, p + "mlp.c_fc.bias"))
        h = h * keep[..., None]
        y = (h @ _t(w, p + "mlp.c_proj.weight").T + _t(w, p + "mlp.c_proj.bias")) * keep[..., None]
        x = x + y
    x = F.layer_norm(x, (d,), _t(w, "ln_final.weight"), _t(w, "ln_final.bias"), eps=1e-5)
    x = torch.where(paddings[..., None] > 0, torch.zeros_like(x), x)
    return x.sum(dim=1) / (keep.sum(dim=1, keepdim=True) + 1e-8)


# ---- released key layout (docs/method.md, "Released checkpoint files"), for test weights ------


def vision_shapes(d: int, depth: int, mlp: int, grid: int, swiglu: bool, patch: int = 14) -> dict:
    """Key -> shape of a released ``*_vision.npz`` (docs/method.md, "Released checkpoint files")."""
    shapes = {
        "cls_token": (1, 1, d),
        "register_tokens": (1, 1, d),
        "mask_token": (1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "patch_embed.proj.weight": (d, 3, patch, patch),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    hidden = (int(mlp * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (d,),
                p + "norm1.bias": (d,),
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.qkv.bias": (3 * d,),
                p + "attn.proj.weight": (d, d),
                p + "attn.proj.bias": (d,),
                p + "ls1.gamma": (d,),
                p + "ls2.gamma": (d,),
                p + "norm2.weight": (d,),
                p + "norm2.bias": (d,),
            }
        )
        if swiglu:
            shapes.update(
                {
                    p + "mlp.w12.weight": (2 * hidden, d),
                    p + "mlp.w12.bias": (2 * hidden,),
                    p + "mlp.w3.weight": (d, hidden),
                    p + "mlp.w3.bias": (d,),
                }
            )
        else:
            shapes.update(
                {
                    p + "mlp.fc1.weight": (mlp, d),
                    p + "mlp.fc1.bias": (mlp,),
                    p + "mlp.fc2.weight": (d, mlp),
                    p + "mlp.fc2.bias": (d,),
                }
            )
    return shapes


def text_shapes(d: int, depth: int, mlp: int, vocab: int = 32000) -> dict:
    """Key -> shape of a released ``*_text.npz`` without ``temperature``.

    Layout: docs/method.md, "Released checkpoint files".
    """
    shapes = {"token_embedding.weight": (vocab, d), "ln_final.weight": (d,), "ln_final.bias": (d,)}
    for i in range(depth):
        p = f"transformer.resblocks.{i}."
        shapes.update(
            {
                p + "attn.in_proj_weight": (3 * d, d),
                p + "attn.in_proj_bias": (3 * d,),
                p + "attn.out_proj.weight": (d, d),
                p + "attn.out_proj.bias": (d,),
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "mlp.c_fc.weight": (mlp, d),
                p + "mlp.c_fc.bias": (mlp,),
                p + "mlp.c_proj.weight": (d, mlp),
                p + "mlp.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
            }
        )
    return shapes


def random_weights(shapes: dict, seed: int) -> Weights:
    """Random float32 arrays: norms/gammas near 1, everything else small (std 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        x = torch.randn(shape, generator=gen)
        if key.endswith(
            (
                "norm1.weight",
                "norm2.weight",
                "norm.weight",
                "gamma",
                "ln_1.weight",
                "ln_2.weight",
                "ln_final.weight",
            )
        ):
            x = 1.0 + 0.1 * x
        elif key in ("cls_token", "register_tokens", "mask_token", "token_embedding.weight"):
            x = 0.5 * x
        else:
            x = 0.02 * x
        out[key] = x.numpy()
    return out
