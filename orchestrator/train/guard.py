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
buffers and the device optimizer state (one flat buffer per element width, allocated per
step and freed after it, as the per-tensor copies were), and a constant number of ops
whatever the number of tensors: the tensors' bits are viewed as integers of their width
(made once for a set of tensors, rebuilt when the set changes: identified by the tensor
objects, so the views assume that a tensor keeps its storage, as in-place optimizers and
FSDP2's sharded parameters do); per width one ``torch._foreach_copy_`` saves them and
``t = t * f + saved * (1 - f)`` on the bits, with f the finite flag as 0 or 1, puts them
back in three foreach ops: exact, and a NaN or an infinity written by the update costs
nothing (on floats ``x * 0`` is NaN; torch has no ``_foreach_where``). A foreach op is one
multi-tensor kernel per chunk of tensors on CUDA (one op per tensor inside it on the CPU).
``benchmarks/guard_ops.py`` counts the aten ops called from Python in ``begin_step`` +
``before_update`` + ``keep_if_finite`` (a NaN step): tips_b14, 1193 tensors guarded, 5965
with a clone, select and copy per tensor, 34 now (README, "Performance");
tests/orchestrator/test_guard.py holds the count constant in the number of tensors. XLA
keeps the per-tensor copy and ``torch.where``: its step is one compiled graph either way.

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
        self._buffers: _Saved | None = None  # the step's copy of the buffers
        self._views: dict[str, _Views] = {}  # "buffers" / "update": made once per tensor set

    def begin_step(self, objective: torch.nn.Module) -> None:
        """Before the step's first forward: copies of the buffers (the loss centres, which
        the forward updates)."""
        self._buffers = self._save("buffers", objective.buffers())

    def before_update(
        self,
        loss: torch.Tensor,
        objective: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        distributed: bool = False,
    ) -> tuple[torch.Tensor, list[_Saved]]:
        """The finite flag, agreed by all ranks, and copies of what the update may change."""
        finite = _agreed_finite(loss, distributed)
        tensors = list(objective.parameters())
        for per_param in optimizer.state.values():
            tensors += [v for v in per_param.values() if _same_device(v, finite)]
        buffers, self._buffers = self._buffers, None
        if buffers is None:
            buffers = self._save("buffers", objective.buffers())
        return finite, [self._save("update", tensors), buffers]

    @torch.no_grad()
    def keep_if_finite(self, saved: tuple[torch.Tensor, list[_Saved]]) -> None:
        """After the update: put the saved values back where the loss was not finite."""
        finite, copies = saved
        for copy in copies:
            copy.restore_unless(finite)
        self._count(finite)

    def count_on_host(self, loss: torch.Tensor, distributed: bool = False) -> bool:
        """Whether the loss is finite on every rank, read on the host (for a step that
        creates optimizer state, which ``keep_if_finite`` could not undo); counted."""
        finite = _agreed_finite(loss, distributed)
        self._count(finite)
        buffers, self._buffers = self._buffers, None
        if not bool(finite):
            if buffers is not None:
                buffers.restore_unless(finite)
            return False
        return True

    def _count(self, finite: torch.Tensor) -> None:
        self.in_a_row.copy_(torch.where(finite, 0, self.in_a_row + 1))
        self.skipped.add_((~finite).int())

    @torch.no_grad()
    def _save(self, kind: str, tensors: Iterable[torch.Tensor]) -> _Saved:
        tensors = list(tensors)
        views = self._views.get(kind)
        if views is None or not views.of(tensors):  # new state: a fresh run's 2nd step
            views = self._views[kind] = _Views(tensors)
        return views.save()

    def read(self) -> tuple[int, int]:
        """(non-finite steps in a row, skipped steps in all): the host read of log steps."""
        return int(self.in_a_row), int(self.skipped)


# Integer dtypes by element size: a tensor's bits are restored as integers, so that a NaN or
# an infinity in the update costs nothing (x * 0 is NaN for a float NaN, 0 for its bits).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _Views:
    """Integer views of the bits of a fixed list of tensors (local shards, detached), grouped
    by width, made once: each group is saved into one flat buffer with one
    ``torch._foreach_copy_`` and put back with three foreach ops (module doc, "The cost").
    On XLA, which compiles the whole step into one graph, the tensors are kept as they are
    and put back with ``torch.where``."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.sources = tensors  # held: their ids identify the set
        local = [_local(t.detach()) for t in tensors]
        self.xla = any(t.device.type == "xla" for t in local)
        self.groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in local:
            view = t if self.xla else t.view(_BITS[t.element_size()])
            self.groups.setdefault(view.dtype, []).append(view)
        # flat views of the contiguous ones (saved in one buffer), the others as they are
        self.flat = {
            d: [v.view(-1) if v.is_contiguous() else v for v in vs] for d, vs in self.groups.items()
        }
        self.packed = {d: [v.is_contiguous() for v in vs] for d, vs in self.groups.items()}
        self.sizes = {
            d: [v.numel() for v, p in zip(vs, self.packed[d]) if p] for d, vs in self.groups.items()
        }

    def of(self, tensors: list[torch.Tensor]) -> bool:
        """Whether these are the tensors the views were made of (the same objects)."""
        return len(tensors) == len(self.sources) and all(
            a is b for a, b in zip(tensors, self.sources)
        )

    def save(self) -> _Saved:
        """A copy of the tensors' current values."""
        if self.xla:
            return _Saved(self, {d: [v.clone() for v in vs] for d, vs in self.groups.items()})
        copies = {}
        for dtype, views in self.flat.items():
            packed, sizes = self.packed[dtype], self.sizes[dtype]
            buffer = torch.empty(sum(sizes), dtype=dtype, device=views[0].device)
            pieces = iter(buffer.split(sizes))
            copies[dtype] = [next(pieces) if p else v.clone() for v, p in zip(views, packed)]
            torch._foreach_copy_(copies[dtype], views)
        return _Saved(self, copies)


@dataclass
class _Saved:
    """One save of a ``_Views``: per group, a copy of each tensor (shaped like its view)."""

    views: _Views
    copies: dict[torch.dtype, list[torch.Tensor]]

    def restore_unless(self, finite: torch.Tensor) -> None:
        """t = finite ? t : saved, on the device: on the bits, t * f + saved * (1 - f) with
        f = finite as an integer (0 or 1: exact, no overflow, NaN-proof)."""
        if self.views.xla:
            for views, copies in zip(self.views.groups.values(), self.copies.values()):
                for t, old in zip(views, copies):
                    t.copy_(torch.where(finite, t, old))
            return
        for dtype, views in self.views.flat.items():
            keep = finite.to(dtype)
            copies = self.copies[dtype]
            torch._foreach_mul_(views, keep)
            torch._foreach_mul_(copies, 1 - keep)
            torch._foreach_add_(views, copies)


def _agreed_finite(loss: torch.Tensor, distributed: bool) -> torch.Tensor:
    """A 0-d bool on the device: the loss is finite on every rank (one all-reduce, a device
    collective: a rank with a NaN loss makes every rank skip, so replicas stay equal)."""
    bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
    if distributed:
        dist.all_reduce(bad)
    return bad.reshape(()) == 0


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
