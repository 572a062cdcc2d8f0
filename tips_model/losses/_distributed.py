"""torch.distributed plumbing for the losses (no launcher, no Ray).

Every helper degrades to the single-process identity when torch.distributed is unavailable,
not initialised, or has world size 1, so the losses run unchanged on a laptop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``"sum"`` or ``"max"``) without autograd; identity off-cluster.

    Args:
        tensor: Any tensor; it is modified in place.
        op: ``"sum"`` or ``"max"``.

    Returns:
        The same tensor object, reduced across ranks.
    """
    if is_distributed():
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(tensor, op=reduce_op)
    return tensor
