"""Every task end to end with oracle encoders whose answers are known.

The oracle vision tower embeds each 8x8 patch as its mean RGB colour and the oracle text
tower embeds a prompt as the one-hot vector of the colour it names, so on images painted in
pure red / green / blue patches every zero-shot and probe task can and must be perfect.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.eval import EvalOptions, get_task
from orchestrator.eval.loader import Encoders
from orchestrator.eval.plots import save_examples_figure
from orchestrator.eval.readers.base import EvalDataset, Split
from tips_model.vision import EncoderOutput

NAMES = ["red", "green", "blue"]
COLOURS = np.eye(3, dtype=np.uint8) * 255
DEPTH_M = np.array([2.0, 4.0, 8.0], np.float32)


class OracleVision(nn.Module):
    patch_size = 8
    grid_size = 4
    embed_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, self.patch_size).flatten(2).transpose(1, 2) + self.anchor

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> EncoderOutput:
        t = self._tokens(images)
        return EncoderOutput(cls_alt=t.mean(1), cls_syn=t.mean(1), patch_tokens=t)

    def forward_value_only_last(self, images: torch.Tensor) -> torch.Tensor:
        return self._tokens(images)


class OracleText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.one_hot(ids[:, 0] - 1, 3).float() + self.anchor


def oracle_tokenizer(texts: list[str]) -> np.ndarray:
    """Token 0 = 1 + the index of the colour the text names."""
    return np.array([[1 + next(i for i, n in enumerate(NAMES) if n in t), 0] for t in texts])


def scene(classes: np.ndarray, patch: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, mask and depth of a patch grid of class ids [h, w]."""
    mask = np.kron(classes, np.ones((patch, patch), np.int64))
    return COLOURS[mask], mask, DEPTH_M[mask]


def make_split(grids: list[np.ndarray], ignore_corner: bool = False) -> Split:
    scenes = [scene(g) for g in grids]
    masks = [m.copy() for _, m, _ in scenes]
    if ignore_corner:
        for m in masks:
            m[0, 0] = 255
    return Split(
        size=len(scenes),
        image_fn=lambda i: scenes[i][0],
        labels=np.array([np.bincount(g.reshape(-1), minlength=3).argmax() for g in grids]),
        captions=[[NAMES[int(np.bincount(g.reshape(-1), minlength=3).argmax())]] for g in grids],
        mask_fn=lambda i: masks[i],
        depth_fn=lambda i: scenes[i][2],
    )


@pytest.fixture(scope="module")
def enc() -> Encoders:
    return Encoders(OracleVision(), OracleText(), oracle_tokenizer, 0.07, "oracle")


def stripes(rng: np.random.Generator, rows: int = 4) -> np.ndarray:
    """A [rows, 4] grid whose rows are one class each: class borders fall exactly where
    bilinear upsampling of per-patch scores switches (midway between patch centres), so
    an oracle scores 100; at 2-D corners no upsampled score map can."""
    return np.repeat(rng.integers(0, 3, (rows, 1)), 4, axis=1)


@pytest.fixture(scope="module")
def data() -> EvalDataset:
    rng = np.random.default_rng(0)
    train = [stripes(rng) for _ in range(6)]
    val = [stripes(rng) for _ in range(3)]
    # a 64 x 64 image in 16-px stripes: its own batch group, still patch-aligned at 32 x 32
    val.append(np.kron(stripes(rng), np.ones((2, 2), np.int64)))
    pure = [np.full((4, 4), c) for c in range(3)]
    return EvalDataset(
        "oracle",
        {
            "train": make_split(train + pure + pure),
            "val": make_split(val, ignore_corner=True),
            "test": make_split(pure),
        },
        class_names=NAMES,
    )


@pytest.fixture(scope="module")
def pure_data() -> EvalDataset:
    """Single-colour images: labels and depth are functions of the colour, with no borders
    to blur and no ties between classes."""
    pure = [np.full((4, 4), c) for c in range(3)]
    return EvalDataset(
        "oracle", {"train": make_split(pure * 2), "val": make_split(pure)}, class_names=NAMES
    )


OPTS = EvalOptions(
    templates="tcl",
    progress=False,
    batch_size=3,
    knn_k=2,
    probe_steps=150,
    probe_lr=0.05,
    probe_batch_size=8,
    depth_bins=16,
    zs_window=16,
    zs_stride=8,
    zs_short_side=32,
)


def test_zero_shot_cls_is_perfect(enc, data):
    r = get_task("zero_shot_cls").run(enc, data, OPTS)
    assert r.metrics["top1"] == 100.0 and r.num_images == 4


def test_retrieval_is_perfect(enc, data):
    r = get_task("retrieval").run(enc, data, OPTS)
    assert all(v == 100.0 for v in r.metrics.values()), r.metrics
    assert set(r.metrics) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_zero_shot_seg_is_perfect_with_sliding_windows(enc, data, tmp_path):
    r = get_task("zero_shot_seg").run(enc, data, OPTS)
    assert r.metrics["miou"] == pytest.approx(100.0)
    assert r.extra["window"] == 16 and r.extra["stride"] == 8
    assert len(r.examples) == min(OPTS.plot_images, 4)
    path = save_examples_figure(r, tmp_path / "zs.png")
    assert path.stat().st_size > 1000


def test_linear_seg_probe_learns_the_oracle(enc, data):
    r = get_task("linear_seg").run(enc, data, OPTS)
    assert r.metrics["miou"] > 97.0, r.metrics
    assert r.extra["final_train_loss"] < 0.3


def test_depth_probe_learns_the_oracle(enc, pure_data, tmp_path):
    r = get_task("depth").run(enc, pure_data, OPTS)
    assert r.metrics["abs_rel"] < 0.05 and r.metrics["delta1"] == 100.0, r.metrics
    assert set(r.metrics) == {"rmse", "abs_rel", "delta1", "delta2", "delta3"}
    assert save_examples_figure(r, tmp_path / "depth.png").is_file()


def test_knn_is_perfect(enc, pure_data):
    r = get_task("knn").run(enc, pure_data, OPTS)
    assert r.metrics["top1"] == 100.0 and r.extra["k"] == 2


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="known tasks: zero_shot_cls, retrieval"):
        get_task("segmentation")
