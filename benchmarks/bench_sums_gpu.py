"""The rotation tracker's batched sum kernels on one GPU, per tile, against torch's fused AdamW step.

    PYTHONPATH=. python benchmarks/bench_sums_gpu.py --set gpt2 [--reps 30] [--tiles default,8x256x8,16x128x4]

A measured step of a run whose optimizer writes no sums itself (torch's AdamW: `ModelSource`,
pretrain/metrics/sources.py) launches two kernels per tracked shape (pretrain/metrics/fused_sums.py
`Batch`): `capture` copies w_t and sums |g|^2 per neuron before the update, `measure` sums
|w_t|^2, <w_t, dw>, |dw|^2 after it. This times both over every tracked tensor of the parameter set
(benchmarks/bench_optim.py's shapes: `--set gpt2`, column neurons; `--set llama`, row neurons),
with CUDA events, and the host time of the calls. A tile `BNxBKxW` (neurons, elements per neuron,
warps) replaces the tile of the set's layout (`fused_sums.COLUMN_TILE` for gpt2, `ROW_TILE` for
llama; the embeddings keep the row tile); `default` is the shipped one. torch's fused AdamW step
over the same tensors is the scale: the sums read and write about as many bytes.

`--device cpu` runs the kernels in Triton's interpreter (set TRITON_INTERPRET=1), with
`--layers 1 --hidden 64 --vocab 512`, as a smoke test of the script; its times mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import pretrain.metrics.fused_sums as fused_sums
from benchmarks.bench_optim import gpt2_shapes, llama_shapes


def tracked(shapes: dict[str, list[tuple[int, ...]]], device: torch.device) -> list[tuple[torch.Tensor, int]]:
    """(tensor with a gradient, neuron axis) of every tracked matrix: rows of Linear and embeddings, Conv1D columns."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for role, axis in (("matrices", 0), ("embedding", 0), ("columns", 1)):
        for shape in shapes.get(role, []):
            p = (torch.randn(shape, generator=gen) * 0.02).to(device)
            p.grad = torch.randn(shape, generator=gen).to(device)
            out.append((p, axis))
    return out


def sums_step(params: list[tuple[torch.Tensor, int]], tile: tuple[int, int, int] | None,
              column_set: bool) -> Callable[[], None]:
    """One measured step's kernels (capture, a stand-in update, measure) with `tile` for the set's layout."""
    default_rows, default_cols = fused_sums.ROW_TILE, fused_sums.COLUMN_TILE
    if tile is not None and column_set:
        fused_sums.COLUMN_TILE = tile
    elif tile is not None:
        fused_sums.ROW_TILE = tile
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p, axis in params:
        groups.setdefault((tuple(p.shape), axis), []).append(p)
    device = params[0][0].device
    plans = []
    for (_, axis), weights in groups.items():
        neurons = weights[0].shape[axis]
        out = torch.zeros(len(weights) * neurons, 4, dtype=torch.float64, device=device)
        rows = list(out.split(neurons))
        batch = fused_sums.Batch(weights, axis)
        batch.compile(weights, [w.grad for w in weights], rows)
        plans.append((batch, weights, [w.grad for w in weights], rows))
    fused_sums.ROW_TILE, fused_sums.COLUMN_TILE = default_rows, default_cols

    def step() -> None:
        for batch, weights, grads, rows in plans:
            batch.capture(weights, grads, rows)
        for _, weights, _, _ in plans:
            torch._foreach_add_(weights, 1e-6)  # the update the sums compare against
        for batch, weights, _, rows in plans:
            batch.measure(weights, rows)

    return step


def adamw_step(params: list[tuple[torch.Tensor, int]]) -> Callable[[], None]:
    weights = [p for p, _ in params]
    fused = weights[0].is_cuda
    optimizer = torch.optim.AdamW(weights, lr=1e-3, weight_decay=0.1, fused=fused, foreach=not fused)
    return optimizer.step


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(device ms, host ms) of one call."""
    if device.type != "cuda":
        began = time.perf_counter()
        fn()
        ms = 1e3 * (time.perf_counter() - began)
        return ms, ms
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    began = time.perf_counter()
    fn()
    host = 1e3 * (time.perf_counter() - began)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="gpt2", choices=["llama", "gpt2"], help="whose parameter set")
    parser.add_argument("--tiles", default="default,8x256x8,8x256x4,16x128x8,4x512x8")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=None, help="embedding rows (default: the model's)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--device cpu needs TRITON_INTERPRET=1 (Triton's interpreter)")
        fused_sums.RUN_ON_CPU = True
    size = {"hidden": args.hidden, **({"vocab": args.vocab} if args.vocab else {})}
    shapes = (gpt2_shapes if args.set == "gpt2" else llama_shapes)(args.layers, **size)
    params = tracked(shapes, device)
    rows = {"torch fused AdamW step": adamw_step(params)}
    for name in args.tiles.split(","):
        tile = None if name == "default" else tuple(int(n) for n in name.split("x"))
        layout = fused_sums.COLUMN_TILE if args.set == "gpt2" else fused_sums.ROW_TILE
        label = f"sums @{'x'.join(map(str, tile or layout))}" + (" (default)" if tile is None else "")
        rows[label] = sums_step(params, tile, args.set == "gpt2")
    for fn in rows.values():  # warm-up: first launches, allocator
        for _ in range(2):
            fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    names = list(rows)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # a rotating order
            samples[name].append(timed(rows[name], device))
    numel = sum(p.numel() for p, _ in params)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton's interpreter)"
    print(f"rotation sums of a measured step, {args.set} set ({len(params)} tracked tensors, {numel / 1e6:.1f}M fp32), "
          f"{where}, torch {torch.__version__}, median of {args.reps}")
    print("| kernels | device ms | vs torch fused AdamW | host ms |")
    print("|---|---|---|---|")
    base = statistics.median(d for d, _ in samples["torch fused AdamW step"])
    for name, values in samples.items():
        device_ms = statistics.median(d for d, _ in values)
        print(f"| {name} | {device_ms:.3f} | {device_ms / base:.2f}x | {statistics.median(h for _, h in values):.3f} |")


if __name__ == "__main__":
    main()
