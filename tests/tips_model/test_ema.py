"""EMA teacher: construction, update arithmetic, wrappers, and TIPSv2 head-only EMA."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tips_model.ema import ema_update_, make_teacher
from tips_model.heads import DINOHead


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5))
        self.head = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4)
        self.register_buffer("step_count", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    return _Net()


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_make_teacher_is_a_frozen_eval_copy():
    student = _net()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    assert all(p.requires_grad for p in student.parameters())
    assert student.training
    for (name, t), s in zip(teacher.named_parameters(), student.parameters()):
        torch.testing.assert_close(t, s, msg=name)
        assert t.data_ptr() != s.data_ptr()


def test_teacher_gets_no_gradient():
    student = _net()
    teacher = make_teacher(student)
    x = torch.randn(3, 6)
    (student(x).sum() + teacher(x).sum()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("momentum", [0.0, 0.9, 1.0])
def test_ema_arithmetic(momentum):
    student, teacher = _net(0), make_teacher(_net(1))
    before_t, before_s = _params(teacher), _params(student)
    with torch.no_grad():
        student.step_count.fill_(7.0)
    ema_update_(teacher, student, momentum)
    for name, t in teacher.named_parameters():
        expected = momentum * before_t[name] + (1 - momentum) * before_s[name]
        torch.testing.assert_close(t, expected, msg=name)
    if momentum == 1.0:
        for name, t in teacher.named_parameters():
            assert torch.equal(t, before_t[name])
    torch.testing.assert_close(teacher.step_count, torch.tensor([7.0]))  # buffers copied
    torch.testing.assert_close(_params(student), before_s)  # student untouched


@pytest.fixture
def single_rank_group(tmp_path):
    """A real world-size-1 gloo group, so that DDP can wrap modules on CPU."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ema_matches_wrapped_and_compiled_students(single_rank_group):
    student, teacher = _net(0), make_teacher(_net(1))
    expected = {
        n: 0.5 * t + 0.5 * s
        for (n, t), s in zip(_params(teacher).items(), _params(student).values())
    }
    ema_update_(teacher, DistributedDataParallel(torch.compile(student)), 0.5)
    torch.testing.assert_close(_params(teacher), expected)
    # a wrapper inside the tree (``lin.module.*``) matches the bare teacher too
    nested = nn.ModuleDict({"lin": DistributedDataParallel(nn.Linear(2, 2))})
    bare = make_teacher(nn.ModuleDict({"lin": nn.Linear(2, 2)}))
    ema_update_(bare, nested, 0.0)
    torch.testing.assert_close(bare["lin"].weight, nested["lin"].module.weight)
    # and a teacher made from the wrapped student is the bare module's copy
    wrapped_teacher = make_teacher(DistributedDataParallel(_net(2)))
    assert isinstance(wrapped_teacher, _Net)


def test_ema_rejects_mismatched_names_and_bad_momentum():
    teacher = make_teacher(_net())
    other = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(ValueError, match="parameter names differ.*backbone"):
        ema_update_(teacher, other, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(teacher, _net(), 1.5)


def test_ema_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        ema_update_(make_teacher(nn.Linear(2, 3)), nn.Linear(3, 2), 0.9)


def test_head_only_teacher_shares_backbone_and_emas_heads():
    """TIPSv2 head-only EMA: backbone shared, heads moved by EMA.

    docs/method.md, "Teacher EMA and schedules".
    """
    student = _net()
    teacher = make_teacher(student, shared=("backbone",))
    # 1. the backbone is the student's own: same modules, same storage, still trainable
    assert teacher.backbone is student.backbone
    for t, s in zip(teacher.backbone.parameters(), student.backbone.parameters()):
        assert t.data_ptr() == s.data_ptr() and t.requires_grad
    assert teacher.backbone.training
    # 2. the heads are a frozen copy
    for t, s in zip(teacher.head.parameters(), student.head.parameters()):
        assert t.data_ptr() != s.data_ptr() and not t.requires_grad
    assert not teacher.head.training
    # 3. one optimiser step on the student, then the generic EMA call
    head_before = _params(teacher.head)
    optim = torch.optim.SGD(student.parameters(), lr=0.5)
    student(torch.randn(4, 6)).square().sum().backward()
    optim.step()
    backbone_after_step = _params(student.backbone)
    ema_update_(teacher, student, 0.9)
    for name, t in teacher.backbone.named_parameters():  # follows the student exactly
        assert torch.equal(t, backbone_after_step[name])
    new_head = _params(student.head)
    for name, t in teacher.head.named_parameters():
        expected = 0.9 * head_before[name] + 0.1 * new_head[name]
        torch.testing.assert_close(t, expected, msg=name)
        assert not torch.equal(t, new_head[name])


def test_head_only_ema_on_the_heads_alone():
    student = _net()
    teacher_head = make_teacher(student.head)
    before = _params(teacher_head)
    with torch.no_grad():
        for p in student.head.parameters():
            p.add_(1.0)
    ema_update_(teacher_head, student.head, 0.75)
    for name, t in teacher_head.named_parameters():
        torch.testing.assert_close(t, before[name] + 0.25, msg=name)


def test_make_teacher_rejects_unknown_shared_name():
    with pytest.raises(ValueError, match="trunk"):
        make_teacher(_net(), shared=("trunk",))


def test_a_child_named_module_next_to_others_is_not_a_wrapper():
    student = nn.ModuleDict({"module": nn.Linear(2, 2), "head": nn.Linear(2, 2)})
    teacher = make_teacher(student)
    assert set(dict(teacher.named_children())) == {"module", "head"}
    ema_update_(teacher, student, 0.0)
    torch.testing.assert_close(teacher["head"].weight, student["head"].weight)
