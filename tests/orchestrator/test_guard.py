"""The non-finite guard's restore (orchestrator/train/guard.py StepGuard) on its own: the
saved bits come back exactly whatever the update wrote (NaN, infinities, any dtype, strided
tensors, FSDP2 shards on two gloo ranks), a finite update is kept as it is, and the guard's
op count does not grow with the number of tensors (foreach ops over groups, not ops per
tensor). The whole training
step's guard is tested in tests/orchestrator/test_host_syncs.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from orchestrator.train.guard import StepGuard


class Mixed(nn.Module):
    """Parameters and buffers of several widths, one of them strided (not contiguous)."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(4, 3)) for _ in range(n))
        self.short = nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
        self.wide = nn.Parameter(torch.randn(2, 2, dtype=torch.float64))
        self.scalar = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("center", torch.randn(6))
        self.register_buffer("count", torch.arange(3))
        self.register_buffer("seen", torch.tensor([True, False]))
        self.register_buffer("strided", torch.randn(4, 6)[:, ::2])


def _bits(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[bytes]:
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [v for s in optimizer.state.values() for v in s.values()]
    return [t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors]


def _update(module: nn.Module, optimizer: torch.optim.Optimizer, value: float) -> None:
    """What a step's update does: every parameter, buffer and state tensor written."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.copy_(torch.full_like(t, value) if t.is_floating_point() else t + 1)
        for state in optimizer.state.values():
            for v in state.values():
                v.fill_(value)


def _guarded_step(guard: StepGuard, module: nn.Module, opt: torch.optim.Optimizer, loss, value):
    guard.begin_step(module)
    saved = guard.before_update(loss, module, opt)
    _update(module, opt, value)
    guard.keep_if_finite(saved)


def _setup(n: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = Mixed(n)
    opt = torch.optim.AdamW(module.parameters())
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # creates the state (CPU: the step counters are guarded too)
    return module, opt


@pytest.mark.parametrize("written", [float("nan"), float("inf"), -float("inf"), 3.0])
def test_a_non_finite_loss_puts_every_bit_back_whatever_the_update_wrote(written):
    module, opt = _setup()
    guard = StepGuard(torch.device("cpu"))
    before = _bits(module, opt)
    _guarded_step(guard, module, opt, torch.tensor(float("nan")), written)
    assert _bits(module, opt) == before
    assert guard.read() == (1, 1)


def test_a_finite_loss_keeps_the_update_and_the_next_step_saves_it():
    module, opt = _setup()
    guard = StepGuard(torch.device("cpu"))
    _guarded_step(guard, module, opt, torch.tensor(1.0), 2.0)
    assert torch.equal(module.weights[0].detach(), torch.full((4, 3), 2.0))
    assert torch.equal(module.count, torch.arange(1, 4))
    assert torch.equal(module.strided, torch.full((4, 3), 2.0))
    kept = _bits(module, opt)
    _guarded_step(guard, module, opt, torch.tensor(float("inf")), float("nan"))
    assert _bits(module, opt) == kept  # the views made at the first step saw the update
    assert guard.read() == (1, 1)


def _top_level_ops(n: int) -> int:
    module, opt = _setup(n)
    guard = StepGuard(torch.device("cpu"))
    _guarded_step(guard, module, opt, torch.tensor(float("nan")), 1.0)  # makes the views
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        guard.begin_step(module)
        saved = guard.before_update(torch.tensor(float("nan")), module, opt)
        guard.keep_if_finite(saved)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def test_the_guard_launches_the_same_ops_for_4_or_40_tensors():
    few, many = _top_level_ops(1), _top_level_ops(37)
    assert few == many
    module, opt = _setup(37)
    tensors = len(_bits(module, opt))  # 164: 40 parameters, 4 buffers, 120 AdamW states
    assert many < tensors  # a guard per tensor would take 3+ (clone, where, copy_) each


def _fsdp_worker(rank: int, out: str) -> None:
    """On a gloo world of two: FSDP2-sharded parameters (DTensors; the guard works on their
    local shards) and their AdamW state; a NaN step is undone, a finite one kept."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = StepGuard(torch.device("cpu"))

    def step(nan: bool) -> None:
        loss = model(torch.randn(3, 6)).square().mean()
        loss.backward()
        guard.begin_step(model)
        saved = guard.before_update(loss * float("nan") if nan else loss, model, opt, True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        guard.keep_if_finite(saved)

    def local() -> list[torch.Tensor]:
        state = [v for s in opt.state.values() for v in s.values()]
        return [t.to_local().clone() if hasattr(t, "to_local") else t.clone() for t in state] + [
            p.to_local().clone() for p in model.parameters()
        ]

    step(False)  # creates the state
    step(False)
    before = local()
    step(nan=rank == 1)  # one rank's NaN: every rank skips
    after_nan = local()
    step(False)
    torch.save(
        {"same": all(torch.equal(a, b) for a, b in zip(before, after_nan)),
         "moved": not torch.equal(local()[-1], after_nan[-1]), "read": guard.read()},
        f"{out}/rank{rank}.pt",
    )  # fmt: skip


def test_a_non_finite_step_is_undone_on_fsdp_shards_on_every_rank(tmp_path):
    from tests.gloo import run_gloo

    run_gloo(_fsdp_worker, 2, tmp_path, str(tmp_path))
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result == {"same": True, "moved": True, "read": (0, 1)}, rank
