"""Schedules: values at warm-up start/end and the last step, lengths, dispatch, clamping."""

from __future__ import annotations

import numpy as np
import pytest

from tips_model.schedules import (
    at,
    build_schedule,
    constant_schedule,
    cosine_schedule,
    ema_momentum_schedule,
    linear_schedule,
    teacher_temp_schedule,
)


def test_cosine_with_warmup():
    s = cosine_schedule(1.0, 0.1, total_steps=21, warmup_steps=10, warmup_start=0.2)
    assert s.shape == (21,) and s.dtype == np.float64
    assert s[0] == pytest.approx(0.2)
    assert s[9] == pytest.approx(0.2 + 0.8 * 9 / 10)
    assert s[10] == pytest.approx(1.0)  # end of warm-up
    assert s[15] == pytest.approx(0.55)  # half-way through the cosine: (base + final) / 2
    assert s[13] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 3 / 10)))
    assert s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[10:]) < 0)


def test_linear_is_the_tips_lr_shape():
    s = linear_schedule(5e-4, 0.0, total_steps=14, warmup_steps=4)
    np.testing.assert_allclose(s[:4], [0.0, 1.25e-4, 2.5e-4, 3.75e-4])
    np.testing.assert_allclose(s[4:], 5e-4 * (1 - np.arange(10) / 9))
    assert s[-1] == 0.0


def test_constant_and_teacher_temperature():
    np.testing.assert_allclose(
        constant_schedule(3.0, 5, warmup_steps=2, warmup_start=1.0), [1, 2, 3, 3, 3]
    )
    s = teacher_temp_schedule(warmup_start=0.04, final=0.07, warmup_steps=30, total_steps=100)
    assert len(s) == 100
    assert s[0] == pytest.approx(0.04)
    assert s[15] == pytest.approx(0.055)
    assert s[30] == pytest.approx(0.07) and s[-1] == pytest.approx(0.07)


def test_ema_momentum_default_is_dinov2_cosine():
    s = ema_momentum_schedule(1001)
    assert s[0] == pytest.approx(0.992)
    assert s[500] == pytest.approx(0.996)
    assert s[-1] == 1.0


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_build_schedule_dispatches(kind):
    direct = {
        "cosine": cosine_schedule(2.0, 0.5, 30, 5, 0.1),
        "linear": linear_schedule(2.0, 0.5, 30, 5, 0.1),
        "constant": constant_schedule(2.0, 30, 5, 0.1),
    }[kind]
    np.testing.assert_array_equal(build_schedule(kind, 2.0, 0.5, 30, 5, 0.1), direct)


def test_build_schedule_names_an_unknown_kind():
    with pytest.raises(ValueError, match="'step'"):
        build_schedule("step", 1.0, 0.0, 10, 0, 0.0)


def test_edge_lengths():
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 1), [1.0])
    np.testing.assert_allclose(linear_schedule(1.0, 0.0, 4, warmup_steps=4), [0, 0.25, 0.5, 0.75])
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, 10, warmup_steps=11)
    with pytest.raises(ValueError, match="total_steps"):
        linear_schedule(1.0, 0.0, 0)


def test_at_clamps_past_the_end():
    s = linear_schedule(1.0, 0.0, 5)
    assert at(s, 0) == 1.0
    assert at(s, 2) == pytest.approx(0.5)
    assert at(s, 4) == 0.0 and at(s, 1000) == 0.0
    assert isinstance(at(s, 1), float)
    with pytest.raises(ValueError, match="step"):
        at(s, -1)
