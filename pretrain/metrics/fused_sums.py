"""The per-neuron sums of a measured step as one Triton kernel per tensor (CUDA).

`neurons.neuron_sums` computes |w_t|^2, <w_t, dw> and |dw|^2 per neuron through float64 slices
and a batched 2x2 Gram matmul: on a GPU that is a float64 batched matmul of tiny matrices per
slice, 16 ms a step for GPT-2 124M on an H200 (benchmarks/RESULTS.md). Here one program reads
a tile of neurons of w_t and w_{t+1} once, subtracts in float64 (exact for fp32 and bf16
weights) and reduces in float64. tests/test_metrics_fused_sums.py compares it with
`neuron_sums` (on CPU in Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tests set this under Triton's interpreter (TRITON_INTERPRET=1) to run the kernel on CPU tensors.
RUN_ON_CPU = False
_BLOCK_N, _BLOCK_K = 8, 128


@triton.jit
def _delta_sums_kernel(before, after, out, neurons, width, stride_n, stride_k,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr):
    n_offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < neurons
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
    tl.store(out + n_offs * 3 + 0, tl.sum(acc_w, axis=1), mask=n_mask)
    tl.store(out + n_offs * 3 + 1, tl.sum(acc_dot, axis=1), mask=n_mask)
    tl.store(out + n_offs * 3 + 2, tl.sum(acc_dw, axis=1), mask=n_mask)


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
    _delta_sums_kernel[(triton.cdiv(neurons, _BLOCK_N),)](
        before, after, out, neurons, width, before.stride(axis), before.stride(1 - axis),
        BLOCK_N=_BLOCK_N, BLOCK_K=block_k, NUM_K=triton.cdiv(width, block_k), num_warps=4)
    return out
