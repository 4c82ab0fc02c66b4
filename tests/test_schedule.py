"""LR schedules against hand-computed values."""

import math

import pytest

from pretrain.config import ScheduleConfig
from pretrain.schedule import lr_at


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(1, 1.0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(10, 1.0, 110, cfg) == pytest.approx(1.0)
    assert lr_at(11, 1.0, 111, cfg) == pytest.approx(1.0)
    assert lr_at(61, 1.0, 111, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(111, 1.0, 111, cfg) == pytest.approx(0.1)


def test_no_warmup_starts_at_peak():
    for name in ("constant", "cosine", "linear", "wsd"):
        cfg = ScheduleConfig(name=name, warmup_steps=0, min_lr_ratio=0.0)
        assert lr_at(1, 2.0, 100, cfg) == 2.0


def test_linear_and_wsd_shapes():
    lin = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(51, 1.0, 101, lin) == pytest.approx(0.5)
    assert lr_at(101, 1.0, 101, lin) == pytest.approx(0.0)
    wsd = ScheduleConfig(name="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_at(80, 1.0, 100, wsd) == 1.0  # stable until the last 20 steps
    assert lr_at(90, 1.0, 100, wsd) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 100, wsd) == pytest.approx(0.0)
