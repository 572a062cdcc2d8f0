"""augment.py: multi-crop shapes, boxes, draft decoding, and direct == inside Ray Data."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from orchestrator.data.augment import (
    STREAM_CROPS,
    CropSpec,
    augment_batch,
    crop_box,
    crop_regions,
    decode_for_crops,
    draft_factor,
    multi_crop,
    plan_crops,
    record_rng,
)

SPEC = CropSpec(num_global=1, global_size=32, num_local=3, local_size=16)


def _image(w: int = 120, h: int = 90, fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.kron(rng.integers(0, 255, (h // 10, w // 10, 3)), np.ones((10, 10, 1)))
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_record_rng_is_stable_and_separates_streams():
    a = record_rng(1, 0, "k", STREAM_CROPS).random(3)
    assert np.array_equal(a, record_rng(1, 0, "k", STREAM_CROPS).random(3))
    for other in ((2, 0, "k", 0), (1, 1, "k", 0), (1, 0, "j", 0), (1, 0, "k", 1)):
        assert not np.array_equal(a, record_rng(*other).random(3))


def test_crop_boxes_lie_inside_the_image_with_area_in_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, w, h = crop_box(rng, 120, 90, (0.05, 0.32))
        assert 0 <= x0 and x0 + w <= 120 and 0 <= y0 and y0 + h <= 90
        assert 0.04 <= w * h / (120 * 90) <= 0.34  # rounding slack


def test_multi_crop_shapes_and_dtypes():
    out = multi_crop(_image(), SPEC, np.random.default_rng(0))
    assert out.global_crops.shape == (1, 3, 32, 32) and out.global_crops.dtype == np.uint8
    assert out.local_crops.shape == (3, 3, 16, 16) and out.local_crops.dtype == np.uint8
    none = multi_crop(
        _image(fmt="PNG"), CropSpec(num_local=0, global_size=16), np.random.default_rng(0)
    )
    assert none.local_crops.shape == (0, 3, 98, 98)


def test_full_flip_mirrors_the_crop():
    spec = CropSpec(global_scale=(1.0, 1.0), num_local=0, global_size=30, hflip_prob=1.0)
    plain = CropSpec(global_scale=(1.0, 1.0), num_local=0, global_size=30, hflip_prob=0.0)
    data = _image(w=30, h=30, fmt="PNG")
    a = multi_crop(data, spec, np.random.default_rng(1)).global_crops
    b = multi_crop(data, plain, np.random.default_rng(1)).global_crops
    assert np.array_equal(a, b[..., ::-1])


def test_draft_decoding_uses_the_smallest_covering_size():
    data = _image(w=800, h=640)
    spec = CropSpec(num_global=1, global_size=64, global_scale=(0.9, 1.0), num_local=0)
    rng = np.random.default_rng(0)
    plan = plan_crops(spec, np.random.default_rng(0), 800, 640)
    assert draft_factor(plan, spec) == 8  # every box is >= 8x its output size
    image, _, scale = decode_for_crops(data, spec, rng, draft=True)
    assert image.shape[:2] == (80, 100) and scale == (0.125, 0.125)
    full, _, _ = decode_for_crops(data, spec, np.random.default_rng(0), draft=False)
    assert full.shape[:2] == (640, 800)
    small = CropSpec(global_size=64, num_local=2, local_size=48, local_scale=(0.01, 0.02))
    assert draft_factor(plan_crops(small, np.random.default_rng(0), 800, 640), small) == 1


def test_regions_follow_the_crop_and_the_flip():
    regions = [
        {"box": [0.1, 0.2, 0.3, 0.4], "text": "left thing"},
        {"box": [0.6, 0.6, 0.9, 0.8], "text": "right thing"},
        {"box": [0.0, 0.0, 0.05, 0.05], "text": ""},  # no text: dropped
    ]
    whole = CropSpec(global_scale=(1.0, 1.0), num_local=0, hflip_prob=0.0)
    plan = plan_crops(whole, np.random.default_rng(0), 100, 100)
    boxes, texts, valid = crop_regions(regions, plan, 4, np.random.default_rng(0))
    assert texts == ["left thing", "right thing", "", ""] and valid.tolist() == [1, 1, 0, 0]
    np.testing.assert_allclose(boxes[:2], [[0.1, 0.2, 0.3, 0.4], [0.6, 0.6, 0.9, 0.8]])
    flipped = plan._replace(flips=np.ones(1, dtype=bool))
    boxes, _, _ = crop_regions(regions, flipped, 4, np.random.default_rng(0))
    np.testing.assert_allclose(boxes[0], [0.7, 0.2, 0.9, 0.4], atol=1e-6)
    right_half = plan._replace(boxes=np.asarray([[50.0, 0.0, 50.0, 100.0]]))
    boxes, texts, valid = crop_regions(regions, right_half, 4, np.random.default_rng(0))
    assert texts[0] == "right thing" and valid.sum() == 1  # the left one is out of the crop
    np.testing.assert_allclose(boxes[0], [0.2, 0.6, 0.8, 0.8], atol=1e-6)
    _, texts, valid = crop_regions(regions, plan, 1, np.random.default_rng(0))
    assert valid.sum() == 1 and texts[0] in ("left thing", "right thing")


def test_photometric_ops_change_pixels_only_when_enabled():
    data = _image()
    gray = CropSpec(global_size=32, num_local=0, grayscale_prob=1.0)
    out = multi_crop(data, gray, np.random.default_rng(0)).global_crops[0]
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    jitter = CropSpec(global_size=32, num_local=0, color_jitter_prob=1.0)
    base = CropSpec(global_size=32, num_local=0)
    a = multi_crop(data, jitter, np.random.default_rng(0)).global_crops
    b = multi_crop(data, base, np.random.default_rng(0)).global_crops
    assert not np.array_equal(a, b)


def test_corrupt_bytes_raise_for_the_caller_to_count():
    data = _image()
    with pytest.raises(Exception):  # noqa: B017 (PIL raises OSError or its own errors)
        multi_crop(data[: len(data) // 2], SPEC, np.random.default_rng(0))
    with pytest.raises(Exception):  # noqa: B017
        multi_crop(b"not an image", SPEC, np.random.default_rng(0))


def test_same_output_directly_and_inside_ray_data(ray_data_runtime):
    import ray.data

    items = [
        {"key": f"k{i}", "image": _image(seed=i, fmt="JPEG" if i % 2 else "PNG")} for i in range(6)
    ]
    kwargs = {"spec": SPEC, "seed": 7, "epoch": 2}
    direct = augment_batch(
        {
            "key": np.asarray([r["key"] for r in items], dtype=object),
            "image": np.asarray([r["image"] for r in items], dtype=object),
        },
        **kwargs,
    )
    ds = ray.data.from_items(items, override_num_blocks=3).map_batches(
        augment_batch, batch_size=2, fn_kwargs=kwargs
    )
    rows = sorted(ds.take_all(), key=lambda r: r["key"])
    assert [r["key"] for r in rows] == list(direct["key"])
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row["global_crops"], direct["global_crops"][i])
        np.testing.assert_array_equal(row["local_crops"], direct["local_crops"][i])
    other = augment_batch(
        {"key": direct["key"][:1], "image": np.asarray([items[0]["image"]], dtype=object)},
        spec=SPEC,
        seed=7,
        epoch=3,
    )
    assert not np.array_equal(other["global_crops"][0], direct["global_crops"][0])
