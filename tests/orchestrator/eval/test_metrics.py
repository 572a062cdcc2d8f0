"""Every metric against a hand-computed case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from orchestrator.eval.metrics import (
    MeanMeter,
    confusion_matrix,
    depth_metrics,
    iou_per_class,
    knn_scores,
    miou,
    pixel_accuracy,
    retrieval_recall,
    topk_accuracy,
)

PRED = np.array([[0, 1], [1, 1]])
TARGET = np.array([[0, 1], [255, 2]])  # one ignored pixel; class 2 predicted as 1


def test_confusion_matrix_drops_ignore_index():
    conf = confusion_matrix(PRED, TARGET, num_classes=3)
    assert conf.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]


def test_miou_by_hand():
    conf = confusion_matrix(PRED, TARGET, num_classes=3)
    # IoU: class 0 = 1/1, class 1 = 1/(1 + 1 FP) = 0.5, class 2 = 0/(1 FN) = 0
    assert_close(iou_per_class(conf), np.array([1.0, 0.5, 0.0]), rtol=0, atol=1e-12)
    assert miou(conf) == pytest.approx(50.0)
    assert pixel_accuracy(conf) == pytest.approx(200 / 3)


def test_absent_class_is_left_out_but_a_predicted_absent_class_counts_zero():
    # class 3 exists in neither target nor prediction: NaN, not in the mean
    conf = confusion_matrix(PRED, TARGET, num_classes=4)
    assert math.isnan(iou_per_class(conf)[3])
    assert miou(conf) == pytest.approx(50.0)
    # class 3 predicted where the truth is 0: IoU(3) = 0 joins the mean, IoU(0) drops to 0
    conf = confusion_matrix(np.array([[3, 1], [1, 1]]), TARGET, num_classes=4)
    assert_close(iou_per_class(conf), np.array([0.0, 0.5, 0.0, 0.0]), rtol=0, atol=1e-12)
    assert miou(conf) == pytest.approx(12.5)


def test_miou_of_empty_confusion_is_nan():
    assert math.isnan(miou(np.zeros((3, 3), dtype=np.int64)))


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.06], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    out = topk_accuracy(scores, labels, ks=(1, 2, 5))
    # sample 0: label 2 is 2nd; sample 1: 1st; sample 2: label 0 is last (3rd)
    assert out["top1"] == pytest.approx(100 / 3)
    assert out["top2"] == pytest.approx(200 / 3)
    assert out["top5"] == pytest.approx(100.0)  # k clipped to C = 3


def test_retrieval_recall_with_several_captions_per_image():
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.7, 0.6, 0.3, 0.5]])  # [I=2, T=4]
    owner = torch.tensor([0, 0, 1, 1])
    out = retrieval_recall(sim, owner, ks=(1, 2, 5))
    # i2t: image 0's best own caption (0.9) ranks 1st; image 1's (0.5) ranks 3rd
    assert (out["i2t_r1"], out["i2t_r2"], out["i2t_r5"]) == (50.0, 50.0, 100.0)
    # t2i ranks of the own image: caption 0 -> 0, 1 -> 1, 2 -> 1, 3 -> 0
    assert (out["t2i_r1"], out["t2i_r2"], out["t2i_r5"]) == (50.0, 100.0, 100.0)


def test_depth_metrics_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    gt = torch.tensor([[1.0, 4.0], [3.0, 0.0]])  # 0 = no measurement
    out = depth_metrics(pred, gt, min_depth=1e-3, max_depth=10.0)
    assert out["rmse"] == pytest.approx(math.sqrt(4 / 3))
    assert out["abs_rel"] == pytest.approx((0 + 2 / 4 + 0) / 3)
    # ratios 1, 2, 1: 2 fails every delta (1.25^3 = 1.953 < 2)
    for k in ("delta1", "delta2", "delta3"):
        assert out[k] == pytest.approx(200 / 3)
    assert depth_metrics(pred, torch.zeros(2, 2)) is None


def test_knn_votes_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    query = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised inside
    votes = knn_scores(train, labels, query, num_classes=2, k=2, temperature=0.5)
    # query 0: neighbours sim 1 (class 0) and 0 (class 1): votes e^2 and e^0
    assert_close(votes[0], torch.tensor([math.exp(2.0), 1.0]))
    # query 1: sim 1 (class 1) and 0 (class 0, the first of the tied points)
    assert_close(votes[1], torch.tensor([1.0, math.exp(2.0)]))
    assert topk_accuracy(votes, torch.tensor([0, 1]), ks=(1,))["top1"] == 100.0


def test_mean_meter():
    m = MeanMeter()
    m.add({"rmse": 1.0})
    m.add({"rmse": 3.0})
    assert m.means() == {"rmse": 2.0} and m.count == 2
