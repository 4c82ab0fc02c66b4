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


class LayerSums:
    """Per-layer sums over the neurons of all tracked tensors, concatenated layer by layer.

    The sum of each layer is taken in a fixed order, so the same neurons give bit-identical
    layer numbers on every run. `index_add_` on a GPU adds with atomics in whatever order
    threads arrive (float64 results that differ in their last bits between runs), and all
    neurons of a layer queue on one address. Here each layer's neurons are laid out in whole
    chunks of `CHUNK` (zero-padded): chunk sums are one reduction over [columns, chunks, CHUNK],
    and layer sums a second one over [columns, layers, most chunks of a layer].
    """

    CHUNK = 1024

    def __init__(self, neurons: list[int]) -> None:
        self.neurons = neurons
        chunks = [-(-n // self.CHUNK) for n in neurons]  # per layer, ceil
        first = [sum(chunks[:i]) for i in range(len(chunks))]
        self._total = sum(chunks) + 1  # one more chunk, always zero, pads the layer table
        # Neuron i of layer l sits at padded position (first chunk of l) * CHUNK + i.
        self._position = torch.cat([torch.arange(n) + f * self.CHUNK for n, f in zip(neurons, first, strict=True)]
                                   ) if neurons else torch.zeros(0, dtype=torch.int64)
        widest = max(chunks, default=0)
        table = torch.full((len(neurons), widest), self._total - 1, dtype=torch.int64)
        for layer, (count, f) in enumerate(zip(chunks, first, strict=True)):
            table[layer, :count] = torch.arange(f, f + count)
        self._table = table
        self.layer_of = torch.repeat_interleave(torch.arange(len(neurons)), torch.tensor(neurons, dtype=torch.int64))

    def to(self, device: torch.device) -> LayerSums:
        """Move the index tensors to `device` (a no-op once they are there)."""
        self._position, self._table = self._position.to(device), self._table.to(device)
        self.layer_of = self.layer_of.to(device)
        return self

    def __call__(self, columns: torch.Tensor) -> torch.Tensor:
        """[k, neurons] -> [k, layers]: the sum of each column over each layer's neurons."""
        padded = columns.new_zeros(len(columns), self._total * self.CHUNK)
        padded[:, self._position] = columns
        chunk_sums = padded.view(len(columns), self._total, self.CHUNK).sum(dim=2)
        return chunk_sums[:, self._table].sum(dim=2)


def layer_stats(metrics: torch.Tensor, sums: LayerSums) -> torch.Tensor:
    """[layers, len(LAYER_STATS)] from the `neuron_metrics` of all layers' neurons, concatenated in
    `sums`' layer order. Undefined (NaN) values drop out of a layer's means."""
    theta, weight_norm, rel_update, grad_norm = metrics.unbind(dim=1)
    defined = [~x.isnan() for x in (theta, rel_update, weight_norm)]
    values = [torch.where(ok, x, 0.0) for ok, x in zip(defined, (theta, rel_update, weight_norm), strict=True)]
    totals = sums(torch.stack([*values, *(ok.to(metrics.dtype) for ok in defined), values[0].square(),
                               grad_norm.square()]))
    theta_sum, rel_sum, weight_sum, theta_n, rel_n, weight_n, theta_sq, grad_sq = totals.unbind()
    theta_mean = theta_sum / theta_n
    spread = torch.where(defined[0], theta - theta_mean[sums.layer_of], 0.0).square()
    theta_std = (sums(spread[None])[0] / theta_n).sqrt()
    return torch.stack([
        theta_mean,
        (theta_sq / theta_n).sqrt(),
        theta_std / theta_mean,
        rel_sum / rel_n,
        grad_sq.sqrt(),  # the tensor's gradient norm
        weight_sum / weight_n,
    ], dim=1)
