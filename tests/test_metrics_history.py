"""Model-level numbers on a hand-made history: time to equilibrium, balance, mean ratio."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from pretrain.metrics import LAYER_METRICS, RotationHistory

NAN = math.nan
STEPS = [1, 10, 20, 30, 40, 50]
# Per layer, theta/eta_r at STEPS. Band: |ratio - 1| <= 0.1.
RATIOS = {
    "settles": [5.0, 1.5, 1.05, 0.95, 1.02, 0.99],    # last outside at 10 -> equilibrium from 20
    "leaves": [5.0, 1.05, 0.8, 1.0, 1.09, 1.2],       # latest outside -> None
    "early": [0.5, 0.95, 1.0, 1.0, 1.0, 1.0],         # from 10
    "no_decay": [NAN] * 6,                             # no eta_r: never, and not part of the overall
}
# Per layer mean theta at STEPS (for the balance).
THETA = {
    "settles": [4.0, 1.0, 2.0, 2.0, 2.0, 2.0],
    "leaves": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    "early": [2.0, 0.5, 4.0, 1.0, 1.0, 3.0],
    "no_decay": [8.0, 1.0, 1.0, 0.0, NAN, 1.0],
}


def make_history(ratios: dict[str, list[float]] = RATIOS, n: int = len(STEPS)) -> RotationHistory:
    history = RotationHistory(list(ratios))
    for t in range(n):
        values = np.zeros((len(ratios), len(LAYER_METRICS)))
        values[:, LAYER_METRICS.index("ratio")] = [r[t] for r in ratios.values()]
        values[:, LAYER_METRICS.index("theta_mean")] = [THETA[name][t] for name in ratios]
        history.append(STEPS[t], 1e-3, 0.01, values)
    return history


def test_time_to_equilibrium_per_layer_and_overall():
    history = make_history()
    assert history.time_to_equilibrium() == [20, None, 10, None]
    assert history.overall_time_to_equilibrium() is None  # "leaves" is out of the band now

    fixed = dict(RATIOS, leaves=[5.0, 1.05, 0.8, 1.0, 1.09, 1.1 - 1e-9])
    history = make_history(fixed)
    assert history.time_to_equilibrium() == [20, 30, 10, None]
    assert history.overall_time_to_equilibrium() == 30  # max over the layers that have an eta_r

    # None until reached: after three measurements "leaves" is outside (0.8 at step 20).
    assert make_history(fixed, n=3).time_to_equilibrium() == [20, None, 10, None]
    assert make_history(fixed, n=3).overall_time_to_equilibrium() is None


def test_a_measurement_at_lr_zero_does_not_count():
    """The last step of a decay-to-zero schedule has eta_r = 0 and every ratio NaN: it neither
    breaks an equilibrium reached before it nor starts one."""
    history = RotationHistory(["settles", "no_decay"])
    for step, eta_r, ratio in [(1, 0.01, 5.0), (10, 0.01, 1.05), (20, 0.01, 0.97), (30, 0.0, NAN)]:
        values = np.zeros((2, len(LAYER_METRICS)))
        values[:, LAYER_METRICS.index("ratio")] = [ratio, NAN]
        history.append(step, 1e-3 if eta_r else 0.0, eta_r, values)
    assert history.time_to_equilibrium() == [10, None]
    assert history.overall_time_to_equilibrium() == 10
    # Outside the band right before the lr reaches 0: no counted measurement follows, so no equilibrium.
    late = RotationHistory(["late"])
    for step, eta_r, ratio in [(1, 0.01, 1.0), (10, 0.01, 3.0), (20, 0.0, NAN)]:
        values = np.zeros((1, len(LAYER_METRICS)))
        values[0, LAYER_METRICS.index("ratio")] = ratio
        late.append(step, 1e-3 if eta_r else 0.0, eta_r, values)
    assert late.time_to_equilibrium() == [None]


def test_no_layer_with_an_eta_r_has_no_time_to_equilibrium():
    history = make_history({"no_decay": [NAN] * 6})
    assert history.time_to_equilibrium() == [None]
    assert history.overall_time_to_equilibrium() is None
    assert np.isnan(history.ratio_mean()).all()


def test_balance_and_ratio_mean():
    history = make_history()
    # max/min of theta_mean over layers (NaN ignored; a zero minimum makes it undefined).
    expected = [8.0 / 1.0, 1.0 / 0.5, 4.0 / 1.0, NAN, 2.0 / 1.0, 3.0 / 1.0]
    np.testing.assert_allclose(history.balance(), expected)
    np.testing.assert_allclose(history.ratio_mean()[:2], [(5.0 + 5.0 + 0.5) / 3, (1.5 + 1.05 + 0.95) / 3])
    # From an index on (the tracker's per-step numbers read the latest alone): the same values.
    np.testing.assert_allclose(history.balance(first=-1), expected[-1:])
    np.testing.assert_allclose(history.ratio_mean(first=-2), history.ratio_mean()[-2:])


def test_state_dict_round_trip_is_weights_only_loadable():
    history = make_history()
    buffer = io.BytesIO()
    torch.save(history.state_dict(), buffer)
    buffer.seek(0)
    back = RotationHistory.from_state_dict(torch.load(buffer, weights_only=True))
    assert back.layers == history.layers
    np.testing.assert_array_equal(back.steps, history.steps)
    np.testing.assert_array_equal(back.values, history.values)  # NaN positions included
    assert back.time_to_equilibrium() == history.time_to_equilibrium()


def test_append_rejects_bad_input():
    history = make_history(n=2)
    with pytest.raises(ValueError, match="step"):
        history.append(10, 1e-3, 0.01, np.zeros((4, len(LAYER_METRICS))))
    with pytest.raises(ValueError, match="shape"):
        history.append(99, 1e-3, 0.01, np.zeros((3, len(LAYER_METRICS))))
