"""The optimizer step as one Triton kernel per tensor shape: plain or rotational, with rotation sums.

The eager step (pretrain/optim/rotational.py) makes about 15 passes over memory per tensor
and launches a few kernels per tensor for the per-neuron sums. Here one program owns a tile
of whole neurons (`BLOCK_N` neurons x up to `BLOCK_K` elements each) and does the whole step
in registers: inner rule (AdamW, Lion, SGDM moments), the five per-neuron sums, the
coefficients a, b, c (docs/design.md, the RV step) and w <- a*w + b*u + c. A neuron that fits
the tile is read once and written once, like torch's fused AdamW; a longer one (or a column
neuron of GPT-2's Conv1D with many rows) takes two passes over its elements.

Tensors of one shape share a launch: the program reads its tensor's addresses from int64
pointer tables, so a llama block stack costs four launches, not one per tensor.

On a measured step the same kernel also writes the rotation tracker's per-neuron sums
(|w_t|^2, <w_t, dw>, |dw|^2, |g|^2 in float64, pretrain/metrics/sources.py `FusedSource`), so
the metrics add no pass over the weights.

Only fp32 CUDA tensors with whole neurons take this path; everything else (CPU, ZeRO flat
partitions, neurons split across ranks) takes the eager one, which tests/test_optim_fused.py
compares it with (on CPU through Triton's interpreter).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from pretrain.optim.hyper import RULE_IDS, Hyper, KernelRejected

_TINY = torch.finfo(torch.float32).tiny
# Row neurons (nn.Linear [out, in], embeddings, flat chunks): a tile of up to this many elements of
# each role, as many whole neurons as fit, with this many warps when full (4 when a narrow layout
# leaves it part-empty). 2048 x 8 warps, not 4096: with 128-bit loads the kernel needs 80-127
# registers a thread at 2048 elements against 127-175 at 4096, so three CTAs (24 warps) share an
# SM instead of one (PTX for sm_90, benchmarks/kernel_codegen.py). Not yet timed on a GPU:
# `benchmarks/bench_optim_gpu.py` compares tiles (`NAME@r4096x8` rows).
ROW_TILE = (2048, 8)
# A neuron up to this wide is held whole in registers, even past ROW_TILE's elements (one neuron a
# tile): a second pass over a wider one re-reads the tensor. Wider ones loop over 1024-element slices.
ONE_PASS_WIDTH = 4096
# Elements per program for flat (non-neuron) tensors: norms, biases.
_FLAT_BLOCK = 2048
# Column neurons (GPT-2's Conv1D [in, out]) are walked (adjacent columns, rows, warps) at a time;
# a neuron longer than the tile's rows takes two passes. 8 columns fill a 32-byte sector. With 4
# warps every tile took 2.4-2.7x torch's fused AdamW on GPT-2's set (H100 and H200): the two-pass
# walk keeps five per-lane sums, and 4 warps leave too few threads in flight. 8 warps: 3.80 ->
# 2.59 ms (H200, 8 x 256, when every access was 32-bit; RESULTS.md). With 128-bit accesses a thread
# of an 8 x 256 tile holds 8 elements of each role and needs 113 registers, and 171 in a measured
# step, which runs queued (with flags) since session 9: two CTAs an SM, then one. 8 x 128 holds one
# 128-bit vector of each role a thread: 64 and 128 registers, four CTAs an SM, then two (PTX for
# sm_90, benchmarks/kernel_codegen.py). An occupancy argument, not yet timed on a GPU:
# `benchmarks/bench_optim_gpu.py --set gpt2` compares tiles (`NAME@8x256x8` rows).
COLUMN_TILE = (8, 128, 8)


@triton.jit
def _direction(w, g, m, v, wd, beta1, beta2, eps, RULE: tl.constexpr, ROTATIONAL: tl.constexpr):
    """(u, new m, new v) of the inner rule, u without lr or scale; SGDM's plain decay is coupled (L2)."""
    if RULE == 0:  # AdamW: u = m / (sqrt(v) + eps'), scale = sqrt(bc2) / bc1 applied by the caller
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        u = m / (tl.sqrt(v) + eps)
    elif RULE == 1:  # Lion: the sign of the interpolation, then the momentum moves
        mix = m + (1.0 - beta1) * (g - m)
        u = tl.where(mix > 0, 1.0, tl.where(mix < 0, -1.0, 0.0))
        m = m + (1.0 - beta2) * (g - m)
    else:  # SGDM, beta1 = momentum
        if not ROTATIONAL:
            g = g + wd * w
        m = m * beta1 + g
        u = m
    return u, m, v


@triton.jit
def _load_step(W, G, M, V, offs, mask, wd, beta1, beta2, eps, g_div, RULE: tl.constexpr, ROTATIONAL: tl.constexpr,
               FLAGS: tl.constexpr):
    """Load a tile and take the inner rule's step: (w, g, u, new m, new v); masked lanes are 0.

    With FLAGS the gradient is divided by `g_div` (the clipping a loss scaler's `grad_scale` carries)."""
    w = tl.load(W + offs, mask=mask, other=0.0)
    g = tl.load(G + offs, mask=mask, other=0.0)
    if FLAGS:
        g = g / g_div
    m = tl.load(M + offs, mask=mask, other=0.0)
    if RULE == 0:  # noqa: SIM108 (a compile-time branch: the other rules never load v)
        v = tl.load(V + offs, mask=mask, other=0.0)
    else:
        v = m
    u, m, v = _direction(w, g, m, v, wd, beta1, beta2, eps, RULE, ROTATIONAL)
    return w, g, tl.where(mask, u, 0.0), m, v


@triton.jit
def _coefficients(w_sq, u_sq, dot, w_sum, u_sum, width, norm, avg, scale, eta, decay, decay_bias, rot_eps,
                  ZERO_MEAN: tl.constexpr):
    """Per-neuron a, b, c and the new update-norm average: the algebra of `_rotation_coefficients`."""
    alpha = dot / tl.maximum(w_sq, 1.1754943508222875e-38)
    u2_sq = u_sq - alpha * dot
    if ZERO_MEAN:
        u1_sum = u_sum - alpha * w_sum
        mu = u1_sum / width
        nu = w_sum / width
        u2_sq = u2_sq - mu * u1_sum
    u2_sq = tl.maximum(u2_sq, 0.0)
    avg = avg * decay + ((1.0 - decay) * scale * scale) * u2_sq
    beta = (eta * scale) * norm / (tl.sqrt(avg / decay_bias) + rot_eps)
    w1_sq = w_sq + beta * beta * u2_sq
    if ZERO_MEAN:
        w1_sq = w1_sq - w_sum * (nu - 2.0 * beta * mu)
    r = norm / tl.sqrt(tl.maximum(w1_sq, 1.1754943508222875e-38))
    if ZERO_MEAN:  # noqa: SIM108 (a compile-time branch)
        c = r * (beta * mu - nu)
    else:
        c = tl.zeros_like(r)
    return r + r * beta * alpha, -r * beta, c, avg


@triton.jit
def _apply(W, M, V, offs, mask, w, u, m, v, a, b, c, lr, wd, scale,
           RULE: tl.constexpr, ROTATIONAL: tl.constexpr):
    """Write the new weights and moments of a tile; returns the new weights."""
    if ROTATIONAL:
        new_w = a[:, None] * w + b[:, None] * u + c[:, None]
    elif RULE == 2:
        new_w = w - lr * u
    else:
        new_w = w * (1.0 - lr * wd) - (lr * scale) * u
    tl.store(W + offs, new_w, mask=mask)
    tl.store(M + offs, m, mask=mask)
    if RULE == 0:
        tl.store(V + offs, v, mask=mask)
    return new_w


@triton.jit
def table_address(table, t, DTYPE: tl.constexpr):
    """The `DTYPE` tensor address at `table[t]`, said to be 16-byte aligned (the launcher checks it).

    The hint must be on the pointer: said of the int64 before the cast, it is lost, and every
    load and store of the kernel became a 32-bit one with twice the registers (PTX for sm_90:
    222 -> 104 registers a thread for plain AdamW; tests/test_kernel_codegen.py keeps it so).
    """
    return tl.multiple_of(tl.load(table + t).to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def table_rows(table, t):
    """The float64 [neurons, 4] rows at `table[t]` (the tracker's sums): no alignment is claimed, none is needed
    for their strided stores."""
    return tl.load(table + t).to(tl.pointer_type(tl.float64))


@triton.jit
def _step_kernel(
    w_tab, g_tab, m_tab, v_tab, norm_tab, avg_tab, sums_tab, flags,
    numel, neurons, width, stride_n, stride_k, tiles_per_tensor,
    lr, wd, beta1, beta2, eps, scale, eta, decay, decay_bias, rot_eps,
    RULE: tl.constexpr, ROTATIONAL: tl.constexpr, ZERO_MEAN: tl.constexpr, TRACK: tl.constexpr,
    FLAGS: tl.constexpr, SINGLE_PASS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid // tiles_per_tensor
    n_offs = (pid % tiles_per_tensor) * BLOCK_N + tl.arange(0, BLOCK_N)
    g_div = 1.0
    if FLAGS:  # flags = [skip, gradient divisor]: a skipped step masks every load and store off
        n_mask = n_offs < tl.where(tl.load(flags) == 0.0, neurons, 0)
        g_div = tl.load(flags + 1)
    else:
        n_mask = n_offs < neurons
    k_base = tl.arange(0, BLOCK_K)
    # Addresses come from tables; saying they are 16-byte aligned (Launch checks it) lets the
    # compiler use vector loads and stores.
    W = table_address(w_tab, t, tl.float32)
    G = table_address(g_tab, t, tl.float32)
    M = table_address(m_tab, t, tl.float32)
    V = table_address(v_tab, t, tl.float32)  # read by AdamW only
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    a, b, c = zero, zero, zero
    t_w = tl.zeros([BLOCK_N], dtype=tl.float64)
    t_dot, t_dw, t_g = t_w, t_w, t_w

    if ROTATIONAL:
        norm_ptr = table_address(norm_tab, t, tl.float32)
        avg_ptr = table_address(avg_tab, t, tl.float32)
        norm = tl.load(norm_ptr + n_offs, mask=n_mask, other=0.0)
        avg = tl.load(avg_ptr + n_offs, mask=n_mask, other=0.0)
        w_sq, u_sq, dot, w_sum, u_sum = zero, zero, zero, zero, zero
        if SINGLE_PASS:  # the whole neuron is in registers: read once, write once
            offs = n_offs[:, None] * stride_n + k_base[None, :] * stride_k
            mask = n_mask[:, None] & (k_base < width)[None, :]
            w, g, u, m, v = _load_step(W, G, M, V, offs, mask, wd, beta1, beta2, eps, g_div, RULE, ROTATIONAL, FLAGS)
            w_sq, u_sq, dot = tl.sum(w * w, axis=1), tl.sum(u * u, axis=1), tl.sum(u * w, axis=1)
            w_sum, u_sum = tl.sum(w, axis=1), tl.sum(u, axis=1)
            a, b, c, avg = _coefficients(w_sq, u_sq, dot, w_sum, u_sum, width * 1.0, norm, avg, scale, eta, decay,
                                         decay_bias, rot_eps, ZERO_MEAN)
            new_w = _apply(W, M, V, offs, mask, w, u, m, v, a, b, c, lr, wd, scale, RULE, ROTATIONAL)
            if TRACK:
                w64 = w.to(tl.float64)
                dw = tl.where(mask, new_w.to(tl.float64) - w64, 0.0)
                g64 = g.to(tl.float64)
                t_w, t_dot = tl.sum(w64 * w64, axis=1), tl.sum(w64 * dw, axis=1)
                t_dw, t_g = tl.sum(dw * dw, axis=1), tl.sum(g64 * g64, axis=1)
        else:  # pass 1: the sums only, accumulated per lane and reduced once after the loop
            acc_w_sq = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc_u_sq = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc_dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc_w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for i in range(NUM_K):
                k_offs = i * BLOCK_K + k_base
                offs = n_offs[:, None] * stride_n + k_offs[None, :] * stride_k
                mask = n_mask[:, None] & (k_offs < width)[None, :]
                w, g, u, m, v = _load_step(W, G, M, V, offs, mask, wd, beta1, beta2, eps, g_div, RULE, ROTATIONAL,
                                           FLAGS)
                acc_w_sq += w * w
                acc_u_sq += u * u
                acc_dot += u * w
                acc_w += w
                acc_u += u
            w_sq, u_sq, dot = tl.sum(acc_w_sq, axis=1), tl.sum(acc_u_sq, axis=1), tl.sum(acc_dot, axis=1)
            w_sum, u_sum = tl.sum(acc_w, axis=1), tl.sum(acc_u, axis=1)
            a, b, c, avg = _coefficients(w_sq, u_sq, dot, w_sum, u_sum, width * 1.0, norm, avg, scale, eta, decay,
                                         decay_bias, rot_eps, ZERO_MEAN)
        tl.store(avg_ptr + n_offs, avg, mask=n_mask)

    if not (ROTATIONAL and SINGLE_PASS):  # the (second) pass that writes
        for i in range(NUM_K):
            k_offs = i * BLOCK_K + k_base
            offs = n_offs[:, None] * stride_n + k_offs[None, :] * stride_k
            mask = n_mask[:, None] & (k_offs < width)[None, :] & (offs < numel)
            w, g, u, m, v = _load_step(W, G, M, V, offs, mask, wd, beta1, beta2, eps, g_div, RULE, ROTATIONAL, FLAGS)
            new_w = _apply(W, M, V, offs, mask, w, u, m, v, a, b, c, lr, wd, scale, RULE, ROTATIONAL)
            if TRACK:
                w64 = w.to(tl.float64)
                dw = tl.where(mask, new_w.to(tl.float64) - w64, 0.0)
                g64 = g.to(tl.float64)
                t_w += tl.sum(w64 * w64, axis=1)
                t_dot += tl.sum(w64 * dw, axis=1)
                t_dw += tl.sum(dw * dw, axis=1)
                t_g += tl.sum(g64 * g64, axis=1)

    if TRACK:
        S = table_rows(sums_tab, t)
        tl.store(S + n_offs * 4 + 0, t_w, mask=n_mask)
        tl.store(S + n_offs * 4 + 1, t_dot, mask=n_mask)
        tl.store(S + n_offs * 4 + 2, t_dw, mask=n_mask)
        tl.store(S + n_offs * 4 + 3, t_g, mask=n_mask)


@dataclass(frozen=True)
class Layout:
    """How a kernel walks one tensor: `neurons` x `width` elements at the given strides."""

    neurons: int
    width: int
    stride_n: int
    stride_k: int

    @staticmethod
    def of(t: Tensor, axis: int | None) -> Layout:
        """Neuron-major along `axis` of a contiguous 2-d tensor; None: flat chunks (no neurons)."""
        if axis is None:
            return Layout(triton.cdiv(t.numel(), _FLAT_BLOCK), _FLAT_BLOCK, _FLAT_BLOCK, 1)
        rows, cols = t.shape
        return Layout(rows, cols, cols, 1) if axis % 2 == 0 else Layout(cols, rows, 1, cols)


def launch(kernel: Any, grid: tuple[int, ...], args: tuple, constants: dict[str, Any], device: torch.device,
           warmup: bool = False) -> None:
    """Queue `kernel` on `device` (its current stream); `warmup`: only compile and load it (`compile_only`).

    Triton launches on the current CUDA device, not on its arguments': a process on cuda:1 that left
    cuda:0 current (library use without `torch.cuda.set_device`) would run the kernel on cuda:0 with
    cuda:1's pointer tables. Making `device` current costs a device query when it already is.
    """
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if warmup:
            compile_only(kernel, grid, args, constants)
        else:
            kernel[grid](*args, **constants)


def compile_only(kernel: Any, grid: tuple[int, ...], args: tuple, constants: dict[str, Any]) -> None:
    """Compile `kernel` for these arguments and load it onto the device, running nothing.

    Triton's `warmup` compiles; loading the module (where a driver older than Triton's
    toolchain, or a kernel over the device's shared memory, fails) happens at the first launch
    unless asked for here. Under the interpreter there is nothing to compile. Raises
    KernelRejected with the compiler's last line.
    """
    try:
        compiled = kernel.warmup(*args, grid=grid, **constants)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled  # an asynchronous compile
        load = getattr(compiled, "_init_handles", None)
        if load is not None:
            load()
    except Exception as exc:  # noqa: BLE001 (the compiler and the loader raise several kinds)
        raise KernelRejected((str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]) from exc


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 when Triton was imported)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(t: Tensor, grad: Tensor | None, axis: int | None) -> bool:
    """Whether the kernel can update `t` (walked along `axis`, None: flat) in place from `grad` (None: unknown).

    CPU tensors count only under Triton's interpreter (as in tests).
    """
    own = (t.is_cuda or (t.device.type == "cpu" and interpreting())) and t.dtype == torch.float32 and (
        t.is_contiguous() and _aligned(t) and (axis is None or t.dim() == 2))
    return own and (grad is None or (grad.dtype == torch.float32 and grad.is_contiguous()))


def _aligned(t: Tensor) -> bool:
    return t.data_ptr() % 16 == 0


class PointerTables:
    """int64 device tables of tensor addresses, one per role, re-uploaded only when an address changes.

    An upload goes through pinned memory without blocking: a plain `torch.tensor(..., device=cuda)`
    is a blocking copy, which waits for every kernel queued before it (the whole backward pass).
    The pinned block is not reused before its copy is done (torch's caching host allocator).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._ptrs: dict[str, tuple[int, ...]] = {}
        self._tables: dict[str, Tensor] = {}

    def get(self, role: str, tensors: list[Tensor], ptrs: tuple[int, ...] | None = None) -> Tensor:
        """The table of `tensors` (whose addresses are `ptrs`, when already known)."""
        ptrs = ptrs or tuple(t.data_ptr() for t in tensors)
        if self._ptrs.get(role) != ptrs:
            host = torch.tensor(ptrs, dtype=torch.int64)
            on_gpu = self.device.type == "cuda"
            self._tables[role] = (host.pin_memory() if on_gpu else host).to(self.device, non_blocking=on_gpu)
            self._ptrs[role] = ptrs
        return self._tables[role]

    def address(self, role: str) -> tuple[int, ...] | None:
        """The addresses of the current table of `role` (None: none yet)."""
        return self._ptrs.get(role)


class Launch:
    """Same-shaped tensors that one kernel launch steps, with their pointer tables.

    A table is re-uploaded only when an address in it changes: the weights and optimizer state
    never move, and the caching allocator usually hands backward the same gradient blocks, so
    a steady-state step uploads nothing.
    """

    def __init__(self, layout: Layout, rotational: bool, weights: list[Tensor], moments: list[list[Tensor]],
                 norms: list[Tensor] | None, avgs: list[Tensor] | None) -> None:
        self.layout, self.rotational, self.count = layout, rotational, len(weights)
        self.block_n, self.block_k, self.num_warps = tile_for(layout)
        self.tiles = triton.cdiv(layout.neurons, self.block_n)
        self.numel = weights[0].numel()
        self.device = weights[0].device
        self._tables = PointerTables(self.device)
        # Tables of tensors that never move (moments, per-neuron state) are built once. The kernel
        # reads them with 16-byte loads; the optimizer keeps its state so aligned (load_state_dict).
        fixed = [t for role in (*moments, norms or [], avgs or []) for t in role]
        if not all(_aligned(t) for t in fixed):
            raise RuntimeError("optimizer state of a fused launch is not 16-byte aligned")
        self._fixed = [self._tables.get("m", moments[0]), self._tables.get("v", moments[-1]),
                       self._tables.get("norm", norms or weights), self._tables.get("avg", avgs or weights)]
        self._no_sums = torch.zeros(len(weights), dtype=torch.int64, device=self.device)

    def run(self, weights: list[Tensor], grads: list[Tensor], hyper: Hyper, sums: list[Tensor] | None = None,
            warmup: bool = False, flags: Tensor | None = None) -> None:
        """One step; `sums`: per tensor a float64 [neurons, 4] view (rows contiguous) for the rotation tracker.

        `flags`: a float32 [2] device tensor, [skip, gradient divisor]: a non-zero skip changes
        nothing, else the gradient is divided by the divisor (clipping decided on the device).
        `warmup`: compile and load the kernel for these arguments and run nothing (KernelRejected).
        """
        grid, args, constants, copies = self._arguments(weights, grads, hyper, sums, flags)
        launch(_step_kernel, grid, args, constants, self.device, warmup)
        del copies  # held until the kernel is queued: its table has only their addresses

    def arguments(self, weights: list[Tensor], grads: list[Tensor], hyper: Hyper, sums: list[Tensor] | None = None,
                  flags: Tensor | None = None) -> tuple[tuple[int], tuple, dict[str, Any]]:
        """(grid, arguments, compile-time constants) of `_step_kernel` for `run`'s arguments, to compile it: the
        aligned copies of unaligned gradients, if any, are freed on return."""
        return self._arguments(weights, grads, hyper, sums, flags)[:3]

    def _arguments(self, weights: list[Tensor], grads: list[Tensor], hyper: Hyper, sums: list[Tensor] | None,
                   flags: Tensor | None) -> tuple[tuple[int], tuple, dict[str, Any], list[Tensor]]:
        """`arguments`, and the gradients whose addresses the gradient table holds (copies of unaligned ones)."""
        layout = self.layout
        weight_ptrs = tuple(w.data_ptr() for w in weights)
        if weight_ptrs != self._tables.address("w") and any(ptr % 16 for ptr in weight_ptrs):
            raise RuntimeError("a weight of a fused launch moved to an address that is not 16-byte aligned")
        grad_ptrs: tuple[int, ...] | None = tuple(g.data_ptr() for g in grads)
        if grad_ptrs != self._tables.address("g") and any(ptr % 16 for ptr in grad_ptrs):
            # A gradient that is a view into a flat buffer (FSDP2's reduce-scatter output, say) may
            # not be 16-byte aligned; the kernel only reads gradients, so an aligned copy will do.
            grads, grad_ptrs = [g if _aligned(g) else g.clone() for g in grads], None
        sums_table = self._tables.get("sums", sums) if sums is not None else self._no_sums
        tables = self._tables.get("w", weights, weight_ptrs), self._tables.get("g", grads, grad_ptrs)
        args = (*tables, *self._fixed, sums_table, flags if flags is not None else self._no_sums, self.numel,
                layout.neurons, layout.width, layout.stride_n, layout.stride_k, self.tiles, hyper.lr,
                hyper.weight_decay, hyper.beta1, hyper.beta2, hyper.eps, hyper.scale, hyper.eta, hyper.decay,
                hyper.decay_bias, hyper.rot_eps)
        constants = dict(
            RULE=RULE_IDS[hyper.rule], ROTATIONAL=self.rotational, ZERO_MEAN=hyper.zero_mean, TRACK=sums is not None,
            FLAGS=flags is not None, SINGLE_PASS=self.block_k >= layout.width, BLOCK_N=self.block_n,
            BLOCK_K=self.block_k, NUM_K=triton.cdiv(layout.width, self.block_k), num_warps=self.num_warps)
        return (self.tiles * self.count,), args, constants, grads


def tile_for(layout: Layout) -> tuple[int, int, int]:
    """(neurons, elements of each, warps) of one program's tile: `COLUMN_TILE` for column neurons, else
    as many whole neurons as `ROW_TILE` holds."""
    width = triton.next_power_of_2(layout.width)
    if layout.stride_k != 1:
        block_n, rows, warps = COLUMN_TILE
        return block_n, min(width, rows), warps
    elements, warps = ROW_TILE
    block_k = width if width <= max(elements, ONE_PASS_WIDTH) else min(1024, elements)
    block_n = max(1, min(16, elements // block_k))
    return block_n, block_k, warps if block_n * block_k >= elements else 4


def make_launch(walk: int | None, rotational: bool, weights: list[Tensor], moments: list[list[Tensor]],
                norms: list[Tensor] | None, avgs: list[Tensor] | None) -> Launch:
    return Launch(Layout.of(weights[0], walk), rotational, weights, moments, norms, avgs)
