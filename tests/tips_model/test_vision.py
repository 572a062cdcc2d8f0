"""Vision encoder: layout, token order, masks, pos-emb resizing, checkpointing, dense helpers."""

from __future__ import annotations

import pytest
import torch

from tests.tips_model import reference as ref
from tips_model.registry import VISION
from tips_model.vision import EncoderOutput, VisionTransformer, build_vision

TOL = dict(atol=1e-5, rtol=1e-5)


def _model(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return build_vision("vit_test", **kw).eval()


def _images(b=2, h=32, w=32, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _randomise(model: VisionTransformer, seed: int = 1) -> None:
    """Make every parameter non-trivial (LayerNorms, gammas, mask token included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _as_reference(model: VisionTransformer) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_registry_and_factories():
    assert {"vit_s14", "vit_b14", "vit_l14", "vit_so400m14", "vit_g14", "vit_test"} <= set(
        VISION.names()
    )
    m = build_vision("vit_test")
    assert (m.embed_dim, m.patch_size, len(m.blocks), m.grid_size) == (32, 8, 2, 4)
    assert build_vision("vit_test", depth=1, img_size=48).grid_size == 6
    with pytest.raises(KeyError, match="vit_nope"):
        build_vision("vit_nope")
    with torch.device("meta"):  # shape-only builds are cheap (used by config validation)
        assert build_vision("vit_g14").patch_size == 14


@pytest.mark.parametrize(
    "name,millions",
    # docs/method.md, "Vision encoder" [ran]: the PyTorch model at img_size=448 (LayerScale,
    # mask token, CLS slot)
    [
        ("vit_s14", 21.92),
        ("vit_b14", 86.32),
        ("vit_l14", 304.02),
        ("vit_so400m14", 413.39),
        ("vit_g14", 1135.95),
    ],
)
def test_parameter_counts_match_released_pytorch_models(name, millions):
    with torch.device("meta"):
        m = build_vision(name, img_size=448, layerscale_init=1.0)
    assert sum(p.numel() for p in m.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)


def test_parameter_names_follow_released_layout():
    names = set(_model(layerscale_init=1.0).state_dict())
    expected = set(ref.vision_shapes(32, 2, 64, 4, swiglu=False, patch=8))
    assert names == expected
    plain = set(_model().state_dict())  # training default: no LayerScale parameters at all
    assert plain == {k for k in expected if ".ls" not in k}
    g = build_vision("vit_test", ffn="swiglu", mlp_hidden_dim=96)
    assert g.state_dict()["blocks.0.mlp.w12.weight"].shape == (2 * 64, 32)  # (int(64)+7)//8*8


def test_output_shapes_and_token_order():
    m = _model(layerscale_init=1.0)
    _randomise(m)
    images = _images(h=32, w=48)
    out = m(images)
    assert isinstance(out, EncoderOutput)
    assert out.cls_alt.shape == (2, 32) and out.cls_syn.shape == (2, 32)
    assert out.patch_tokens.shape == (2, 4 * 6, 32)
    want = ref.reference_vision(_as_reference(m), images, heads=2)
    torch.testing.assert_close(out.cls_alt, want["x_norm_1st_clstoken"][:, 0], **TOL)
    torch.testing.assert_close(out.cls_syn, want["x_norm_2nd_clstoken"][:, 0], **TOL)
    torch.testing.assert_close(out.patch_tokens, want["x_norm_patchtokens"], **TOL)


def test_image_size_must_be_divisible_by_patch():
    with pytest.raises(ValueError, match="33x32 is not divisible by the patch size 8"):
        _model()(torch.rand(1, 3, 33, 32))


def test_pos_embed_used_as_stored_at_native_grid_and_resized_otherwise():
    m = _model()
    pos = m._pos_embed(4, 4, torch.float32)
    assert torch.equal(pos, m.pos_embed)
    resized = m._pos_embed(2, 3, torch.float32)
    assert resized.shape == (1, 1 + 6, 32)
    assert torch.equal(resized[:, 0], m.pos_embed[:, 0])  # CLS slot never resized
    # square but different grid, and a non-square grid with the same token count (2x8 = 16)
    assert not torch.equal(m._pos_embed(2, 8, torch.float32)[:, 1:], m.pos_embed[:, 1:])


def test_masked_patches_use_mask_token():
    m = _model(layerscale_init=1.0)
    _randomise(m)
    images = _images()
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1, 2] = masks[1, 3, 0] = True
    want = ref.reference_vision(_as_reference(m), images, heads=2, masks=masks)
    out = m(images, masks=masks)
    torch.testing.assert_close(out.patch_tokens, want["x_norm_patchtokens"], **TOL)
    torch.testing.assert_close(m(images, masks=masks.flatten(1)).cls_alt, out.cls_alt)
    # fully masked: the output no longer depends on the pixels
    full = torch.ones(2, 16, dtype=torch.bool)
    a, b = m(images, masks=full), m(_images(seed=5), masks=full)
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens)
    assert not torch.allclose(m(images).patch_tokens, a.patch_tokens)
    with pytest.raises(ValueError, match="masks must flatten"):
        m(images, masks=torch.zeros(2, 3, 3, dtype=torch.bool))


def test_grad_checkpointing_same_outputs_and_gradients():
    images = _images()
    masks = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) > 0.6
    results = []
    for ckpt in (False, True):
        m = _model(layerscale_init=1.0).train()
        m.set_grad_checkpointing(ckpt)
        out = m(images, masks=masks)
        loss = out.cls_alt.square().sum() + out.cls_syn.sum() + out.patch_tokens.pow(3).mean()
        loss.backward()
        results.append((out, {k: p.grad.clone() for k, p in m.named_parameters()}))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1.patch_tokens, o2.patch_tokens, atol=0, rtol=0)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-7, rtol=1e-6)


def test_drop_path_only_in_training():
    m = _model(drop_path_rate=0.5)
    images = _images(b=8)
    torch.testing.assert_close(m(images).cls_alt, m(images).cls_alt)
    m.train()
    torch.manual_seed(0)
    a = m(images).cls_alt
    torch.manual_seed(1)
    assert not torch.allclose(a, m(images).cls_alt)


def test_intermediate_layers():
    m = _model(depth=3)
    images = _images(h=24, w=40)
    outs = m.get_intermediate_layers(images, [0, -1, 1])
    assert [o.shape for o in outs] == [(2, 15, 32)] * 3
    torch.testing.assert_close(outs[1], m(images).patch_tokens)
    raw = m.get_intermediate_layers(images, [1], norm=False)[0]
    torch.testing.assert_close(m.norm(raw), outs[2])
    with pytest.raises(ValueError, match=r"block indices \[3\] out of range for depth 3"):
        m.get_intermediate_layers(images, [3])


def test_value_only_last_differs_only_in_last_block():
    m = _model(layerscale_init=1.0)
    _randomise(m)
    images = _images(h=32, w=40)
    dense = m.forward_value_only_last(images)
    assert dense.shape == (2, 20, 32)
    torch.testing.assert_close(
        dense, ref.reference_value_attention(_as_reference(m), images, heads=2), **TOL
    )
    assert not torch.allclose(dense, m(images).patch_tokens, atol=1e-3)
    # If the last block's values are the same for every token, attention returns exactly V,
    # so the values trick and the normal forward must agree: nothing else differs.
    with torch.no_grad():
        qkv = m.blocks[-1].attn.qkv
        qkv.weight[64:] = 0.0
        qkv.bias[64:] = torch.linspace(-1, 1, 32)
    torch.testing.assert_close(m.forward_value_only_last(images), m(images).patch_tokens, **TOL)
    # block by block: normal attention in every block but the last
    x = m.blocks[0](m.prepare_tokens(images))
    manual = m.norm(m.blocks[1](x, value_only=True))[:, 2:]
    torch.testing.assert_close(m.forward_value_only_last(images), manual, atol=0, rtol=0)


def test_input_norm_is_applied_once_in_prepare_tokens_and_never_stored():
    raw, norm = _model(), _model(input_norm="imagenet")
    norm.load_state_dict(raw.state_dict())  # strict: the mean/std buffers are not state
    assert set(norm.state_dict()) == set(raw.state_dict())
    x = _images()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = raw((x - mean) / std)
    got = norm(x)
    torch.testing.assert_close(got.cls_alt, want.cls_alt, **TOL)
    torch.testing.assert_close(got.patch_tokens, want.patch_tokens, **TOL)
    # the dense helpers go through the same place
    torch.testing.assert_close(
        norm.forward_value_only_last(x), raw.forward_value_only_last((x - mean) / std), **TOL
    )
    torch.testing.assert_close(
        norm.get_intermediate_layers(x, [0])[0],
        raw.get_intermediate_layers((x - mean) / std, [0])[0],
        **TOL,
    )
    # "none" (the released weights' contract) leaves the pixels alone
    assert raw.normalize_pixels(x) is x
    with pytest.raises(ValueError, match="input_norm"):
        _model(input_norm="imagenette")
