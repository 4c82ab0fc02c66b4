"""The tracker measures known per-neuron rotations exactly, for both neuron-axis layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pretrain.config import OptimConfig
from pretrain.metrics import RotationTracker, layer_name
from pretrain.optim.equilibrium import equilibrium_rate
from pretrain.params import classify_parameters

LR = 1e-3


class TwoLayouts(nn.Module):
    """A Linear ([out, in], neuron axis 0) and a GPT-2 Conv1D ([in, out], neuron axis 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 6, bias=False)
        self.conv = Conv1D(5, 40)  # nf=5 outputs, nx=40 inputs: weight [40, 5]


def rotated(w: np.ndarray, angle: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    """cos(a) w + sin(a) |w| v for a random unit v orthogonal to w, times `scale` (norm change)."""
    v = rng.standard_normal(w.shape)
    v -= w * (v @ w) / (w @ w)
    v /= np.linalg.norm(v)
    return scale * (math.cos(angle) * w + math.sin(angle) * np.linalg.norm(w) * v)


def rotate_neurons(w: np.ndarray, axis: int, angles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rows = np.moveaxis(w, axis, 0)
    scales = rng.uniform(0.8, 1.2, len(angles))
    out = np.stack([rotated(r, a, s, rng) for r, a, s in zip(rows, angles, scales, strict=True)])
    return np.moveaxis(out, 0, axis)


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        for name, w in weights.items():
            model.get_parameter(name).copy_(torch.from_numpy(w))


def measure_known(dtype: torch.dtype) -> tuple[RotationTracker, dict, dict, dict, dict]:
    """Set w_t, capture, set w_{t+1} (known rotations), measure; returns the tracker and the inputs."""
    rng = np.random.default_rng(0)
    model = TwoLayouts().to(dtype)
    table = classify_parameters(model, rotational_embeddings=False)
    tracker = RotationTracker(model, table, OptimConfig(name="adamw", lr=LR), every=1)
    angles = {"fc.weight": np.geomspace(1e-4, 0.5, 6), "conv.weight": np.array([1e-4, 3e-4, 2e-3, 0.05, 1.0])}
    axes = {"fc.weight": 0, "conv.weight": 1}
    before = {n: model.get_parameter(n).detach().double().numpy().copy() for n in angles}
    after = {n: rotate_neurons(before[n], axes[n], angles[n], rng) for n in angles}
    grads = {n: rng.standard_normal(before[n].shape) for n in angles}
    for name, g in grads.items():
        model.get_parameter(name).grad = torch.from_numpy(g).to(dtype)
    tracker.capture()
    set_weights(model, after)
    # What the tensors hold after rounding to `dtype` is what the tracker must measure.
    after = {n: model.get_parameter(n).detach().double().numpy().copy() for n in angles}
    scalars = tracker.measure(1, LR)
    return tracker, scalars, angles, {"before": before, "after": after, "axes": axes}, grads


def test_known_angles_float64_linear_and_conv1d():
    tracker, scalars, angles, w, grads = measure_known(torch.float64)
    for name, layer in (("fc.weight", "fc"), ("conv.weight", "conv")):
        a, axis = angles[name], w["axes"][name]
        theta = tracker.snapshot[layer]["theta"].numpy()
        np.testing.assert_allclose(theta, a, rtol=1e-6, atol=0)
        assert scalars[f"rotation/angle/{layer}"] == pytest.approx(a.mean(), rel=1e-6)
        assert scalars[f"rotation/angle_rms/{layer}"] == pytest.approx(np.sqrt((a ** 2).mean()), rel=1e-6)
        assert scalars[f"rotation/cv/{layer}"] == pytest.approx(a.std() / a.mean(), rel=1e-6)
        eta_r = equilibrium_rate("adamw", LR, 0.1, (0.9, 0.95))
        assert scalars[f"rotation/ratio/{layer}"] == pytest.approx(a.mean() / eta_r, rel=1e-6)

        w0, w1 = np.moveaxis(w["before"][name], axis, 0), np.moveaxis(w["after"][name], axis, 0)
        rel = np.linalg.norm(w1 - w0, axis=1) / np.linalg.norm(w0, axis=1)
        np.testing.assert_allclose(tracker.snapshot[layer]["rel_update"].numpy(), rel, rtol=1e-9)
        np.testing.assert_allclose(tracker.snapshot[layer]["weight_norm"].numpy(), np.linalg.norm(w1, axis=1),
                                   rtol=1e-12)
        g = np.linalg.norm(np.moveaxis(grads[name], axis, 0), axis=1)
        np.testing.assert_allclose(tracker.snapshot[layer]["grad_norm"].numpy(), g, rtol=1e-12)
        assert scalars[f"rotation/grad_norm/{layer}"] == pytest.approx(np.linalg.norm(grads[name]), rel=1e-12)
        assert scalars[f"rotation/weight_norm/{layer}"] == pytest.approx(np.linalg.norm(w1, axis=1).mean())
        assert scalars[f"rotation/rel_update/{layer}"] == pytest.approx(rel.mean(), rel=1e-9)
    assert set(tracker.layers) == {"fc", "conv"}


def test_float32_weights_match_float64_arccos_of_the_stored_vectors():
    """fp32 weights: the angle between the vectors actually stored (rounded), to float64 precision."""
    tracker, _, angles, w, _ = measure_known(torch.float32)
    for name, layer in (("fc.weight", "fc"), ("conv.weight", "conv")):
        axis = w["axes"][name]
        w0, w1 = np.moveaxis(w["before"][name], axis, 0), np.moveaxis(w["after"][name], axis, 0)
        cos = (w0 * w1).sum(1) / (np.linalg.norm(w0, axis=1) * np.linalg.norm(w1, axis=1))
        reference = np.arccos(np.clip(cos, -1, 1))  # float64: error ~1e-16/theta, fine at theta >= 1e-4
        np.testing.assert_allclose(tracker.snapshot[layer]["theta"].numpy(), reference, rtol=1e-6)
        # Rounding w_{t+1} to fp32 moves the smallest angles measurably: the rtol above is about
        # the measurement, this one about how close fp32 storage keeps the constructed angle.
        np.testing.assert_allclose(reference, angles[name], rtol=2e-2)


def test_zero_neuron_is_left_out_of_the_layer_numbers():
    """A neuron with no direction (zero weights, e.g. a padding embedding row) has no angle."""
    model = nn.Linear(8, 3, bias=False).double()
    table = classify_parameters(model, rotational_embeddings=False)
    tracker = RotationTracker(model, table, OptimConfig(lr=LR), every=1)
    with torch.no_grad():
        model.weight[1] = 0.0
    tracker.capture()
    with torch.no_grad():
        model.weight.mul_(0.5)
    scalars = tracker.measure(1, LR)
    theta = tracker.snapshot["weight"]["theta"]  # a bare Linear's only parameter is named 'weight'
    assert theta[0] < 1e-12 and math.isnan(theta[1]) and theta[2] < 1e-12  # pure scaling: no rotation
    assert scalars["rotation/angle/weight"] < 1e-12
    assert "rotation/cv/weight" not in scalars  # 0/0: undefined values are not logged
    assert scalars["rotation/rel_update/weight"] == pytest.approx(0.5)


def test_should_measure_and_protocol_errors():
    model = nn.Linear(4, 4)
    tracker = RotationTracker(model, classify_parameters(model, rotational_embeddings=False), OptimConfig(), every=10)
    assert [s for s in range(1, 31) if tracker.should_measure(s)] == [1, 10, 20, 30]
    off = RotationTracker(model, classify_parameters(model, rotational_embeddings=False), OptimConfig(), every=0)
    assert not any(off.should_measure(s) for s in range(1, 50))
    with pytest.raises(RuntimeError, match="capture"):
        tracker.measure(10, LR)
    with pytest.raises(ValueError):
        RotationTracker(model, classify_parameters(model, rotational_embeddings=False), OptimConfig(), every=-1)


@pytest.mark.parametrize("param, layer", [
    ("model.layers.3.self_attn.q_proj.weight", "layers.3.self_attn.q_proj"),
    ("model.layers.0.mlp.up_proj.parametrizations.weight.original", "layers.0.mlp.up_proj"),
    ("transformer.h.11.attn.c_attn.weight", "h.11.attn.c_attn"),
    ("_orig_mod.model.embed_tokens.weight", "embed_tokens"),
    ("lm_head.weight", "lm_head"),
])
def test_layer_names(param, layer):
    assert layer_name(param) == layer
