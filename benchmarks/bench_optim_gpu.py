"""Optimizer step time on one GPU: our fused (Triton) and eager steps against torch's fused AdamW.

    PYTHONPATH=. python benchmarks/bench_optim_gpu.py [--reps 50] [--layers 12] [--set gpt2]

`--set llama` (default): the llama-125m parameter set (benchmarks/bench_optim.py `llama_shapes`:
84 block matrices, the 32000 x 768 embedding, 25 norms). `--set gpt2`: GPT-2 124M's
(`gpt2_shapes`: 48 Conv1D matrices whose neurons are columns, two embeddings, 98 biases and
norms), the layout whose fused kernel walks column neurons. fp32 CUDA tensors with fixed
random gradients. RV rows make the matrices and the embeddings rotational (per neuron / per
token row, as the paper's code); plain rows decay the same tensors. Every optimizer is built once; each repetition steps
every optimizer once, in an order that rotates, and CUDA events time each step. Reported:
median step time (CUDA events) and its ratio to torch's `AdamW(fused=True)`, and the host time of
the `step()` call (when it nears the step time, Python and launches bound the step, not the GPU).
`+sums` rows also write the rotation tracker's per-neuron sums for every matrix (a
`logging.rotation_every=1` step). `NAME@32x64x4` plans NAME's kernel launches with column tiles of
32 columns x 64 rows and 4 warps (`pretrain.optim.fused.COLUMN_TILE`), to compare the column walk's
tiles; a tile whose rows cover a neuron (768 rows: `@4x1024x8`) walks it in one pass.
`NAME@r4096x8` plans them with row tiles of 4096 elements and 8 warps (`fused.ROW_TILE`: llama's
matrices and every embedding). `benchmarks/kernel_codegen.py` gives each tile's registers on CPU.
Fused rows (torch's and ours) step as a training step on a GPU does (`TorchEngine._step_on_device`):
with `found_inf` and `grad_scale` set as device tensors (no skip, divisor 1), which both take in
their kernels; eager rows without them, as the engine steps them. Until session 9 no row had them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pretrain.optim.fused as fused
from benchmarks.bench_optim import gpt2_shapes, llama_shapes
from pretrain.optim import RotationalOptimizer


def make_params(shapes: dict[str, list[tuple[int, ...]]], seed: int = 0) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = {}
    for role, role_shapes in shapes.items():
        out[role] = []
        for shape in role_shapes:
            p = torch.randn(shape, device="cuda", generator=gen) * 0.02
            p.grad = torch.randn(shape, device="cuda", generator=gen)
            out[role].append(p)
    return out


def build(name: str, shapes: dict, wd: float = 0.1) -> tuple[torch.optim.Optimizer, dict]:
    params = make_params(shapes)
    matrices, columns = params.get("matrices", []) + params["embedding"], params.get("columns", [])
    if name == "torch-fused":
        groups = [{"params": matrices + columns, "weight_decay": wd},
                  {"params": params["norms"], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), fused=True), params
    rule, _, mode = name.partition(":")
    rv = rule.startswith("rv-")
    groups = [{"params": matrices, "weight_decay": wd, "rotational": rv},
              {"params": params["norms"], "weight_decay": 0.0, "rotational": False}]
    if columns:
        groups.append({"params": columns, "weight_decay": wd, "rotational": rv, "neuron_axis": 1})
    opt = RotationalOptimizer(groups, rule=rule.removeprefix("rv-"), lr=1e-3, betas=(0.9, 0.95),
                              fused=mode != "eager")
    return opt, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--set", default="llama", choices=["llama", "gpt2"], help="whose parameter set")
    parser.add_argument("--names", default="torch-fused,adamw,adamw:eager,rv-adamw,rv-adamw:eager,rv-adamw+sums,"
                                          "lion,lion:eager,rv-lion,rv-lion:eager,sgdm,rv-sgdm")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (benchmarks/bench_optim.py times the steps on a CPU)")
    shapes = (llama_shapes if args.set == "llama" else gpt2_shapes)(args.layers)
    optimizers = {}
    default_tiles = fused.ROW_TILE, fused.COLUMN_TILE
    for name in args.names.split(","):
        spec, _, tile = name.partition("@")
        fused.ROW_TILE, fused.COLUMN_TILE = default_tiles
        if tile.startswith("r"):
            fused.ROW_TILE = tuple(int(n) for n in tile[1:].split("x"))
        elif tile:
            fused.COLUMN_TILE = tuple(int(n) for n in tile.split("x"))
        opt, params = build(spec.removesuffix("+sums"), shapes)
        if not spec.endswith(":eager"):
            opt.found_inf, opt.grad_scale = torch.zeros((), device="cuda"), torch.ones((), device="cuda")
        rows = None
        if spec.endswith("+sums"):
            axes = [(t, 0) for t in params.get("matrices", []) + params["embedding"]]
            axes += [(t, 1) for t in params.get("columns", [])]
            sums = torch.zeros(sum(t.shape[axis] for t, axis in axes), 4, dtype=torch.float64, device="cuda")
            rows, start = {}, 0
            for t, axis in axes:
                rows[id(t)] = (axis, sums[start:start + t.shape[axis]])
                start += t.shape[axis]
        optimizers[name] = (opt, rows)
        for _ in range(3):  # compile the kernels, settle the allocator
            if rows is not None:
                opt.request_rotation_sums(rows)
            opt.step()
    fused.ROW_TILE, fused.COLUMN_TILE = default_tiles
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    host: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            opt, rows = optimizers[name]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            began = time.perf_counter()
            if rows is not None:
                opt.request_rotation_sums(rows)
            opt.step()
            host[name].append(1e3 * (time.perf_counter() - began))
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    numel = sum(torch.Size(s).numel() for role in shapes.values() for s in role)
    base = statistics.median(times["torch-fused"]) if "torch-fused" in times else None
    print(f"optimizer step, {args.set} parameter set ({numel / 1e6:.1f}M fp32), {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, median of {args.reps}")
    print("| optimizer | step ms | vs torch fused AdamW | host ms |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"| {name} | {median:.3f} | {ratio} | {statistics.median(host[name]):.3f} |")


if __name__ == "__main__":
    main()
