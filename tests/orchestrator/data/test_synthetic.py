"""synthetic.py: deterministic scenes whose captions, regions, masks and depth agree."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli.data import main as main_data
from orchestrator.data.shards import iter_records, list_shards
from orchestrator.data.synthetic import (
    BACKGROUND_DEPTH_M,
    CLASS_NAMES,
    COLOUR_NAMES,
    OBJECT_DEPTH_M,
    SHAPES,
    class_id,
    load_eval_arrays,
    make_record,
    read_eval_split,
)


def test_vocabulary_is_fixed():
    assert len(CLASS_NAMES) == 1 + len(SHAPES) * len(COLOUR_NAMES) == 25
    assert CLASS_NAMES[0] == "background" and CLASS_NAMES[class_id("cross", "red")] == "red cross"


def test_records_are_deterministic_per_seed_and_index():
    a, b = make_record(5, "train", 7), make_record(5, "train", 7)
    assert a == b
    assert make_record(6, "train", 7)["image"] != a["image"]
    assert make_record(5, "train", 8)["image"] != a["image"]


def test_captions_say_what_is_where():
    for i in range(20):
        rec = make_record(0, "train", i, image_size=64)
        meta = json.loads(rec["meta"])
        short, long = (c["text"] for c in rec["captions"])
        names = {f"{o['colour']} {o['shape']}" for o in meta["objects"]}
        assert any(n in short for n in names)
        assert any(p in short for p in ("top", "bottom", "left", "right", "center"))
        for region in rec["regions"]:
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert region["text"].split(" ", 2)[2] in long  # "a small red circle" -> named
        assert rec["alt_text"]


def test_eval_split_masks_and_depth_agree_with_meta():
    rec = make_record(1, "eval", 3, image_size=48)
    meta = json.loads(rec["meta"])
    mask = np.asarray(Image.open(io.BytesIO(rec["class_mask"])))
    depth = np.asarray(Image.open(io.BytesIO(rec["depth"]))).astype(np.float32) / 1000
    assert mask.shape == depth.shape == (48, 48)
    visible = {o["class_id"] for o in meta["objects"] if o["visible"] > 0}
    assert set(np.unique(mask)) - {0} == visible
    assert np.all(depth[mask == 0] >= BACKGROUND_DEPTH_M[0] - 1e-3)
    assert np.all(depth[mask > 0] <= OBJECT_DEPTH_M[1] + 1e-3)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_synth_cli_round_trips_both_formats(tmp_path, fmt):
    out = tmp_path / fmt
    argv = [
        "synth",
        "--out",
        str(out),
        "--n",
        "12",
        "--seed",
        "2",
        "--image-size",
        "32",
        "--format",
        fmt,
        "--shard-size",
        "5",
        "--n-eval",
        "4",
    ]
    assert main_data(argv) == 0
    train = list_shards(str(out / "train"))
    assert train.num_rows == 12 and len(train.shards) == 3
    assert {s.format for s in train.shards} == {fmt}
    back = list(iter_records(str(out / "train")))
    for i, rec in enumerate(back):
        expected = make_record(2, "train", i, image_size=32)
        assert rec["key"] == expected["key"] and rec["image"] == expected["image"]
        assert rec["captions"] == expected["captions"]
        assert rec["alt_text"] == expected["alt_text"]
    samples = list(read_eval_split(str(out / "eval")))
    assert [s.key for s in samples] == [f"eval-{i:07d}" for i in range(4)]
    assert samples[0].image.shape == (32, 32, 3) and samples[0].class_mask.dtype == np.uint8
    arrays = load_eval_arrays(str(out / "eval"))
    assert arrays["images"].shape == (4, 32, 32, 3) and arrays["depth"].dtype == np.float32
    assert arrays["class_mask"].max() < len(CLASS_NAMES)
