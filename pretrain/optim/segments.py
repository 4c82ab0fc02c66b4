"""Which element of a flat parameter partition belongs to which neuron (docs/design.md §9, ZeRO).

DeepSpeed ZeRO hands the optimizer flat 1-D fp32 partitions: a slice of the concatenation of a
parameter group's tensors, cut at arbitrary element boundaries. A `SegmentMap` records, for one
such partition, the runs of elements it holds of each original tensor, numbering neurons over the
*group* (all neurons of all tensors the flat buffer spans, in group order).

A run of a row-major tensor is at most three rectangular blocks: a partial first row, whole rows,
a partial last row. With the neuron axis first ([out, in] Linear) each block row is one neuron;
with it last (GPT-2's Conv1D [in, out]) each block column is one. So per-neuron sums are row or
column reductions of 2-d views, and per-neuron coefficients are applied by broadcasting, in
place: the same kernels as the dense path, no per-element index and no partition-sized temporary.
The sums of a partition are partial; the optimizer all-reduces them over the data-parallel ranks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
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


@dataclass(frozen=True)
class Block:
    """Partition elements [offset, offset + rows*width) seen as [rows, width]; neurons from `neuron` on,
    one per row, or one per column when `columns`."""

    offset: int
    rows: int
    width: int
    neuron: int
    columns: bool

    @property
    def neurons(self) -> slice:
        return slice(self.neuron, self.neuron + (self.width if self.columns else self.rows))

    def view(self, flat: Tensor) -> Tensor:
        return flat[self.offset:self.offset + self.rows * self.width].view(self.rows, self.width)

    def per_neuron(self, values: Tensor) -> Tensor:
        """This block's slice of a [neurons] vector, shaped to broadcast against `view`."""
        part = values[self.neurons]
        return part.view(1, -1) if self.columns else part.view(-1, 1)


class SegmentMap:
    """Element -> neuron map of one flat partition; elements outside every segment are padding."""

    def __init__(self, tensors: list[TensorInfo], segments: list[Segment], numel: int, group: object | None = None
                 ) -> None:
        self.tensors, self.segments, self.numel, self.group = tensors, segments, numel, group
        self.base = [0, *itertools.accumulate(t.num_neurons for t in tensors)][:-1]
        self.num_neurons = sum(t.num_neurons for t in tensors)
        self.blocks = [block for seg in segments for block in self._blocks(seg)]

    def _blocks(self, seg: Segment) -> Iterator[Block]:
        info = self.tensors[seg.tensor]
        if seg.offset < 0 or seg.offset + seg.length > self.numel:
            raise ValueError(f"segment of {info.name} at [{seg.offset}, {seg.offset + seg.length}) lies outside "
                             f"the partition of {self.numel} elements")
        base = self.base[seg.tensor]
        if info.axis is None:  # the whole tensor is one neuron
            yield Block(seg.offset, 1, seg.length, base, False)
            return
        axis = info.axis % len(info.shape)
        if math.prod(info.shape[:axis]) == 1:  # neuron axis first: a neuron is `width` consecutive elements
            width, columns = math.prod(info.shape[axis + 1:]), False
        elif axis == len(info.shape) - 1:  # neuron axis last: element k belongs to neuron k % width
            width, columns = info.shape[axis], True
        else:
            raise ValueError(f"{info.name}: a neuron axis ({info.axis}) inside a {len(info.shape)}-d tensor cannot be "
                             "mapped on flat ZeRO partitions; use a strategy other than DeepSpeed ZeRO for it")
        start, end, offset = seg.start, seg.start + seg.length, seg.offset
        while start < end:  # a partial row, then whole rows, then a partial row
            row, col = divmod(start, width)
            if col or end - start < width:
                count = min(width - col, end - start)
                neuron = base + (col if columns else row)
                yield Block(offset, 1, count, neuron, columns)
            else:
                rows = (end - start) // width
                count = rows * width
                yield Block(offset, rows, width, base if columns else base + row, columns)
            start, offset = start + count, offset + count

    def rotation_sums(self, w: Tensor, u: Tensor, zero_mean: bool) -> Tensor:
        """[6 or 3, num_neurons] float32 local sums: ||w||^2, ||u||^2, <u, w> (and sum w, sum u, count)."""
        out = torch.zeros(6 if zero_mean else 3, self.num_neurons, dtype=torch.float32, device=w.device)
        for block in self.blocks:
            wv, uv, dim = block.view(w).float(), block.view(u).float(), 0 if block.columns else 1
            seg = out[:, block.neurons]
            seg[0] += torch.linalg.vector_norm(wv, dim=dim).square()
            seg[1] += torch.linalg.vector_norm(uv, dim=dim).square()
            seg[2] += torch.linalg.vecdot(uv, wv, dim=dim)
            if zero_mean:
                seg[3] += wv.sum(dim=dim)
                seg[4] += uv.sum(dim=dim)
                seg[5] += wv.shape[dim]
        return out

    def apply(self, w: Tensor, u: Tensor, a: Tensor, b: Tensor, c: Tensor | None) -> None:
        """w <- a*w + b*u (+ c) per neuron, in place; padding is left alone."""
        for block in self.blocks:
            wv = block.view(w)
            wv.mul_(block.per_neuron(a)).addcmul_(block.view(u), block.per_neuron(b))
            if c is not None:
                wv.add_(block.per_neuron(c))
