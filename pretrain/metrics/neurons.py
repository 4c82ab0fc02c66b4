"""The per-neuron arithmetic of the rotation metrics: tensor in, tensor out, no state.

Every quantity is a function of three per-neuron float64 sums, |w_t|^2, <w_t, dw> and |dw|^2
with dw = w_{t+1} - w_t, and of the per-neuron gradient norm. Per-layer numbers are segment
reductions over the neurons of all tracked tensors at once, so a measurement costs a fixed
number of kernels plus a few per tensor, not per neuron or per layer statistic.
"""

from __future__ import annotations

import math

import torch

from pretrain.params import ParamSpec

# Per-neuron quantities, in the order `neuron_metrics` returns them.
NEURON_METRICS = ("theta", "weight_norm", "rel_update", "grad_norm")
# Per-layer numbers `layer_stats` returns, in this order (the ratio is added on the host).
LAYER_STATS = ("theta_mean", "theta_rms", "theta_cv", "rel_update", "grad_norm", "weight_norm")
# The float64 sums run over slices of at most this many elements per weight, so the float64
# workspace stays at 2 x 32 MiB whatever the size of the largest tensor (embeddings).
CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(width: int) -> int:
    """Neurons per float64 slice, for neurons of `width` elements."""
    return max(1, CHUNK_ELEMENTS // max(1, width))


def workspace_elements(specs: list[ParamSpec]) -> int:
    """Size of the float64 workspace: room for w_t and dw of the largest slice of any tensor."""
    sizes = []
    for spec in specs:
        width = math.prod(spec.shape) // max(1, spec.num_neurons)
        sizes.append(2 * min(spec.num_neurons, _chunk_rows(width)) * width)
    return max(sizes, default=0)


def neuron_sums(before: torch.Tensor, after: torch.Tensor, axis: int, workspace: torch.Tensor) -> torch.Tensor:
    """[neurons, 3] float64: |w_t|^2, <w_t, dw>, |dw|^2 with dw = w_{t+1} - w_t.

    Both weights are converted to float64 before subtracting, so dw is exact for any
    parameter dtype up to fp32. The work runs over slices along the neuron axis inside the
    preallocated `workspace`, laid out [neurons, 2, width] with w_t and dw of a neuron side
    by side: one batched matmul X X^T gives all three sums as each neuron's 2x2 Gram matrix,
    reading the slice once, and no temporary as large as a slice is allocated (on CPU a
    fresh large allocation costs a page fault per 4 KiB, more than the arithmetic).
    """
    before, after = before.movedim(axis, 0), after.movedim(axis, 0)
    width = before[0].numel()
    grams = []
    for w0, w1 in zip(before.split(_chunk_rows(width)), after.split(_chunk_rows(width)), strict=True):
        x = workspace[: 2 * w0.numel()].view(len(w0), 2, width)
        x[:, 0].view(w0.shape).copy_(w0)  # copy_ converts, and gathers strided Conv1D columns
        x[:, 1].view(w1.shape).copy_(w1)
        x[:, 1].sub_(x[:, 0])
        grams.append(torch.bmm(x, x.mT))
    gram = torch.cat(grams)
    return torch.stack([gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]], dim=1)


def neuron_metrics(sums: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """[neurons, len(NEURON_METRICS)] from `neuron_sums` rows and gradient norms.

    theta = atan2(|w_t x w_{t+1}|, <w_t, w_{t+1}>) with |w_t x w_{t+1}|^2 = |w_t|^2 |dw|^2 - <w_t, dw>^2
    (Lagrange's identity with w_{t+1} = w_t + dw). Unlike arccos of a cosine near 1, this keeps
    full relative precision for tiny angles: nothing cancels down to the size of theta^2.
    theta and the relative update are NaN for a neuron without a direction (zero weights
    before or after, e.g. a padding embedding row), and such neurons drop out of the layer numbers.
    """
    a, b, c = sums.unbind(dim=1)  # |w_t|^2, <w_t, dw>, |dw|^2
    after_sq = a + 2 * b + c
    nan = torch.full_like(a, math.nan)
    theta = torch.where((a > 0) & (after_sq > 0), torch.atan2((a * c - b * b).clamp_min(0).sqrt(), a + b), nan)
    rel_update = torch.where(a > 0, (c / a).sqrt(), nan)
    return torch.stack([theta, after_sq.clamp_min(0).sqrt(), rel_update, grad_norm], dim=1)


def layer_stats(metrics: torch.Tensor, segment: torch.Tensor, n_layers: int) -> torch.Tensor:
    """[layers, len(LAYER_STATS)] from the `neuron_metrics` of all layers' neurons, concatenated;
    `segment[i]` is the layer of neuron i."""
    theta, weight_norm, rel_update, grad_norm = metrics.unbind(dim=1)
    theta_mean = _segment_nanmean(theta, segment, n_layers)
    theta_std = _segment_nanmean((theta - theta_mean[segment]).square(), segment, n_layers).sqrt()
    return torch.stack([
        theta_mean,
        _segment_nanmean(theta.square(), segment, n_layers).sqrt(),
        theta_std / theta_mean,
        _segment_nanmean(rel_update, segment, n_layers),
        _segment_sum(grad_norm.square(), segment, n_layers).sqrt(),  # the tensor's gradient norm
        _segment_nanmean(weight_norm, segment, n_layers),
    ], dim=1)


def _segment_sum(x: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, segment, x)


def _segment_nanmean(x: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    defined = ~x.isnan()
    return _segment_sum(torch.where(defined, x, 0.0), segment, n) / _segment_sum(defined.to(x.dtype), segment, n)
