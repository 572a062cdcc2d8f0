"""Checkpoint directories: what a run must carry to resume exactly, written safely.

Two layouts (``train.checkpoint_format``; docs/design.md, "Checkpoints"). Sharded: each
rank's DCP shards, ``.metadata``, ``config.yaml`` and ``train_state.json``, written by
orchestrator/train/checkpoint.py; ``checkpoint_problem`` and ``newest_checkpoint`` here judge
and find both layouts. Full, written here: ``checkpoint_<step:08d>/`` with
  model.pt          the objective's state_dict (student, teacher/EMA heads, loss centres,
                    temperature), unsharded whatever ``scaling.strategy`` trained it
  optim.pt          optimizer.state_dict(), unsharded (FSDP: gathered, see parallel.py)
  train_state.json  step, samples seen (the data position), seeds, world size at save, plan
  config.yaml       the resolved run config

A checkpoint is built whole in a fresh temporary directory and only then handed to Ray,
which copies it to the run's storage; the last good checkpoint is never written into. Each
file is itself written to a temp name and renamed, so a crash mid-write leaves no
half-written file under its final name.

RNG state is not stored: every random draw in a step is seeded from (seed, step, rank), so
the state at step k is a pure function of k (see ``step_seed``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from orchestrator.storage import exists, filesystem, is_s3, join_uri, read_text, write_bytes
from tips_model.checkpoints import CheckpointError, load_state_dict, save_state_dict

logger = logging.getLogger(__name__)

CHECKPOINT_FILES = ("model.pt", "optim.pt", "train_state.json", "config.yaml")
__all__ = ["CHECKPOINT_FILES", "CheckpointError", "TrainState"]


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global samples trained on (steps x global batch)
    data_position: int = 0  # input position of the stream to resume from (skips included)
    data_stats: dict[str, float] = dataclasses.field(default_factory=dict)  # skipped records
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    world_size_at_save: int = 0
    seed: int = 0
    plan: dict[str, Any] = dataclasses.field(default_factory=dict)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A stable 63-bit seed for (run seed, step, rank): no hidden RNG state to checkpoint."""
    return zlib.crc32(f"{seed}/{step}/{rank}".encode()) * 2654435761 % (2**63 - 1)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_checkpoint_dir(
    model_state: dict[str, Any],
    optim_state: dict[str, Any],
    state: TrainState,
    config_yaml: str,
) -> Path:
    """Write a complete checkpoint into a new temp directory and return its path.

    Args:
        model_state: the unsharded ``objective.state_dict()``.
        optim_state: the unsharded ``optimizer.state_dict()`` (integer parameter ids); under
            FSDP both come from ``orchestrator.train.parallel`` (gathered by every rank).
        state: step, data position, world size at save, plan.
        config_yaml: the resolved run config.

    The directory is named ``checkpoint_<step:08d>`` inside a fresh ``mkdtemp`` parent so the
    name Ray stores it under is stable.
    """
    parent = Path(tempfile.mkdtemp(prefix="tips-ckpt-"))
    out = parent / f"checkpoint_{state.step:08d}"
    out.mkdir()
    save_state_dict(model_state, out / "model.pt")
    save_state_dict(optim_state, out / "optim.pt")
    _write_json(out / "train_state.json", dataclasses.asdict(state))
    (out / "config.yaml.tmp").write_text(config_yaml)
    os.replace(out / "config.yaml.tmp", out / "config.yaml")
    return out


def read_train_state(directory: str | Path) -> TrainState:
    path = Path(directory) / "train_state.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory}: no train_state.json (incomplete checkpoint)") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    known = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in raw.items() if k in known})


def check_state_dict_matches(
    state_dict: dict[str, Any], model: torch.nn.Module, where: str
) -> None:
    """One line naming what differs when a checkpoint does not fit the configured model
    (torch's own error lists every tensor: hundreds of lines for a changed tower).

    Raises:
        CheckpointError: missing or unexpected keys, or tensors of another shape.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}"
        for k, v in own.items()
        if k in state_dict
        and hasattr(state_dict[k], "shape")
        and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensors of another shape (checkpoint vs model: {shapes[0]})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    raise CheckpointError(
        f"{where} does not fit the configured model: {'; '.join(parts)}; the model or "
        "objective settings changed since it was saved: start a new run.name"
    )


def read_optimizer_state(directory: str | Path) -> dict[str, Any]:
    """``optim.pt``: the unsharded ``optimizer.state_dict()`` of the run that saved it."""
    return load_state_dict(Path(directory) / "optim.pt")


def restore_checkpoint_dir(
    directory: str | Path,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> TrainState:
    """Load model, optimizer (unless None) and train state from a checkpoint dir (strict)."""
    directory = Path(directory)
    missing = [f for f in CHECKPOINT_FILES if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: incomplete checkpoint, missing {missing}")
    state_dict = load_state_dict(directory / "model.pt")
    check_state_dict_matches(state_dict, objective, f"{directory}/model.pt")
    objective.load_state_dict(state_dict, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(load_state_dict(directory / "optim.pt"))
    return read_train_state(directory)


def persist_checkpoint(directory: Path, run_uri: str, storage: Any = None) -> str:
    """Copy a finished checkpoint directory into the run directory, whole or not at all.

    Used in Ray Train local mode, where Ray keeps reported checkpoints in memory only.
    Local disk: copied to ``<name>.partial`` and renamed when complete. S3 has no rename:
    ``train_state.json`` is written last, and a checkpoint without it counts as incomplete
    (``restore_checkpoint_dir`` and ``latest_train_state`` both check).
    """
    dest_uri = join_uri(run_uri, directory.name)
    if is_s3(dest_uri):
        names = sorted(CHECKPOINT_FILES, key=lambda n: n == "train_state.json")
        for name in names:
            write_bytes(join_uri(dest_uri, name), (directory / name).read_bytes(), storage)
        return dest_uri
    fs, dest = filesystem(dest_uri, storage)
    partial = dest + ".partial"
    fs.create_dir(partial, recursive=True)
    pafs.copy_files(str(directory), partial, destination_filesystem=fs)
    if fs.get_file_info(dest).type != pafs.FileType.NotFound:
        fs.delete_dir(dest)
    fs.move(partial, dest)
    return dest_uri


# ------------------------------------------------- finding a run's checkpoints on storage

FATAL_FILE = "fatal_error.txt"  # a run's workers stopped at an error that would repeat
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_problem(ckpt_uri: str, storage: Any | None = None) -> str | None:
    """Why a checkpoint directory cannot be resumed from, naming the file; None when it can.

    Checks what a crash during a write leaves behind, cheaply enough to run on the driver
    and on every worker: every file present, ``train_state.json`` valid JSON with a step,
    ``model.pt`` and ``optim.pt`` whole torch archives (a zip whose central directory, at
    the end of the file, is readable: a truncated file has none). A sharded checkpoint (DCP's
    ``.metadata``, no ``model.pt``): ``checkpoint.sharded_problem`` (every shard file the
    metadata names there and long enough) and the same train state check.
    """
    from orchestrator.train.checkpoint import is_sharded, sharded_problem

    fs, path = filesystem(ckpt_uri, storage)
    full = fs.get_file_info(f"{path}/model.pt").type == pafs.FileType.File
    if not full and is_sharded(ckpt_uri, storage):
        return sharded_problem(ckpt_uri, storage) or _train_state_problem(ckpt_uri, storage)
    for name in CHECKPOINT_FILES:
        info = fs.get_file_info(f"{path}/{name}")
        if info.type != pafs.FileType.File:
            return f"{name}: missing (incomplete checkpoint)"
        if info.size == 0:
            return f"{name}: empty"
    problem = _train_state_problem(ckpt_uri, storage)
    if problem:
        return problem
    for name in ("model.pt", "optim.pt"):
        try:
            with fs.open_input_file(f"{path}/{name}") as f, zipfile.ZipFile(f) as z:
                if not z.namelist():
                    return f"{name}: an empty archive"
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return f"{name}: not a whole torch file, truncated or corrupt ({e})"
    return None


def _train_state_problem(ckpt_uri: str, storage: Any | None) -> str | None:
    try:
        raw = json.loads(read_text(join_uri(ckpt_uri, "train_state.json"), storage))
        int(raw["step"])
    except FileNotFoundError:  # gone since the listing: removed as unfinished meanwhile
        return "train_state.json: missing (incomplete checkpoint)"
    except (ValueError, KeyError, TypeError) as e:
        return f"train_state.json: not a valid train state ({type(e).__name__}: {e})"
    return None


def list_checkpoints(run_uri: str, storage: Any | None = None) -> list[tuple[int, str]]:
    """``(step, uri)`` of the ``checkpoint_<step>`` directories of a run, newest first."""
    fs, path = filesystem(run_uri, storage)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        match = CHECKPOINT_RE.match(Path(info.path).name)
        if match and info.type == pafs.FileType.Directory:
            found.append((int(match.group(1)), join_uri(run_uri, Path(info.path).name)))
    return sorted(found, reverse=True)


def newest_checkpoint(run_uri: str, storage: Any | None = None) -> str | None:
    """The newest complete and loadable checkpoint of a run on storage, local or S3.

    Found on storage itself, not through Ray's run snapshot (which trails the checkpoints
    written by seconds, is lost with a killed driver and is Ray's private file): a newer
    checkpoint that does not pass ``checkpoint_problem`` is skipped with a warning naming
    the file and why. The driver (data position) and the workers (weights) both call it on
    the same files, so they agree. It only reads (``tips export`` may call it while the run
    writes); the unfinished directories it skips are removed by rank 0 when a worker group
    starts (``checkpoint.remove_unfinished``).
    """
    for _, uri in list_checkpoints(run_uri, storage):
        problem = checkpoint_problem(uri, storage)
        if problem is None:
            return uri
        logger.warning("%s: %s; trying the previous checkpoint", uri, problem)
    return None


def latest_train_state(
    uri: str, storage: Any | None = None, *, is_checkpoint: bool = False
) -> Any | None:
    """The ``TrainState`` (step, samples seen = data position) of a run's latest checkpoint.

    Args:
        uri: the run directory (``storage_uri/name``), or a checkpoint directory when
            ``is_checkpoint``.
        storage: ``cfg.storage``.
        is_checkpoint: ``uri`` is itself a checkpoint directory.

    Returns:
        The state, or None when the run has no checkpoint yet.
    """
    ckpt = uri if is_checkpoint else newest_checkpoint(uri, storage)
    if ckpt is None:
        return None
    state_uri = join_uri(ckpt, "train_state.json")
    if not exists(state_uri, storage):
        logger.warning("%s: missing; starting the data stream at 0", state_uri)
        return None
    raw = json.loads(read_text(state_uri, storage))
    known = set(TrainState.__dataclass_fields__)
    return TrainState(**{k: v for k, v in raw.items() if k in known})
