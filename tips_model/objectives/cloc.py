"""CLOC objective: CLIP + region-text contrastive + box grounding through a Prompter.

Chen et al., "Contrastive Localized Language-Image Pre-Training", ICML 2025, arXiv 2410.02746
(docs/method.md, "CLOC"; sources and the verified / fallback status of every knob in
cloc_config.py).

    L = sum_c NCE(cls_c, caption_c)                               (L_CLIP, c in alt / syn)
        + lambda * ( w_rt * NCE_regions(Prompter(tokens, box_r), Text(region caption_r))
                   + w_g * (w_l1 * L1 + w_giou * (1 - GIoU))(b_hat_r, box_r) )
    b_hat_r = BoxHead(Prompter(tokens, Text(region caption_r)))

* CLIP (image level): the TIPS vision tower's CLS tokens against the pooled text tower, the
  same ``contrastive_loss`` (learned temperature, cross-worker negatives) TIPS uses; with
  ``clip_captions="both"`` CLS-alt pairs with the alt-text and CLS-syn with the synthetic
  caption exactly as in TIPS, so the two objectives differ only by the region terms.
* Prompter ("promptable embeddings", [paper]): a small pre-LN transformer over
  ``[patch tokens + position; prompt tokens]``. A box prompt is an encoding of its xyxy
  coordinates plus a learned type embedding; patch positions use the same encoding of each
  patch's own cell, so boxes and patches share one coordinate system. An isolation mask lets
  patches attend only to patches and each prompt only to the patches and itself, so the R
  prompts of an image run in one pass yet each output equals a separate run per region.
* Region-text term: the prompt output, linearly projected, against the region caption's
  pooled text embedding; padded regions are excluded; negatives from all workers
  (``_regions.region_contrastive_loss``).
* Grounding: the region caption embedding enters the Prompter as a *text* prompt (shared
  weights, own type embedding, ``grounding_prompter="shared"``); an MLP maps its output to
  sigmoid (cx, cy, w, h) -> xyxy; DETR's L1 + GIoU against the region's box.

Batch keys: global_crops [B,G,3,H,W] uint8 (crop 0 is used; boxes refer to it), alt_ids /
syn_ids [B,T] int64 (per ``clip_captions``), and, when a region term is on, regions [B,R,4]
float32 xyxy in [0,1], region_ids [B,R,T] int64, region_valid [B,R] bool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tips_model.losses import contrastive_loss
from tips_model.objectives._layers import Block, init_linear_, sincos_box
from tips_model.objectives._regions import (
    box_iou,
    box_losses,
    cxcywh_to_xyxy,
    region_contrastive_loss,
)
from tips_model.objectives.base import (
    ModelConfig,
    Objective,
    ObjectiveOutput,
    StepState,
    build_towers,
    images_to_float,
)
from tips_model.objectives.cloc_config import ClocObjectiveConfig
from tips_model.objectives.tips import Temperature
from tips_model.registry import OBJECTIVES
from tips_model.vision import EncoderOutput

REGION_KEYS = ("regions", "region_ids", "region_valid")


def isolation_mask(num_context: int, num_prompts: int, device: torch.device) -> Tensor:
    """[N+Q, N+Q] bool attention mask (True = may attend) for ``[context; prompts]``.

    Context tokens see only context; prompt q sees the context and itself.
    """
    n, q = num_context, num_prompts
    allowed = torch.zeros(n + q, n + q, dtype=torch.bool, device=device)
    allowed[:, :n] = True
    allowed[n:, n:] = torch.eye(q, dtype=torch.bool, device=device)
    return allowed


def patch_cells(grid_h: int, grid_w: int, device: torch.device) -> Tensor:
    """xyxy box in [0, 1] of every patch, row-major: [gh*gw, 4]."""
    ys = torch.arange(grid_h, dtype=torch.float32, device=device) / grid_h
    xs = torch.arange(grid_w, dtype=torch.float32, device=device) / grid_w
    y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
    y0, x0 = y0.flatten(), x0.flatten()
    return torch.stack([x0, y0, x0 + 1.0 / grid_w, y0 + 1.0 / grid_h], dim=-1)


class Prompter(nn.Module):
    """Promptable region read-out: (patch tokens, prompts) -> one embedding per prompt.

    Args:
        dim: token width D (the vision width).
        depth: transformer blocks.
        heads: attention heads.
        box_encoding: "sincos" (DETR-style features of the 4 coordinates, then Linear) or
            "linear" (Linear(4, D) on the raw coordinates).
        kinds: prompt kinds this instance takes ("box", "text"); only their parameters exist.
    """

    def __init__(
        self, dim: int, depth: int, heads: int, box_encoding: str, kinds: tuple[str, ...]
    ) -> None:
        super().__init__()
        self.dim = dim
        self.box_encoding = box_encoding
        self.box_embed = nn.Linear(dim if box_encoding == "sincos" else 4, dim)
        self.box_prompt = nn.Parameter(torch.zeros(dim)) if "box" in kinds else None
        self.text_embed = nn.Linear(dim, dim) if "text" in kinds else None
        self.text_prompt = nn.Parameter(torch.zeros(dim)) if "text" in kinds else None
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_linear_(self)
        for p in (self.box_prompt, self.text_prompt):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def encode_boxes(self, boxes: Tensor) -> Tensor:
        """[..., 4] xyxy in [0, 1] -> [..., D]."""
        feats = sincos_box(boxes, self.dim) if self.box_encoding == "sincos" else boxes.float()
        return self.box_embed(feats.to(self.box_embed.weight.dtype))

    def box_prompts(self, boxes: Tensor) -> Tensor:
        """[B, R, 4] boxes -> [B, R, D] prompt tokens."""
        return self.encode_boxes(boxes) + self.box_prompt

    def text_prompts(self, text_emb: Tensor) -> Tensor:
        """[B, R, D] pooled region-caption embeddings -> [B, R, D] prompt tokens."""
        return self.text_embed(text_emb) + self.text_prompt

    def forward(self, patch_tokens: Tensor, grid: tuple[int, int], prompts: Tensor) -> Tensor:
        """Args: patch_tokens [B,N,D]; grid (gh, gw), N = gh*gw; prompts [B,Q,D] -> [B,Q,D]."""
        n = patch_tokens.shape[1]
        pos = self.encode_boxes(patch_cells(*grid, patch_tokens.device))  # [N,D]
        x = torch.cat(
            [patch_tokens + pos.to(patch_tokens.dtype), prompts.to(patch_tokens.dtype)], 1
        )
        mask = isolation_mask(n, prompts.shape[1], x.device)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        return self.norm(x[:, n:])


@dataclass
class ClocStudentOutput:
    image: EncoderOutput  # global crop 0, [B, ...]
    txt_alt: Tensor | None  # [B,D]
    txt_syn: Tensor | None  # [B,D]
    temperature: Tensor  # scalar
    region_temperature: Tensor  # scalar
    region_emb: Tensor | None  # [B*R,D] box-prompted region embeddings
    region_txt: Tensor | None  # [B*R,D] pooled region-caption embeddings
    boxes: Tensor | None  # [B*R,4] xyxy predicted from the region captions


class ClocStudent(nn.Module):
    """Everything trained, one module whose ``forward`` is the whole student pass (DDP)."""

    def __init__(self, cfg: ClocObjectiveConfig, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vision, self.text = build_towers(
            model_cfg, vocab_size, "the towers share one embedding space"
        )
        self.vision.mask_token.requires_grad_(False)  # never used without iBOT masking
        d = self.vision.embed_dim
        self.temperature = Temperature(model_cfg.temperature_init, model_cfg.learn_temperature)
        self.region_temperature = (
            None
            if cfg.share_temperature or not cfg.uses_region_contrastive
            else Temperature(model_cfg.temperature_init, model_cfg.learn_temperature)
        )
        heads = cfg.prompter_heads or self.vision.blocks[0].attn.num_heads
        shared = cfg.grounding_prompter == "shared"
        kinds = (("box",) if cfg.uses_region_contrastive else ()) + (
            ("text",) if cfg.uses_grounding and shared else ()
        )
        self.prompter = (
            Prompter(d, cfg.prompter_depth, heads, cfg.box_encoding, kinds) if kinds else None
        )
        self.grounding_prompter = (
            Prompter(d, cfg.prompter_depth, heads, cfg.box_encoding, ("text",))
            if cfg.uses_grounding and not shared
            else None
        )
        self.region_proj = nn.Linear(d, d) if cfg.uses_region_contrastive else None
        self.box_head = (
            nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 4))
            if cfg.uses_grounding
            else None
        )
        for m in (self.region_proj, self.box_head):
            if m is not None:
                init_linear_(m)

    def forward(
        self,
        images: Tensor,
        alt_ids: Tensor | None,
        syn_ids: Tensor | None,
        regions: Tensor | None = None,
        region_ids: Tensor | None = None,
    ) -> ClocStudentOutput:
        """Args: images [B,3,H,W] float; *_ids [B,T]; regions [B,R,4]; region_ids [B,R,T]."""
        cfg = self.cfg
        enc = self.vision(images)
        temp = self.temperature()
        out = ClocStudentOutput(
            image=enc,
            txt_alt=self.text(alt_ids) if alt_ids is not None else None,
            txt_syn=self.text(syn_ids) if syn_ids is not None else None,
            temperature=temp,
            region_temperature=temp
            if self.region_temperature is None
            else self.region_temperature(),
            region_emb=None,
            region_txt=None,
            boxes=None,
        )
        if not cfg.uses_regions or regions is None or region_ids is None:
            return out
        b, r = regions.shape[:2]
        p = self.vision.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        region_txt = self.text(region_ids.flatten(0, 1))  # [B*R,D]
        out.region_txt = region_txt
        prompts, text_prompter = [], None
        if cfg.uses_region_contrastive:
            prompts.append(self.prompter.box_prompts(regions))  # [B,R,D]
        if cfg.uses_grounding:
            text_prompter = self.grounding_prompter or self.prompter
            text_prompts = text_prompter.text_prompts(region_txt.unflatten(0, (b, r)))
            if text_prompter is self.prompter:
                prompts.append(text_prompts)
        outputs = []
        if prompts:
            outputs = self.prompter(enc.patch_tokens, grid, torch.cat(prompts, 1)).split(r, 1)
        if cfg.uses_region_contrastive:
            out.region_emb = self.region_proj(outputs[0]).flatten(0, 1)  # [B*R,D]
        if cfg.uses_grounding:
            if text_prompter is self.prompter:
                grounded = outputs[-1]
            else:
                grounded = text_prompter(enc.patch_tokens, grid, text_prompts)
            out.boxes = cxcywh_to_xyxy(self.box_head(grounded).float().sigmoid()).flatten(0, 1)
        return out


@OBJECTIVES.register("cloc")
class ClocObjective(Objective):
    """CLOC (``name="cloc"``): no teacher; ``update_teacher`` is a no-op."""

    CONFIG = ClocObjectiveConfig

    def __init__(self, cfg: ClocObjectiveConfig, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.student = ClocStudent(cfg, model_cfg, vocab_size)
        self.teacher = None

    def required_batch_keys(self) -> set[str]:
        keys = {"global_crops"}
        if self.cfg.clip_captions in ("alt", "both"):
            keys.add("alt_ids")
        if self.cfg.clip_captions in ("syn", "both"):
            keys.add("syn_ids")
        if self.cfg.uses_regions:
            keys.update(REGION_KEYS)
        return keys

    def forward(self, batch: dict[str, Tensor], step: StepState) -> ObjectiveOutput:
        cfg = self.cfg
        # 1. inputs: global crop 0 (the boxes refer to it), captions, padded regions
        images = images_to_float(batch["global_crops"][:, 0])  # [B,3,H,W]
        use_alt = cfg.clip_captions in ("alt", "both")
        use_syn = cfg.clip_captions in ("syn", "both")
        regions = region_ids = valid = None
        if cfg.uses_regions:
            regions = batch["regions"].float()  # [B,R,4]
            region_ids = batch["region_ids"]  # [B,R,T]
            valid = batch["region_valid"].bool().flatten()  # [B*R]
        # 2. student
        s = self.run_student(
            images,
            batch["alt_ids"] if use_alt else None,
            batch["syn_ids"] if use_syn else None,
            regions,
            region_ids,
        )
        # 3. image-level CLIP
        losses: dict[str, Tensor] = {}
        gather = cfg.gather_negatives
        if use_alt:
            losses["contrastive_alt"] = contrastive_loss(
                s.image.cls_alt, s.txt_alt, s.temperature, gather=gather
            )
        if use_syn:
            losses["contrastive_syn"] = contrastive_loss(
                s.image.cls_syn, s.txt_syn, s.temperature, gather=gather
            )
        total = sum(losses.values())
        # 4. region terms
        region_total = None
        if s.region_emb is not None:
            losses["region_contrastive"] = region_contrastive_loss(
                s.region_emb, s.region_txt, valid, s.region_temperature, gather=gather
            )
            region_total = cfg.region_contrastive_weight * losses["region_contrastive"]
        if s.boxes is not None:
            target = regions.flatten(0, 1)  # [B*R,4]
            losses["grounding_l1"], losses["grounding_giou"] = box_losses(s.boxes, target, valid)
            grounding = (
                cfg.box_l1_weight * losses["grounding_l1"]
                + cfg.box_giou_weight * losses["grounding_giou"]
            )
            term = cfg.grounding_weight * grounding
            region_total = term if region_total is None else region_total + term
        if region_total is not None:
            total = total + cfg.region_weight * region_total
        return ObjectiveOutput(loss=total, losses=losses, metrics=self._metrics(s, regions, valid))

    @torch.no_grad()
    def _metrics(
        self, s: ClocStudentOutput, regions: Tensor | None, valid: Tensor | None
    ) -> dict[str, Tensor]:
        m: dict[str, Tensor] = {"temperature": s.temperature.detach().float()}
        if valid is not None:
            m["regions_valid_frac"] = valid.float().mean()
            n_valid = valid.sum().clamp_min(1).float()
        if s.region_emb is not None:
            r = F.normalize(s.region_emb.float(), dim=-1)
            t = F.normalize(s.region_txt.float(), dim=-1)
            sim = (r @ t.t()).masked_fill(~valid[None, :], float("-inf"))  # [M,M]
            hit = (sim.argmax(-1) == torch.arange(sim.shape[0], device=sim.device)) & valid
            m["region_acc"] = hit.sum().float() / n_valid
        if s.boxes is not None:
            iou = box_iou(s.boxes, regions.flatten(0, 1))  # [M]
            m["grounding_iou"] = (iou * valid.float()).sum() / n_valid
        return m
