"""EMA teacher: construction and the in-place momentum update.

Contract:
    make_teacher(student, shared=()) -> teacher      deep copy, frozen, eval mode
    ema_update_(teacher, student, momentum)          theta_t <- m theta_t + (1 - m) theta_s

TIPS v1: full EMA teacher, backbone + heads, "DINO-style"
(docs/method.md, "Teacher EMA and schedules"):
    teacher = make_teacher(student);  ema_update_(teacher, student, m)
TIPSv2 head-only EMA (docs/method.md, "Teacher EMA and schedules";
docs/method.md, "TIPSv2 changes", item 3): the teacher re-uses the student backbone (run under
no_grad) and only the heads keep an EMA copy. Two equivalent ways:
    teacher_heads = make_teacher(student.heads);  ema_update_(teacher_heads, student.heads, m)
or, so that the generic training loop's ``ema_update_(objective.teacher, objective.student,
m)`` works unchanged, a teacher with the student's parameter names whose backbone *is* the
student's:
    teacher = make_teacher(student, shared=("backbone",))
``ema_update_`` skips every parameter/buffer that is the very same tensor in both modules,
so the shared backbone is never touched (m*x + (1-m)*x is not exactly x in floating point).
Shared submodules keep the student's ``requires_grad`` and train/eval mode: do not call
``teacher.eval()`` / ``teacher.requires_grad_(False)`` on such a teacher, that would reach the
student backbone; the objective runs the shared backbone under ``torch.no_grad()``.

Momentum schedule: ``tips_model.schedules.ema_momentum_schedule`` (DINOv2 cosine 0.992 -> 1.0;
see the SILC caution there). Source of the update rule: ``dinov2/train/train.py`` /
``ssl_meta_arch.update_teacher`` (fused ``_foreach_mul_`` / ``_foreach_add_``).

Wrappers: DDP / FSDP1 (``.module``) and ``torch.compile`` (``._orig_mod``) are unwrapped on
both sides, and wrapper components (``module``, ``_orig_mod``, ``_fsdp_wrapped_module``,
``_checkpoint_wrapped_module``) are dropped from parameter names wherever they occur, so a
teacher made from the bare student matches a wrapped student (or a wrapped submodule).

Sharded parameters (FSDP2 ``fully_shard``: DTensors): the teacher must be sharded like the
student (same mesh, same placements, hence the same elements on every rank); the update then
runs on the local shards, elementwise, with no communication. A DTensor paired with a plain
tensor, or two DTensors sharded differently, is refused: updating one rank's shard from another
layout would mix unrelated elements.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["make_teacher", "ema_update_", "ema_pairs", "ema_apply_", "check_momentum", "unwrap"]

# Path components inserted by wrappers: DDP/FSDP1 ``module``, torch.compile ``_orig_mod``,
# FSDP1 / activation checkpointing inner modules.
_WRAPPER_PARTS = frozenset(
    {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
)


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / FSDP1 (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    A module counts as a wrapper only when that inner module is its single child and it holds
    no parameters or buffers of its own, so a model that merely has a child called ``module``
    next to others is left whole.
    """
    while True:
        inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "module", None)
        children = list(module.children())
        is_wrapper = (
            isinstance(inner, nn.Module)
            and len(children) == 1
            and children[0] is inner
            and not module._parameters
            and not module._buffers
        )
        if not is_wrapper:
            return module
        module = inner


def _clean_name(name: str) -> str:
    """Drop wrapper components anywhere in a dotted name (``_orig_mod.module.x`` -> ``x``).

    Anywhere, not only as a prefix, so that a wrapped submodule inside an unwrapped parent
    (``backbone.module.x``) also matches; both sides are cleaned the same way.
    """
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def _named(tensors: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        clean = _clean_name(name)
        if clean in named:
            raise ValueError(f"ema_update_: {name!r} collides with another tensor as {clean!r}")
        named[clean] = tensor
    return named


def make_teacher(student: nn.Module, shared: Iterable[str] = ()) -> nn.Module:
    """Deep-copy a student into a frozen, eval-mode EMA teacher.

    Args:
        student: The module to copy (wrappers are stripped first).
        shared: Dotted names of submodules that the teacher shares *by reference* with the
            student instead of copying (TIPSv2 head-only EMA: ``("backbone",)``). They are
            left exactly as they are (grad flag, train mode).

    Returns:
        The teacher: parameters outside ``shared`` have ``requires_grad=False`` and their
        modules are in eval mode.

    Raises:
        ValueError: If a name in ``shared`` is not a submodule of ``student``.
    """
    student = unwrap(student)
    shared_modules = []
    for name in shared:
        try:
            shared_modules.append(student.get_submodule(name))
        except AttributeError as err:
            raise ValueError(f"make_teacher: shared={name!r} is not a submodule") from err
    # deepcopy maps every object found in memo to itself: pre-seeding it with the shared
    # modules and their tensors makes the copy reference them instead of duplicating them.
    memo: dict[int, object] = {}
    shared_ids: set[int] = set()
    for module in shared_modules:
        for obj in [*module.modules(), *module.parameters(), *module.buffers()]:
            memo[id(obj)] = obj
            shared_ids.add(id(obj))
    teacher = copy.deepcopy(student, memo)
    for param in teacher.parameters():
        if id(param) not in shared_ids:
            param.requires_grad_(False)
    for module in teacher.modules():
        if id(module) not in shared_ids:
            module.training = False
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``theta_t <- m theta_t + (1 - m) theta_s`` for parameters; buffers copied.

    Parameters are matched by name (wrapper prefixes stripped). Tensors that are the same
    object on both sides (a shared backbone) are skipped.

    Args:
        teacher: The EMA module (updated in place).
        student: The trained module, possibly DDP-wrapped or compiled.
        momentum: m in [0, 1]; 1 keeps the teacher, 0 copies the student.

    Raises:
        ValueError: If momentum is outside [0, 1], or the parameter/buffer names or shapes of
            teacher and student differ.
    """
    check_momentum(momentum)
    ema_apply_(*ema_pairs(teacher, student), momentum)


def check_momentum(momentum: float) -> None:
    """Raise ValueError unless ``0 <= momentum <= 1``."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update_ momentum must be in [0, 1], got {momentum}")


EmaPairs = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def ema_pairs(teacher: nn.Module, student: nn.Module) -> EmaPairs:
    """``(teacher params, student params, teacher buffers, student buffers)`` matched by name
    (``ema_update_``'s pairing and checks), for ``ema_apply_``."""
    teacher, student = unwrap(teacher), unwrap(student)
    t_params, s_params = _matched(
        _named(teacher.named_parameters()), _named(student.named_parameters()), "parameter"
    )
    t_buffers, s_buffers = _matched(
        _named(teacher.named_buffers()), _named(student.named_buffers()), "buffer"
    )
    return t_params, s_params, t_buffers, s_buffers


@torch.no_grad()
def ema_apply_(
    t_params: list[torch.Tensor],
    s_params: list[torch.Tensor],
    t_buffers: list[torch.Tensor],
    s_buffers: list[torch.Tensor],
    momentum: float | torch.Tensor,
) -> None:
    """The update on matched lists: fused ``_foreach`` ops, no Python branch on values, so
    ``torch.compile`` makes it one graph (``Objective.compile_step``). Compiled, pass the
    momentum as a 0-d tensor: a float is a constant of the graph, and each new value of the
    schedule would compile another one."""
    if t_params and isinstance(momentum, torch.Tensor):
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, torch._foreach_mul(s_params, 1.0 - momentum))
    elif t_params:  # eager: no temporary copy of the student
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
    if t_buffers:
        torch._foreach_copy_(t_buffers, s_buffers)


def _matched(
    teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], kind: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pair tensors by name, dropping pairs that are one and the same tensor."""
    if teacher.keys() != student.keys():
        missing = sorted(student.keys() - teacher.keys())[:5]
        unexpected = sorted(teacher.keys() - student.keys())[:5]
        raise ValueError(
            f"ema_update_: teacher and student {kind} names differ; missing in teacher: "
            f"{missing}, only in teacher: {unexpected}"
        )
    t_list, s_list = [], []
    for name, t in teacher.items():
        s = student[name]
        if t is s:
            continue
        if t.shape != s.shape:
            raise ValueError(
                f"ema_update_: {kind} {name!r} has shape {tuple(t.shape)} in the teacher and "
                f"{tuple(s.shape)} in the student"
            )
        t, s = _local_pair(name, t, s.detach(), kind)
        t_list.append(t)
        s_list.append(s)
    return t_list, s_list


def _local_pair(
    name: str, t: torch.Tensor, s: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The local shards of a DTensor pair (views: in-place updates reach the DTensor)."""
    t_sharded, s_sharded = _is_dtensor(t), _is_dtensor(s)
    if not t_sharded and not s_sharded:
        return t, s
    if not (t_sharded and s_sharded) or (t.placements, t.device_mesh) != (
        s.placements,
        s.device_mesh,
    ):
        raise ValueError(
            f"ema_update_: {kind} {name!r} is sharded differently in teacher and student; "
            "shard the teacher with the student's mesh and units"
        )
    return t.to_local(), s.to_local()


def _is_dtensor(x: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)
