"""iBOT masked-patch loss (TIPS) and iBOT++ all-patch loss (TIPSv2), with the patch centre.

Contract (student logits from the *masked* global crop, teacher from the *unmasked* one):
    forward_masked(student [B, N, K], teacher_probs [B, N, K], masks [B, N]) -> scalar
        = (1/B) sum_i (1/|M_i|) sum_{p in M_i} CE_ip     (B counts images with no mask too)
    forward_all(student [B, N, K], teacher_probs [B, N, K], masks=None, w_m=1, w_v=1) -> scalar
        = (1/B) sum_i [sum_p w_ip CE_ip / sum_p w_ip],  w_ip = w_m if masked else w_v
    softmax_center_teacher / sinkhorn_knopp_teacher -> teacher_probs;  update_center(...)
with CE_ip = -sum_k p_t log softmax(s_ip / tau_s).

Sources: docs/method.md, "iBOT masked image modelling" (L_MIM, beta = 2), docs/method.md, "Masking"
(DINOv2 weighting: each masked token of image i weighs 1/#masked_i and the sum is divided by the
number of images *including* the unmasked ones; ``dinov2/loss/ibot_patch_loss.py forward_masked`` +
``dinov2/data/collate.py masks_weight``), docs/method.md, "TIPSv2 all-token iBOT" (iBOT++: every
patch token of the masked student view, mean over tokens; separate masked/visible weights are
[open], default 1:1). With ``visible_weight=0`` iBOT++ reduces exactly to ``forward_masked``.

Centre: buffer ``center [1, 1, K]``, EMA (0.9) of the mean teacher patch logits over the
tokens that are distilled (the masked ones for iBOT, all for iBOT++), all-reduced. DINOv2
calls its update with ``[n_masked, K]`` and then takes ``.mean(1)``, which averages over the
prototypes and collapses the centre to one scalar; that is not reproduced here.

Memory: ``[B, N, K]`` teacher probabilities are large at K = 65536. ``forward_masked``,
``softmax_center_teacher``, ``sinkhorn_knopp_teacher`` and ``update_center`` also accept
already-selected masked rows ``[n_masked, K]`` (row-major order of ``masks.nonzero()``, i.e.
``x[masks]``), so an objective can run the heads on masked tokens only, as DINOv2 does.
"""

from __future__ import annotations

import torch

from tips_model.losses.targets import CenteredTeacherLoss, sinkhorn_knopp, soft_cross_entropy

__all__ = ["IBOTPatchLoss"]


def _select_masked(x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """``[B, N, K]`` -> ``[n_masked, K]`` rows ``x[masks]``; 2-D input is already selected."""
    if x.ndim == 2:
        return x
    if masks is None:
        return x.reshape(-1, x.shape[-1])  # [B * N, K]
    return x[masks.bool()]  # [n_masked, K]


class IBOTPatchLoss(CenteredTeacherLoss):
    """Patch-level self-distillation against a centred (or Sinkhorn) teacher.

    ``softmax_center_teacher`` (``CenteredTeacherLoss``) takes ``[B, N, K]`` or ``[n, K]``
    logits and returns float32 probabilities of the input's shape.

    Args:
        out_dim: Number of prototypes K of the patch head.
        center_momentum: EMA momentum of the centre (DINOv2: 0.9).
        student_temp: Student temperature tau_s (DINOv2: 0.1).
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9, student_temp: float = 0.1):
        super().__init__((1, 1, out_dim), center_momentum, student_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_patch_logits: torch.Tensor,
        teacher_temp: float,
        masks: torch.Tensor | None = None,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets over the masked tokens (masks given) or over all tokens.

        Args:
            teacher_patch_logits: ``[B, N, K]`` (or selected ``[n, K]``) teacher logits.
            teacher_temp: Teacher temperature tau_t.
            masks: ``[B, N]`` bool; only masked tokens enter the equipartition (iBOT). None:
                every token does (iBOT++).
            n_iterations: Normalisation rounds (DINOv2: 3).

        Returns:
            Float32 probabilities of the input's shape; for ``[B, N, K]`` input with masks,
            rows of unmasked tokens are zero.
        """
        if teacher_patch_logits.ndim == 2 or masks is None:
            rows = _select_masked(teacher_patch_logits, None)  # [n, K]
            return sinkhorn_knopp(rows, teacher_temp, n_iterations).reshape(
                teacher_patch_logits.shape
            )
        masks = masks.bool()
        probs = teacher_patch_logits.new_zeros(teacher_patch_logits.shape, dtype=torch.float32)
        probs[masks] = sinkhorn_knopp(teacher_patch_logits[masks], teacher_temp, n_iterations)
        return probs

    def forward_masked(
        self, student: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """iBOT loss over masked tokens, DINOv2 per-image weighting.

        Args:
            student: ``[B, N, K]`` student patch logits (or selected ``[n_masked, K]``).
            teacher_probs: ``[B, N, K]`` teacher targets (or selected ``[n_masked, K]``).
            masks: ``[B, N]`` bool, True where the student's patch was masked.

        Returns:
            Scalar float32 loss; 0 when no token is masked.
        """
        masks = masks.bool()
        num_images = masks.shape[0]
        ce = soft_cross_entropy(
            _select_masked(student, masks), _select_masked(teacher_probs, masks), self.student_temp
        )  # [n_masked]
        per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # [B]
        weights = per_image[:, None].expand_as(masks)[masks]  # [n_masked]
        return (ce * weights).sum() / num_images

    def forward_all(
        self,
        student: torch.Tensor,
        teacher_probs: torch.Tensor,
        masks: torch.Tensor | None = None,
        masked_weight: float = 1.0,
        visible_weight: float = 1.0,
    ) -> torch.Tensor:
        """iBOT++ loss over every patch token: weighted mean per image, then mean over images.

        Args:
            student: ``[B, N, K]`` student patch logits (masked view).
            teacher_probs: ``[B, N, K]`` teacher targets (unmasked view).
            masks: ``[B, N]`` bool student masks; None treats every token as visible.
            masked_weight: Relative weight of masked tokens ([open], default 1).
            visible_weight: Relative weight of visible tokens ([open], default 1).

        Returns:
            Scalar float32 loss. An image whose tokens all have weight 0 contributes 0 but still
            counts in the mean over images (as in ``forward_masked``).

        Raises:
            ValueError: On negative weights or both weights zero.
        """
        if masked_weight < 0 or visible_weight < 0 or masked_weight + visible_weight == 0:
            raise ValueError(
                "forward_all needs non-negative masked_weight/visible_weight, not both 0; got "
                f"{masked_weight} and {visible_weight}"
            )
        ce = soft_cross_entropy(student, teacher_probs, self.student_temp)  # [B, N]
        if masks is None:
            weights = torch.full_like(ce, visible_weight)
        else:
            weights = torch.where(masks.bool(), masked_weight, visible_weight).to(ce.dtype)
        total = weights.sum(dim=-1)  # [B]
        per_image = (ce * weights).sum(dim=-1) / total.clamp(min=torch.finfo(ce.dtype).tiny)
        return per_image.mean()

    @torch.no_grad()
    def update_center(
        self, teacher_patch_logits: torch.Tensor, masks: torch.Tensor | None = None
    ) -> None:
        """EMA of the all-reduced mean teacher patch logits over masked (or all) tokens.

        Args:
            teacher_patch_logits: ``[B, N, K]`` (or selected ``[n, K]``) teacher logits.
            masks: ``[B, N]`` bool to average over masked tokens only; None: all tokens. The
                centre is left unchanged when no rank has a token to average.
        """
        self._update_center_from_rows(_select_masked(teacher_patch_logits, masks))

    @torch.no_grad()
    def update_center_fixed_shape(
        self, teacher_patch_logits: torch.Tensor, masks: torch.Tensor
    ) -> None:
        """``update_center(logits, masks)`` with shapes that do not depend on the masks: the
        masked rows weigh 1, the others 0 (for XLA, where ``x[masks]`` recompiles whenever
        the number of masked tokens changes).

        Args:
            teacher_patch_logits: ``[B, N, K]`` teacher logits of every token.
            masks: ``[B, N]`` bool.
        """
        k = teacher_patch_logits.shape[-1]
        self._update_center_from_rows(
            teacher_patch_logits.reshape(-1, k), masks.reshape(-1).to(teacher_patch_logits.dtype)
        )
