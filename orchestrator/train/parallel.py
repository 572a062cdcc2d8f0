"""Data parallelism for the training loop: DDP, or FSDP2 sharding (``scaling.strategy``).

    strategy = wrap_for_distributed(objective, cfg, device, world_size)   # before the optimizer
    optimizer = build_optimizer(objective, cfg)
    strategy.load_optimizer_state(objective, optimizer, saved)            # a full optim.pt
    with strategy.micro_batch(final): loss.backward()                     # accumulation
    strategy.finish_grads(); strategy.clip_grad_norm_(max_norm)
    model_sd, optim_sd = strategy.full_state_dicts(objective, optimizer, rank)  # every rank

* ``none`` (or a world of one): nothing is wrapped.
* ``ddp``: Ray Train's ``prepare_model`` (DistributedDataParallel) around ``objective.student``,
  kept outside the module tree (``objective.wrap_student``), ``no_sync`` while accumulating.
* ``fsdp``: PyTorch FSDP2 (``fully_shard``; parameters become DTensors sharded on dim 0 over a
  1-D mesh of all workers). Units, innermost first: every name in ``objective.shard_units()``
  (ViT and text blocks; for TIPS also both towers and the heads), then the student root. A
  unit gathers its parameters around its own ``forward``, so the loss may call the heads, and
  TIPSv2's head-only EMA the student's vision tower, outside the student's ``forward``. The
  student root is initialised here (FSDP2 otherwise makes the first module to run forward the
  root, and a sub-unit run first would claim it). 0-d parameters (the contrastive temperature)
  cannot be sharded by FSDP2: they stay replicated and ``finish_grads`` averages their
  gradients. On CUDA with ``train.precision=bf16``: bf16 parameters in compute, fp32
  gradient reduction (``MixedPrecisionPolicy``).
  The EMA teacher is sharded with the same mesh and units, so each rank's teacher shard holds
  the same elements as its student shard and ``ema_update_`` runs on local shards, with no
  communication. (Gathering the student for a replicated teacher instead would cost a full
  all-gather per step and a whole teacher per rank, the memory FSDP is there to save.)
  Periodic evaluation runs on every rank (a unit's forward is a collective); the towers'
  extra forwards (``forward_value_only_last``, ``get_intermediate_layers``) are registered
  with FSDP.
* ``train.mixed_precision=fsdp_params``: FSDP2 as above whatever the strategy and world size
  (a world of one shards over a mesh of one, in a process group of one where Ray Train's
  local mode has none; ``ddp`` keeps the units gathered from forward to backward, as DDP's
  replicas are), so that on CUDA the forward runs on FSDP2's bf16 copies of the fp32 master
  weights, made once per unit per step in its all-gather, instead of autocast casting every
  weight at every use; the optimizer and the checkpoints see only the fp32 shards.

Checkpoints (``train.checkpoint_format``) resume on any world size, under FSDP, DDP or alone:
* ``full``, one format whatever the strategy: ``model.pt`` = the unsharded
  ``objective.state_dict()``, ``optim.pt`` = ``optimizer.state_dict()`` (integer parameter
  ids). Under FSDP every rank joins DCP's ``get_*_state_dict(full_state_dict=True,
  cpu_offload=True)`` gathers (``full_state_dicts``) and rank 0 writes; DCP's names (FQNs) are
  mapped back to ids. The model is restored before sharding (a plain load on every rank); the
  optimizer after, through ``set_optimizer_state_dict`` from the full state
  (``load_optimizer_state``), which takes each rank's slice.
* ``sharded``: no gather; each rank writes and reads its own DTensor shards through DCP after
  wrapping (orchestrator/train/checkpoint.py), and DCP reshards on load.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from tips_model.checkpoints import CheckpointError
from tips_model.objectives.base import Objective

if TYPE_CHECKING:
    from orchestrator.config import TipsConfig

__all__ = ["Strategy", "DdpStrategy", "FsdpStrategy", "wrap_for_distributed"]

# Extra forwards of the vision tower that evaluation calls (see orchestrator/eval/).
_VISION_FORWARDS = ("forward_value_only_last", "get_intermediate_layers")


class Strategy:
    """One process, or replicas without a wrapper: gradients are local."""

    name = "none"
    collective_eval = False  # periodic evaluation must run on every rank

    def begin_step(self, seed: int) -> None:
        """Before a step's first micro-batch (the loop has seeded torch's generator)."""

    def end_step(self) -> None:
        """After the optimizer and EMA updates: XLA closes the step's graph here."""

    def perf_metrics(self) -> dict[str, float]:
        """Extra ``perf/*`` metrics for a log row (XLA: graphs compiled)."""
        return {}

    def micro_batch(self, final: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward + backward; ``final`` synchronises grads."""
        return contextlib.nullcontext()

    def finish_grads(self) -> None:
        """After the last micro-batch: synchronise what the wrapper does not."""

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def full_state_dicts(
        self, objective: nn.Module, optimizer: torch.optim.Optimizer, rank: int
    ) -> tuple[dict | None, dict | None]:
        """Unsharded model and optimizer state on rank 0 (None elsewhere); all ranks call."""
        if rank != 0:
            return None, None
        return objective.state_dict(), optimizer.state_dict()

    def load_optimizer_state(
        self, objective: nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        optimizer.load_state_dict(state)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[nn.Module | None]:
        """Around periodic evaluation; yields a student to evaluate instead (XLA: a host
        copy), or None for ``objective.student``."""
        yield None


class DdpStrategy(Strategy):
    """Ray Train's DDP wrapper around the student (outside the module tree)."""

    name = "ddp"

    def __init__(self, objective: Objective) -> None:
        import ray.train.torch

        objective.wrap_student(
            lambda m: ray.train.torch.prepare_model(
                m, move_to_device=False, parallel_strategy="ddp"
            )
        )
        self._ddp = objective._runner[0]

    def micro_batch(self, final: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if final else self._ddp.no_sync()


class FsdpStrategy(Strategy):
    """FSDP2 over a 1-D mesh of all ranks; see the module docstring for the layout."""

    name = "fsdp"
    collective_eval = True

    def __init__(
        self, objective: Objective, mesh: Any, mp_policy: Any = None, reshard: bool = True
    ) -> None:
        from torch.distributed.fsdp import (
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        student = objective.student
        self.student, self.mesh = student, mesh
        self.device = torch.device(mesh.device_type)  # "cuda": the current device
        # FSDP2 shards on dim 0 and refuses 0-d parameters: they stay replicated.
        self.replicated = [p for p in student.parameters() if p.ndim == 0]
        kw = dict(
            mesh=mesh,
            mp_policy=mp_policy or MixedPrecisionPolicy(),
            ignored_params=set(self.replicated),
        )
        names = objective.shard_units()
        for name in names:
            fully_shard(student.get_submodule(name), reshard_after_forward=reshard, **kw)
        fully_shard(student, reshard_after_forward=reshard, **kw)
        teacher_roots = _shard_teacher(objective.teacher, names, kw)
        for module in (student, *teacher_roots):
            module._get_fsdp_state()._lazy_init()  # see the module docstring
        tower = getattr(student, "vision", None)
        for method in _VISION_FORWARDS:
            if tower is not None and hasattr(tower, method):
                register_fsdp_forward_method(tower, method)  # a no-op unless it is a unit

    def micro_batch(self, final: bool) -> contextlib.AbstractContextManager:
        self.student.set_requires_gradient_sync(final)  # FSDP2's no_sync
        return contextlib.nullcontext()

    def finish_grads(self) -> None:
        """Average the gradients of the replicated (0-d) parameters, as DDP would."""
        world = self.mesh.size()
        for p in self.replicated:
            if not p.requires_grad:
                continue
            grad = p.grad if p.grad is not None else torch.zeros_like(p, device=self.device)
            dist.all_reduce(grad, group=self.mesh.get_group())
            p.grad = grad.div_(world)

    @torch.no_grad()
    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` (L2) over sharded and replicated gradients."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
        whole = [g for g in grads if not isinstance(g, DTensor)]
        sq = torch.zeros((), device=self.device)
        if sharded:
            sq = torch.stack(torch._foreach_norm(sharded)).square().sum()
        dist.all_reduce(sq, group=self.mesh.get_group())  # every rank calls, even without grads
        if whole:
            sq = sq + torch.stack(torch._foreach_norm(whole)).square().sum()
        total = sq.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        locals_ = [*sharded, *whole]
        if locals_:
            torch._foreach_mul_(locals_, coef)
        return total

    def full_state_dicts(
        self, objective: nn.Module, optimizer: torch.optim.Optimizer, rank: int
    ) -> tuple[dict | None, dict | None]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(objective, options=options)
        optim = get_optimizer_state_dict(objective, optimizer, options=options)
        if rank != 0:
            return None, None
        return model, names_to_ids(optim)

    def load_optimizer_state(
        self, objective: nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        named = _ids_to_names(state, objective, optimizer)
        set_optimizer_state_dict(
            objective, optimizer, named, options=StateDictOptions(full_state_dict=True)
        )

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Gather the student root's own parameters (e.g. a tower that is not a unit)."""
        self.student.unshard()
        try:
            yield
        finally:
            self.student.reshard()


def _shard_teacher(teacher: nn.Module | None, names: list[str], kw: dict) -> list[nn.Module]:
    """Shard the teacher's submodules named like the student's units; return the outermost."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    if teacher is None:
        return []
    sharded: list[str] = []
    for name in names:
        try:
            module = teacher.get_submodule(name)
        except AttributeError:
            continue
        fully_shard(module, reshard_after_forward=True, **kw)  # a teacher never runs backward
        sharded.append(name)
    loose = [n for n, p in teacher.named_parameters() if p.ndim > 0 and not isinstance(p, DTensor)]
    if loose:
        raise ValueError(
            f"FSDP: teacher parameters {loose[:4]} are in no unit of objective.shard_units(); "
            "the EMA update needs the teacher sharded like the student"
        )
    roots = [n for n in sharded if not any(n.startswith(f"{o}.") for o in sharded if o != n)]
    return [teacher.get_submodule(n) for n in roots]


def names_to_ids(optim: dict) -> dict:
    """DCP's optimizer state (parameter FQNs) -> ``optimizer.state_dict()``'s integer ids."""
    ids: dict[str, int] = {}
    groups = []
    for group in optim["param_groups"]:
        for name in group["params"]:
            ids[name] = len(ids)
        groups.append({**group, "params": [ids[n] for n in group["params"]]})
    return {"state": {ids[n]: v for n, v in optim["state"].items()}, "param_groups": groups}


def _ids_to_names(state: dict, objective: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` ids -> this optimizer's parameter FQNs (ids count in order)."""
    fqn = {id(p): n for n, p in objective.named_parameters()}
    names = [fqn[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if sorted(saved) != list(range(len(names))):
        raise CheckpointError(
            f"optim.pt has {len(saved)} parameters in {len(state['param_groups'])} groups; "
            f"this optimizer has {len(names)} in {len(optimizer.param_groups)}"
        )
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def wrap_for_distributed(
    objective: Objective, cfg: TipsConfig, device: torch.device, world_size: int
) -> Strategy:
    """Wrap or shard ``objective`` for ``cfg.scaling.strategy``; call before the optimizer.

    ``train.mixed_precision=fsdp_params`` always shards with FSDP2 (a world of one gets a
    mesh of one), for its bf16 compute copies; ``scaling.strategy=ddp`` then keeps the
    parameters gathered from forward to backward as DDP's replicas are."""
    fsdp_params = cfg.train.mixed_precision == "fsdp_params"
    distributed = dist.is_available() and dist.is_initialized() and world_size > 1
    if not fsdp_params and (not distributed or cfg.scaling.strategy == "none"):
        return Strategy()
    if not fsdp_params and cfg.scaling.strategy == "ddp":
        return DdpStrategy(objective)
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if fsdp_params and not dist.is_initialized():
        _group_of_one(device, world_size)
    mesh = init_device_mesh(device.type, (world_size,))
    # FSDP2 warns once per tower that the EncoderOutput fields are views; safe here: no code
    # modifies an encoder output in place (the gloo test compares gradients to one process).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    reshard = cfg.scaling.strategy == "fsdp" and world_size > 1  # else nothing to save
    return FsdpStrategy(objective, mesh, mixed_precision_policy(cfg, device), reshard)


def mixed_precision_policy(cfg: TipsConfig, device: torch.device) -> Any:
    """FSDP2's policy: where the loop runs bf16 (CUDA), bf16 parameters in compute (fp32
    master weights stay in the shards the optimizer updates) and fp32 gradient reduction;
    elsewhere (the CPU runs fp32) none. Under bf16 autocast the weights then need no cast:
    autocast returns a tensor already of its dtype as it is, and still runs what it keeps in
    fp32 (softmax, norms, losses) in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and cfg.train.precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _group_of_one(device: torch.device, world_size: int) -> None:
    """The default process group for a single process without one (Ray Train's local
    mode): FSDP2's mesh needs a group, even of one."""
    if world_size != 1:
        raise RuntimeError(
            f"train.mixed_precision=fsdp_params: world size {world_size} without a "
            "torch.distributed process group"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
