"""Per-layer statistics of the rotation metrics against a numpy float64 re-derivation, and their
fixed reduction order (bit-identical repeats, on a GPU too)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.metrics.neurons import LAYER_STATS, LayerSums, layer_stats

# Layers smaller than, equal to, one past and many times a chunk, and single neurons.
NEURONS = [3, LayerSums.CHUNK, LayerSums.CHUNK + 1, 50 * LayerSums.CHUNK + 17, 1, 2 * LayerSums.CHUNK]


def _metrics(neurons: list[int], seed: int = 0) -> torch.Tensor:
    """[neurons, 4] float64 theta, weight norm, relative update, gradient norm, with undefined values."""
    gen = torch.Generator().manual_seed(seed)
    metrics = torch.rand(sum(neurons), 4, generator=gen, dtype=torch.float64) * torch.tensor([1e-2, 3.0, 1e-3, 5.0],
                                                                                           dtype=torch.float64)
    metrics[5, 0] = metrics[20, 2] = math.nan  # a neuron without a direction
    metrics[sum(neurons[:4]), [0, 2]] = math.nan  # layer 4 (one neuron): no angle at all
    return metrics


def _reference(metrics: np.ndarray, neurons: list[int]) -> np.ndarray:
    rows = []
    for part in np.split(metrics, np.cumsum(neurons)[:-1]):
        theta, weight_norm, rel_update, grad_norm = part.T
        theta = theta[~np.isnan(theta)]
        mean = theta.sum() / theta.size if theta.size else math.nan
        rms = math.sqrt((theta ** 2).sum() / theta.size) if theta.size else math.nan
        std = math.sqrt(((theta - mean) ** 2).sum() / theta.size) if theta.size else math.nan
        rel = rel_update[~np.isnan(rel_update)]
        rows.append([mean, rms, std / mean, rel.mean() if rel.size else math.nan,
                     math.sqrt((grad_norm ** 2).sum()), weight_norm.mean()])
    return np.array(rows)


def test_layer_stats_match_numpy_float64():
    metrics = _metrics(NEURONS)
    ours = layer_stats(metrics, LayerSums(NEURONS)).numpy()
    ref = _reference(metrics.numpy(), NEURONS)
    assert ours.shape == (len(NEURONS), len(LAYER_STATS))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    assert np.isnan(ours[4, :4]).all() and np.isfinite(ours[4, 4:]).all()  # no angle, still a gradient norm
    np.testing.assert_allclose(ours, ref, rtol=1e-13)


def test_layer_sums_pad_with_zeros_only():
    sums = LayerSums(NEURONS)
    ones = torch.ones(2, sum(NEURONS), dtype=torch.float64)
    np.testing.assert_array_equal(sums(ones).numpy(), np.array([NEURONS, NEURONS], dtype=np.float64))
    assert sums.layer_of.tolist() == [layer for layer, n in enumerate(NEURONS) for _ in range(n)]
    assert LayerSums([])(torch.zeros(3, 0, dtype=torch.float64)).shape == (3, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layer_stats_repeat_bit_for_bit_and_match_the_cpu():
    neurons = NEURONS * 8  # ~0.5M neurons: atomics would reorder their additions between runs
    metrics = _metrics(neurons, seed=1)
    sums = LayerSums(neurons).to(torch.device("cuda"))
    runs = [layer_stats(metrics.cuda(), sums).cpu() for _ in range(10)]
    for run in runs[1:]:
        assert torch.equal(run.nan_to_num(), runs[0].nan_to_num())
    cpu = layer_stats(metrics, LayerSums(neurons))
    torch.testing.assert_close(runs[0], cpu, rtol=1e-13, atol=0, equal_nan=True)
