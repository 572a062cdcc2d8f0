"""DINOHead: shapes, init, L2 normalisation before the weight-normalised last layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tips_model.heads import DINOHead


def _head(**kwargs) -> DINOHead:
    torch.manual_seed(0)
    defaults = dict(in_dim=16, out_dim=32, hidden_dim=64, bottleneck_dim=8, nlayers=3)
    return DINOHead(**{**defaults, **kwargs})


@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16)])
def test_output_shape_for_cls_and_patch_tokens(shape):
    head = _head()
    out = head(torch.randn(*shape))
    assert out.shape == (*shape[:-1], 32)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("nlayers, num_linear", [(1, 1), (2, 2), (3, 3), (4, 4)])
def test_mlp_depth_and_widths(nlayers, num_linear):
    head = _head(nlayers=nlayers)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == num_linear
    assert linears[0].in_features == 16
    assert linears[-1].out_features == 8
    assert all(isinstance(m, torch.nn.GELU) for m in head.mlp if not isinstance(m, torch.nn.Linear))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())


def test_trunc_normal_init_and_zero_bias():
    head = _head(in_dim=256, hidden_dim=512)
    weight = head.mlp[0].weight
    torch.testing.assert_close(weight.std().item(), 0.02, atol=1e-3, rtol=0)
    assert weight.abs().max() <= 2.0  # trunc_normal_ bounds
    for module in head.mlp:
        if isinstance(module, torch.nn.Linear):
            assert torch.count_nonzero(module.bias) == 0


def test_weight_norm_magnitude_is_one_and_trainable():
    head = _head()
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (32, 1)
    torch.testing.assert_close(g, torch.ones(32, 1))
    assert g.requires_grad
    # every effective prototype row has unit norm, so each logit is a cosine in [-1, 1]
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))
    assert head.last_layer.bias is None
    assert head(torch.randn(50, 16)).abs().max() <= 1.0 + 1e-6


def test_bottleneck_is_l2_normalised_before_last_layer():
    head = _head()
    x = torch.randn(4, 16)
    expected = head.last_layer(F.normalize(head.mlp(x), dim=-1))
    torch.testing.assert_close(head(x), expected)
    # scaling the bottleneck output (last MLP layer) must not change the logits
    out = head(x)
    with torch.no_grad():
        head.mlp[-1].weight.mul_(7.0)
        head.mlp[-1].bias.mul_(7.0)
    torch.testing.assert_close(head(x), out)


def test_gradients_reach_magnitude_and_direction():
    head = _head()
    head(torch.randn(3, 16)).square().sum().backward()
    params = head.last_layer.parametrizations.weight
    assert params.original0.grad is not None and params.original1.grad is not None


def test_bf16_autocast_is_finite_and_close():
    head = _head()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), head(x), atol=0.03, rtol=0)
