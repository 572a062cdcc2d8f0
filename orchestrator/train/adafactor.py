"""Adafactor that gives FSDP-sharded parameters the same update as whole ones.

    opt = Adafactor(param_groups, lr=5e-4)    # a drop-in torch.optim.Adafactor

Without DTensor parameters (one process, DDP) ``step`` computes torch's update
(``torch/optim/_adafactor.py``, the same state keys and shapes) without reading anything
back to the host: torch's step calls ``.item()`` on two norms per parameter, ~600 host syncs
per ViT-B/14 TIPS step that left the GPU idle for 28 % of the step on an H200 (README,
"GPU step"). Here the norms, relative step sizes and update clipping stay on the device
(computed in float64, as torch's Python floats are) and only the step counters, which torch
keeps on the CPU, are read (all at once, from the CPU).

That step is also grouped, so that it is not launch-bound (issue 22, item 5): parameters of
one shape are stacked and their factored second moments, update and clipping computed on
the stack (``_factored``), vectors and scalars go through ``torch._foreach_*`` ops
(``_unfactored``), and the norms, scales and the final update are one foreach op each. A
step then launches ~20 ops per distinct shape instead of ~12 per parameter (ViT-B/14 TIPS:
308 tensors, 14 shapes; README, "Performance"). The same path serves FSDP2 on a mesh of one
(``train.mixed_precision=fsdp_params`` on one GPU), whose local shards are whole tensors.

With FSDP2 over several ranks (``fully_shard``: parameters and gradients are DTensors
sharded on dim 0 over a 1-D mesh) torch's step cannot run: its in-place ops on the norms of sharded
tensors raise, and factoring each rank's local shard instead would give other second
moments than the whole matrix. This step follows torch's single-tensor algorithm
(``torch/optim/_adafactor.py``; Shazeer & Stern 2018 with torch's defaults) on the local
shards and sums over all shards exactly what needs the whole tensor:

* the parameter RMS (relative step size) and the update RMS (update clipping, ``d``);
* for a 2-D parameter (its rows split over ranks): the column means of g^2 and the mean of
  the row factor. Row factors are local. Parameters with 3+ dims are split on dim 0, outside
  the two factored dims, so both their factors are local.

That is two all-reduces of one flat buffer each per step, and, as above, no host sync;
this sharded step still runs per parameter (one step counter read each).
The state keeps torch's keys and whole-tensor shapes: ``row_var`` split like the
parameter's rows, ``col_var`` replicated for 2-D parameters (split on dim 0 otherwise),
``variance`` split like the parameter. DCP's
``get_optimizer_state_dict(full_state_dict=True)`` gathers them into torch's unsharded
layout, so one checkpoint moves between FSDP, DDP and a single process. The TIPS recipes
use Adafactor (docs/method.md, "Optimizer and schedule").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Adafactor"]


def _dtensor_cls() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _local(x: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place ops reach the DTensor), else ``x``."""
    cls = _dtensor_cls()
    return x.to_local() if cls is not None and isinstance(x, cls) else x


@dataclass
class _Item:
    """One parameter during a sharded step: local views and whole-tensor sizes."""

    param: Tensor
    grad: Tensor
    state: dict[str, Any]
    group: dict[str, Any]
    shape: tuple[int, ...]
    numel: int
    sharded: bool
    scratch: dict[str, Any] = field(default_factory=dict)  # floats and 0-d device tensors

    @property
    def split_rows(self) -> bool:
        return self.sharded and len(self.shape) == 2


class Adafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` whose step is also correct for FSDP2-sharded parameters."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        cls = _dtensor_cls()
        live = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        dtensors = [p for p, _ in live if cls is not None and isinstance(p, cls)]
        whole = all(p.device_mesh.size() == 1 for p in dtensors)  # a mesh of one: shard = all
        if whole and closure is None and _device_step_ok(self.param_groups, self.state):
            self._device_step()
            return None
        if not dtensors:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = [self._item(p, g) for p, g in live]
        pg = _mesh_group(p for p, _ in live)
        sharded = [it.sharded for it in items]
        # 1. step counters and row factors (local); the sums that need every shard
        totals = _sum_over_shards([self._begin(it) for it in items], sharded, pg)
        # 2. weight decay, second-moment estimates and the raw updates
        updates = [self._update(it, total) for it, total in zip(items, totals)]
        # 3. update RMS over every shard, clipped to d, applied
        sq = [u.float().square().sum().reshape(1) for u in updates]
        for it, u, usq in zip(items, updates, _sum_over_shards(sq, sharded, pg)):
            # on the device, in float64 like torch's Python floats: no host sync per parameter
            rms_u = usq.double().sqrt().reshape(()) / (math.sqrt(it.numel) * it.group["d"])
            scale = it.scratch["alpha"] / rms_u.clamp_(min=1.0)
            it.param.add_(u * scale.neg_().to(u.dtype))
        return loss

    def _device_step(self) -> None:
        """torch's Adafactor step for whole parameters, grouped: no host sync, and a number
        of kernels per step that grows with the distinct parameter shapes, not the count."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, d, wd = float(group["lr"]), group["d"], group["weight_decay"]
            eps1, eps2 = group["eps"]
            cls = _dtensor_cls()
            states = [
                _init_state(self.state[p], p, cls is not None and isinstance(p, cls))
                for p in params
            ]
            counters = [st["step"] for st in states]
            torch._foreach_add_(counters, 1.0)  # CPU tensors, as torch keeps them: no sync
            steps = torch.stack(counters).tolist()
            local = [_local(p) for p in params]  # a mesh of one: the shard is the whole
            grads = [_local(p.grad) for p in params]
            p_norms = torch._foreach_norm(local)  # before weight decay, as torch
            if wd != 0:
                torch._foreach_mul_(local, 1 - lr * wd)
            e1 = eps1 if eps1 is not None else torch.finfo(local[0].dtype).eps
            updates: list[Tensor] = [grads[0]] * len(local)  # every slot is filled below
            for idx, factored in _buckets(grads, steps):
                omb = steps[idx[0]] ** group["beta2_decay"]  # 1 - beta2_t
                sub = [states[i] for i in idx]
                g = [grads[i] for i in idx]
                new = _factored(g, sub, omb, e1) if factored else _unfactored(g, sub, omb, e1)
                for i, u in zip(idx, new):
                    updates[i] = u
            u_norms = torch._foreach_norm(updates)
            dev = local[0].device
            sqrt_n = torch.tensor([p.numel() ** 0.5 for p in params], dtype=torch.float64)
            rho = torch.tensor([min(lr, 1 / s**0.5) for s in steps], dtype=torch.float64)
            sqrt_n, rho = sqrt_n.to(dev, non_blocking=True), rho.to(dev, non_blocking=True)
            alpha = (torch.stack(p_norms).double() / sqrt_n).clamp_(min=eps2) * rho
            denom = (torch.stack(u_norms).double() / (sqrt_n * d)).clamp_(min=1.0)
            scale = (alpha / denom).neg_().to(updates[0].dtype)
            torch._foreach_mul_(updates, list(scale.unbind(0)))
            torch._foreach_add_(local, updates)

    def _item(self, p: Tensor, group: dict[str, Any]) -> _Item:
        if group["maximize"] or torch.is_complex(p):
            raise NotImplementedError("Adafactor on sharded parameters: no maximize, no complex")
        cls = _dtensor_cls()
        sharded = cls is not None and isinstance(p, cls)
        state = _init_state(self.state[p], p, sharded)
        item = _Item(_local(p), _local(p.grad), state, group, tuple(p.shape), p.numel(), sharded)
        if sharded and len(item.shape) > 1:  # the factors split exactly like the parameter
            assert _local(state["row_var"]).shape[0] == item.param.shape[0]
        return item

    @staticmethod
    def _begin(it: _Item) -> Tensor:
        """Count the step, update the row factor; return [sum p^2, (col sums g^2, sum row)]."""
        g, st = it.group, it.state
        st["step"] += 1
        s = st["step"].item()
        it.scratch["omb"] = s ** g["beta2_decay"]  # 1 - beta2_t
        it.scratch["rho"] = min(float(g["lr"]), 1 / s**0.5)
        sums = [it.param.float().square().sum().reshape(1)]  # before weight decay, as torch
        if len(it.shape) > 1:
            row_var = _local(st["row_var"])
            row_mean = torch.linalg.vector_norm(it.grad, dim=-1, keepdim=True).square_()
            row_var.lerp_(row_mean.div_(it.shape[-1]), it.scratch["omb"])
            if it.split_rows:
                sums.append(it.grad.float().square().sum(dim=0))  # [C] over the local rows
                sums.append(row_var.float().sum().reshape(1))
        return torch.cat(sums)

    @staticmethod
    def _update(it: _Item, total: Tensor) -> Tensor:
        """torch's update direction, with whole-tensor sums from ``total``."""
        g, st, omb = it.group, it.state, it.scratch["omb"]
        eps1, eps2 = g["eps"]
        if eps1 is None:
            eps1 = torch.finfo(it.param.dtype).eps
        rms = total[0].double().sqrt() / math.sqrt(it.numel)  # a device tensor: no sync
        it.scratch["alpha"] = rms.clamp_(min=eps2) * it.scratch["rho"]
        if g["weight_decay"] != 0:
            it.param.mul_(1 - float(g["lr"]) * g["weight_decay"])
        if len(it.shape) > 1:
            row_var, col_var = _local(st["row_var"]), _local(st["col_var"])
            rows, cols = it.shape[-2], it.shape[-1]
            if it.split_rows:
                col_mean = total[1 : 1 + cols].reshape(1, cols) / rows
                row_var_mean = total[1 + cols] / rows
            else:
                col_mean = torch.linalg.vector_norm(it.grad, dim=-2, keepdim=True).square_()
                col_mean = col_mean.div_(rows)
                row_var_mean = row_var.mean(dim=-2, keepdim=True)
            col_var.lerp_(col_mean.to(col_var.dtype), omb)
            var_estimate = row_var @ col_var
            var_estimate.div_(row_var_mean.to(var_estimate.dtype).clamp(min=eps1))
        else:
            variance = _local(st["variance"])
            variance.lerp_(it.grad * it.grad, omb)
            var_estimate = variance.clone()
        return var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(it.grad)


# Upper bound on the elements of one stacked bucket of same-shape gradients: the stack and
# the variance estimate are its temporaries (2 x 256 MiB in fp32). Our choice: above it the
# launch count is already small (ViT-g's largest shape, 40 x 1536 x 4096 SwiGLU halves,
# makes 4 buckets).
_BUCKET_NUMEL = 1 << 26


def _buckets(grads: list[Tensor], steps: list[float]) -> list[tuple[list[int], bool]]:
    """Indices of parameters updated together, with whether they are factored (2+ dims):
    factored ones by (shape, step), in chunks of at most ``_BUCKET_NUMEL`` elements; the
    rest (vectors, scalars) by step, one bucket each."""
    keys: dict[tuple, list[int]] = {}
    for i, (g, s) in enumerate(zip(grads, steps)):
        keys.setdefault((g.dim() > 1, tuple(g.shape) if g.dim() > 1 else (), s), []).append(i)
    out = []
    for (factored, shape, _), idx in keys.items():
        per = max(1, _BUCKET_NUMEL // max(1, math.prod(shape))) if factored else len(idx)
        out.extend((idx[j : j + per], factored) for j in range(0, len(idx), per))
    return out


def _factored(
    grads: list[Tensor], states: list[dict[str, Any]], omb: float, eps1: float
) -> list[Tensor]:
    """Updates of same-shape 2+-D parameters, computed on their stack: torch's row and
    column factors (written back into each state) and ``g / sqrt(row x col / mean(row))``."""
    g = _stack(grads)  # [k, ..., R, C]
    rows, cols = g.shape[-2], g.shape[-1]
    row_vars = [_local(st["row_var"]) for st in states]
    col_vars = [_local(st["col_var"]) for st in states]
    row_var, col_var = _stack(row_vars), _stack(col_vars)
    row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_()
    row_var.lerp_(row_mean.div_(cols), omb)
    col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True).square_()
    col_var.lerp_(col_mean.div_(rows), omb)
    if len(states) > 1:  # a stack is a copy: the factors go back into the state
        torch._foreach_copy_(row_vars, list(row_var.unbind(0)))
        torch._foreach_copy_(col_vars, list(col_var.unbind(0)))
    var = row_var @ col_var
    var.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    return list(var.clamp_(min=eps1 * eps1).rsqrt_().mul_(g).unbind(0))


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack``, or for one tensor a view of it (no copy; in-place ops reach it)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _unfactored(
    grads: list[Tensor], states: list[dict[str, Any]], omb: float, eps1: float
) -> list[Tensor]:
    """Updates of vectors and scalars with torch's full second moment, as foreach ops."""
    variance = [_local(st["variance"]) for st in states]
    torch._foreach_lerp_(variance, torch._foreach_mul(grads, grads), omb)
    var = torch._foreach_clamp_min(variance, eps1 * eps1)
    torch._foreach_rsqrt_(var)
    torch._foreach_mul_(var, grads)
    return var


def _device_step_ok(groups: list[dict[str, Any]], state: Any) -> bool:
    """Whether ``_device_step`` covers every parameter: real dense tensors of one device and
    dtype, no ``maximize``, CPU step counters (torch's layout; a device counter would sync)."""
    devices, dtypes = set(), set()
    for g in groups:
        for p in g["params"]:
            if p.grad is None:
                continue
            if g["maximize"] or torch.is_complex(p) or p.grad.is_sparse:
                return False
            st = state.get(p)
            if st and not st["step"].is_cpu:
                return False
            devices.add(p.device)
            dtypes.add(p.dtype)
    return len(devices) <= 1 and len(dtypes) <= 1


def _mesh_group(params: Iterable[Tensor]) -> Any:
    """The process group of the one 1-D mesh every sharded parameter is split (dim 0) over."""
    from torch.distributed.tensor import Shard

    cls = _dtensor_cls()
    meshes = []
    for p in params:
        if not isinstance(p, cls):
            continue
        placement = p.placements[0]
        if p.device_mesh.ndim != 1 or not isinstance(placement, Shard) or placement.dim != 0:
            raise NotImplementedError(
                f"Adafactor: parameters must be sharded on dim 0 over a 1-D mesh, got "
                f"{p.placements} on a {p.device_mesh.ndim}-D mesh"
            )
        if not any(p.device_mesh == m for m in meshes):
            meshes.append(p.device_mesh)
    if len(meshes) != 1:
        raise NotImplementedError("Adafactor: every sharded parameter must use one mesh")
    return meshes[0].get_group()


def _step_dtype() -> torch.dtype:
    """The step counter's dtype, as torch's optimizers pick it (the private
    ``torch.optim.optimizer._get_scalar_dtype()`` of torch 2.14): float64 when that is the
    default dtype, else float32, so the state matches ``torch.optim.Adafactor``'s
    (tests/test_ray_compat.py compares the two)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _init_state(state: dict[str, Any], p: Tensor, sharded: bool) -> dict[str, Any]:
    """Fill an empty state with torch's initial one (a CPU step counter); return it."""
    if not state:
        state["step"] = torch.tensor(0.0, dtype=_step_dtype())
        state.update(_zero_state(p, sharded))
    return state


def _zero_state(p: Tensor, sharded: bool) -> dict[str, Tensor]:
    """torch's initial state; for a DTensor, DTensors laid out like its dim-0 split."""
    shape = list(p.shape)
    if not sharded:
        grad = p.grad
        if p.ndim > 1:
            return {
                "row_var": grad.new_zeros([*shape[:-1], 1]),
                "col_var": grad.new_zeros([*shape[:-2], 1, shape[-1]]),
            }
        return {"variance": torch.zeros_like(grad, memory_format=torch.preserve_format)}
    from torch.distributed.tensor import Replicate, Shard, zeros

    kw = dict(device_mesh=p.device_mesh, dtype=p.grad.dtype)
    if p.ndim > 1:
        col_placement = Replicate() if p.ndim == 2 else Shard(0)
        return {
            "row_var": zeros([*shape[:-1], 1], placements=[Shard(0)], **kw),
            "col_var": zeros([*shape[:-2], 1, shape[-1]], placements=[col_placement], **kw),
        }
    return {"variance": zeros(shape, placements=[Shard(0)], **kw)}


def _sum_over_shards(values: list[Tensor], sharded: list[bool], pg: Any) -> list[Tensor]:
    """Sum the sharded items' values over ranks in one all-reduce; replicated ones stay."""
    idx = [i for i, s in enumerate(sharded) if s]
    if not idx:
        return values
    flat = torch.cat([values[i].float() for i in idx])
    dist.all_reduce(flat, group=pg)
    out = list(values)
    for i, v in zip(idx, flat.split([values[i].numel() for i in idx])):
        out[i] = v
    return out
