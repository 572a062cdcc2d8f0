"""Hyper-parameter schedules as numpy arrays indexed by optimisation step.

Contract: every builder returns a float64 array of length ``total_steps``; the loop reads
``at(schedule, step)``, which clamps past the end. Arrays (not closures) are what dinov2
(``dinov2/utils/utils.py CosineScheduler``) and big_vision use: they are logged, plotted and
checkpoint-free (rebuilt from the config at every (re)start, like ``derive``:
docs/design.md, "Config").

Conventions (shared by all builders, W = warmup_steps, T = total_steps):
    steps 0 .. W-1   linear warm-up ``warmup_start + (base - warmup_start) * step / W``
    step  W          ``base`` exactly
    steps W .. T-1   decay from ``base`` to ``final``; step T-1 equals ``final`` exactly.
DINOv2 differs by a step at both ends (its warm-up ``linspace`` ends on ``base`` one step
early and its cosine stops one step short of ``final``), which matters for EMA momentum: here
the last step uses exactly m = 1.0.

Recipes (docs/method.md, "Teacher EMA and schedules"; docs/method.md, "Optimizer and schedule"):
    lr, TIPS paper     linear_schedule(5e-4, 0.0, T, warmup_steps=1.4 epochs)  (Adafactor)
    lr, DINOv2         cosine_schedule(lr, 1e-6, T, warmup_steps)
    weight decay       cosine_schedule(0.04, 0.4, T)  (DINOv2)
    teacher temp       teacher_temp_schedule(warmup_start=0.04, final=0.07, ...)  (DINOv2)
    EMA momentum       ema_momentum_schedule(T)  (DINOv2 cosine 0.992 -> 1.0; 0.994 for L/g)

SILC caution (docs/method.md, "Teacher EMA and schedules"): when contrastive learning is
combined with self-distillation, SILC keeps the EMA momentum *fixed* instead of annealing it to
1.0, so the teacher keeps following the text-driven improvements of the student. For a TIPS v1
full-EMA teacher consider ``constant_schedule(0.996, T)``-style momentum; the TIPS value is
[open].
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "cosine_schedule",
    "linear_schedule",
    "constant_schedule",
    "teacher_temp_schedule",
    "ema_momentum_schedule",
    "build_schedule",
    "at",
    "SCHEDULE_KINDS",
]

SCHEDULE_KINDS = ("cosine", "linear", "constant")


def _warmup(total_steps: int, warmup_steps: int, warmup_start: float, base: float) -> np.ndarray:
    """Validate the step counts and return the W warm-up values (step W would be ``base``)."""
    if total_steps < 1:
        raise ValueError(f"schedule total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"schedule warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    return warmup_start + (base - warmup_start) * np.arange(warmup_steps) / max(warmup_steps, 1)


def _progress(num_steps: int) -> np.ndarray:
    """``num_steps`` points from 0 to 1 inclusive (a single point is 0)."""
    return np.arange(num_steps) / max(num_steps - 1, 1)


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warm-up, then half-cosine from ``base`` to ``final``.

    Args:
        base: Value at the end of warm-up (step ``warmup_steps``).
        final: Value at the last step.
        total_steps: Length T of the schedule.
        warmup_steps: Length W of the linear warm-up.
        warmup_start: Value at step 0 when W > 0.

    Returns:
        ``[T]`` float64 array.

    Raises:
        ValueError: If T < 1 or W is not in [0, T].
    """
    warm = _warmup(total_steps, warmup_steps, warmup_start, base)
    t = _progress(total_steps - warmup_steps)
    decay = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * t))
    return np.concatenate([warm, decay]).astype(np.float64)


def linear_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warm-up, then linear from ``base`` to ``final`` (TIPS lr: final = 0, §7).

    Args and Returns as :func:`cosine_schedule`.
    """
    warm = _warmup(total_steps, warmup_steps, warmup_start, base)
    t = _progress(total_steps - warmup_steps)
    decay = base + (final - base) * t
    return np.concatenate([warm, decay]).astype(np.float64)


def constant_schedule(
    value: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up to ``value``, then constant.

    Args and Returns as :func:`cosine_schedule` with ``base = final = value``.
    """
    warm = _warmup(total_steps, warmup_steps, warmup_start, value)
    flat = np.full(total_steps - warmup_steps, value, dtype=np.float64)
    return np.concatenate([warm, flat]).astype(np.float64)


def teacher_temp_schedule(
    *,
    warmup_start: float = 0.04,
    final: float = 0.07,
    warmup_steps: int,
    total_steps: int,
) -> np.ndarray:
    """DINO teacher temperature: linear warm-up ``warmup_start -> final``, then constant.

    DINOv2 warms 0.04 -> 0.07 over 30 epochs (docs/method.md, "Teacher EMA and schedules"); the
    TIPS values are [open].
    Keyword-only so the (start, final, warm-up, total) order of the docs cannot be confused.

    Returns:
        ``[total_steps]`` float64 array.
    """
    return constant_schedule(final, total_steps, warmup_steps, warmup_start)


def ema_momentum_schedule(total_steps: int, base: float = 0.992, final: float = 1.0) -> np.ndarray:
    """EMA teacher momentum, DINOv2 default: cosine from 0.992 to 1.0, no warm-up.

    See the module docstring for the SILC caution (fixed momentum with contrastive losses).

    Returns:
        ``[total_steps]`` float64 array.
    """
    return cosine_schedule(base, final, total_steps)


def build_schedule(
    kind: str,
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Dispatch on ``kind`` in ``("cosine", "linear", "constant")``.

    ``"constant"`` holds ``base`` after the warm-up and ignores ``final``.

    Raises:
        ValueError: For an unknown kind (named in the message) or bad step counts.
    """
    if kind == "cosine":
        return cosine_schedule(base, final, total_steps, warmup_steps, warmup_start)
    if kind == "linear":
        return linear_schedule(base, final, total_steps, warmup_steps, warmup_start)
    if kind == "constant":
        return constant_schedule(base, total_steps, warmup_steps, warmup_start)
    raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")


def at(schedule: np.ndarray, step: int) -> float:
    """The value for ``step``; steps past the end return the last value.

    Raises:
        ValueError: For an empty schedule or a negative step.
    """
    if len(schedule) == 0:
        raise ValueError("at(): empty schedule")
    if step < 0:
        raise ValueError(f"at(): step must be >= 0, got {step}")
    return float(schedule[min(step, len(schedule) - 1)])
