"""TIPS / TIPSv2 vision encoder: a DINOv2-layout ViT with two CLS tokens.

Contract: ``VisionTransformer(images [B,3,H,W] float in [0,1], masks [B,h,w]|[B,N] bool|None)
-> EncoderOutput(cls_alt [B,D], cls_syn [B,D], patch_tokens [B,N,D])``, all after the final
LayerNorm. Pixels come in as float in [0, 1]; ``input_norm`` says what the tower does with them
first, in ``prepare_tokens`` (the one place, so training, periodic evaluation and ``tips eval``
agree): ``"none"`` (the released TIPS weights' contract, docs/method.md "Input pixels":
IMAGE_MEAN=0, IMAGE_STD=1) or a named mean/std (``INPUT_NORMS``). The setting is a model config
field (``model.input_norm``), so a checkpoint's ``config.yaml`` carries it; the mean/std are
non-persistent buffers and never enter a state dict (released files load strictly).

Layout and semantics follow the authors' PyTorch port (google-deepmind/tips
``pytorch/image_encoder.py``; summarised in docs/method.md, "Vision encoder", "Two CLS tokens",
"Position embeddings" and "Released checkpoint files"):

* parameter names are exactly the released ``state_dict`` names
  (docs/method.md, "Released checkpoint files"), so released ``*_vision.npz`` files load
  strictly (see ``tips_model/checkpoints.py``);
* token sequence ``[cls_token + pos_embed[:,0], register_tokens, patches + pos_embed[:,1:]]``:
  the 2nd CLS is the reference's single "register" token and gets no position embedding
  (docs/method.md, "Two CLS tokens"). ``cls_alt`` = 1st CLS (web alt-text), ``cls_syn`` = 2nd
  CLS (synthetic caption); the mapping to the reference's output names lives in
  ``checkpoints.py``;
* the mask token replaces masked patch embeddings before position embeddings are added;
* the stored position grid is resized (bilinear, antialias, explicit output size, i.e.
  interpolate_offset 0, align_corners False) only when the token grid differs from it,
  non-square grids included (docs/method.md, "Position embeddings"); DINOv2's bicubic + 0.1
  offset is NOT used;
* pre-LN blocks (LayerNorm eps 1e-6), qkv bias, optional LayerScale, GELU MLP or SwiGLU
  (hidden ``(int(mlp_dim*2/3)+7)//8*8``, only ViT-g), final ``norm``; no projection head.

Initialisation (training from scratch): trunc_normal(std 0.02) for every Linear weight,
``pos_embed``, ``cls_token`` and ``register_tokens``; zero biases and ``mask_token``; PyTorch's
default for the patch-embedding conv; LayerNorm ones/zeros; LayerScale gammas at
``layerscale_init``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tips_model.layers import Block
from tips_model.registry import VISION

# Input normalisations by name: (mean, std) per RGB channel of pixels in [0, 1].
INPUT_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]] | None] = {
    "none": None,  # raw [0, 1]: released TIPS / TIPSv2 (docs/method.md, "Input pixels")
    # ImageNet statistics, as DINOv2 trains (dinov2/data/transforms.py)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # OpenAI CLIP's statistics, as open_clip's OPENAI_DATASET_MEAN/STD (open_clip/constants.py)
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


@dataclass
class EncoderOutput:
    """Vision encoder outputs, all after the final LayerNorm.

    Attributes:
        cls_alt: [B, D] 1st CLS token (aligned with web alt-text).
        cls_syn: [B, D] 2nd CLS token (aligned with synthetic captions).
        patch_tokens: [B, N, D] patch tokens in row-major (h, w) order.
    """

    cls_alt: Tensor
    cls_syn: Tensor
    patch_tokens: Tensor


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: [B,3,H,W] -> [B, H/p * W/p, D]."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT with 2 CLS tokens, a mask token and resizable position embeddings.

    Args:
        img_size: image side for which ``pos_embed`` stores its (square) grid.
        patch_size: patch side in pixels.
        embed_dim: width D.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_hidden_dim: MLP hidden width (SwiGLU derives its own, see ``swiglu_hidden_dim``).
        ffn: "mlp" (GELU) or "swiglu".
        gelu_approximate: "none" (exact erf, released PyTorch) or "tanh" (Scenic/flax).
        layerscale_init: LayerScale init value; None (or 0) = no LayerScale parameters at all.
        qkv_bias: bias on the qkv projection.
        drop_path_rate: stochastic depth, linearly increasing from 0 to this over blocks.
        ln_eps: LayerNorm epsilon.
        input_norm: what ``prepare_tokens`` does to the [0, 1] pixels first, a key of
            ``INPUT_NORMS`` ("none": nothing, the released weights' contract).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_hidden_dim: int = 3072,
        ffn: str = "mlp",
        gelu_approximate: str = "none",
        layerscale_init: float | None = None,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        ln_eps: float = 1e-6,
        input_norm: str = "none",
    ) -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {sorted(INPUT_NORMS)}, got {input_norm!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {gelu_approximate!r}")
        self._patch_size = patch_size
        self._embed_dim = embed_dim
        self.grid_size = img_size // patch_size
        self.grad_checkpointing = False
        self.input_norm = input_norm
        stats = INPUT_NORMS[input_norm]
        if stats is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in stats)
            self.register_buffer("pixel_mean", mean, persistent=False)
            self.register_buffer("pixel_std", std, persistent=False)

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_hidden_dim,
                ffn,
                gelu_approximate,
                layerscale_init,
                qkv_bias,
                rate,
                ln_eps,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=ln_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:  # shape-only build: nothing to initialise
            return
        for p in (self.pos_embed, self.cls_token, self.register_tokens):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def patch_size(self) -> int:
        return self._patch_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (torch.utils.checkpoint, use_reentrant=False)."""
        self.grad_checkpointing = enable

    # ---- tokens ---------------------------------------------------------------------------

    def _grid(self, images: Tensor) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        p = self._patch_size
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch size {p}; resize or pad to a "
                f"multiple of {p}"
            )
        return h // p, w // p

    def _pos_embed(self, gh: int, gw: int, dtype: torch.dtype) -> Tensor:
        """Position embeddings [1, 1+gh*gw, D] for a gh x gw grid (resized if needed)."""
        g = self.grid_size
        if (gh, gw) == (g, g):
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid, size=(gh, gw), mode="bilinear", antialias=True, align_corners=False
        )
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def normalize_pixels(self, images: Tensor) -> Tensor:
        """[0, 1] pixels -> what the patch embedding sees (``input_norm``; identity for "none")."""
        if self.input_norm == "none":
            return images
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def prepare_tokens(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        """Token sequence [B, 2+N, D]: [cls_alt, cls_syn, patches] before the blocks.

        Args:
            images: [B,3,H,W] float in [0,1].
            masks: [B,h,w] or [B,N] bool, True = replace that patch by ``mask_token``.
        """
        gh, gw = self._grid(images)
        x = self.patch_embed(self.normalize_pixels(images))  # [B,N,D]
        b, n, _ = x.shape
        if masks is not None:
            masks = masks.reshape(masks.shape[0], -1)
            if masks.shape != (b, n):
                raise ValueError(f"masks must flatten to [B,N]=[{b},{n}], got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        x = x + self._pos_embed(gh, gw, x.dtype)
        reg = self.register_tokens.expand(b, -1, -1).to(x.dtype)
        return torch.cat([x[:, :1], reg, x[:, 1:]], dim=1)

    def _block(self, blk: Block, x: Tensor, value_only: bool = False) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, value_only, use_reentrant=False)
        return blk(x, value_only)

    # ---- public forwards ------------------------------------------------------------------

    def forward(self, images: Tensor, masks: Tensor | None = None) -> EncoderOutput:
        """Encode images.

        Args:
            images: [B,3,H,W] float in [0,1]; H and W multiples of the patch size.
            masks: optional [B,h,w] or [B,N] bool patch mask (True = masked).

        Returns:
            EncoderOutput with cls_alt [B,D], cls_syn [B,D], patch_tokens [B,N,D].
        """
        x = self.prepare_tokens(images, masks)
        for blk in self.blocks:
            x = self._block(blk, x)
        x = self.norm(x)
        return EncoderOutput(cls_alt=x[:, 0], cls_syn=x[:, 1], patch_tokens=x[:, 2:])

    def get_intermediate_layers(
        self, images: Tensor, indices: Sequence[int], norm: bool = True
    ) -> list[Tensor]:
        """Patch tokens after each listed block (0-based; negative counts from the end).

        Args:
            images: [B,3,H,W] float in [0,1].
            indices: block indices, e.g. [2, 5, 8, 11] for the B/14 DPT head
                (docs/method.md, "Dense heads").
            norm: apply the final LayerNorm to each output.

        Returns:
            One [B,N,D] tensor per index, in the order given.
        """
        depth = len(self.blocks)
        wanted = [i + depth if i < 0 else i for i in indices]
        bad = [i for i, j in zip(indices, wanted) if not 0 <= j < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for depth {depth}")
        x = self.prepare_tokens(images)
        taken: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            x = self._block(blk, x)
            if i in wanted:
                taken[i] = self.norm(x) if norm else x
        return [taken[i][:, 2:] for i in wanted]

    def forward_value_only_last(self, images: Tensor) -> Tensor:
        """MaskCLIP "values trick" patch tokens (docs/method.md, "Evaluation protocols").

        All blocks but the last run normally; in the last, the attention output is replaced by
        ``proj(V)`` (LayerScale, residual and MLP branch kept), then the final norm.

        Args:
            images: [B,3,H,W] float in [0,1].

        Returns:
            [B,N,D] patch tokens.
        """
        x = self.prepare_tokens(images)
        for blk in self.blocks[:-1]:
            x = self._block(blk, x)
        x = self._block(self.blocks[-1], x, value_only=True)
        return self.norm(x)[:, 2:]


# ---- registered factories (docs/method.md, "Vision encoder") -------------------------------

_ARCHS: dict[str, dict[str, Any]] = {
    "vit_s14": dict(embed_dim=384, depth=12, num_heads=6, mlp_hidden_dim=1536),
    "vit_b14": dict(embed_dim=768, depth=12, num_heads=12, mlp_hidden_dim=3072),
    # B/16: the CLOC and MUG papers' backbone size (not a TIPS release)
    "vit_b16": dict(embed_dim=768, depth=12, num_heads=12, mlp_hidden_dim=3072, patch_size=16),
    "vit_l14": dict(embed_dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096),
    "vit_so400m14": dict(embed_dim=1152, depth=27, num_heads=16, mlp_hidden_dim=4304),
    "vit_g14": dict(embed_dim=1536, depth=40, num_heads=24, mlp_hidden_dim=6144, ffn="swiglu"),
}
_TEST_ARCH = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64)


def _make(arch: dict[str, Any], overrides: dict[str, Any]) -> VisionTransformer:
    kwargs: dict[str, Any] = dict(img_size=224, patch_size=14, layerscale_init=None)
    kwargs.update(arch)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


@VISION.register("vit_s14")
def vit_s14(**overrides: Any) -> VisionTransformer:
    """ViT-S/14: D 384, 12 blocks, 6 heads, MLP 1536."""
    return _make(_ARCHS["vit_s14"], overrides)


@VISION.register("vit_b14")
def vit_b14(**overrides: Any) -> VisionTransformer:
    """ViT-B/14: D 768, 12 blocks, 12 heads, MLP 3072."""
    return _make(_ARCHS["vit_b14"], overrides)


@VISION.register("vit_b16")
def vit_b16(**overrides: Any) -> VisionTransformer:
    """ViT-B/16: D 768, 12 blocks, 12 heads, MLP 3072, patch 16 (CLOC / MUG comparisons)."""
    return _make(_ARCHS["vit_b16"], overrides)


@VISION.register("vit_l14")
def vit_l14(**overrides: Any) -> VisionTransformer:
    """ViT-L/14: D 1024, 24 blocks, 16 heads, MLP 4096."""
    return _make(_ARCHS["vit_l14"], overrides)


@VISION.register("vit_so400m14")
def vit_so400m14(**overrides: Any) -> VisionTransformer:
    """ViT-So400m/14: D 1152, 27 blocks, 16 heads (head dim 72), MLP 4304."""
    return _make(_ARCHS["vit_so400m14"], overrides)


@VISION.register("vit_g14")
def vit_g14(**overrides: Any) -> VisionTransformer:
    """ViT-g/14 ("giant2"): D 1536, 40 blocks, 24 heads, SwiGLU (nominal MLP 6144 -> 4096)."""
    return _make(_ARCHS["vit_g14"], overrides)


@VISION.register("vit_test")
def vit_test(**overrides: Any) -> VisionTransformer:
    """Tiny test model: patch 8, image 32, D 32, 2 blocks, 2 heads, MLP 64."""
    return _make(_TEST_ARCH, overrides)


def build_vision(name: str, **overrides: Any) -> VisionTransformer:
    """Build a registered vision encoder by name (``VISION.names()`` lists them)."""
    return VISION.build(name, **overrides)
