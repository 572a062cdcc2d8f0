"""orchestrator.train.adafactor.Adafactor on whole parameters: torch's update, no host syncs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from orchestrator.train import adafactor
from orchestrator.train.adafactor import Adafactor


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.fc = nn.Linear(6, 5)  # 2-D weight (factored) and 1-D bias
    m.fc2 = nn.Linear(6, 5)  # a second parameter of each of fc's shapes
    m.conv = nn.Conv2d(2, 3, 3)  # 4-D weight: factored over the last two dims
    m.scale = nn.Parameter(torch.randn(7))
    m.unused = nn.Parameter(torch.randn(4, 4))  # never gets a gradient
    return m


def _loss(m: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, img = torch.randn(8, 6, generator=g), torch.randn(2, 2, 5, 5, generator=g)
    loss = m.fc(x).square().mean() + m.fc2(x).sin().mean() + m.conv(img).tanh().mean()
    return (loss + (m.scale**3).sum()) * 3.0


def _groups(m: nn.Module) -> list[dict]:
    decay = [m.fc.weight, m.fc2.weight, m.conv.weight, m.unused]
    return [
        {"params": decay, "weight_decay": 0.1},
        {"params": [m.fc.bias, m.fc2.bias, m.conv.bias, m.scale], "weight_decay": 0.0},
    ]


def _run(opt_cls, steps: int = 6, **kw) -> tuple[nn.Module, torch.optim.Optimizer]:
    m = _model()
    opt = opt_cls(_groups(m), lr=3e-2, **kw)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-2 / (1 + i)  # the loop's schedule sets lr every step
        opt.zero_grad(set_to_none=True)
        _loss(m, i).backward()
        opt.step()
    return m, opt


@pytest.mark.parametrize("foreach", [False, True])
def test_update_equals_torch_adafactor(foreach):
    ours, ours_opt = _run(Adafactor)
    ref, ref_opt = _run(torch.optim.Adafactor, foreach=foreach)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(ours.fc.weight, _model().fc.weight)  # it did train
    torch.testing.assert_close(ours.unused, _model().unused)  # no gradient, no update
    a_sd, b_sd = ours_opt.state_dict(), ref_opt.state_dict()

    def drop_foreach(groups):
        return [{k: v for k, v in g.items() if k != "foreach"} for g in groups]

    assert drop_foreach(a_sd["param_groups"]) == drop_foreach(b_sd["param_groups"])
    for i, st in b_sd["state"].items():
        assert a_sd["state"][i].keys() == st.keys()
        for k, v in st.items():
            torch.testing.assert_close(a_sd["state"][i][k], v, rtol=1e-6, atol=1e-9)


def test_state_moves_between_torch_and_ours():
    """A checkpoint taken with torch's Adafactor resumes with ours and gives torch's result."""
    full, _ = _run(torch.optim.Adafactor, steps=6)
    m, opt = _run(torch.optim.Adafactor, steps=3)
    resumed = Adafactor(_groups(m), lr=1.0)
    resumed.load_state_dict(opt.state_dict())
    for i in range(3, 6):
        for group in resumed.param_groups:
            group["lr"] = 3e-2 / (1 + i)
        resumed.zero_grad(set_to_none=True)
        _loss(m, i).backward()
        resumed.step()
    for a, b in zip(m.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _top_level_ops(opt: torch.optim.Optimizer, m: nn.Module, loss_fn) -> int:
    """Top-level ``aten::`` ops of one step (each is one kernel launch or more on a GPU)."""
    loss_fn(m, 0).backward()
    opt.step()  # state initialised outside the profile
    loss_fn(m, 1).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not _in_aten(e))


def _in_aten(event) -> bool:
    """Whether a profiler event runs inside another ``aten::`` op (not launched by Python)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def test_step_reads_nothing_back_to_the_host():
    """torch's step reads two norms per parameter back to the host (a GPU sync each); ours
    reads none (the CPU step counters are listed in one go, no tensor read per parameter)."""
    counts = {}
    for name, cls in (("ours", Adafactor), ("torch", torch.optim.Adafactor)):
        m = _model()
        opt = cls(_groups(m), lr=1e-2)
        _loss(m, 0).backward()
        opt.step()  # state initialised outside the profile
        _loss(m, 1).backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        counts[name] = sum(
            e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense"
        )
    n_with_grad = 7  # all but ``unused``, which has no gradient
    assert counts["ours"] == 0
    assert counts["torch"] >= 3 * n_with_grad


def _stack_of_layers(n: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(n)])


def _stack_loss(m: nn.Module, seed: int) -> torch.Tensor:
    return m(torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))).square().mean()


def test_kernels_per_step_do_not_grow_with_same_shape_parameters():
    """Same-shape parameters are updated together: 2 or 16 layers launch the same number
    of ops, where torch's single-tensor step launches more per layer."""
    ops = {}
    for n in (2, 16):
        for name, cls, kw in (
            ("ours", Adafactor, {}),
            ("torch", torch.optim.Adafactor, {"foreach": False}),
        ):
            m = _stack_of_layers(n)
            ops[name, n] = _top_level_ops(cls(m.parameters(), lr=1e-2, **kw), m, _stack_loss)
    assert ops["ours", 2] == ops["ours", 16]
    assert ops["torch", 16] - ops["torch", 2] >= 14 * 2 * 10  # >= 10 ops per extra tensor
    assert ops["ours", 16] * 5 < ops["torch", 16]


def test_buckets_split_by_size_give_the_same_update(monkeypatch):
    """Bucketing bounds the temporaries; how parameters are bucketed changes no update."""
    whole, _ = _run(Adafactor)
    monkeypatch.setattr(adafactor, "_BUCKET_NUMEL", 30)  # fc.weight alone fills a bucket
    split, _ = _run(Adafactor)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
