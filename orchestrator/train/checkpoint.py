"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes its
own shards, in parallel, straight to the run's storage (local disk or S3), synchronously or in
the background (``train.checkpoint_format=sharded``, ``train.async_checkpoint``).

    ckpt = ShardedCheckpointer(run_uri, storage, rank, distributed, async_save=True)
    ckpt.save(objective, optimizer, state, config_yaml, wait=False)   # all ranks, a collective
    for step, uri in ckpt.ready(): ...        # all ranks: the saves complete now (agreed)
    load_sharded(uri, storage, objective, optimizer, group)           # after wrapping
    full = read_full_state(uri, storage)      # one process: the unsharded model and optimizer

Layout of ``checkpoint_<step:08d>/`` (docs/design.md, "Checkpoints"):
  __<rank>_<n>.distcp  each rank's part of ``{"model": objective state, "optim": optimizer
                       state}`` as ``get_state_dict`` gives it: under FSDP each rank's DTensor
                       shards (student, EMA teacher, Adafactor's ``row_var``/``variance``);
                       tensors every rank holds whole (loss centres, temperature, Adafactor's
                       ``col_var`` of 2-D parameters, DDP replicas) are written once
  .metadata            DCP's index of every tensor's pieces, written by rank 0 after every
                       rank's files are finished
  config.yaml          the resolved run config (rank 0, after ``.metadata``)
  train_state.json     written last by rank 0: the completeness marker

A write that dies midway leaves no ``.metadata`` or no ``train_state.json``, or a ``.metadata``
naming shard files that are missing or short: ``sharded_problem`` says so and
``state.newest_checkpoint`` takes the previous checkpoint. What it left is removed, by rank 0:
when the next worker group starts (``remove_unfinished``: the directories newer
than the newest complete one that have no ``train_state.json``), and before a save writes into
a ``checkpoint_<step>`` that exists and is not complete (stale shards or ``.metadata`` of the
dead write would otherwise sit beside the new ones).

Asynchronous save: ``save`` copies this rank's state to host memory (DCP's staging, into
buffers kept from the previous save: the only stall), then a background thread writes the
files, and a second one, once DCP's write has finished, writes the markers. DCP's background
collectives run on a process group of their own (gloo: the CPU backend async save needs,
docs of ``dcp.async_save``), so they never interleave with the training loop's collectives
on the default group. One write is in flight at a time: a save waits for the previous one.
``ready`` agrees across ranks (an all-reduce of "done" flags) which saves are complete, so
every rank reports them to Ray at the same call.

Plan cache (``train.checkpoint_plan_cache``): a worker group saves the same tensors, shaped
the same, every time, so DCP's plan is cached (``DefaultSavePlanner(enable_plan_caching=True)``):
a rank whose local plan has not changed sends an empty one, and rank 0 reuses the global plan
and ``.metadata`` index it built last time (the written files' offsets are still gathered and
recorded at every save). A changed plan (optimizer state that appears later) is sent and
merged. DCP keeps the cache per process, keyed by the planner's class name: ``_cached_planner``
gives ours its own name so no other DCP user in the process shares it.

Loading reshards: the target is this process's own ``get_state_dict`` (DTensors under FSDP,
whole tensors alone or under DDP), and DCP reads for each target shard the pieces of the saved
shards it overlaps, so a checkpoint written by N ranks loads on any world size and strategy.
S3: DCP's fsspec writer and reader on ``fsspec``'s wrapper around our pyarrow S3 filesystem
(orchestrator/storage.py: the same endpoint and credentials), no s3fs needed.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import pickle
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from orchestrator.storage import filesystem, is_s3, join_uri, write_text
from tips_model.checkpoints import CheckpointError

if TYPE_CHECKING:  # imported where used: 0.65 s of every worker's start otherwise
    import torch.distributed.checkpoint as dcp

logger = logging.getLogger(__name__)
METADATA_FILE = ".metadata"  # DCP's index (torch.distributed.checkpoint.filesystem)
SHARD_SUFFIX = ".distcp"  # DCP's shard files: __<rank>_<n>.distcp
SHARDED_MARKERS = ("config.yaml", "train_state.json")  # rank 0, after .metadata, in order

__all__ = [
    "ShardedCheckpointer",
    "is_sharded",
    "load_sharded",
    "read_full_state",
    "remove_unfinished",
    "sharded_problem",
]


def _arrow_fsspec(uri: str, storage: Any) -> tuple[Any, str]:
    """DCP's fsspec ``FileSystem`` backed by our pyarrow filesystem for ``uri``, and the path."""
    from fsspec.implementations.arrow import ArrowFSWrapper
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem

    fs, path = filesystem(uri, storage)
    wrapped = FileSystem()
    wrapped.fs = ArrowFSWrapper(fs)
    return wrapped, path


def _writer(uri: str, storage: Any) -> dcp.FileSystemWriter:
    """A DCP writer for a checkpoint directory on local disk (fsync'd) or S3."""
    import torch.distributed.checkpoint as dcp

    if not is_s3(uri):
        return dcp.FileSystemWriter(filesystem(uri)[1], sync_files=True)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    fs, path = _arrow_fsspec(uri, storage)
    writer = FsspecWriter(path, sync_files=False)  # an S3 object exists once it is closed
    writer.fs, writer.path = fs, path
    return writer


def _reader(uri: str, storage: Any) -> dcp.FileSystemReader:
    import torch.distributed.checkpoint as dcp

    if not is_s3(uri):
        return dcp.FileSystemReader(filesystem(uri)[1])
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    class RangeReader(FsspecReader):
        """Each tensor's bytes in one ranged GET: ``torch.load`` on DCP's file view reads in
        small pieces, one request each (the test model's few MB took 50 s from moto)."""

        def _slice_file(self, file: Any, sinfo: Any) -> io.BytesIO:
            file.seek(sinfo.offset)
            return io.BytesIO(file.read(sinfo.length))

    fs, path = _arrow_fsspec(uri, storage)
    reader = RangeReader(path)
    reader.fs, reader.path = fs, path
    return reader


def is_sharded(uri: str, storage: Any | None = None) -> bool:
    """Whether ``uri`` is a sharded (DCP) checkpoint directory, whole or partly written: it
    holds DCP's ``.metadata`` or shard files."""
    fs, path = filesystem(uri, storage)
    if fs.get_file_info(f"{path}/{METADATA_FILE}").type == pafs.FileType.File:
        return True
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return any(i.path.endswith(SHARD_SUFFIX) for i in infos)


def sharded_problem(uri: str, storage: Any | None = None) -> str | None:
    """Why a sharded checkpoint cannot be resumed from, naming the file; None when it can.

    ``.metadata`` readable; every shard file it names present and at least as long as the
    pieces it says are in it; ``config.yaml`` and ``train_state.json`` present and non-empty
    (``state.checkpoint_problem`` checks the train state's JSON).
    """
    fs, path = filesystem(uri, storage)
    try:
        with fs.open_input_file(f"{path}/{METADATA_FILE}") as f:
            metadata = pickle.loads(f.read())
    except FileNotFoundError:
        return f"{METADATA_FILE}: missing (incomplete sharded checkpoint)"
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
        return f"{METADATA_FILE}: unreadable, truncated or corrupt ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    names = sorted(needed) + list(SHARDED_MARKERS)
    infos = fs.get_file_info([f"{path}/{n}" for n in names])
    for name, info in zip(names, infos):
        if info.type != pafs.FileType.File:
            return f"{name}: missing (incomplete sharded checkpoint)"
        if info.size < needed.get(name, 1):
            return f"{name}: {info.size} bytes, shorter than {needed.get(name, 1)} (truncated)"
    return None


def _is_full_layout(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(f"{path}/model.pt").type == pafs.FileType.File


def _clear_unfinished(uri: str, storage: Any) -> None:
    """Remove ``uri`` when it exists and is not a complete sharded checkpoint: a write of
    this step that died (nothing of this run writes there now: this rank's previous write
    has finished), whose stale shards or ``.metadata`` would sit beside the new ones.

    Rank 0, before its ``dcp.save``: no rank writes a shard before the global plan, which
    rank 0 makes after this, and rank 0's own planning creates the directory again
    (``prepare_local_plan``). A complete one is left for DCP to overwrite, and so is a
    full-layout one (``model.pt``: ``state.checkpoint_problem`` judges those).
    """
    fs, path = filesystem(uri, storage)
    if fs.get_file_info(path).type == pafs.FileType.NotFound or _is_full_layout(fs, path):
        return
    problem = sharded_problem(uri, storage)
    if problem is not None:
        logger.warning("%s: %s; removing it before writing this step again", uri, problem)
        fs.delete_dir(path)


def remove_unfinished(run_uri: str, storage: Any | None = None) -> list[str]:
    """Delete the run's checkpoint directories newer than its newest complete one (all of
    them when none is) whose write never finished, with one warning naming them; their URIs.

    Unfinished means no ``train_state.json``, the marker written last, after all of a
    checkpoint's other files, in both layouts (``state.persist_checkpoint`` for the full
    one). Newest first: a directory that has it and passes ``sharded_problem`` (or is a
    full-layout one) ends the scan, so neither a complete checkpoint nor the one resumed
    from (``state.newest_checkpoint``'s choice) is ever removed; one that has it but fails
    is damaged, not unfinished: kept (``newest_checkpoint`` names it; the save of its step
    replaces it, ``_clear_unfinished``).

    Only where no writer of this run can be alive: a directory is also unfinished while an
    asynchronous write into it still runs (``ShardedCheckpointer._remove_unfinished``).
    """
    fs, path = filesystem(run_uri, storage)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    found = []  # the listing of state.list_checkpoints (state imports this module)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and re.fullmatch(r"checkpoint_\d+", name):
            found.append((int(name.split("_")[1]), name))
    unfinished = []
    for _, name in sorted(found, reverse=True):
        ckpt = f"{path}/{name}"
        if fs.get_file_info(f"{ckpt}/{SHARDED_MARKERS[-1]}").type != pafs.FileType.File:
            unfinished.append(join_uri(run_uri, name))
        elif _is_full_layout(fs, ckpt) or sharded_problem(join_uri(run_uri, name), storage) is None:
            break  # complete: the one resumed from; older ones stay as they are
    if unfinished:
        logger.warning(
            "removing %d unfinished checkpoint(s) newer than the newest complete one (their "
            "write died before train_state.json): %s", len(unfinished), ", ".join(unfinished)
        )  # fmt: skip
    for uri in unfinished:
        fs.delete_dir(filesystem(uri, storage)[1])
    return unfinished


def _state_dicts(objective: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{"model", "optim"}`` as DCP sees this process's state (sharded under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(objective, optimizer)
    return {"model": model, "optim": optim}


def load_sharded(
    uri: str,
    storage: Any,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    group: Any = None,
) -> None:
    """Load a sharded checkpoint into the (wrapped) objective and optimizer; every rank calls.

    Raises:
        CheckpointError: the checkpoint does not hold this model's or optimizer's state.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if optimizer is None:
        target = {"model": get_model_state_dict(objective)}
    else:
        target = _state_dicts(objective, optimizer)
    try:
        dcp.load(
            target,
            storage_reader=_reader(uri, storage),
            process_group=group,
            no_dist=group is None,  # alone, or a world of one
        )
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{uri} does not fit the configured model or optimizer ({first[:300]}); the model, "
            "objective or optimizer settings changed since it was saved: start a new run.name"
        ) from e
    set_model_state_dict(objective, target["model"])
    if optimizer is not None:
        set_optimizer_state_dict(objective, optimizer, target["optim"])


def read_full_state(uri: str, storage: Any | None = None) -> dict[str, Any]:
    """The whole ``{"model": state_dict, "optim": {"state", "param_groups"}}`` of a sharded
    checkpoint in this process (parameter FQNs as keys), whatever world size wrote it."""
    from orchestrator.ray_compat import dcp_load_whole

    return dcp_load_whole(_reader(uri, storage))


class _ReusedStager:
    """DCP's host staging for asynchronous saves into buffers kept from the previous save.

    ``FileSystemWriter``'s own staging allocates a fresh host copy of the state at every
    save; the first touch of that memory is most of the copy's time, and the copy is the
    loop's whole stall (benchmarks/checkpoint_io.py). Reusing the buffers is safe because
    a save starts only after the previous write finished. Pinned on CUDA (faster device
    copies); DCP's ``BlockingAsyncStager(cache_staged_state_dict=True)`` would always pin,
    which a host without CUDA cannot.
    """

    should_synchronize_after_execute = False

    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        from torch.distributed._state_dict_utils import (
            CompanionMismatch,
            _copy_state_dict,
            _create_cpu_state_dict,
        )

        if self._buffers is not None:
            try:
                return _copy_state_dict(state_dict, self._buffers)
            except CompanionMismatch:  # another set of tensors than last time: new buffers
                self._buffers = None
        self._buffers = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state_dict, self._buffers)

    def synchronize_staging(self) -> None:
        """Nothing to wait for: ``stage`` copies before it returns."""

    def close(self) -> None:
        self._buffers = None


@functools.cache
def _cached_planner() -> type:
    """``DefaultSavePlanner`` with plan caching, as a class of its own: DCP keys its
    process-wide cache by the planner's class name (module doc, "Plan cache")."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    class TipsCachedSavePlanner(DefaultSavePlanner):
        def __init__(self) -> None:
            super().__init__(enable_plan_caching=True)

    return TipsCachedSavePlanner


@dataclasses.dataclass
class _Pending:
    step: int
    uri: str
    done: Future  # the markers are written (after DCP's write finished)


class ShardedCheckpointer:
    """One per worker: starts sharded saves and says, agreed by all ranks, which are complete.

    Args:
        run_uri: the run directory; checkpoints go to ``<run_uri>/checkpoint_<step:08d>``.
        storage: ``cfg.storage``.
        rank: this worker's rank (rank 0 writes ``.metadata`` and the markers).
        distributed: a process group of several ranks is up.
        async_save: write in the background (``train.async_checkpoint``).
        plan_cache: reuse DCP's save plan (``train.checkpoint_plan_cache``; module doc).
    """

    def __init__(
        self,
        run_uri: str,
        storage: Any,
        rank: int,
        distributed: bool,
        async_save: bool,
        plan_cache: bool = True,
    ) -> None:
        self.run_uri, self.storage, self.rank = run_uri, storage, rank
        self.distributed, self.async_save, self.plan_cache = distributed, async_save, plan_cache
        # DCP's collectives of a background write must not meet the loop's on the default
        # group; a gloo group also serves NCCL runs (async save stages on the CPU).
        self.group = dist.new_group(backend="gloo") if distributed else None
        # and ``ready``'s agreement, on the loop's thread, on neither of the two
        self._agree = dist.new_group(backend="gloo") if distributed else None
        self._remove_unfinished()
        self.no_dist = not distributed
        self._executor = ThreadPoolExecutor(1, "tips-ckpt") if async_save else None
        self._stager = _ReusedStager()
        self._pending: _Pending | None = None
        self._complete: list[tuple[int, str]] = []

    def _remove_unfinished(self) -> None:
        """Rank 0 removes the run's unfinished checkpoints newer than its newest complete one
        (``remove_unfinished``), once every rank has chosen what it resumes from.

        Safe here and only here: one checkpointer is built per worker when a worker group
        starts (orchestrator/train/loop.py, right after ``_restore`` chose the checkpoint),
        so no writer of this run is alive; an attempt's asynchronous writes ran in its
        workers' processes, which Ray Train ends before it starts the next group. Later, a
        directory without ``train_state.json`` may be a write still in flight: never touched.
        """
        if self.distributed:  # every rank's _restore has listed the checkpoints
            dist.barrier(group=self._agree)
        if self.rank == 0:
            remove_unfinished(self.run_uri, self.storage)

    def save(
        self,
        objective: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: Any,
        config_yaml: str,
        wait: bool,
    ) -> None:
        """Start writing ``checkpoint_<state.step>``: staged now, written in the background
        when ``async_save`` and not ``wait``. Every rank calls (DCP plans collectively)."""
        import torch.distributed.checkpoint as dcp

        self._wait_pending()  # one write at a time
        uri = join_uri(self.run_uri, f"checkpoint_{state.step:08d}")
        if self.rank == 0:
            _clear_unfinished(uri, self.storage)
        state_json = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True)
        writer = _writer(uri, self.storage)
        planner = _cached_planner()() if self.plan_cache else None  # a planner per save
        sd = _state_dicts(objective, optimizer)
        if self._executor is None:
            dcp.save(
                sd,
                storage_writer=writer,
                planner=planner,
                process_group=self.group,
                no_dist=self.no_dist,
            )
            self._write_markers(None, uri, state_json, config_yaml)
            self._complete.append((state.step, uri))
            return
        written = dcp.async_save(
            sd,
            storage_writer=writer,
            planner=planner,
            process_group=self.group,
            async_stager=self._stager,
            no_dist=self.no_dist,
        )
        done = self._executor.submit(self._write_markers, written, uri, state_json, config_yaml)
        self._pending = _Pending(state.step, uri, done)
        if wait:
            self._wait_pending()

    def _write_markers(
        self, written: Future | None, uri: str, state_json: str, config_yaml: str
    ) -> None:
        if written is not None:
            written.result()  # DCP's write and rank 0's .metadata (a collective) are done
        if self.rank == 0:
            for name, text in zip(SHARDED_MARKERS, (config_yaml, state_json)):
                write_text(join_uri(uri, name), text, self.storage)

    def _wait_pending(self) -> None:
        if self._pending is not None:
            self._pending.done.result()  # raises what the background write raised
            self._complete.append((self._pending.step, self._pending.uri))
            self._pending = None

    def ready(self) -> list[tuple[int, str]]:
        """``(step, uri)`` of the saves complete on every rank and not returned before,
        oldest first; every rank calls at the same point (an all-reduce when one is pending)."""
        if self._pending is not None:
            done = torch.tensor([int(self._pending.done.done())], dtype=torch.int32)
            if self.distributed:
                dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._agree)
            if done.item():
                self._wait_pending()
        out, self._complete = self._complete, []
        return out

    def close(self) -> None:
        """Wait for a write in flight (the end of training: the last checkpoint waits)."""
        self._wait_pending()
        self._stager.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
