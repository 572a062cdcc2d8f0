"""Every reader on a tiny fixture in its real on-disk layout, made here; and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from orchestrator.eval.readers import (
    ADE20K_CLASSES,
    VOC_CLASSES,
    ReaderError,
    open_dataset,
    read_ade20k,
    read_imagefolder,
    read_karpathy,
    read_nyu,
    read_synthetic,
    read_voc,
)


def _rgb(path: Path, value: int = 100, size: tuple[int, int] = (6, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def _palette_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


# ---------------------------------------------------------------------------- ImageFolder


def test_imagefolder_train_val_and_classnames(tmp_path):
    for split, n in (("train", 2), ("val", 1)):
        for c in ("n01_gold_fish", "n02_tabby"):
            for i in range(n):
                _rgb(tmp_path / split / c / f"{i}.png", value=10 * i)
    (tmp_path / "classnames.txt").write_text("goldfish\ntabby cat\n")
    ds = read_imagefolder(tmp_path)
    assert ds.class_names == ["goldfish", "tabby cat"]
    assert len(ds.split("train")) == 4 and len(ds.split("val")) == 2
    assert ds.split("train").labels.tolist() == [0, 0, 1, 1]
    img = ds.split("val").image(1)
    assert img.shape == (6, 8, 3) and img.dtype == np.uint8


def test_imagefolder_single_split_uses_folder_names(tmp_path):
    _rgb(tmp_path / "red_car" / "a.jpg")
    _rgb(tmp_path / "dog" / "b.png")
    ds = read_imagefolder(tmp_path)
    assert ds.class_names == ["dog", "red car"] and list(ds.splits) == ["val"]


def test_imagefolder_errors_name_the_layout(tmp_path):
    with pytest.raises(ReaderError, match="Expected layout") as e:
        read_imagefolder(tmp_path)
    assert "ROOT/<class_name>/<image>.jpg" in str(e.value)
    _rgb(tmp_path / "a" / "x.png")
    (tmp_path / "classnames.txt").write_text("one\ntwo\n")
    with pytest.raises(ReaderError, match="2 names but there are 1 class folders"):
        read_imagefolder(tmp_path)


# ---------------------------------------------------------------------------- Karpathy JSON


def test_karpathy_coco_layout(tmp_path):
    entries = []
    for i, split in enumerate(["train", "restval", "test", "test"]):
        name = f"COCO_val2014_{i:012d}.jpg"
        _rgb(tmp_path / "val2014" / name, value=i * 20)
        sents = [{"raw": f"caption {i} {j} "} for j in range(5)]
        entries.append(
            {"filepath": "val2014", "filename": name, "split": split, "sentences": sents}
        )
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": entries}))
    ds = read_karpathy(tmp_path)
    assert ds.name == "coco" and sorted(ds.splits) == ["test", "train"]
    test = ds.split("test")
    assert len(test) == 2 and len(ds.split("train")) == 2  # restval counts as train
    assert test.captions[0] == [f"caption 2 {j}" for j in range(5)]
    assert test.image(1)[0, 0, 0] == 60


def test_karpathy_flickr_layout_and_missing_image(tmp_path):
    entries = [{"filename": "1000.jpg", "split": "test", "sentences": [{"raw": "a dog"}]}]
    _rgb(tmp_path / "flickr30k-images" / "1000.jpg")
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    ds = read_karpathy(path)
    assert ds.name == "flickr30k" and ds.split("test").captions == [["a dog"]]
    (tmp_path / "flickr30k-images" / "1000.jpg").unlink()
    with pytest.raises(ReaderError, match="'1000.jpg' not found; tried") as e:
        read_karpathy(path)
    assert "Expected layout" in str(e.value)


def test_karpathy_bad_json(tmp_path):
    (tmp_path / "dataset_coco.json").write_text('{"no_images": []}')
    with pytest.raises(ReaderError, match="not a Karpathy split JSON"):
        read_karpathy(tmp_path)


# ---------------------------------------------------------------------------- VOC, ADE20K


def _voc(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    labels = np.array([[0, 0, 15, 15], [0, 255, 255, 15], [12, 12, 0, 0]])
    for i, split in ((1, "train"), (2, "train"), (3, "val")):
        _rgb(base / "JPEGImages" / f"2007_00000{i}.jpg", size=labels.shape)
        _palette_png(base / "SegmentationClass" / f"2007_00000{i}.png", labels)
        sets = base / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True, exist_ok=True)
        with open(sets / f"{split}.txt", "a") as f:
            f.write(f"2007_00000{i}\n")
    return base


def test_voc_reader(tmp_path):
    _voc(tmp_path)
    ds = read_voc(tmp_path / "VOCdevkit")
    assert ds.class_names == VOC_CLASSES and len(ds.class_names) == 21
    assert len(ds.split("train")) == 2 and ds.split("val").keys == ["2007_000003"]
    mask = ds.split("val").mask(0)
    assert mask.dtype == np.int64 and mask.shape == (3, 4)
    assert sorted(np.unique(mask).tolist()) == [0, 12, 15, 255]  # palette indices, void kept


def test_voc_errors(tmp_path):
    with pytest.raises(ReaderError, match="no SegmentationClass/ folder") as e:
        read_voc(tmp_path)
    assert "ImageSets/Segmentation" in str(e.value)
    base = _voc(tmp_path)
    rgb = Image.fromarray(np.zeros((3, 4, 3), np.uint8))
    rgb.save(base / "SegmentationClass" / "2007_000003.png")  # colour PNG, not indices
    with pytest.raises(ReaderError, match="label image is RGB"):
        read_voc(base).split("val").mask(0)


def _ade(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    for folder, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            _rgb(base / "images" / folder / f"ADE_{folder}_{i:08d}.jpg", size=(2, 3))
            ann = base / "annotations" / folder / f"ADE_{folder}_{i:08d}.png"
            ann.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.array([[0, 1, 150], [3, 3, 0]], np.uint8), mode="L").save(ann)
    return base


def test_ade20k_reader_reduces_zero_label(tmp_path):
    _ade(tmp_path)
    ds = read_ade20k(tmp_path)  # the parent of ADEChallengeData2016 is accepted
    assert len(ADE20K_CLASSES) == 150 and ds.class_names[0] == "wall"
    assert len(ds.split("train")) == 2 and len(ds.split("val")) == 1
    assert ds.split("val").mask(0).tolist() == [[255, 0, 149], [2, 2, 255]]


def test_ade20k_missing_annotation(tmp_path):
    base = _ade(tmp_path)
    (base / "annotations" / "validation" / "ADE_validation_00000000.png").unlink()
    with pytest.raises(ReaderError, match="1 images have no annotation PNG") as e:
        read_ade20k(base)
    assert "ADEChallengeData2016/annotations" in str(e.value)


# ---------------------------------------------------------------------------- NYU Depth v2


def test_nyu_labeled_mat_with_splits(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 5, 3, 3), dtype=np.uint8)  # [H, W, 3, N] as MATLAB
    depths = rng.uniform(0.5, 9.0, (4, 5, 3)).astype(np.float32)
    scipy.io.savemat(tmp_path / "nyu_depth_v2_labeled.mat", {"images": images, "depths": depths})
    scipy.io.savemat(
        tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [3]]), "testNdxs": np.array([[2]])}
    )
    ds = read_nyu(tmp_path)
    assert len(ds.split("train")) == 2 and len(ds.split("val")) == 1
    np.testing.assert_array_equal(ds.split("val").image(0), images[..., 1])
    np.testing.assert_array_equal(ds.split("train").depth(1), depths[..., 2])
    assert ds.depth_range == (1e-3, 10.0)


def test_nyu_v73_mat_without_h5py_explains(tmp_path):
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 ."
    (tmp_path / "nyu_depth_v2_labeled.mat").write_bytes(
        header.ljust(116, b" ") + bytes(8) + b"\x00\x02IM" + bytes(512)
    )
    try:
        import h5py  # noqa: F401
    except ImportError:
        with pytest.raises(ReaderError, match="MATLAB v7.3.*h5py"):
            read_nyu(tmp_path)
    else:  # with h5py the fake file is not valid HDF5
        with pytest.raises(OSError):
            read_nyu(tmp_path)


def test_nyu_png_folder(tmp_path):
    for folder in ("train", "test"):
        _rgb(tmp_path / folder / "rgb" / "0001.png")
        d = tmp_path / folder / "depth" / "0001.png"
        d.parent.mkdir(parents=True)
        Image.fromarray(np.full((6, 8), 2500, np.uint16)).save(d)
    ds = read_nyu(tmp_path)
    assert sorted(ds.splits) == ["train", "val"]
    depth = ds.split("val").depth(0)
    assert depth.dtype == np.float32 and depth[0, 0] == pytest.approx(2.5)
    (tmp_path / "test" / "depth" / "0001.png").unlink()
    with pytest.raises(ReaderError, match="no depth PNG for 1 images"):
        read_nyu(tmp_path)


def test_nyu_nothing_there(tmp_path):
    with pytest.raises(ReaderError, match="nyu_depth_v2_labeled.mat"):
        read_nyu(tmp_path)


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_in_memory():
    from orchestrator.data.synthetic import CLASS_NAMES

    ds = read_synthetic(n=6)
    assert ds.class_names == list(CLASS_NAMES) and len(ds.class_names) == 25
    train, val = ds.split("train"), ds.split("val")
    assert len(train) == 3 and len(val) == 3
    mask = val.mask(0)
    assert mask.shape == val.image(0).shape[:2] == val.depth(0).shape
    counts = np.bincount(mask.reshape(-1), minlength=25)
    counts[0] = 0
    assert val.labels[0] == counts.argmax() > 0
    assert len(val.captions[0]) == 2  # short and long
    depth = val.depth(0)
    assert 1.4 < depth.min() and depth.max() <= 10.0


def test_synthetic_written_split_and_wrong_split(tmp_path):
    from orchestrator.data.synthetic import write_synthetic

    write_synthetic(str(tmp_path), n=4, n_eval=4, seed=0)
    ds = open_dataset(str(tmp_path / "eval"), "segmentation")  # detected as synthetic
    assert ds.name == "synthetic" and len(ds.split("val")) == 2
    mem = read_synthetic(n=4)
    np.testing.assert_array_equal(ds.split("val").mask(1), mem.split("val").mask(1))
    with pytest.raises(ReaderError, match="not a synthetic evaluation split"):
        open_dataset(str(tmp_path / "train"), "depth")


# ---------------------------------------------------------------------------- dispatch


def test_open_dataset_detects_and_explains(tmp_path):
    _voc(tmp_path / "voc")
    _ade(tmp_path / "ade")
    assert open_dataset(str(tmp_path / "voc"), "segmentation").name == "voc2012"
    assert open_dataset(str(tmp_path / "ade"), "segmentation").name == "ade20k"
    assert open_dataset(f"ade20k:{tmp_path / 'ade'}", "segmentation").name == "ade20k"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReaderError, match="matches no segmentation dataset layout") as e:
        open_dataset(str(tmp_path / "empty"), "segmentation")
    assert "SegmentationClass" in str(e.value) and "ADEChallengeData2016" in str(e.value)
    with pytest.raises(ReaderError, match="no such file"):
        open_dataset(str(tmp_path / "missing"), "depth")


def test_split_limit_is_evenly_spaced(tmp_path):
    for c in ("a", "b", "c"):
        for i in range(4):
            _rgb(tmp_path / c / f"{i}.png")
    split = read_imagefolder(tmp_path).split("val").limit(3)
    assert split.labels.tolist() == [0, 1, 2]  # every class kept from a class-sorted listing
