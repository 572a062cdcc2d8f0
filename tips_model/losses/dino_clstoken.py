"""DINO self-distillation loss on CLS tokens, with its centre.

Contract:
    DINOLoss(K).softmax_center_teacher(teacher_logits [B, K], tau_t) -> probs [B, K]
    DINOLoss(K).sinkhorn_knopp_teacher(teacher_logits [B, K], tau_t) -> probs [B, K]
    DINOLoss(K)(student_logits [S, B, K], teacher_probs [B, K]) -> scalar
    DINOLoss(K).update_center(teacher_logits [B, K])      (explicit; call once per step)

TIPS (docs/method.md, "DINO CLS distillation"):
L_distill = -sum_m softmax((p_t - c)/tau_t) . log softmax(p_m/tau_s)
with one global crop, so only the M local crops are students (S = M) and there is no
global<->global term. The value returned is the mean over the S crops and the B samples, the
same normaliser DINOv2 uses per (student, teacher) pair
(docs/method.md, "DINO head and loss bookkeeping"); whether TIPS sums over m instead is [open],
so an objective wanting the sum multiplies by S.

Centre (docs/method.md, "Teacher EMA and schedules"; ``dinov2/loss/dino_clstoken_loss.py``):
buffer ``center [1, K]``, an EMA (momentum 0.9) of the batch-mean teacher logits, all-reduced
across ranks. DINOv2 defers the update to the next ``softmax_center_teacher`` call (async
all-reduce); here ``update_center`` applies it immediately, so the call order at the call site
is the order of effects (compute targets first, then update the centre, as DINOv2 effectively
does).
"""

from __future__ import annotations

import torch

from tips_model.losses.targets import CenteredTeacherLoss, sinkhorn_knopp, soft_cross_entropy

__all__ = ["DINOLoss"]


class DINOLoss(CenteredTeacherLoss):
    """Cross-entropy of student crops against a centred, sharpened teacher distribution.

    ``softmax_center_teacher(teacher_logits [B, K], tau_t)`` (``CenteredTeacherLoss``) gives
    ``softmax((t - center) / tau_t)``; tau_t follows DINOv2's schedule 0.04 -> 0.07.

    Args:
        out_dim: Number of prototypes K.
        center_momentum: EMA momentum of the centre (DINOv2: 0.9).
        student_temp: Student temperature tau_s (DINOv2: 0.1).
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9, student_temp: float = 0.1):
        super().__init__((1, out_dim), center_momentum, student_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Teacher targets by Sinkhorn-Knopp over the global batch (centre unused).

        Args:
            teacher_logits: ``[B, K]`` teacher head logits.
            teacher_temp: Teacher temperature tau_t.
            n_iterations: Normalisation rounds (DINOv2: 3).

        Returns:
            ``[B, K]`` float32 probabilities; rows sum to 1, columns to ~B_total/K.
        """
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Mean over crops and samples of ``-sum_k p_t log softmax(s / tau_s)``.

        Args:
            student_logits: ``[S, B, K]`` student logits of S crops (``[B, K]`` means S = 1).
            teacher_probs: ``[B, K]`` teacher targets, shared by every student crop.

        Returns:
            Scalar float32 loss.
        """
        if student_logits.ndim == 2:
            student_logits = student_logits.unsqueeze(0)  # [1, B, K]
        if student_logits.ndim != 3 or student_logits.shape[1:] != teacher_probs.shape:
            raise ValueError(
                "DINOLoss expects student [S, B, K] and teacher [B, K], got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
            )
        return soft_cross_entropy(student_logits, teacher_probs, self.student_temp).mean()

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the (all-reduced) batch mean: ``c <- m c + (1 - m) mean_b t_b``.

        Args:
            teacher_logits: ``[B, K]`` teacher head logits of this step (all ranks call).
        """
        self._update_center_from_rows(teacher_logits.reshape(-1, teacher_logits.shape[-1]))
