"""Rotational equilibrium on a real (tiny) training run: RV-AdamW is in it from the start, AdamW is not.

What the RV guarantees is an angle of arctan(eta_r * ||u|| / sqrt(s_hat)) per step, where s_hat
averages ||u||^2 with decay 0.9. At step 1 s_hat = ||u||^2 exactly, so theta = eta_r in every
layer. While Adam's update norm still shrinks (its second moment builds up over ~1/(1-beta2)
steps) s_hat lags and the ratio dips below 1 (measured 0.75-0.95 on this model), then returns
towards 1. AdamW without warmup starts 10-30x above eta_r and needs ~1/(lr*wd) steps to get there.
"""

import numpy as np

from pretrain.metrics import load_rotation
from pretrain.train import train
from tests.train_utils import tiny_config

STEPS = 60


def _run(tiny_data_dir, tmp_path, optimizer):
    cfg = tiny_config(tiny_data_dir, tmp_path / optimizer, f"optim.name={optimizer}", "optim.lr=3e-3",
                      f"train.steps={STEPS}", "schedule.name=constant", "schedule.warmup_steps=0",
                      "train.micro_batch_size=8", "checkpoint.every=1000", "logging.rotation_every=1")
    rotation = load_rotation(train(cfg).checkpoint / "rotation")
    rotational = [i for i, layer in enumerate(rotation.summary["layers"]) if layer["rotational"]]
    # Recomputed from the raw history: each layer's mean theta over eta_r at that step.
    ratio = rotation.history.column("theta_mean")[:, rotational] / rotation.history.eta_r[:, None]
    return rotation, rotational, ratio


def test_rv_adamw_is_in_equilibrium_from_the_start_and_adamw_is_not(tiny_data_dir, tmp_path):
    rv, rotational, rv_ratio = _run(tiny_data_dir, tmp_path, "rv-adamw")
    plain, _, plain_ratio = _run(tiny_data_dir, tmp_path, "adamw")
    # 2 llama blocks x (q, k, v, o, gate, up, down), and the tied embedding (optim.rotational_embeddings)
    assert len(rotational) == 2 * 7 + 1

    np.testing.assert_allclose(rv_ratio[0], 1.0, rtol=1e-3)  # step 1: exactly at equilibrium
    assert np.all((rv_ratio > 0.6) & (rv_ratio < 1.25))  # and near it at every step
    settled = rv.history.steps > STEPS // 2
    assert abs(rv_ratio[settled].mean() - 1.0) < 0.1  # second half, averaged over steps and layers

    assert np.all(plain_ratio[0] > 10.0)  # AdamW's first updates rotate far too fast
    assert np.all(plain_ratio[: STEPS // 3] > 1.5)

    def layers_in_equilibrium(rotation):
        return sum(rotation.summary["layers"][i]["time_to_equilibrium"] is not None for i in rotational)

    assert layers_in_equilibrium(rv) > layers_in_equilibrium(plain)
    plain_time = plain.summary["time_to_equilibrium"]
    rv_time = rv.summary["time_to_equilibrium"] or STEPS + 1
    assert plain_time is None or plain_time > rv_time
