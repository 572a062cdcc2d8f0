"""Losses for TIPS / TIPSv2 and the alternative objectives: one file per loss (dinov2-style).

Pure functions of tensors, plus thin ``nn.Module`` s where a centre is held:
    contrastive_loss   symmetric image-text InfoNCE, all-gathered negatives (contrastive.py)
    DINOLoss           CLS self-distillation + centre (dino_clstoken.py)
    IBOTPatchLoss      iBOT masked-patch / iBOT++ all-patch distillation + centre (ibot_patch.py)
    koleo_loss         KoLeo spreading regulariser (koleo.py)
    softmax_center, sinkhorn_knopp, soft_cross_entropy, target_stats   teacher targets (targets.py)

Every term is returned unweighted; objectives weight and name them
(docs/design.md, "Objective contract").
"""

from __future__ import annotations

from tips_model.losses.contrastive import contrastive_loss
from tips_model.losses.dino_clstoken import DINOLoss
from tips_model.losses.ibot_patch import IBOTPatchLoss
from tips_model.losses.koleo import koleo_loss
from tips_model.losses.targets import (
    sinkhorn_knopp,
    soft_cross_entropy,
    softmax_center,
    target_stats,
)

__all__ = [
    "contrastive_loss",
    "DINOLoss",
    "IBOTPatchLoss",
    "koleo_loss",
    "sinkhorn_knopp",
    "soft_cross_entropy",
    "target_stats",
    "softmax_center",
]
