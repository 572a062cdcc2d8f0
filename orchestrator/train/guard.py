"""The non-finite step guard on the device, and a counter of host reads.

    guard = StepGuard(device, skipped_before=state.nonfinite_total)
    guard.begin_step(objective)          # before the forward: it updates the loss centres
    saved = guard.before_update(total_loss, objective, optimizer, distributed)
    optimizer.step(); objective.update_teacher(momentum)
    guard.keep_if_finite(saved)          # a non-finite step's update is undone on the device
    in_a_row, total = guard.read()       # at log and checkpoint steps only: the host read

The training loop (orchestrator/train/loop.py) never reads a tensor back inside a step on any
strategy (none, DDP, FSDP, XLA): whether the loss is finite is a 0-d device tensor, agreed by
all ranks with one all-reduce (an asynchronous collective, not a host read), and the update is
applied and then selected with ``torch.where``: parameters, buffers (the loss centres, copied
before the forward that updates them) and the optimizer state on the loss's device keep their
values from before the step when the loss is not finite. The EMA teacher is covered: it is
part of the objective's parameters and buffers. Two device counters count the skipped steps
(in a row, and in all); the loop reads them at log and checkpoint steps and stops the run
there once ``train.max_nonfinite_steps`` are in a row. One step reads the flag on the host
(``count_on_host``): one whose update would create optimizer state (a fresh run's first, the
first after the last-layer freeze), since state that did not exist cannot be put back.

Optimizer state that torch keeps on the host (AdamW's and Adafactor's ``step`` counters on
CUDA or XLA; on the CPU everything is one device and is restored) still advances on a skipped
step: restoring it would need the flag on the host.

The cost: while the update runs, one more copy of the parameters (student and teacher), the
buffers and the device optimizer state, and per tensor a copy and a select (no host sync).

``count_host_reads()`` counts what makes the host wait for the device: the calls that read a
tensor's value back (``item``, ``tolist``, ``cpu``, ``bool(t)``, ``int(t)``, ``float(t)``,
``operator.index(t)``, ``complex(t)``, ``t.to(<cpu>)`` from another device) and
``torch.tensor``/``torch.as_tensor`` with a ``device=`` (Python data copied to a GPU with a
stream sync; ``torch.full`` fills on the device instead). It cannot see syncs inside an op
(boolean-mask indexing, ``nonzero``: their output size), which ``torch.cuda.
set_sync_debug_mode`` shows on a GPU. ``benchmarks/gpu_step.py`` can print it as "host
reads per step" (count in steps apart from the timed ones: the counting costs Python time
per op); tests/orchestrator/test_host_syncs.py holds it at 0 for whole training steps on
the CPU.

    with count_host_reads(ignore=host_tensors(optimizer)) as reads:
        train_step(...)
    print(reads.count, reads.sites)
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["StepGuard", "HostReads", "count_host_reads", "host_tensors"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (a view: in-place ops reach it), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


class StepGuard:
    """Skips a non-finite step on the device and counts skipped steps there (module doc)."""

    def __init__(self, device: torch.device, skipped_before: int = 0) -> None:
        self.in_a_row = torch.zeros((), dtype=torch.int32, device=device)
        self.skipped = torch.full((), skipped_before, dtype=torch.int32, device=device)
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def begin_step(self, objective: torch.nn.Module) -> None:
        """Before the step's first forward: copies of the buffers (the loss centres, which
        the forward updates)."""
        self._buffers = _copies(objective.buffers())

    def before_update(
        self,
        loss: torch.Tensor,
        objective: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        distributed: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The finite flag, agreed by all ranks, and copies of what the update may change."""
        finite = _agreed_finite(loss, distributed)
        tensors = list(objective.parameters())
        for per_param in optimizer.state.values():
            tensors += [v for v in per_param.values() if _same_device(v, finite)]
        buffers, self._buffers = self._buffers, None
        return finite, _copies(tensors) + (buffers or _copies(objective.buffers()))

    @torch.no_grad()
    def keep_if_finite(
        self, saved: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]
    ) -> None:
        """After the update: put the saved values back where the loss was not finite."""
        finite, pairs = saved
        for t, old in pairs:
            t.copy_(torch.where(finite, t, old))
        self._count(finite)

    def count_on_host(self, loss: torch.Tensor, distributed: bool = False) -> bool:
        """Whether the loss is finite on every rank, read on the host (for a step that
        creates optimizer state, which ``keep_if_finite`` could not undo); counted."""
        finite = _agreed_finite(loss, distributed)
        self._count(finite)
        buffers, self._buffers = self._buffers or [], None
        if not bool(finite):
            for t, old in buffers:
                t.copy_(old)
            return False
        return True

    def _count(self, finite: torch.Tensor) -> None:
        self.in_a_row.copy_(torch.where(finite, 0, self.in_a_row + 1))
        self.skipped.add_((~finite).int())

    def read(self) -> tuple[int, int]:
        """(non-finite steps in a row, skipped steps in all): the host read of log steps."""
        return int(self.in_a_row), int(self.skipped)


def _agreed_finite(loss: torch.Tensor, distributed: bool) -> torch.Tensor:
    """A 0-d bool on the device: the loss is finite on every rank (one all-reduce, a device
    collective: a rank with a NaN loss makes every rank skip, so replicas stay equal)."""
    bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
    if distributed:
        dist.all_reduce(bad)
    return bad.reshape(()) == 0


def _copies(tensors: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, a copy of it) for each, on local shards (an in-place update reaches them)."""
    return [(t, t.clone()) for t in (_local(t.detach()) for t in tensors)]


def _same_device(value: Any, flag: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == flag.device.type


def host_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Optimizer state that lives on the CPU by design (torch's ``step`` counters): reading
    it costs no device sync, so ``count_host_reads`` may be told to ``ignore`` it."""
    return [
        v
        for per_param in optimizer.state.values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor) and v.is_cpu and v.ndim == 0
    ]


@dataclass
class HostReads:
    """What ``count_host_reads`` saw: the number of reads and where they came from."""

    count: int = 0
    sites: Counter = field(default_factory=Counter)  # "file:line in function (method)"

    def add(self, what: str) -> None:
        """Count one read, at its caller's line (the frame under the counting wrappers)."""
        self.count += 1
        for frame in reversed(traceback.extract_stack()[:-1]):
            if frame.filename != __file__ or frame.name not in _COUNTING_FRAMES:
                self.sites[f"{frame.filename}:{frame.lineno} in {frame.name} ({what})"] += 1
                return


_COUNTING_FRAMES = ("wrapper", "__torch_function__")  # this module's, above a read
_READERS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__")
_READERS += ("__complex__",)


@contextlib.contextmanager
def count_host_reads(ignore: Iterable[torch.Tensor] = ()) -> Iterator[HostReads]:
    """Count host reads of tensors in this thread while the block runs (module doc).

    On the CPU every tensor is a host tensor, so every read above counts (``cpu()`` too,
    though a no-op there: on a GPU it is the copy that waits); ``to(cpu)`` counts only from
    another device, since host tensors are moved with it. ``numpy()`` is not patched: it only
    works on CPU tensors, and a device tensor reaches it through ``cpu()``. Tensors in
    ``ignore`` (by identity: e.g. ``host_tensors(optimizer)``) and CPU tensors computed from
    them alone (a ``TorchFunctionMode`` follows them) are not counted.
    """
    reads, thread = HostReads(), threading.get_ident()
    skip = {id(t): t for t in ignore}  # the tensors held, so that no id is reused
    depth = threading.local()
    names = (*_READERS, "to")
    own = {name: torch.Tensor.__dict__[name] for name in names if name in torch.Tensor.__dict__}
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name: str, original: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counted = threading.get_ident() == thread and id(self) not in skip
            if name == "to":
                counted = counted and _to_host(self, args, kwargs)
            if counted and not getattr(depth, "n", 0):  # a read inside a read counts once
                reads.add(name)
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth.n -= 1

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        with _HostValues(skip, thread, reads):
            yield reads
    finally:
        for name in names:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:  # inherited from torch._C.TensorBase
                delattr(torch.Tensor, name)


class _HostValues(TorchFunctionMode):
    """Extends ``ignore`` to what is computed from ignored tensors alone (e.g. a stack of the
    optimizer's CPU step counters): host values, whose reads wait for no device. Counts the
    copies from the host that wait for the device on a GPU: ``torch.tensor(data, device=)``
    (torch copies Python data to the device and synchronises the stream)."""

    def __init__(self, host: dict[int, torch.Tensor], thread: int, reads: HostReads) -> None:
        super().__init__()
        self.host, self.thread, self.reads = host, thread, reads

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if threading.get_ident() != self.thread:
            return out
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            self.reads.add(f"torch.{func.__name__}(..., device=)")
            return out
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if inputs and all(id(t) in self.host for t in inputs):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_cpu:
                    self.host[id(t)] = t
        return out


def _to_host(t: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether ``t.to(*args, **kwargs)`` copies a non-CPU tensor to the CPU."""
    if t.is_cpu:
        return False
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, torch.Tensor):
        target = target.device
    if isinstance(target, str | torch.device):
        return torch.device(target).type == "cpu"
    return False
