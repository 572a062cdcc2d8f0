"""TIPS and TIPSv2 objectives: dual-CLS contrastive + DINO self-distillation + iBOT / iBOT++.

    L = w_alt * NCE(cls_alt, alt_text) + w_syn * NCE(cls_syn, synthetic caption)
        + alpha * L_dino + beta * L_mim + koleo_weight * L_koleo

(docs/method.md, "Loss weights")

* Contrastive (docs/method.md, "Dual-caption contrastive loss"): symmetric InfoNCE, one learned
  temperature (divide), negatives gathered across workers; CLS-alt pairs with the web alt-text,
  CLS-syn with the sampled synthetic caption; one shared text tower.
* Distillation (docs/method.md, "DINO CLS distillation"): the teacher sees the unmasked global
  crop(s); students are the M local crops and the other global crops (with TIPS's single global
  crop: only the M locals).
* MIM (docs/method.md, "iBOT masked image modelling"; docs/method.md, "TIPSv2 all-token iBOT"):
  the student sees the global crops with masked patches replaced by the mask token;
  ``mim_tokens="masked"`` is iBOT (TIPS), ``"all"`` is iBOT++ (TIPSv2).
* Teacher (docs/method.md, "Teacher EMA and schedules"): ``full_ema`` keeps an EMA copy of
  backbone and heads (TIPS); ``head_ema`` runs the student backbone under no_grad and keeps EMA
  heads only (TIPSv2).

Batch keys (docs/design.md, "Batch contract"): global_crops [B,G,3,H,W] u8, local_crops
[B,M,3,h,w] u8, masks [B,G,h',w'] bool, alt_ids [B,T] i64, syn_ids [B,T] i64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tips_model.ema import make_teacher
from tips_model.heads import DINOHead
from tips_model.losses import (
    DINOLoss,
    IBOTPatchLoss,
    contrastive_loss,
    koleo_loss,
    soft_cross_entropy,
    target_stats,
)
from tips_model.objectives.base import (
    ModelConfig,
    Objective,
    ObjectiveOutput,
    StepState,
    build_towers,
    images_to_float,
)
from tips_model.objectives.tips_config import TipsObjectiveConfig, TipsV2ObjectiveConfig
from tips_model.registry import OBJECTIVES
from tips_model.vision import EncoderOutput


class Temperature(nn.Module):
    """The contrastive temperature, learned in log space so it stays positive."""

    def __init__(self, init: float, learn: bool) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init)), requires_grad=learn)

    def forward(self) -> torch.Tensor:
        return self.log_temperature.exp()


@dataclass
class StudentOutput:
    glob: EncoderOutput  # masked global crops, [B*G, ...]
    contrastive: EncoderOutput  # the view used for the contrastive CLS (global crop 0), [B, ...]
    local_cls: torch.Tensor | None  # [B*M, D] CLS of the local crops
    txt_alt: torch.Tensor  # [B, D]
    txt_syn: torch.Tensor  # [B, D]
    temperature: torch.Tensor  # scalar


@dataclass
class MaskSlots:
    """``mim_masked_capacity``: S token slots per image, gathered from ``[B*G*N]`` tokens."""

    index: torch.Tensor  # [B*G*S] int64 into the flattened tokens; per image masked ones first
    valid: torch.Tensor  # [B*G*S] float32, 1 = a masked token, 0 = padding
    weight: torch.Tensor  # [B*G*S] float32, valid / (masked count of its image), DINOv2's
    # masks_weight (dinov2/data/collate.py)


def mask_slots(masks: torch.Tensor, capacity: float) -> MaskSlots:
    """The fixed-count selection of ``masks [B*G, N]`` bool: S = max(1, int(capacity * N))
    slots per image holding its masked tokens in patch order, then padding (unmasked tokens,
    weight 0). Shapes depend on B*G, N and ``capacity`` only; masked tokens beyond S (never
    with pipeline masks when capacity >= masking.ratio_max) are left out."""
    n_img, n = masks.shape
    s = max(1, int(capacity * n))
    # Distinct keys (masked above unmasked, then by patch order), so the selection does not
    # depend on how a sort orders ties: inductor may recompute it in backward with its own.
    position = torch.arange(n - 1, -1, -1, device=masks.device)  # [N]
    order = torch.topk(masks.long() * n + position, s, dim=1).indices  # [B*G,S]
    valid = masks.gather(1, order).float()
    count = masks.sum(dim=1, keepdim=True).clamp(min=1).float()  # [B*G,1]
    offset = torch.arange(n_img, device=masks.device)[:, None] * n
    return MaskSlots((order + offset).flatten(), valid.flatten(), (valid / count).flatten())


class TipsStudent(nn.Module):
    """Everything trained, in one module whose ``forward`` is the whole student pass, so the
    loop can wrap it for DDP/FSDP and every gradient is synchronised."""

    def __init__(self, cfg: TipsObjectiveConfig, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vision, self.text = build_towers(
            model_cfg, vocab_size, 'TIPS has no projection head (docs/method.md, "Vision encoder")'
        )
        d = self.vision.embed_dim
        self.temperature = Temperature(model_cfg.temperature_init, model_cfg.learn_temperature)
        head_kw = dict(
            in_dim=d,
            out_dim=cfg.head_out_dim,
            hidden_dim=cfg.head_hidden_dim,
            bottleneck_dim=cfg.head_bottleneck_dim,
            nlayers=cfg.head_nlayers,
        )
        # Heads exist only for terms that are on, so DDP never sees unused parameters.
        self.dino_head = DINOHead(**head_kw) if cfg.alpha > 0 else None
        self.ibot_head = (
            DINOHead(**head_kw)
            if cfg.beta > 0 and (cfg.separate_ibot_head or cfg.alpha == 0)
            else None
        )

    def patch_head(self) -> DINOHead | None:
        if self.cfg.beta <= 0:
            return None
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def forward(
        self,
        global_imgs: torch.Tensor,
        masks: torch.Tensor | None,
        local_imgs: torch.Tensor | None,
        alt_ids: torch.Tensor,
        syn_ids: torch.Tensor,
        num_global: int,
    ) -> StudentOutput:
        """Args: global_imgs [B*G,3,H,W] float; masks [B*G,N] bool; local_imgs [B*M,3,h,w]."""
        glob = self.vision(global_imgs, masks=masks)
        if self.cfg.contrastive_view == "unmasked" and masks is not None:
            first = global_imgs.unflatten(0, (-1, num_global))[:, 0]  # [B,3,H,W]
            contrastive = self.vision(first)
        else:
            contrastive = EncoderOutput(
                cls_alt=glob.cls_alt.unflatten(0, (-1, num_global))[:, 0],
                cls_syn=glob.cls_syn.unflatten(0, (-1, num_global))[:, 0],
                patch_tokens=glob.patch_tokens[::num_global],
            )
        local_cls = None
        if local_imgs is not None and self.dino_head is not None:
            loc = self.vision(local_imgs)
            local_cls = loc.cls_alt if self.cfg.dino_cls == "alt" else loc.cls_syn
        return StudentOutput(
            glob=glob,
            contrastive=contrastive,
            local_cls=local_cls,
            txt_alt=self.text(alt_ids),
            txt_syn=self.text(syn_ids),
            temperature=self.temperature(),
        )


@OBJECTIVES.register("tips")
class TipsObjective(Objective):
    """The TIPS objective (``name="tips"``); ``TipsV2Objective`` changes only the config."""

    CONFIG = TipsObjectiveConfig

    def __init__(self, cfg: TipsObjectiveConfig, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.student = TipsStudent(cfg, model_cfg, vocab_size)
        heads = nn.ModuleDict()
        if self.student.dino_head is not None:
            heads["dino_head"] = self.student.dino_head
        if self.student.ibot_head is not None:
            heads["ibot_head"] = self.student.ibot_head
        if cfg.teacher == "full_ema":
            heads["vision"] = self.student.vision
        self.teacher = make_teacher(heads) if len(heads) else None
        k = cfg.head_out_dim
        self.dino_loss = DINOLoss(
            k, center_momentum=cfg.center_momentum, student_temp=cfg.student_temp
        )
        self.ibot_loss = IBOTPatchLoss(
            k, center_momentum=cfg.center_momentum, student_temp=cfg.student_temp
        )

    # ------------------------------------------------------------------ loop hooks
    def shard_units(self) -> list[str]:
        """Blocks, then both towers and the heads: the loss calls the heads, and head-only EMA
        the student's vision tower, outside the student's ``forward``."""
        heads = [n for n in ("dino_head", "ibot_head") if getattr(self.student, n) is not None]
        return [*super().shard_units(), "vision", "text", *heads]

    def required_batch_keys(self) -> set[str]:
        keys = {"global_crops", "alt_ids", "syn_ids"}
        if self.cfg.alpha > 0:
            keys.add("local_crops")
        if self.cfg.beta > 0:
            keys.add("masks")
        return keys

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        self.dino_loss.settle_center()  # a compiled forward rebinds the centres
        self.ibot_loss.settle_center()
        if self.teacher is None:
            return
        self.ema_update(
            [(t_mod, getattr(self.student, name)) for name, t_mod in self.teacher.items()],
            momentum,
        )

    # ------------------------------------------------------------------ forward
    def _teacher_targets(
        self,
        global_imgs: torch.Tensor,
        temp: float,
        masks: torch.Tensor | None,
        slots: MaskSlots | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Teacher probabilities on the unmasked global crops, and their collapse diagnostics
        (``dino/*``, ``ibot/*``: ``tips_model.losses.target_stats``). CLS [B*G,K]; patches
        [n_masked,K] rows ``x[masks]`` for iBOT (``mim_tokens="masked"``: the head, the
        centring and the centre update see only the tokens that are distilled, as in DINOv2)
        or [B*G,N,K] for iBOT++ (every token is distilled); [B*G*S,K] for the ``slots``."""
        cfg = self.cfg
        with torch.no_grad():
            backbone = self.teacher["vision"] if cfg.teacher == "full_ema" else self.student.vision
            out = backbone(global_imgs)
            cls = out.cls_alt if cfg.dino_cls == "alt" else out.cls_syn
            cls_probs = patch_probs = None
            stats: dict[str, torch.Tensor] = {}
            if cfg.alpha > 0:
                cls_logits = self.teacher["dino_head"](cls).float()
                cls_probs = self._center(self.dino_loss, cls_logits, temp)
                self.dino_loss.update_center(cls_logits)
                for k, v in target_stats(cls_probs, cls_logits, temp).items():
                    stats[f"dino/{k}"] = v
            if cfg.beta > 0:
                head = self.teacher["ibot_head" if "ibot_head" in self.teacher else "dino_head"]
                tokens = out.patch_tokens  # [B*G,N,D]
                if self._fixed_shape_ibot(masks):
                    return cls_probs, *self._fixed_shape_targets(head, tokens, masks, temp, stats)
                if slots is not None:  # the same targets on the slots, padding weighing 0
                    tokens = tokens.flatten(0, 1).index_select(0, slots.index)  # [B*G*S,D]
                    return cls_probs, *self._fixed_shape_targets(
                        head, tokens, slots.valid, temp, stats
                    )
                if cfg.mim_tokens == "masked" and masks is not None:
                    tokens = tokens[masks]  # [n_masked,D]; on every token the 65536-way
                    # head held most of the step's memory (B/14, batch 256: 92 vs 67 GiB)
                patch_logits = head(tokens).float()
                patch_probs = self._center(self.ibot_loss, patch_logits, temp)
                self.ibot_loss.update_center(patch_logits)
                if patch_logits.numel():
                    for k, v in target_stats(patch_probs, patch_logits, temp).items():
                        stats[f"ibot/{k}"] = v
        return cls_probs, patch_probs, stats

    def _fixed_shape_ibot(self, masks: torch.Tensor | None) -> bool:
        cfg = self.cfg
        return cfg.mim_fixed_shapes and cfg.mim_tokens == "masked" and masks is not None

    def _fixed_shape_targets(
        self,
        head: nn.Module,
        tokens: torch.Tensor,
        masks: torch.Tensor,
        temp: float,
        stats: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """iBOT's teacher targets on every token ``[B*G,N,K]`` (``mim_fixed_shapes``) or on
        the gathered slots ``[B*G*S,K]`` (``mim_masked_capacity``); the centre update and the
        diagnostics weigh the masked tokens 1 and the others 0 (``masks`` of the same rows)."""
        patch_logits = head(tokens).float()  # [B*G,N,K]
        patch_probs = self.ibot_loss.softmax_center_teacher(patch_logits, temp)
        self.ibot_loss.update_center_fixed_shape(patch_logits, masks)
        weights = masks.reshape(-1)
        for k, v in target_stats(patch_probs, patch_logits, temp, weights).items():
            stats[f"ibot/{k}"] = v
        return patch_probs, stats

    def _center(self, loss: nn.Module, logits: torch.Tensor, temp: float) -> torch.Tensor:
        if self.cfg.centering == "sinkhorn":
            return loss.sinkhorn_knopp_teacher(
                logits, temp, n_iterations=self.cfg.sinkhorn_iterations
            )
        return loss.softmax_center_teacher(logits, temp)

    def forward(self, batch: dict[str, torch.Tensor], step: StepState) -> ObjectiveOutput:
        cfg = self.cfg
        # 1. pixels and shapes
        glob_u8 = batch["global_crops"]  # [B,G,3,H,W]
        b, g = glob_u8.shape[:2]
        global_imgs = images_to_float(glob_u8.flatten(0, 1))  # [B*G,3,H,W]
        masks = slots = None
        if cfg.beta > 0:  # bool here once: x[masks] below selects rows, not integer indices
            masks = batch["masks"].flatten(0, 1).flatten(1).bool()  # [B*G,N]
            if cfg.mim_masked_capacity is not None:
                slots = mask_slots(masks, cfg.mim_masked_capacity)
        local_imgs = None
        if cfg.alpha > 0 and batch["local_crops"].shape[1] > 0:
            local_imgs = images_to_float(batch["local_crops"].flatten(0, 1))  # [B*M,3,h,w]
        # 2. teacher targets on the unmasked global crops
        cls_probs, patch_probs, target_metrics = self._teacher_targets(
            global_imgs, step.teacher_temp, masks, slots
        )
        # 3. student
        s = self.run_student(global_imgs, masks, local_imgs, batch["alt_ids"], batch["syn_ids"], g)
        # 4. contrastive, dual CLS
        losses: dict[str, torch.Tensor] = {}
        losses["contrastive_alt"] = contrastive_loss(
            s.contrastive.cls_alt, s.txt_alt, s.temperature, gather=cfg.gather_negatives
        )
        losses["contrastive_syn"] = contrastive_loss(
            s.contrastive.cls_syn, s.txt_syn, s.temperature, gather=cfg.gather_negatives
        )
        total = (
            cfg.contrastive_alt_weight * losses["contrastive_alt"]
            + cfg.contrastive_syn_weight * losses["contrastive_syn"]
        )
        student = self.student
        # 5. DINO CLS distillation: for each teacher crop t, students are the locals + other globals
        if cfg.alpha > 0 and cls_probs is not None:
            glob_cls = s.glob.cls_alt if cfg.dino_cls == "alt" else s.glob.cls_syn
            losses["dino"] = self._dino(student, glob_cls, s.local_cls, cls_probs, b, g)
            total = total + cfg.alpha * losses["dino"]
        # 6. MIM on patch tokens
        if cfg.beta > 0 and patch_probs is not None:
            losses["ibot"], token_metrics = self._ibot(student, s, patch_probs, masks, slots)
            total = total + cfg.beta * losses["ibot"]
        if cfg.koleo_weight > 0:
            losses["koleo"] = koleo_loss(s.contrastive.cls_alt.float())
            total = total + cfg.koleo_weight * losses["koleo"]
        metrics = {**self._metrics(s, masks), **target_metrics}
        if cfg.beta > 0 and patch_probs is not None:
            metrics.update(token_metrics)
        return ObjectiveOutput(loss=total, losses=losses, metrics=metrics)

    def _ibot(
        self,
        student: TipsStudent,
        s: StudentOutput,
        patch_probs: torch.Tensor,
        masks: torch.Tensor | None,
        slots: MaskSlots | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The iBOT / iBOT++ loss on the student's patch tokens, and its token diagnostics."""
        cfg = self.cfg
        if cfg.mim_tokens == "all":
            s_patch = student.patch_head()(s.glob.patch_tokens)  # [B*G,N,K]
            loss = self.ibot_loss.forward_all(
                s_patch,
                patch_probs,
                masks,
                masked_weight=cfg.mim_masked_weight,
                visible_weight=cfg.mim_visible_weight,
            )
        elif self._fixed_shape_ibot(masks):  # the same loss as below, on every token
            s_patch = student.patch_head()(s.glob.patch_tokens)  # [B*G,N,K]
            loss = self.ibot_loss.forward_all(
                s_patch, patch_probs, masks, masked_weight=1.0, visible_weight=0.0
            )
        elif slots is not None:  # forward_masked's sum, on the slots
            rows = s.glob.patch_tokens.flatten(0, 1).index_select(0, slots.index)
            s_patch = student.patch_head()(rows)  # [B*G*S,K]
            ce = soft_cross_entropy(s_patch, patch_probs, cfg.student_temp)
            loss = (ce * slots.weight).sum() / masks.shape[0]
        else:
            s_patch = student.patch_head()(s.glob.patch_tokens[masks])  # [n_masked,K]
            loss = self.ibot_loss.forward_masked(s_patch, patch_probs, masks)
        # The loss is a mean over images, counting images without masked tokens as 0
        # (DINOv2); the mean over the distilled tokens is what compares with log K.
        with torch.no_grad():
            ce = soft_cross_entropy(s_patch.detach(), patch_probs, cfg.student_temp)
            if self._fixed_shape_ibot(masks) or slots is not None:
                m = (masks if slots is None else slots.valid).reshape(ce.shape).to(ce.dtype)
                token_loss = (ce * m).sum() / m.sum().clamp(min=1)
            else:
                token_loss = ce.mean() if ce.numel() else ce.sum()
            token_metrics = {"ibot/token_loss": token_loss}
            if slots is not None:  # masked tokens beyond the capacity (0 when exact)
                token_metrics["ibot/dropped_tokens"] = masks.sum().float() - slots.valid.sum()
        return loss, token_metrics

    def _dino(
        self,
        student: TipsStudent,
        glob_cls: torch.Tensor,
        local_cls: torch.Tensor | None,
        cls_probs: torch.Tensor,
        b: int,
        g: int,
    ) -> torch.Tensor:
        head = student.dino_head
        t_probs = cls_probs.unflatten(0, (b, g))  # [B,G,K]
        glob_logits = head(glob_cls).unflatten(0, (b, g))  # [B,G,K]
        local_logits = None
        if local_cls is not None:
            local_logits = head(local_cls).unflatten(0, (b, -1)).transpose(0, 1)  # [M,B,K]
        terms, weights = [], []
        for t in range(g):
            students = [glob_logits[:, j] for j in range(g) if j != t]
            stacked = torch.stack(students) if students else None  # [G-1,B,K]
            if local_logits is not None:
                stacked = local_logits if stacked is None else torch.cat([stacked, local_logits])
            if stacked is None:
                continue
            terms.append(self.dino_loss(stacked, t_probs[:, t]))
            weights.append(stacked.shape[0])
        if not terms:
            return glob_cls.sum() * 0.0
        # mean over all (student, teacher) pairs; Python weights: no host-to-device copy
        return torch.stack([t * n for t, n in zip(terms, weights)]).sum() / sum(weights)

    @torch.no_grad()
    def _metrics(self, s: StudentOutput, masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        m: dict[str, torch.Tensor] = {"temperature": s.temperature.detach().float()}
        img = F.normalize(s.contrastive.cls_alt.float(), dim=-1)
        txt = F.normalize(s.txt_alt.float(), dim=-1)
        labels = torch.arange(img.shape[0], device=img.device)
        m["contrastive_alt_acc"] = ((img @ txt.T).argmax(-1) == labels).float().mean()
        if masks is not None:
            m["mask_ratio"] = masks.float().mean()
        return m


@OBJECTIVES.register("tipsv2")
class TipsV2Objective(TipsObjective):
    """TIPSv2: iBOT++ (all patch tokens) and head-only EMA; same code, other defaults."""

    CONFIG = TipsV2ObjectiveConfig
