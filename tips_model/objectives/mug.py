"""MUG objective: masked image reconstruction + caption generation (docs/method.md, "MUG").

Zhao et al., "Vision Learners Meet Web Image-Text Pairs" (MUlti-modal Generator), TMLR 2024,
arXiv 2301.07088. Purely generative: no contrastive term, no EMA teacher, no multi-crop.

    tokens  = Enc(visible patches)                      (MAE token dropping, ratio 0.75)
    L_rec   = mean over masked patches of mean_j (PixDec(tokens)_j - norm_pix(x)_j)^2
    L_cap   = - mean over caption tokens t of log p(w_t | w_<t, tokens)   (teacher forcing)
    L       = w_rec * L_rec + lambda * L_cap

* Encoder: the TIPS vision tower run on the two CLS tokens + the visible patches only
  (``_mae.encode_visible``); its iBOT ``mask_token`` is never used, so it is frozen (no
  gradient, no DDP wait) and kept only so checkpoints keep the tower's layout.
* Pixel decoder (MAE §3): Linear to the decoder width, learned mask tokens in the dropped
  slots, un-shuffle, fixed 2-D sin-cos positions, pre-LN blocks, Linear to p*p*3 pixels.
* Caption decoder (CoCa-style multimodal decoder, [inf] for MUG): learned BOS + token
  embedding + learned positions, causal self-attention, cross-attention to all encoder
  tokens (CLS + visible patches), logits tied to the token embedding by default. Inputs are
  ``[BOS, w_1 .. w_{T-1}]``, targets ``[w_1 .. w_T]``; id 0 (padding) is ignored. Captions are
  right-padded, so causal attention alone keeps real tokens from seeing padding.

Randomness: the patch subset comes from ``torch.rand`` on the default generator of the
images' device; the training loop reseeds it from (seed, step, rank) every step, so a resumed
run draws the same masks. ``MugObjective.forward`` also takes an explicit ``generator``.

Batch keys: global_crops [B,G,3,H,W] uint8 (all G crops are used, each with its own mask),
alt_ids or syn_ids [B,T] int64 (``objective.caption``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tips_model.objectives._layers import Block, init_linear_, sincos_2d
from tips_model.objectives._mae import (
    encode_visible,
    masked_mse,
    normalize_patches,
    patchify,
    random_masking,
)
from tips_model.objectives.base import (
    ModelConfig,
    Objective,
    ObjectiveOutput,
    StepState,
    build_vision_tower,
    images_to_float,
)
from tips_model.objectives.mug_config import MugObjectiveConfig
from tips_model.registry import OBJECTIVES
from tips_model.text import PAD_ID


class PixelDecoder(nn.Module):
    """MAE decoder: encoder tokens [B, 2+K, De] + ids_restore -> pixels [B, N, p*p*3]."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, patch_size: int) -> None:
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        init_linear_(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tensor, ids_restore: Tensor, grid: tuple[int, int]) -> Tensor:
        """Args: tokens [B,2+K,De] (CLS first); ids_restore [B,N]; grid (gh, gw), N = gh*gw."""
        x = self.embed(tokens)  # [B,2+K,Dd]
        b, n = ids_restore.shape
        vis = x[:, 2:]
        filler = self.mask_token.to(x.dtype).expand(b, n - vis.shape[1], -1)
        full = torch.cat([vis, filler], dim=1)  # [B,N,Dd] in shuffled order
        full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        full = full + sincos_2d(*grid, x.shape[-1], device=x.device).to(x.dtype)
        x = torch.cat([x[:, :2], full], dim=1)  # [B,2+N,Dd]
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 2:]  # [B,N,p*p*3]


class CaptionDecoder(nn.Module):
    """Causal text decoder cross-attending to image tokens; teacher-forced logits.

    Args:
        vocab_size: tokenizer vocabulary (id 0 = padding).
        enc_dim: width of the image tokens.
        dim, depth, heads: decoder width, blocks, heads.
        max_len: longest caption T.
        tie_embeddings: logits = h @ token_embedding^T (no separate output matrix).
    """

    def __init__(
        self,
        vocab_size: int,
        enc_dim: int,
        dim: int,
        depth: int,
        heads: int,
        max_len: int,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.bos_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, cross_attention=True, context_dim=enc_dim) for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(dim, eps=1e-6)
        self.head = None if tie_embeddings else nn.Linear(dim, vocab_size, bias=False)
        init_linear_(self)
        for p in (self.bos_token, self.pos_embed, self.token_embedding.weight):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, ids: Tensor, image_tokens: Tensor) -> Tensor:
        """Teacher forcing.

        Args:
            ids: [B, T] int64 caption, right-padded with 0.
            image_tokens: [B, S, enc_dim] encoder outputs to cross-attend to.

        Returns:
            [B, T, V] logits; position t predicts ``ids[:, t]`` from ``ids[:, :t]``.
        """
        b, t = ids.shape
        if t > self.pos_embed.shape[1]:
            raise ValueError(
                f"captions have {t} tokens, the decoder max_len is {self.pos_embed.shape[1]}"
            )
        prev = self.token_embedding(ids[:, :-1])  # [B,T-1,D]
        x = torch.cat([self.bos_token.expand(b, -1, -1).to(prev.dtype), prev], dim=1)  # [B,T,D]
        x = x + self.pos_embed[:, :t].to(x.dtype)
        for blk in self.blocks:
            x = blk(x, context=image_tokens, is_causal=True)
        x = self.ln_final(x)
        if self.head is None:
            return x @ self.token_embedding.weight.t()
        return self.head(x)


def caption_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Token-level cross-entropy, padding (id 0) ignored, mean over real tokens.

    Args:
        logits: [B, T, V] teacher-forced logits.
        ids: [B, T] int64 targets, 0 = padding.

    Returns:
        Scalar float32; 0 (still attached to ``logits``) if every target is padding.
    """
    valid = ids != PAD_ID
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), ids.flatten(), ignore_index=PAD_ID, reduction="sum"
    )  # no host read of whether any target is real: 0 / 1 when none is
    return total / valid.sum().clamp_min(1)


@dataclass
class MugStudentOutput:
    pred: Tensor | None  # [B,N,p*p*3] predicted pixels of every patch (only masked ones scored)
    logits: Tensor | None  # [B,T,V] caption logits


class MugStudent(nn.Module):
    """Everything trained, one module whose ``forward`` is the whole student pass (DDP)."""

    def __init__(self, cfg: MugObjectiveConfig, model_cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.vision = build_vision_tower(model_cfg)
        # Token dropping never substitutes mask tokens: freeze it so DDP never waits on it.
        self.vision.mask_token.requires_grad_(False)
        self.text = None  # MUG has no text encoder: only vision tasks can evaluate it
        d = self.vision.embed_dim
        self.pixel_decoder = (
            PixelDecoder(
                d, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, self.vision.patch_size
            )
            if cfg.reconstruction_weight > 0
            else None
        )
        self.caption_decoder = (
            CaptionDecoder(
                vocab_size,
                d,
                cfg.caption_dim,
                cfg.caption_depth,
                cfg.caption_heads,
                model_cfg.max_text_len,
                cfg.tie_caption_embeddings,
            )
            if cfg.caption_weight > 0
            else None
        )

    def forward(
        self, images: Tensor, ids_keep: Tensor, ids_restore: Tensor, caption_ids: Tensor | None
    ) -> MugStudentOutput:
        """Args: images [B,3,H,W] float; ids_keep [B,K]; ids_restore [B,N]; caption_ids [B,T]."""
        p = self.vision.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        enc = encode_visible(self.vision, images, ids_keep)
        tokens = torch.cat([enc.cls_alt[:, None], enc.cls_syn[:, None], enc.patch_tokens], 1)
        pred = logits = None
        if self.pixel_decoder is not None:
            pred = self.pixel_decoder(tokens, ids_restore, grid)
        if self.caption_decoder is not None and caption_ids is not None:
            logits = self.caption_decoder(caption_ids, tokens)
        return MugStudentOutput(pred=pred, logits=logits)


@OBJECTIVES.register("mug")
class MugObjective(Objective):
    """MUG (``name="mug"``): no teacher; ``update_teacher`` is a no-op."""

    CONFIG = MugObjectiveConfig

    def __init__(self, cfg: MugObjectiveConfig, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.student = MugStudent(cfg, model_cfg, vocab_size)
        self.teacher = None

    def required_batch_keys(self) -> set[str]:
        keys = {"global_crops"}
        if self.cfg.caption_weight > 0:
            keys.add(f"{self.cfg.caption}_ids")
        return keys

    def forward(
        self,
        batch: dict[str, Tensor],
        step: StepState,
        generator: torch.Generator | None = None,
    ) -> ObjectiveOutput:
        cfg = self.cfg
        # 1. pixels, patch targets and the random visible subset
        glob_u8 = batch["global_crops"]  # [B,G,3,H,W]
        g = glob_u8.shape[1]
        images = images_to_float(glob_u8.flatten(0, 1))  # [B*G,3,H,W]
        p = self.student.vision.patch_size
        n = (images.shape[-2] // p) * (images.shape[-1] // p)
        ids_keep, ids_restore, mask = random_masking(
            images.shape[0], n, cfg.mask_ratio, images.device, generator
        )
        caption_ids = None
        if cfg.caption_weight > 0:
            caption_ids = batch[f"{cfg.caption}_ids"].repeat_interleave(g, dim=0)  # [B*G,T]
        # 2. student: encoder on visible patches, pixel and caption decoders
        s = self.run_student(images, ids_keep, ids_restore, caption_ids)
        # 3. losses
        losses: dict[str, Tensor] = {}
        total = images.new_zeros(())
        if s.pred is not None:
            with torch.no_grad():
                target = patchify(images, p)  # [B*G,N,p*p*3]
                if cfg.norm_pix_loss:
                    target = normalize_patches(target)
            losses["reconstruction"] = masked_mse(s.pred, target, mask)
            total = total + cfg.reconstruction_weight * losses["reconstruction"]
        if s.logits is not None:
            losses["caption"] = caption_loss(s.logits, caption_ids)
            total = total + cfg.caption_weight * losses["caption"]
        return ObjectiveOutput(
            loss=total, losses=losses, metrics=self._metrics(s, mask, caption_ids)
        )

    @torch.no_grad()
    def _metrics(
        self, s: MugStudentOutput, mask: Tensor, caption_ids: Tensor | None
    ) -> dict[str, Tensor]:
        m: dict[str, Tensor] = {"mask_ratio": mask.float().mean()}
        if s.logits is not None and caption_ids is not None:
            valid = caption_ids != PAD_ID
            hit = (s.logits.argmax(-1) == caption_ids) & valid
            m["caption_token_acc"] = hit.sum().float() / valid.sum().clamp_min(1).float()
        return m
