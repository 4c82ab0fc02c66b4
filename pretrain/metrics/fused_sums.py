"""The per-neuron sums of a measured step as Triton kernels (CUDA): per tensor, or per shape (`Batch`).

`neurons.neuron_sums` computes |w_t|^2, <w_t, dw> and |dw|^2 per neuron through float64 slices
and a batched 2x2 Gram matmul: on a GPU that is a float64 batched matmul of tiny matrices per
slice, 16 ms a step for GPT-2 124M on an H200 (benchmarks/RESULTS.md). Here one program reads
a tile of neurons of w_t and w_{t+1} once, subtracts in float64 (exact for fp32 and bf16
weights) and reduces in float64. tests/test_metrics_fused_sums.py compares it with
`neuron_sums` (on CPU in Triton's interpreter).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from pretrain.optim.fused import PointerTables, launch, table_address, table_rows

# Tests set this under Triton's interpreter (TRITON_INTERPRET=1) to run the kernel on CPU tensors.
RUN_ON_CPU = False
_BLOCK_N, _BLOCK_K = 8, 128
# The batched kernels' tiles (neurons, elements per neuron, warps) for row neurons (nn.Linear,
# embeddings) and column neurons (GPT-2's Conv1D [in, out]). The optimizer's column walk took
# 2.4-2.7x torch's fused AdamW with 4 warps and 1.85x with 8 (pretrain/optim/fused.py); these have
# not been measured apart: `benchmarks/bench_sums_gpu.py` compares tiles (`NAME@8x256x8` rows).
ROW_TILE = (_BLOCK_N, _BLOCK_K, 4)
COLUMN_TILE = (_BLOCK_N, _BLOCK_K, 4)


@triton.jit
def _delta_tile(before, after, n_offs, n_mask, width, stride_n, stride_k,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr):
    """Per-neuron float64 |w_t|^2, <w_t, dw>, |dw|^2 of a tile of neurons, from w_t at `before`, w_t+1 at `after`."""
    acc_w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64)
    acc_dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64)
    acc_dw = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64)
    for i in range(NUM_K):
        k_offs = i * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (k_offs < width)[None, :]
        offs = n_offs[:, None] * stride_n + k_offs[None, :] * stride_k
        w0 = tl.load(before + offs, mask=mask, other=0.0).to(tl.float64)
        dw = tl.load(after + offs, mask=mask, other=0.0).to(tl.float64) - w0
        acc_w += w0 * w0
        acc_dot += w0 * dw
        acc_dw += dw * dw
    return tl.sum(acc_w, axis=1), tl.sum(acc_dot, axis=1), tl.sum(acc_dw, axis=1)


@triton.jit
def _delta_sums_kernel(before, after, out, neurons, width, stride_n, stride_k,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr):
    n_offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < neurons
    w_sq, dot, dw_sq = _delta_tile(before, after, n_offs, n_mask, width, stride_n, stride_k, BLOCK_N, BLOCK_K, NUM_K)
    tl.store(out + n_offs * 3 + 0, w_sq, mask=n_mask)
    tl.store(out + n_offs * 3 + 1, dot, mask=n_mask)
    tl.store(out + n_offs * 3 + 2, dw_sq, mask=n_mask)


def supports(before: Tensor, after: Tensor) -> bool:
    """2-d tensors of one layout and dtype (fp32, bf16, fp16) on CUDA."""
    return ((before.is_cuda or RUN_ON_CPU) and before.dim() == 2 and before.shape == after.shape
            and before.stride() == after.stride() and before.dtype == after.dtype
            and before.dtype in (torch.float32, torch.bfloat16, torch.float16))


def delta_sums(before: Tensor, after: Tensor, axis: int) -> Tensor:
    """[neurons, 3] float64: |w_t|^2, <w_t, dw>, |dw|^2 per neuron along `axis`; see `supports`."""
    neurons, width = before.shape[axis], before.shape[1 - axis]
    out = torch.empty(neurons, 3, dtype=torch.float64, device=before.device)
    block_k = min(_BLOCK_K, triton.next_power_of_2(width))
    launch(_delta_sums_kernel, (triton.cdiv(neurons, _BLOCK_N),),
           (before, after, out, neurons, width, before.stride(axis), before.stride(1 - axis)),
           dict(BLOCK_N=_BLOCK_N, BLOCK_K=block_k, NUM_K=triton.cdiv(width, block_k), num_warps=4), before.device)
    return out


# ---------------------------------------------------------------- batched: one launch per shape
# A measured step of `ModelSource` used to cost ~8 small kernels per tracked tensor (a clone, a
# gradient norm, the delta sums, two row updates): on a GPU, ~1200 launches for GPT-2 124M. The
# two kernels below take every fp32 tensor of one shape and layout in one launch, through int64
# pointer tables as the fused optimizer step does: `_capture_kernel` copies w_t and writes
# |g|^2 per neuron before the step, `_delta_kernel` writes |w_t|^2, <w_t, dw>, |dw|^2 after it.
# Both write straight into the tracker's [neurons, 4] float64 rows.


@triton.jit
def _program_tile(tiles, neurons, BLOCK_N: tl.constexpr):
    """(tensor index, neuron offsets, their mask) of this program: `tiles` programs per tensor."""
    pid = tl.program_id(0)
    n_offs = (pid % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid // tiles, n_offs, n_offs < neurons


@triton.jit
def _capture_kernel(w_tab, g_tab, copy_tab, out_tab, neurons, width, stride_n, stride_k, tiles,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr):
    t, n_offs, n_mask = _program_tile(tiles, neurons, BLOCK_N)
    W = table_address(w_tab, t, tl.float32)
    G = table_address(g_tab, t, tl.float32)
    C = table_address(copy_tab, t, tl.float32)
    OUT = table_rows(out_tab, t)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64)
    for i in range(NUM_K):
        k_offs = i * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (k_offs < width)[None, :]
        offs = n_offs[:, None] * stride_n + k_offs[None, :] * stride_k
        tl.store(C + offs, tl.load(W + offs, mask=mask, other=0.0), mask=mask)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float64)
        acc += g * g
    tl.store(OUT + n_offs * 4 + 3, tl.sum(acc, axis=1), mask=n_mask)


@triton.jit
def _delta_kernel(copy_tab, w_tab, out_tab, neurons, width, stride_n, stride_k, tiles,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr):
    t, n_offs, n_mask = _program_tile(tiles, neurons, BLOCK_N)
    OUT = table_rows(out_tab, t)
    before, after = table_address(copy_tab, t, tl.float32), table_address(w_tab, t, tl.float32)
    w_sq, dot, dw_sq = _delta_tile(before, after, n_offs, n_mask, width, stride_n, stride_k, BLOCK_N, BLOCK_K, NUM_K)
    tl.store(OUT + n_offs * 4 + 0, w_sq, mask=n_mask)
    tl.store(OUT + n_offs * 4 + 1, dot, mask=n_mask)
    tl.store(OUT + n_offs * 4 + 2, dw_sq, mask=n_mask)


def batchable(w: Tensor, grad: Tensor | None) -> bool:
    """Whether `Batch` takes `w`: fp32, non-empty, contiguous, 2-d, 16-byte aligned, with such a gradient, on CUDA."""
    def ok(t: Tensor) -> bool:
        return (t.dtype == torch.float32 and t.dim() == 2 and t.numel() > 0 and t.is_contiguous()
                and t.data_ptr() % 16 == 0)

    return (w.is_cuda or RUN_ON_CPU) and grad is not None and ok(w) and ok(grad) and grad.shape == w.shape


class Batch:
    """Tracked tensors of one shape and neuron axis, measured by one launch before and one after the step.

    The copies of w_t live from `capture` to `measure` only, as a per-tensor clone would (kept
    between measured steps they would add a weight copy to every step's peak). A pointer table
    is re-uploaded only when an address in it changes; the caching allocator usually hands out
    the same blocks again, so a steady measured step uploads little.
    """

    def __init__(self, weights: list[Tensor], axis: int) -> None:
        rows, cols = weights[0].shape
        self.neurons, self.width = (rows, cols) if axis % 2 == 0 else (cols, rows)
        self.stride_n, self.stride_k = (cols, 1) if axis % 2 == 0 else (1, cols)
        self.block_n, block_k, self.num_warps = ROW_TILE if axis % 2 == 0 else COLUMN_TILE
        self.block_k = min(block_k, triton.next_power_of_2(self.width))
        self.tiles = triton.cdiv(self.neurons, self.block_n)
        self.count = len(weights)
        self.copies: list[Tensor] = []
        self._tables = PointerTables(weights[0].device)

    def arguments(self, *tables: Tensor) -> tuple[tuple[int], tuple, dict[str, Any]]:
        """(grid, arguments, compile-time constants) of either kernel, given its pointer tables."""
        args = (*tables, self.neurons, self.width, self.stride_n, self.stride_k, self.tiles)
        constants = dict(BLOCK_N=self.block_n, BLOCK_K=self.block_k, NUM_K=triton.cdiv(self.width, self.block_k),
                         num_warps=self.num_warps)
        return (self.tiles * self.count,), args, constants

    def _launch(self, kernel: Any, *tables: Tensor, warmup: bool = False) -> None:
        grid, args, constants = self.arguments(*tables)
        launch(kernel, grid, args, constants, tables[0].device, warmup)

    def compile(self, weights: list[Tensor], grads: list[Tensor], rows: list[Tensor]) -> None:
        """Compile and load both kernels for these tensors, running nothing (KernelRejected).

        A pointer table's addresses do not change the compiled kernel, so the weights' table
        stands in for the copies' (no copy is made for this).
        """
        w, g, out = self._tables.get("w", weights), self._tables.get("g", grads), self._tables.get("out", rows)
        self._launch(_capture_kernel, w, g, w, out, warmup=True)
        self._launch(_delta_kernel, w, w, out, warmup=True)

    def capture(self, weights: list[Tensor], grads: list[Tensor], rows: list[Tensor]) -> None:
        """Copy the weights and write |g|^2 per neuron into column 3 of `rows` ([neurons, 4] float64 views)."""
        self.copies = [torch.empty_like(w) for w in weights]
        self._launch(_capture_kernel, self._tables.get("w", weights), self._tables.get("g", grads),
                     self._tables.get("copy", self.copies), self._tables.get("out", rows))

    def measure(self, weights: list[Tensor], rows: list[Tensor]) -> None:
        """Write |w_t|^2, <w_t, dw>, |dw|^2 per neuron into columns 0-2 of `rows`."""
        self._launch(_delta_kernel, self._tables.get("copy", self.copies), self._tables.get("w", weights),
                     self._tables.get("out", rows))
        self.copies = []
