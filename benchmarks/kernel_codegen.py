"""What our Triton kernels compile to for a GPU, compiled on this machine without one.

    PYTHONPATH=. python benchmarks/kernel_codegen.py [--set llama] [--arch 90] [--row-tile 4096x8]
                                                     [--column-tile 8x256x8]

For every launch that the fused optimizer step (`pretrain/optim/fused.py`) and the batched
rotation sums (`pretrain/metrics/fused_sums.py`) make on a parameter set (the benchmarks'
llama-125m or GPT-2 124M shapes), the kernel is compiled as Triton's JIT compiles it for that
launch: the same specialisation of its arguments (16-byte alignment of pointers, integers
divisible by 16 or equal to 1, compile-time constants), here for an NVIDIA target given by its
compute capability (90: H100/H200). Its PTX and cubin are then read:

- registers per thread, and how many CTAs of its size those registers leave room for on one SM
  (65536 registers; the occupancy a memory-bound kernel needs to keep loads in flight);
- global loads and stores by width: a memory-bound kernel wants 128-bit ones (`v4.b32`).

This is how the lost alignment hint of session 8 was found (every load a 32-bit one, 222-255
registers a thread; benchmarks/RESULTS.md). It needs Triton's bundled ptxas and cuobjdump, and
no GPU or driver; it reads no tensor (the launches are planned on meta tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

import pretrain.metrics.fused_sums as fused_sums
import pretrain.optim.fused as fused
from benchmarks.bench_optim import gpt2_shapes, llama_shapes
from pretrain.optim.hyper import Hyper

# Hopper's (and A100's) limits per SM: registers, resident blocks, resident warps (2048 threads).
_REGISTERS_PER_SM = 65536
_CTAS_PER_SM = 32
_WARPS_PER_SM = 64
# Registers are allocated to a warp in units of 256, i.e. a thread's count rounded up to a multiple of 8.
_REGISTER_UNIT = 8


@dataclass(frozen=True)
class Codegen:
    """What one compiled kernel does per thread: registers, and its global loads and stores by PTX type."""

    registers: int
    local_bytes: int  # spilled registers and stack, a thread
    loads: Counter
    stores: Counter
    num_warps: int
    ptx: str = field(repr=False, default="")

    @property
    def warps_per_sm(self) -> int:
        return self.ctas_per_sm * self.num_warps

    @property
    def ctas_per_sm(self) -> int:
        """Resident CTAs of this kernel that one SM's registers hold (within its block and warp limits)."""
        allocated = -(-max(1, self.registers) // _REGISTER_UNIT) * _REGISTER_UNIT
        by_registers = _REGISTERS_PER_SM // (allocated * 32 * self.num_warps)
        return min(_CTAS_PER_SM, _WARPS_PER_SM // self.num_warps, by_registers)

    @staticmethod
    def vector_share(ops: Counter) -> float:
        """The share of the bytes `ops` move (each thread, one op each) that 128-bit ops move; 64-bit
        scalars (pointer tables, float64 sums) are left out: they are addresses and per-neuron results."""
        def bits(kind: str) -> int:
            lanes, _, width = kind.rpartition(".")
            return int(width[1:]) * (int(lanes[1:]) if lanes else 1)
        moved = {kind: n * bits(kind) for kind, n in ops.items() if kind not in ("b64", "f64", "u64", "s64")}
        wide = sum(b for kind, b in moved.items() if bits(kind) == 128)
        return wide / sum(moved.values()) if moved else 1.0

    def record(self) -> dict[str, Any]:
        return {"registers": self.registers, "local_bytes": self.local_bytes, "warps": self.num_warps,
                "ctas_per_sm": self.ctas_per_sm, "warps_per_sm": self.warps_per_sm,
                "load_vector_share": round(self.vector_share(self.loads), 4),
                "store_vector_share": round(self.vector_share(self.stores), 4),
                "loads": dict(self.loads), "stores": dict(self.stores)}


@dataclass(frozen=True)
class KernelLaunch:
    """One launch as the code makes it: what it is, the kernel, and its arguments."""

    label: str
    kernel: Any
    args: tuple
    constants: dict[str, Any]


def _tools() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


_compiled: dict[tuple, Codegen] = {}


def compile_for(launch: KernelLaunch, arch: int = 90) -> Codegen:
    """Compile `launch` as the JIT would on a device of compute capability `arch`, and read the result.

    Launches the JIT would specialise alike share one compilation (as they share one binary on a GPU).
    """
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.constants)
    key = (kernel.fn.__name__, arch, str(specialization), str(options))
    if key not in _compiled:
        options, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.constants), bound,
                                                                  specialization, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        _compiled[key] = _read(compiled.asm["ptx"], compiled.asm["cubin"], options.num_warps)
    return _compiled[key]


def _read(ptx: str, cubin: bytes, num_warps: int) -> Codegen:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        usage = subprocess.run([os.path.join(_tools(), "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
    registers, local = re.search(r"REG:(\d+)", usage), re.search(r"LOCAL:(\d+)", usage)
    if registers is None or local is None:
        raise RuntimeError(f"cuobjdump reported no register count: {usage.strip()[-200:]}")
    ops = {kind: Counter(re.findall(rf"\b{kind}\.global\.((?:v[24]\.)?[bfsu]\d+)", ptx)) for kind in ("ld", "st")}
    return Codegen(int(registers.group(1)), int(local.group(1)), ops["ld"], ops["st"], num_warps, ptx)


# ----------------------------------------------------------------------------- the launches


def _meta(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    return [torch.empty(shape, device="meta") for shape in shapes]


def _layouts(shapes: dict[str, list[tuple[int, ...]]]) -> Iterator[tuple[str, tuple[int, ...], int | None, bool]]:
    """(role, shape, axis, rotational in an RV run) per distinct shape of a role, as `build_optimizer` groups."""
    axes = {"matrices": 0, "columns": 1, "embedding": 0, "norms": None}
    for role, role_shapes in shapes.items():
        for shape in dict.fromkeys(role_shapes):
            yield role, shape, axes[role], axes[role] is not None


def step_launches(shapes: dict[str, list[tuple[int, ...]]], rule: str, rotational: bool, tracked: bool,
                  flags: bool, count: int = 2) -> Iterator[KernelLaunch]:
    """The fused optimizer step's launches on `shapes` (`count` tensors a shape): an RV run's when
    `rotational` (norms stay plain), else a plain run's; `tracked`: a measured step; `flags`: queued."""
    hyper = Hyper(rule, 1e-3, 0.1, 0.9, 0.95, 1e-8, 1.0, eta=0.01)
    for role, shape, axis, rot in _layouts(shapes):
        rot = rot and rotational
        walk = axis if rot or (tracked and axis is not None) else None
        weights = _meta([shape] * count)
        moments = [_meta([shape] * count) for _ in ("m", "v")]
        neurons = shape[walk] if walk is not None else 1
        per_neuron = _meta([(neurons,)] * count) if rot else None
        launch = fused.make_launch(walk, rot, weights, moments, per_neuron, per_neuron)
        sums = [torch.empty(neurons, 4, dtype=torch.float64, device="meta")] * count if walk is not None and tracked \
            else None
        _, args, constants = launch.arguments(weights, _meta([shape] * count), hyper, sums,
                                              torch.empty(2, device="meta") if flags else None)
        kind = f"{'rv-' if rot else ''}{rule}{' tracked' if sums else ''}{' flags' if flags else ''}"
        tile = f"{launch.block_n}x{launch.block_k}x{launch.num_warps}"
        yield KernelLaunch(f"step {kind}: {role} {tuple(shape)}, tile {tile}", fused._step_kernel, args, constants)


def sums_launches(shapes: dict[str, list[tuple[int, ...]]], count: int = 2) -> Iterator[KernelLaunch]:
    """The batched rotation sums' two launches per tracked shape (`ModelSource`: torch's optimizers)."""
    for role, shape, axis, _ in _layouts(shapes):
        if axis is None:
            continue
        batch = fused_sums.Batch(_meta([shape] * count), axis)
        table = batch._tables.get("w", _meta([shape] * count))
        tile = f"{batch.block_n}x{batch.block_k}x{batch.num_warps}"
        for kernel, tables in ((fused_sums._capture_kernel, (table, table, table, table)),
                               (fused_sums._delta_kernel, (table, table, table))):
            _, args, constants = batch.arguments(*tables)
            yield KernelLaunch(f"sums {kernel.fn.__name__.strip('_')}: {role} {tuple(shape)}, tile {tile}",
                               kernel, args, constants)


def all_launches(shapes: dict[str, list[tuple[int, ...]]]) -> Iterator[KernelLaunch]:
    """What a GPU run makes: the RV-AdamW step queued (flags; one GPU, DDP) plain and measured, and measured
    without flags (FSDP2 and fp16 read the flags first); RV-Lion's; our plain AdamW's; the sums that measure
    torch's AdamW."""
    yield from step_launches(shapes, "adamw", True, tracked=False, flags=True)
    yield from step_launches(shapes, "adamw", True, tracked=True, flags=True)
    yield from step_launches(shapes, "adamw", True, tracked=True, flags=False)
    yield from step_launches(shapes, "lion", True, tracked=False, flags=True)
    yield from step_launches(shapes, "adamw", False, tracked=False, flags=True)
    yield from sums_launches(shapes)


def _tile(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split("x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="llama", choices=["llama", "gpt2"], help="whose parameter set")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 (A100), 90 (H100/H200)")
    parser.add_argument("--row-tile", type=_tile, help="fused.ROW_TILE: elements x warps, e.g. 4096x8")
    parser.add_argument("--column-tile", type=_tile, help="fused.COLUMN_TILE: columns x rows x warps")
    parser.add_argument("--json", action="store_true", help="one JSON object a launch, a line each")
    args = parser.parse_args()
    fused.ROW_TILE = args.row_tile or fused.ROW_TILE
    fused.COLUMN_TILE = args.column_tile or fused.COLUMN_TILE
    shapes = (llama_shapes if args.set == "llama" else gpt2_shapes)(1)
    if args.json:
        for launch in all_launches(shapes):
            print(json.dumps({"launch": launch.label, **compile_for(launch, args.arch).record()}))
        return
    print(f"Triton {triton.__version__} for sm_{args.arch}, {args.set} shapes; row tile {fused.ROW_TILE}, "
          f"column tile {fused.COLUMN_TILE}")
    print("| launch | registers | spilled bytes | CTAs/SM | warps/SM | loads: 128-bit share | stores: 128-bit share |")
    print("|---|---|---|---|---|---|---|")
    for launch in all_launches(shapes):
        code = compile_for(launch, args.arch)
        print(f"| {launch.label} | {code.registers} | {code.local_bytes} | {code.ctas_per_sm} | {code.warps_per_sm} | "
              f"{code.vector_share(code.loads):.0%} | {code.vector_share(code.stores):.0%} |")


if __name__ == "__main__":
    main()
