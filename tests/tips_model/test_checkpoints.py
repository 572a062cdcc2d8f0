"""Released-weight import/export (parity with the reference oracle) and our own state files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.tips_model import reference as ref
from tips_model.checkpoints import (
    CheckpointError,
    ReleasedTIPS,
    canonical_variant,
    check_state_shapes,
    encoder_output_from_reference,
    encoder_output_to_reference,
    export_released,
    from_reference_names,
    load_released,
    load_state_dict,
    save_state_dict,
)
from tips_model.text import build_text
from tips_model.vision import build_vision

# variant -> (width, heads, vision mlp, swiglu, text depth, test depth);
# docs/method.md, "Vision encoder" and docs/method.md, "Text encoder".
VARIANTS = {
    "S": (384, 6, 1536, False, 12, 2),
    "B": (768, 12, 3072, False, 12, 2),
    "L": (1024, 16, 4096, False, 12, 1),
    "So400m": (1152, 16, 4304, False, 27, 1),
    "g": (1536, 24, 6144, True, 12, 1),
}
FULL_VISION_DEPTH = {"S": 12, "B": 12, "L": 24, "So400m": 27, "g": 40}
VIT = {"S": "vit_s14", "B": "vit_b14", "L": "vit_l14", "So400m": "vit_so400m14", "g": "vit_g14"}
TXT = {"S": "text_s", "B": "text_b", "L": "text_l", "So400m": "text_so400m", "g": "text_g"}
GRID = 4  # the test files' stored grid: "native" size 56x56
TOL = dict(atol=1e-5, rtol=1e-5)


def _write(path, arrays):
    np.savez(path, **arrays)
    return path


_CACHE: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """variant -> (vision path, text path, vision arrays, text arrays); files made once."""

    def make(variant):
        if variant not in _CACHE:
            d, _, mlp, swiglu, _, depth = VARIANTS[variant]
            vw = ref.random_weights(ref.vision_shapes(d, depth, mlp, GRID, swiglu), seed=0)
            tw = ref.random_weights(ref.text_shapes(d, depth, mlp), seed=1)
            tmp = tmp_path_factory.mktemp(variant)
            vpath = _write(tmp / f"{variant}_vision.npz", vw)
            tpath = _write(
                tmp / f"{variant}_text.npz",
                {**tw, "temperature": np.asarray(0.0050660, np.float32)},
            )
            _CACHE[variant] = (vpath, tpath)
        vpath, tpath = _CACHE[variant]
        # arrays re-read per test so only the current variant's weights stay in memory
        return vpath, tpath, _read(vpath), _read(tpath, drop=("temperature",))

    yield make
    _CACHE.clear()


def _read(path, drop=()):
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k not in drop}


def _images(h, w, b=2, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _ids():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 32000, (3, 64), generator=gen)
    ids[0, 10:] = 0  # short caption
    ids[1, 40:] = 0
    return ids  # row 2: no padding at all


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_released_parity_with_reference(released, variant):
    vpath, tpath, vw, tw = released(variant)
    model = load_released(vpath, tpath, variant.lower())
    heads = VARIANTS[variant][1]
    assert model.variant == variant
    assert model.temperature == pytest.approx(0.0050660, rel=1e-6)
    with torch.no_grad():
        # native grid (4x4), a smaller non-square grid (2x3) and a larger one (5x6)
        for h, w in [(56, 56), (28, 42), (70, 84)]:
            images = _images(h, w)
            out = model.vision(images)
            want = encoder_output_from_reference(ref.reference_vision(vw, images, heads))
            torch.testing.assert_close(out.cls_alt, want.cls_alt, **TOL)
            torch.testing.assert_close(out.cls_syn, want.cls_syn, **TOL)
            torch.testing.assert_close(out.patch_tokens, want.patch_tokens, **TOL)
        ids = _ids()
        torch.testing.assert_close(model.text(ids), ref.reference_text(tw, ids, heads), **TOL)


def test_released_parity_masks_and_value_trick(released):
    vpath, tpath, vw, _ = released("B")
    model = load_released(vpath, tpath, "B")
    images = _images(42, 56)
    masks = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(1)) > 0.5
    with torch.no_grad():
        out = model.vision(images, masks=masks)
        want = ref.reference_vision(vw, images, 12, masks=masks)
        torch.testing.assert_close(out.patch_tokens, want["x_norm_patchtokens"], **TOL)
        torch.testing.assert_close(
            model.vision.forward_value_only_last(images),
            ref.reference_value_attention(vw, images, 12),
            **TOL,
        )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_size_layout_loads_strict(variant):
    """Released key names/shapes at full depth fit every factory (meta).

    docs/method.md, "Released checkpoint files".
    """
    d, _, mlp, swiglu, text_depth, _ = VARIANTS[variant]
    grid = 32  # 448-px files; g14-LR would be 16
    v_expected = ref.vision_shapes(d, FULL_VISION_DEPTH[variant], mlp, grid, swiglu)
    t_expected = ref.text_shapes(d, text_depth, mlp)
    with torch.device("meta"):
        vision = build_vision(VIT[variant], img_size=448, layerscale_init=1.0)
        text = build_text(TXT[variant], vocab_size=32000)
        for model, expected in ((vision, v_expected), (text, t_expected)):
            got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            check_state_shapes(expected, got, TXT[variant])
            assert got == expected
            fake = {k: torch.empty(s) for k, s in expected.items()}
            model.load_state_dict(fake, strict=True, assign=True)


def test_variant_names():
    assert canonical_variant("so400m") == "So400m"
    assert canonical_variant("G") == "g"
    with pytest.raises(ValueError, match="unknown TIPS variant 'H'"):
        canonical_variant("H")


def test_missing_unexpected_misshaped_keys_are_reported(tmp_path, released):
    _, tpath, vw, _ = released("S")
    vpath = tmp_path / "bad_vision.npz"
    bad = dict(vw)
    del bad["blocks.0.ls1.gamma"]
    bad["blocks.0.extra.weight"] = np.zeros((2, 2), np.float32)
    bad["norm.bias"] = np.zeros((383,), np.float32)
    _write(vpath, bad)
    with pytest.raises(CheckpointError) as err:
        load_released(vpath, tpath, "S")
    msg = str(err.value)
    assert str(vpath) in msg
    assert "missing key 'blocks.0.ls1.gamma': expected shape (384,)" in msg
    assert "unexpected key 'blocks.0.extra.weight': shape (2, 2)" in msg
    assert "shape mismatch for 'norm.bias': expected (384,), found (383,)" in msg


def test_width_mismatch_against_variant_table(released):
    vpath, tpath, _, _ = released("S")
    with pytest.raises(CheckpointError, match=r"expected \(1, 1, 768\), found \(1, 1, 384\)"):
        load_released(vpath, tpath, "B")


def test_text_file_errors(tmp_path, released):
    vpath, _, _, tw = released("S")
    tpath = _write(tmp_path / "t.npz", tw)  # no temperature
    with pytest.raises(CheckpointError, match="missing key 'temperature'"):
        load_released(vpath, tpath, "S")
    with pytest.raises(CheckpointError, match="not found: .*nope_text.npz"):
        load_released(vpath, tmp_path / "nope_text.npz", "S")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.npz"):
        load_released(vpath, tmp_path / "junk.npz", "S")


def test_temperature_contrastive_is_popped(tmp_path, released):
    vpath, _, _, tw = released("S")
    tpath = _write(
        tmp_path / "t.npz",
        {**tw, "temperature": np.float32(0.004), "temperature_contrastive": np.float32(0.5)},
    )
    assert load_released(vpath, tpath, "S").temperature == pytest.approx(0.004)


def test_export_import_round_trip_is_bit_exact(tmp_path, released):
    vpath, tpath, vw, tw = released("S")
    model = load_released(vpath, tpath, "S")
    out = tmp_path / "out"
    export_released(model, out / "v.npz", out / "t.npz")
    with np.load(out / "v.npz") as z:
        assert set(z.files) == set(vw)
        assert all(np.array_equal(z[k], vw[k]) for k in vw)
    with np.load(out / "t.npz") as z:
        assert set(z.files) == set(tw) | {"temperature"}
        assert all(np.array_equal(z[k], tw[k]) for k in tw)
    again = load_released(out / "v.npz", out / "t.npz", "S")
    assert again.temperature == model.temperature
    for a, b in ((model.vision, again.vision), (model.text, again.text)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # tuple form, from freshly initialised towers
    vision, text = build_vision("vit_test", layerscale_init=1.0), build_text("text_test")
    export_released((vision, text, 0.01), out / "v2.npz", out / "t2.npz")
    with np.load(out / "t2.npz") as z:
        assert float(z["temperature"]) == np.float32(0.01)


def test_loaded_model_is_trainable_float32(released):
    vpath, tpath, _, _ = released("S")
    model = load_released(vpath, tpath, "S")
    assert isinstance(model, ReleasedTIPS)
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    assert all(p.requires_grad for p in params)
    assert not model.vision.training


def test_reference_name_helpers():
    state = {"cls_token": 1, "temperature": 2, "temperature_contrastive": 3}
    assert from_reference_names(state) == {"cls_token": 1}
    vision = build_vision("vit_test")
    out = vision(torch.rand(2, 3, 32, 32))
    feats = encoder_output_to_reference(out)
    assert feats["x_norm_1st_clstoken"].shape == (2, 1, 32)
    back = encoder_output_from_reference(feats)
    assert torch.equal(back.cls_alt, out.cls_alt) and torch.equal(back.cls_syn, out.cls_syn)


def test_save_and_load_state_dict_atomically(tmp_path):
    path = tmp_path / "sub" / "model.pt"
    state = {"w": torch.arange(4.0), "step": 3, "nested": {"name": "x"}}
    save_state_dict(state, path)
    save_state_dict({**state, "step": 4}, path)  # overwrite in place
    got = load_state_dict(path)
    assert torch.equal(got["w"], state["w"]) and got["step"] == 4 and got["nested"]["name"] == "x"
    assert os.listdir(path.parent) == ["model.pt"]  # no temp files left behind
    with pytest.raises(CheckpointError, match="not found: .*missing.pt"):
        load_state_dict(tmp_path / "missing.pt")


def test_failed_save_leaves_old_file(tmp_path):
    path = tmp_path / "model.pt"
    save_state_dict({"a": torch.ones(1)}, path)
    with pytest.raises(Exception):  # noqa: B017 - a lambda is not picklable by torch.save
        save_state_dict({"a": lambda: 0}, path)
    assert torch.equal(load_state_dict(path)["a"], torch.ones(1))
    assert os.listdir(tmp_path) == ["model.pt"]
