"""Which element of a flat parameter partition belongs to which neuron (DESIGN section 4, ZeRO).

DeepSpeed ZeRO hands the optimizer flat 1-D fp32 partitions: a slice of the concatenation of a
parameter group's tensors, cut at arbitrary element boundaries. A `SegmentMap` records, for one
such partition, the runs of elements it holds of each original tensor; from it comes a per-element
neuron id into the *group's* neuron vector (all neurons of all tensors the flat buffer spans, in
group order). Per-neuron sums are then `index_add` over local elements, an all-reduce of that
short vector over the data-parallel ranks, and per-element application by gathering the
per-neuron coefficients: the single-process RV math on any partition.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TensorInfo:
    """One original tensor the flat buffer spans: its name, full shape and neuron axis (None: one neuron)."""

    name: str
    shape: tuple[int, ...]
    axis: int | None

    @property
    def num_neurons(self) -> int:
        return self.shape[self.axis] if self.axis is not None else 1


@dataclass(frozen=True)
class Segment:
    """`length` elements of tensor `tensor` (row-major flat index from `start`) at `offset` of the partition."""

    tensor: int
    start: int
    length: int
    offset: int


class SegmentMap:
    """Element -> neuron map of one flat partition; elements outside every segment are padding."""

    def __init__(self, tensors: list[TensorInfo], segments: list[Segment], numel: int, device: torch.device,
                 group: object | None = None) -> None:
        self.tensors, self.segments, self.numel, self.group = tensors, segments, numel, group
        counts = [t.num_neurons for t in tensors]
        self.base = [0, *itertools.accumulate(counts)][:-1]
        self.num_neurons = sum(counts)
        # Padding elements point at one extra neuron, N, whose coefficients are zero.
        dtype = torch.int32 if self.num_neurons < 2**31 - 1 else torch.int64
        index = torch.full((numel,), self.num_neurons, dtype=dtype, device=device)
        for seg in segments:
            info = tensors[seg.tensor]
            if seg.offset < 0 or seg.offset + seg.length > numel:
                raise ValueError(f"segment of {info.name} at [{seg.offset}, {seg.offset + seg.length}) lies "
                                 f"outside the partition of {numel} elements")
            k = torch.arange(seg.start, seg.start + seg.length, device=device, dtype=torch.int64)
            if info.axis is None:
                neuron = torch.zeros_like(k)
            else:
                stride = math.prod(info.shape[info.axis + 1:])
                neuron = (k // stride) % info.shape[info.axis]
            index[seg.offset:seg.offset + seg.length] = (neuron + self.base[seg.tensor]).to(dtype)
        self.index = index
        self.counts = self.sums(torch.ones(numel, device=device))

    def sums(self, values: Tensor) -> Tensor:
        """Per-neuron sums of a per-element tensor over this partition's elements: [num_neurons] (local part)."""
        out = torch.zeros(self.num_neurons + 1, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.index, values)[:-1]

    def spread(self, per_neuron: Tensor) -> Tensor:
        """Per-element view of a [num_neurons] vector (zero on padding)."""
        padded = torch.cat([per_neuron, per_neuron.new_zeros(1)])
        return padded[self.index]

    def neuron_range(self, name: str) -> tuple[int, int]:
        """[first, end) of tensor `name`'s neurons in the group's neuron vector."""
        for i, info in enumerate(self.tensors):
            if info.name == name:
                return self.base[i], self.base[i] + info.num_neurons
        raise KeyError(name)
