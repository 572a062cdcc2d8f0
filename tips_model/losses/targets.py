"""Teacher targets for self-distillation and the soft cross-entropy against them.

Contract (pure functions of tensors; the centre state lives in ``CenteredTeacherLoss``, the base
of ``DINOLoss`` / ``IBOTPatchLoss``):
    softmax_center(logits [..., K], center [K], temp) -> probs [..., K]      (rows sum to 1)
    sinkhorn_knopp(logits [n, K], temp, n_iterations) -> probs [n, K]       (rows sum to 1,
        columns sum to ~n_total/K, n_total = number of rows over all ranks)
    soft_cross_entropy(student [..., K], teacher_probs [..., K], temp) -> [...]
    distributed_mean(x [n, K]) -> [K] | None                                (all-reduced)
    ema_(center, value, momentum)                                           (in place)

Sources: docs/method.md, "DINO CLS distillation" (softmax centering, Eq. quoted from the TIPS
paper), docs/method.md, "Teacher EMA and schedules" (centre momentum 0.9, Sinkhorn-Knopp with 3
iterations in the DINOv2 L/g configs); the algorithm follows ``dinov2/loss/dino_clstoken_loss.py``
and ``dinov2/loss/ibot_patch_loss.py`` (SwAV-style, rows = samples, columns = prototypes).

Numerics: everything is computed in float32 whatever the input dtype (bf16 autocast safe).
Sinkhorn runs in the log domain (each normalisation is a log-sum-exp subtraction): the same
iterates as DINOv2 in exact arithmetic, without the float32 overflow / underflow of its plain
``exp(logits / 0.04)`` once logit gaps exceed ~3.5.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tips_model.losses._distributed import all_reduce_

__all__ = [
    "softmax_center",
    "sinkhorn_knopp",
    "soft_cross_entropy",
    "distributed_mean",
    "ema_",
    "CenteredTeacherLoss",
    "target_stats",
]


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Per-row cross-entropy ``-sum_k p_t[k] * log softmax(s / temp)[k]`` in float32.

    Args:
        student_logits: ``[..., K]`` student head logits (any float dtype).
        teacher_probs: ``[..., K]`` teacher distribution, broadcastable to the student.
        student_temp: Student temperature tau_s (DINOv2: 0.1).

    Returns:
        ``[...]`` float32 cross-entropies (the broadcast leading shape).
    """
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


@torch.no_grad()
def softmax_center(
    teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float
) -> torch.Tensor:
    """DINO softmax centering and sharpening: ``softmax((t - c) / tau_t)``.

    Args:
        teacher_logits: ``[..., K]`` teacher head logits.
        center: Centre broadcastable to ``[K]`` (any of ``[K]``, ``[1, K]``, ``[1, 1, K]``).
        teacher_temp: Teacher temperature tau_t.

    Returns:
        ``[..., K]`` float32 probabilities, no grad.
    """
    center = center.reshape(-1).float()
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
) -> torch.Tensor:
    """Sinkhorn-Knopp equipartition of teacher logits over prototypes (SwAV / DINOv2).

    Alternately rescales prototype (column) totals to 1/K and sample (row) totals to
    1/n_total, ``n_iterations`` times, then multiplies by n_total. The last step is the row
    normalisation, so each row is exactly a distribution; the prototype marginals are
    ~n_total/K (exact only at convergence). Under torch.distributed the prototype totals and
    n_total are all-reduced, so the equipartition is over the global batch and every rank
    must call this function (with zero rows if it has nothing to assign).

    Args:
        teacher_logits: ``[n, K]`` logits of the samples (or masked patch tokens) on this rank.
        teacher_temp: Teacher temperature tau_t.
        n_iterations: Number of (column, row) normalisation rounds (DINOv2: 3).

    Returns:
        ``[n, K]`` float32 assignment probabilities, no grad.

    Raises:
        ValueError: If the input is not 2-D or ``n_iterations < 1``.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects [n, K] logits, got {tuple(teacher_logits.shape)}")
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp n_iterations must be >= 1, got {n_iterations}")
    log_q = teacher_logits.float() / teacher_temp  # [n, K]
    n_local, num_prototypes = log_q.shape
    # torch.full: a fill on the device, not a copy from the host that waits for it
    log_n_total = all_reduce_(torch.full((), float(n_local), device=log_q.device)).log()
    log_k = math.log(num_prototypes)
    # DINOv2's first step (divide by the global sum) cancels in the prototype step and is
    # skipped; every division becomes a log-sum-exp subtraction.
    for _ in range(n_iterations):
        # 1. every prototype gets total mass 1/K over the global batch
        log_q = log_q - _logsumexp_over_ranks(log_q) - log_k  # [n, K] - [1, K]
        # 2. every sample gets total mass 1/n_total
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_n_total
    return torch.exp(log_q + log_n_total)


def _logsumexp_over_ranks(log_q: torch.Tensor) -> torch.Tensor:
    """``log sum_{rows on all ranks} exp(log_q)`` per column: ``[n, K] -> [1, K]``."""
    if log_q.shape[0] > 0:
        col_max = log_q.amax(dim=0, keepdim=True)  # [1, K]
    else:
        col_max = log_q.new_full((1, log_q.shape[1]), float("-inf"))
    all_reduce_(col_max, op="max")
    col_sum = all_reduce_(torch.exp(log_q - col_max).sum(dim=0, keepdim=True))  # [1, K]
    return col_max + col_sum.log()


@torch.no_grad()
def distributed_mean(x: torch.Tensor) -> torch.Tensor | None:
    """Mean over the rows of ``x`` on all ranks (one all-reduce of sum and count).

    Args:
        x: ``[n, K]`` rows on this rank (n may differ across ranks, or be 0).

    Returns:
        ``[K]`` float32 global mean, or None when no rank has any row.
    """
    total, count = _distributed_sum_count(x)
    if count.item() == 0:
        return None
    return total / count


def _distributed_sum_count(
    x: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([K] sum of the rows, 0-d row count)`` over all ranks, one all-reduce, on device.
    With ``weights`` ``[n]`` (0/1: the rows that count), the weighted sum and their total: a
    selection of rows with a fixed shape (XLA compiles one graph whatever the selection)."""
    x = x.float()
    if weights is None:
        packed = torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])])  # [K + 1]
    else:
        w = weights.float()
        packed = torch.cat([(x * w[:, None]).sum(dim=0), w.sum().reshape(1)])
    all_reduce_(packed)
    return packed[:-1], packed[-1]


@torch.no_grad()
def ema_(center: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """In-place ``center <- momentum * center + (1 - momentum) * value``.

    Args:
        center: State tensor (a module buffer), updated in place.
        value: New value broadcastable to ``center``.
        momentum: Centre momentum in [0, 1] (DINOv2: 0.9).
    """
    center.mul_(momentum).add_(value.to(center.dtype).reshape(center.shape), alpha=1 - momentum)


class CenteredTeacherLoss(nn.Module):
    """The teacher side ``DINOLoss`` and ``IBOTPatchLoss`` share: the centre and its targets.

    Holds the ``center`` buffer (zeros of ``center_shape``, ``[1, K]`` or ``[1, 1, K]``), the
    student temperature, centred-softmax targets and the EMA update of the centre from
    the all-reduced mean of the teacher rows that are distilled.

    Args:
        center_shape: Shape of the centre buffer (last dimension K).
        center_momentum: EMA momentum of the centre (DINOv2: 0.9).
        student_temp: Student temperature tau_s (DINOv2: 0.1).
    """

    center: torch.Tensor

    def __init__(
        self, center_shape: tuple[int, ...], center_momentum: float, student_temp: float
    ) -> None:
        super().__init__()
        self.center_momentum = center_momentum
        self.student_temp = student_temp
        self.register_buffer("center", torch.zeros(center_shape))
        self._home = [self.center]  # the buffer object, while compiled steps rebind it

    @torch.no_grad()
    def softmax_center_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """``softmax((t - center) / tau_t)`` (float32, the input's shape)."""
        return softmax_center(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def _update_center_from_rows(
        self, rows: torch.Tensor, weights: torch.Tensor | None = None
    ) -> None:
        """``c <- m c + (1 - m) mean(rows over all ranks)``; unchanged when no rank has a row.

        Args:
            rows: ``[n, K]`` teacher logits of this rank (every rank calls).
            weights: ``[n]`` 0/1, the rows that count (fixed-shape selection); None: all.
        """
        # distributed_mean + ema_ without reading the count on the host (a lazy device such
        # as XLA would cut the step's graph there): the same arithmetic, selected on device
        total, count = _distributed_sum_count(rows, weights)
        m = self.center_momentum
        mean = (total / count.clamp(min=1)).reshape(self.center.shape)
        updated = torch.add(self.center * m, mean.to(self.center.dtype), alpha=1 - m)
        new = torch.where(count > 0, updated, self.center)
        if torch.compiler.is_compiling():
            # Rebound, not copy_: inductor's backward may recompute the targets from the
            # centre it saved, and an in-place update would hand it the new one (wrong
            # gradients: tests/tips_model/test_compile.py). settle_center, after backward,
            # puts the value back into the buffer object that checkpoints and guards hold.
            self.center = new
        else:
            self.center.copy_(new)

    def _apply(self, fn: Any, recurse: bool = True) -> CenteredTeacherLoss:
        out = super()._apply(fn, recurse)
        self._home = [self.center]  # .to() / .cuda() replaced the buffer object
        return out

    @torch.no_grad()
    def settle_center(self) -> None:
        """After backward: the centre's value back in the registered buffer object."""
        home = self._home[0]
        if self.center is not home:
            home.copy_(self.center)
            self.center = home


@torch.no_grad()
def target_stats(
    teacher_probs: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Collapse diagnostics of one batch of teacher targets (this rank's rows; no host read).

    Args:
        teacher_probs: ``[n, K]`` centred teacher distributions (rows sum to 1).
        teacher_logits: ``[n, K]`` the teacher head's raw logits they came from.
        teacher_temp: the temperature the targets were made with.
        weights: ``[n]`` 0/1, the rows that count (a fixed-shape selection, e.g. the masked
            tokens of ``[B, N]``, flattened); None: every row.

    Returns:
        ``entropy``: mean per-row entropy (nats); ``log K`` = uniform targets (collapse),
        near 0 = one-hot targets.
        ``mean_entropy``: entropy of the batch-mean target; near 0 = every row picks the
        same prototype (collapse), high with a low ``entropy`` = sharp and diverse (healthy).
        ``logit_spread``: std across rows of the logits, averaged over prototypes, in units
        of the teacher temperature; << 1 = the teacher barely tells images apart, so
        centring flattens the targets (the small-scale collapse, docs/method.md).
    """
    p = teacher_probs.float().flatten(0, -2)
    logp = p.clamp_min(1e-12).log()
    if weights is not None:
        return _weighted_target_stats(p, logp, teacher_logits, teacher_temp, weights)
    mean = p.mean(dim=0)
    spread = teacher_logits.float().flatten(0, -2).std(dim=0, correction=0).mean()
    return {
        "entropy": -(p * logp).sum(-1).mean(),
        "mean_entropy": -(mean * mean.clamp_min(1e-12).log()).sum(),
        "logit_spread": spread / teacher_temp,
    }


def _weighted_target_stats(
    p: torch.Tensor,
    logp: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    weights: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``target_stats`` over the rows with weight 1 only, with fixed shapes."""
    w = weights.float().flatten()
    n = w.sum().clamp(min=1)
    mean = (p * w[:, None]).sum(dim=0) / n
    x = teacher_logits.float().flatten(0, -2)
    mu = (x * w[:, None]).sum(dim=0) / n
    var = (((x - mu) ** 2) * w[:, None]).sum(dim=0) / n
    return {
        "entropy": (-(p * logp).sum(-1) * w).sum() / n,
        "mean_entropy": -(mean * mean.clamp_min(1e-12).log()).sum(),
        "logit_spread": var.sqrt().mean() / teacher_temp,
    }
