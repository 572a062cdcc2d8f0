"""torch_xla (PJRT) for Ray Train V2: a TorchConfig whose Backend sets up XLA workers.

    tips train recipe=tips_b14_tpu ...   # scaling.accelerator=tpu: driver.py's backend_config
    # -> TorchTrainer(loop, torch_config=TorchXLAConfig(pjrt_device="TPU"),
    #        scaling_config=ScalingConfig(num_workers=32, resources_per_worker={"TPU": 1, ...}))
    # in the worker (orchestrator/train/loop.py): device = xla_device(),
    #    strategy = XlaStrategy(...): the same loop as CPU/GPU, no DDP wrapper

Why a custom backend (docs/ray.md, "TPU and torch_xla"): in Ray 2.60 ``use_tpu=True`` picks backend
``tpu_dist`` from Google's ``torch_tpu`` package, and ``ray.train.torch.xla.TorchXLAConfig``
is the V1-era Neuron/XRT one. Ray Train V2 still calls the generic ``Backend`` hooks of a
``TorchConfig`` subclass, so this module brings its own:

* ``on_start``: rank 0's address and a free port become MASTER_ADDR/MASTER_PORT; every worker
  gets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK) from
  ``ray.train.get_context()``, ``PJRT_DEVICE``, and ``TORCHELASTIC_RUN_ID``. The last one makes
  torch_xla's ``xla://`` rendezvous treat the workers exactly like ``torchrun --nproc_per_node``
  processes: one process per chip, topology variables (TPU_VISIBLE_CHIPS, ...) set per local
  rank by torch_xla itself. So use one Ray worker per chip: ``{"TPU": 1}``.
* ``on_training_start``: ``dist.init_process_group("xla", init_method="xla://")`` on every
  worker (torch.distributed collectives on XLA tensors, e.g. the loop's finite-loss check).
* ``on_shutdown``: destroy the process group.

Gradients are all-reduced by ``XlaStrategy.finish_grads`` (one ``xm.all_reduce``, what
``xm.optimizer_step`` does), not by DDP; do not call ``ray.train.torch.prepare_model`` or
``get_device`` in XLA workers (they assume cuda/cpu, or load ``torch_tpu`` when
``use_tpu=True``); nor ``ScalingConfig(use_tpu=True)``: it would select ``torch_tpu``.

torch_xla is imported only inside workers and helpers: this module imports without it. Its
environment is requirements-xla.txt (torch 2.9.0 + torch-xla 2.9.0), apart from the main one.
On ``PJRT_DEVICE=CPU`` (tests: ``make test-xla``) each process has its own CPU client, so one
worker: with two, both take rank 0 of the ``xla://`` rendezvous (torch_xla 2.9 configures
multi-process PJRT for TPU/Neuron/plugins only; measured: EADDRINUSE on its TCPStore), and
orchestrator/config_validation.py refuses it. The multi-host TPU rendezvous is exercised only
on real slices.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

from orchestrator.train.parallel import Strategy

logger = logging.getLogger(__name__)

PJRT_DEVICES = ("TPU", "CPU", "CUDA")


@dataclass
class TorchXLAConfig(TorchConfig):
    """Ray Train backend config for torch_xla on PJRT (TPU chips, or the CPU device in tests).

    Args:
        pjrt_device: ``TPU`` (one worker per chip), ``CPU`` (tests) or ``CUDA``.
        init_process_group: create the ``xla`` torch.distributed process group.
        cpu_num_devices: XLA CPU devices per process when ``pjrt_device="CPU"``.
        timeout_s: process-group timeout (TorchConfig's field).
    """

    pjrt_device: str = "TPU"
    init_process_group: bool = True
    cpu_num_devices: int = 1

    def __post_init__(self) -> None:
        if self.pjrt_device not in PJRT_DEVICES:
            raise ValueError(
                f"TorchXLAConfig.pjrt_device={self.pjrt_device!r}: must be one of {PJRT_DEVICES}"
            )
        self.backend = "xla"

    @property
    def backend_cls(self) -> type[Backend]:
        return _XLABackend

    @property
    def train_func_context(self) -> Any:
        # TorchConfig's context calls ray.train.torch.get_device(), which is cuda/cpu or,
        # with use_tpu=True, loads torch_tpu: neither applies to torch_xla workers.
        return contextlib.nullcontext

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "pjrt_device": self.pjrt_device,
            "init_process_group": self.init_process_group,
        }


def _address_and_port() -> tuple[str, int]:
    """Runs on rank 0: this node's IP and a port free on it (the rendezvous address)."""
    import ray.util

    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        s.bind(("", 0))
        return addr, s.getsockname()[1]


def _set_worker_env(master_addr: str, master_port: int, config: dict[str, Any]) -> None:
    """Runs on each worker: the torchrun variables plus PJRT's, before torch_xla starts."""
    import ray.train

    ctx = ray.train.get_context()
    env = {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "RANK": str(ctx.get_world_rank()),
        "WORLD_SIZE": str(ctx.get_world_size()),
        "LOCAL_RANK": str(ctx.get_local_rank()),
        "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()),
        "NODE_RANK": str(ctx.get_node_rank()),
        "GROUP_RANK": str(ctx.get_node_rank()),
        # torch_xla's xla:// rendezvous: "launched by torchrun" -> per-local-rank PJRT setup.
        "TORCHELASTIC_RUN_ID": ctx.get_experiment_name() or "ray-train",
        "PJRT_DEVICE": config["pjrt_device"],
    }
    if config["pjrt_device"] == "CPU":
        env["CPU_NUM_DEVICES"] = str(config["cpu_num_devices"])
    os.environ.update(env)


def _init_process_group(timeout_s: int) -> None:
    import torch.distributed as dist
    import torch_xla.distributed.xla_backend  # noqa: F401 - registers the "xla" backend

    if not dist.is_initialized():
        dist.init_process_group("xla", init_method="xla://", timeout=timedelta(seconds=timeout_s))


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class _XLABackend(Backend):
    """The Backend hooks Ray Train V2 calls around the train function (see module doc)."""

    def on_start(self, worker_group: Any, backend_config: TorchXLAConfig) -> None:
        addr, port = worker_group.execute_single(0, _address_and_port)
        config = {
            "pjrt_device": backend_config.pjrt_device,
            "cpu_num_devices": backend_config.cpu_num_devices,
        }
        worker_group.execute(_set_worker_env, master_addr=addr, master_port=port, config=config)

    def on_training_start(self, worker_group: Any, backend_config: TorchXLAConfig) -> None:
        if backend_config.init_process_group:
            worker_group.execute(_init_process_group, timeout_s=backend_config.timeout_s)

    def on_shutdown(self, worker_group: Any, backend_config: TorchXLAConfig) -> None:
        from ray.exceptions import RayActorError

        if not backend_config.init_process_group:
            return
        try:
            worker_group.execute(_destroy_process_group)
        except RayActorError:  # workers already gone (run over, or a node lost): nothing to do
            logger.debug("xla process group: workers gone before shutdown")


# ---------------------------------------------------------------------- worker-side helpers


def xla_device() -> torch.device:
    """This worker's XLA device (its chip under PJRT; ``xla:0`` on the CPU device)."""
    import torch_xla

    return torch_xla.device()


def compile_count() -> int:
    """Graphs torch_xla has compiled in this process so far (its ``UncachedCompile``)."""
    import torch_xla.debug.metrics as met

    return int(met.counter_value("UncachedCompile") or 0)


def to_cpu(tree: Any) -> Any:
    """A copy of a (nested) state dict with every XLA tensor moved to the host in one
    transfer (``xm.save``'s way): checkpoints keep the format of CPU/GPU runs."""
    import torch_xla.core.xla_model as xm

    return xm._maybe_convert_to_cpu(tree)


class XlaStrategy(Strategy):
    """The loop's ``Strategy`` (orchestrator/train/parallel.py) for torch_xla replicas.

    No DDP wrapper: after the last micro-batch ``finish_grads`` averages the gradients over
    the replicas with one ``xm.all_reduce`` (what ``xm.optimizer_step`` does). Every step is
    one traced graph closed by ``end_step`` (``torch_xla.sync``), and nothing in it reads a
    value on the host, as on every strategy: the loop's non-finite check is
    ``orchestrator/train/guard.py``'s ``StepGuard`` (the step's parameter, buffer and
    optimizer updates are selected on the device, device counters count the skipped steps,
    the loop reads them at log steps; host-side optimizer state, such as AdamW's CPU ``step``
    counter, still advances). Checkpoints are host copies (``to_cpu``) in the usual format;
    periodic evaluation runs on a host copy of the student.
    """

    name = "xla"

    def __init__(self, objective: torch.nn.Module, world_size: int, device: torch.device) -> None:
        self.objective, self.world_size, self.device = objective, world_size, device
        self._compiles = compile_count()

    def begin_step(self, seed: int) -> None:
        """Seed the XLA generator too (drop-path): a resumed run repeats the same steps."""
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed, device=self.device)

    def finish_grads(self) -> None:
        import torch_xla.core.xla_model as xm

        if self.world_size <= 1:
            return
        grads = [p.grad for p in self.objective.parameters() if p.grad is not None]
        xm.all_reduce(xm.REDUCE_SUM, grads, scale=1.0 / self.world_size)

    def end_step(self) -> None:
        import torch_xla

        torch_xla.sync()

    def full_state_dicts(
        self, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int
    ) -> tuple[dict | None, dict | None]:
        if rank != 0:
            return None, None
        return to_cpu(objective.state_dict()), to_cpu(optimizer.state_dict())

    @contextlib.contextmanager
    def evaluating(self) -> Any:
        """A host copy of the student: evaluation's varying shapes compile nothing."""
        yield copy.deepcopy(self.objective.student).to("cpu")

    def perf_metrics(self) -> dict[str, float]:
        """``perf/xla_compiles``: graphs compiled since the previous call (0 once warm)."""
        now = compile_count()
        last, self._compiles = self._compiles, now
        return {"perf/xla_compiles": float(now - last)}
