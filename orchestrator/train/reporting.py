"""What a worker hands to Ray Train: its checkpoints and its reports (``ray.train.report``, a
barrier every rank calls equally often). The loop (orchestrator/train/loop.py) decides when.

* ``train.checkpoint_format=full``: rank 0 writes a complete, unsharded checkpoint directory
  (under FSDP every rank joins the gather first) and reports it; Ray copies it to the run's
  storage (``checkpoint_<step>``);
* ``sharded``: every rank writes its own shards into the run directory
  (orchestrator/train/checkpoint.py), and the first report after a checkpoint is complete
  registers it with Ray without a copy.
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING, Any

import ray.train
import torch

from orchestrator import config as config_lib
from orchestrator.train.preemption import agreed
from orchestrator.train.state import persist_checkpoint, write_checkpoint_dir

if TYPE_CHECKING:
    from orchestrator.train.loop import Worker


def save_checkpoint(w: Worker, wait: bool = True) -> Any:
    """A complete, unsharded checkpoint directory (rank 0; under FSDP every rank joins the
    gather first); None on other ranks. Sharded: every rank starts writing its shards (in
    the background with ``train.async_checkpoint`` unless ``wait``: the last and preemption
    checkpoints) and ``report`` hands the checkpoint to Ray once it is complete; None."""
    w.state.world_size_at_save = w.world_size
    if w.checkpointer is not None:
        w.checkpointer.save(w.objective, w.optimizer, w.state, w.config_yaml, wait=wait)
        return None
    model_sd, optim_sd = w.strategy.full_state_dicts(w.objective, w.optimizer, w.rank)
    if w.rank != 0:
        return None
    return write_checkpoint_dir(model_sd, optim_sd, w.state, w.config_yaml)


def report(w: Worker, metrics: dict[str, Any], directory: Any, checkpointing: bool) -> None:
    """``ray.train.report`` (a barrier: every rank calls it), with rank 0's checkpoint."""
    if w.checkpointer is not None:
        _report_sharded(w, metrics)
        return
    checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
    name = f"checkpoint_{w.state.step:08d}" if checkpointing else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    if directory is not None:
        if w.persist_locally:
            persist_checkpoint(directory, w.run_uri, w.cfg.storage)
        # SYNC upload copied it to the run's storage; the temp copy is ours to remove.
        shutil.rmtree(directory.parent, ignore_errors=True)


def _report_sharded(w: Worker, metrics: dict[str, Any]) -> None:
    """Report with the sharded checkpoints every rank has finished writing since the last
    report (``ShardedCheckpointer.ready``: agreed, so every rank reports as often): already
    in the run directory, registered with Ray without a copy (``NO_UPLOAD``), so Ray's
    ``run.num_checkpoints_to_keep`` deletes old ones. Two at once (a previous asynchronous
    write finished just before the last or a preemption checkpoint): one report each."""
    ready = w.checkpointer.ready()
    for step, uri in ready or [(0, None)]:
        checkpoint = None
        if uri is not None and w.rank == 0:
            checkpoint = _stored_checkpoint(w, uri)
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=f"checkpoint_{step:08d}" if uri else None,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )


def _stored_checkpoint(w: Worker, uri: str) -> ray.train.Checkpoint:
    """A ``ray.train.Checkpoint`` for a checkpoint directory on the run's storage, on the
    filesystem object Ray's own storage uses (Ray checks that it manages the directory)."""
    from orchestrator.storage import checkpoint_from_uri

    if w.persist_locally:  # Ray Train local mode: no run storage of its own
        return checkpoint_from_uri(uri, w.cfg.storage)
    storage = ray.train.get_context().get_storage()
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return ray.train.Checkpoint(
        path=f"{storage.experiment_fs_path}/{name}", filesystem=storage.storage_filesystem
    )


def report_due(
    last_report: float, cfg: config_lib.TipsConfig, device: torch.device, distributed: bool
) -> bool:
    """Whether a metrics-only report goes to Ray now: rank 0's clock decides for every rank
    (``report`` is a barrier that all ranks must call equally often).

    Ray Train's controller drains each worker's single-slot report queue once per poll, so a
    report sent sooner than that after the previous one blocks the loop until the poll:
    with a 40 ms step and a report every 10 steps that cost 80% of the time (benchmarks/
    train_overhead.py). Local logging is not gated.
    """
    return agreed(
        time.monotonic() - last_report >= cfg.train.report_min_interval_s, device, distributed
    )
