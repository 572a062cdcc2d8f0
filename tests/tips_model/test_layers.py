"""The shared transformer layers (tips_model/layers.py): one attention for every tower."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tips_model.layers import Attention, Block
from tips_model.objectives.base import ModelConfig, Objective, build_towers


def _names(m: nn.Module) -> list[str]:
    return list(m.state_dict())


def test_each_layout_keeps_its_parameter_names():
    assert _names(Attention(8, 2, "qkv")) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    assert _names(Attention(8, 2, "in_proj")) == [
        "in_proj_weight",
        "in_proj_bias",
        "out_proj.weight",
        "out_proj.bias",
    ]
    assert _names(Attention(8, 2, "q_kv", context_dim=6)) == [
        "q.weight",
        "q.bias",
        "kv.weight",
        "kv.bias",
        "proj.weight",
        "proj.bias",
    ]
    with pytest.raises(ValueError, match="layout"):
        Attention(8, 2, "fused")
    with pytest.raises(ValueError, match="divisible"):
        Attention(9, 2)


def test_layouts_compute_the_same_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    fused = Attention(8, 2, "qkv").eval()
    mha = Attention(8, 2, "in_proj").eval()
    split = Attention(8, 2, "q_kv").eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(fused.qkv.weight)
        mha.in_proj_bias.copy_(fused.qkv.bias)
        mha.out_proj.load_state_dict(fused.proj.state_dict())
        split.q.weight.copy_(fused.qkv.weight[:8])
        split.q.bias.copy_(fused.qkv.bias[:8])
        split.kv.weight.copy_(fused.qkv.weight[8:])
        split.kv.bias.copy_(fused.qkv.bias[8:])
        split.proj.load_state_dict(fused.proj.state_dict())
    assert torch.equal(fused(x), mha(x))
    torch.testing.assert_close(split(x), fused(x))
    # nn.MultiheadAttention reads the same names the same way
    ref = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ref.load_state_dict(mha.state_dict())
    torch.testing.assert_close(mha(x), ref(x, x, x, need_weights=False)[0])


def test_value_only_is_the_projected_values():
    torch.manual_seed(0)
    attn = Attention(8, 2, "qkv").eval()
    x = torch.randn(2, 5, 8)
    v = F.linear(x, attn.qkv.weight[16:], attn.qkv.bias[16:])
    torch.testing.assert_close(attn(x, value_only=True), attn.proj(v))


def _backward_nodes(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("layout", ["qkv", "in_proj"])
def test_qkv_gradients_are_not_stacked_activation_sized(layout):
    """q, k, v come from views of the one fused weight: backward splits the weight's
    gradient (weight-sized), never unbinds one projected output (which stacks the q/k/v
    gradients and copies them back, activation-sized); the gradients are the fused ones."""
    torch.manual_seed(0)
    attn = Attention(16, 2, layout)
    weight, bias = (
        (attn.qkv.weight, attn.qkv.bias)
        if layout == "qkv"
        else (attn.in_proj_weight, attn.in_proj_bias)
    )
    with torch.no_grad():
        weight.normal_(std=0.3)
        bias.normal_(std=0.1)
    x = torch.randn(3, 7, 16, requires_grad=True)
    out = attn(x)
    nodes = _backward_nodes(out)
    assert "UnbindBackward0" not in nodes and "StackBackward0" not in nodes
    assert "SplitBackward0" in nodes  # the weight (and bias) split into q, k, v rows
    grads = torch.autograd.grad(out.square().sum(), [x, weight, bias])
    # the fused computation: one projection unbound into q, k, v
    qkv = F.linear(x, weight, bias).reshape(3, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(3, 7, 16)
    proj = attn.proj if layout == "qkv" else attn.out_proj
    ref_grads = torch.autograd.grad(proj(ref).square().sum(), [x, weight, bias])
    torch.testing.assert_close(grads, ref_grads)


def test_key_padding_mask_and_context():
    torch.manual_seed(0)
    attn = Attention(8, 2, "in_proj").eval()
    nn.init.normal_(attn.in_proj_weight, std=0.5)  # the text tower's init is not run here
    x = torch.randn(1, 4, 8)
    keep = torch.tensor([True, True, False, False])[None, None, None, :]
    # masked keys do not matter: changing them leaves the output of real positions alone
    y = x.clone()
    y[:, 2:] = torch.randn(1, 2, 8)
    torch.testing.assert_close(attn(x, attn_mask=keep)[:, :2], attn(y, attn_mask=keep)[:, :2])
    with pytest.raises(ValueError, match="self-attention only"):
        attn(x, context=torch.randn(1, 3, 8))
    cross = Block(8, 2, 16, attn_layout="q_kv", cross_attention=True, context_dim=6)
    assert cross(x, context=torch.randn(1, 3, 6)).shape == x.shape
    with pytest.raises(ValueError, match="context"):
        cross(x)


class _Doubler(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.inner(x)


def test_objective_runs_the_student_through_its_wrapper():
    obj = Objective()
    obj.student = nn.Identity()
    x = torch.ones(3)
    assert torch.equal(obj.run_student(x), x)  # before wrap_student: the bare student
    obj.wrap_student(_Doubler)
    assert torch.equal(obj.run_student(x), 2 * x)
    assert isinstance(obj._runner[0], _Doubler)
    assert "_runner" not in dict(obj.named_modules())  # not a registered submodule
    assert [n for n, _ in obj.named_children()] == ["student"]


def test_build_towers_checks_the_width_and_checkpoints_both():
    cfg = ModelConfig(vision="vit_test", text="text_test", max_text_len=8, grad_checkpointing=True)
    vision, text = build_towers(cfg, vocab_size=50, why_same_width="because")
    assert vision.grad_checkpointing and text.grad_checkpointing
    assert text.max_len == 8 and text.vocab_size == 50
    with pytest.raises(ValueError, match="has width 384 .* has 32: because"):
        build_towers(ModelConfig(vision="vit_test", text="text_s"), 50, "because")
