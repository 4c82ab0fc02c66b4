"""Optimizer step time of the rotational variants against their plain baselines, on CPU.

The parameter set is that of llama-125m (hidden 768, 12 layers, 12 heads, intermediate 2048,
tied 32000-token embedding) built as plain tensors with fixed random gradients: no model is
needed, only the shapes and the grouping matter. Groups are as `build_optimizer` makes them:
rotational matrices (neuron axis 0), the decayed embedding (rotational per token row in RV runs,
as `optim.rotational_embeddings` defaults to), undecayed norms.

Each comparison builds both optimizers in one process and alternates their steps (the order
flips every repetition), so machine load affects both alike; it reports the median of the
per-repetition time ratios, and the medians and minima of the step times. The extra memory a
step needs beyond weights, gradients and state is the peak resident set during one step over
the resident set before it (Linux `VmHWM`), measured in a fresh process per optimizer with
glibc told to return freed blocks to the system, so that reused heap cannot hide it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_optim.py [--reps 21] [--layers 12] [--threads 1]
        [--cpu-chunk 0]  # ablation: RotationalOptimizer without its CPU tiling
        [--only lion:fused/rv-lion:fused]  # some comparisons only

An optimizer named `<name>:fused` takes the fused C++ step (`optim.fused=true` on CPU,
pretrain/optim/cpu_fused.py; built on first use).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pretrain.optim import RotationalOptimizer, rotational

Shapes = dict[str, list[tuple[int, ...]]]


def llama_shapes(layers: int, hidden: int = 768, intermediate: int = 2048, vocab: int = 32000) -> Shapes:
    """Tensor shapes of a Llama model by role (q, k, v, o and the MLP are nn.Linear [out, in])."""
    block = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    return {"matrices": block * layers, "embedding": [(vocab, hidden)], "norms": [(hidden,)] * (2 * layers + 1)}


def gpt2_shapes(layers: int, hidden: int = 768, vocab: int = 50304, context: int = 1024) -> Shapes:
    """Tensor shapes of GPT-2 by role: its Conv1D weights are [in, out], so their neurons are columns."""
    block = [(hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)]
    flat = [(hidden,)] * 4 + [(3 * hidden,), (hidden,), (4 * hidden,), (hidden,)]  # 2 layer norms, 4 biases
    return {"columns": block * layers, "embedding": [(vocab, hidden), (context, hidden)],
            "norms": flat * layers + [(hidden,)] * 2}


def make_groups(shapes: Shapes, weight_decay: float, rotational: bool | None, seed: int = 0) -> list[dict]:
    """Fresh tensors with gradients, grouped like `build_optimizer` (rotational None: torch AdamW groups)."""
    gen = torch.Generator().manual_seed(seed)

    def tensors(role: str) -> list[torch.Tensor]:
        out = []
        for shape in shapes[role]:
            p = torch.randn(shape, generator=gen) * 0.02
            p.grad = torch.randn(shape, generator=gen)
            out.append(p)
        return out

    groups = []
    # (role, decayed, rotational in an RV run, neuron axis); GPT-2's Conv1D "columns" have theirs on axis 1
    for role, decayed, rot, axis in (("matrices", True, True, 0), ("columns", True, True, 1),
                                     ("embedding", True, True, 0), ("norms", False, False, 0)):
        if role in shapes:
            group = {"params": tensors(role), "weight_decay": weight_decay if decayed else 0.0}
            if axis:
                group["neuron_axis"] = axis
            if rotational is not None:
                group["rotational"] = rot and rotational
            groups.append(group)
    return groups


def state_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state by key, summed over parameters."""
    sizes: dict[str, int] = {}
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                sizes[key] = sizes.get(key, 0) + value.numel() * value.element_size()
    return sizes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_peak_bytes(step: Callable[[], None]) -> int:
    """Peak resident memory a call adds over the memory resident before it (Linux only)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def peak_in_fresh_process(name: str, args: argparse.Namespace) -> int:
    """`step_peak_bytes` of the optimizer `name` after one warm-up step, in a new interpreter."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks go back: RSS tracks live memory
    command = [sys.executable, __file__, "--peak-of", name, "--layers", str(args.layers)]
    if args.cpu_chunk is not None:
        command += ["--cpu-chunk", str(args.cpu_chunk)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def compare(name_a: str, opt_a: torch.optim.Optimizer, name_b: str, opt_b: torch.optim.Optimizer,
            reps: int) -> dict[str, float]:
    """Alternate steps of two optimizers; the ratio is b / a."""
    opt_a.step()  # warm-up: state allocation and first-touch page faults
    opt_b.step()
    times: dict[str, list[float]] = {name_a: [], name_b: []}
    for rep in range(reps):
        order = [(name_a, opt_a), (name_b, opt_b)]
        for name, opt in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times[name_a], times[name_b], strict=True)]
    return {"ratio": statistics.median(ratios),
            **{f"{name} median s": statistics.median(ts) for name, ts in times.items()},
            **{f"{name} min s": min(ts) for name, ts in times.items()}}


class Tracked:
    """An optimizer whose every step also writes the rotation tracker's sums of its matrices (a
    `logging.rotation_every=1` step, as `FusedSource` asks for them)."""

    def __init__(self, opt: RotationalOptimizer) -> None:
        self.opt = opt
        matrices = [p for group in opt.param_groups for p in group["params"] if p.dim() == 2]
        self.rows = {id(p): (0, torch.zeros(p.shape[0], 4, dtype=torch.float64)) for p in matrices}

    def step(self) -> None:
        self.opt.request_rotation_sums(self.rows)
        self.opt.step()

    @property
    def state(self) -> dict:
        return self.opt.state


def make_optimizer(name: str, shapes: Shapes, lr: float, weight_decay: float) -> torch.optim.Optimizer | Tracked:
    """'torch-adamw', or a RotationalOptimizer: 'rv-<rule>' rotational, '<rule>' plain; ':fused' the C++ step,
    ':fused-tracked' that step writing the rotation metrics' sums every step."""
    if name == "torch-adamw":
        return torch.optim.AdamW(make_groups(shapes, weight_decay, None), lr=lr, weight_decay=weight_decay,
                                 foreach=True)
    base, _, mode = name.partition(":")
    rotational = base.startswith("rv-")
    opt = RotationalOptimizer(make_groups(shapes, weight_decay, rotational), base.removeprefix("rv-"), lr=lr,
                              weight_decay=weight_decay, fused=mode.startswith("fused"))
    return Tracked(opt) if mode == "fused-tracked" else opt


# Eager against eager, fused (C++) against fused, and the fused RV step against the eager plain one.
COMPARISONS = [("torch-adamw", "rv-adamw"), ("adamw", "rv-adamw"), ("lion", "rv-lion"),
               ("lion:fused", "rv-lion:fused"), ("adamw:fused", "rv-adamw:fused"), ("lion", "rv-lion:fused"),
               ("torch-adamw", "rv-adamw:fused"), ("lion", "lion:fused"),
               ("rv-adamw:fused", "rv-adamw:fused-tracked"), ("adamw:fused", "adamw:fused-tracked")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-chunk", type=int, default=None,
                        help="ablation: elements per CPU tile of RotationalOptimizer (0: no tiling)")
    parser.add_argument("--only", help="comma-separated A/B pairs, e.g. lion:fused/rv-lion:fused (default: all)")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_chunk is not None:
        rotational._CPU_CHUNK_NUMEL = args.cpu_chunk or sys.maxsize
    shapes = llama_shapes(args.layers)
    if args.peak_of:
        opt = make_optimizer(args.peak_of, shapes, args.lr, args.weight_decay)
        opt.step()
        print(step_peak_bytes(opt.step))
        return
    total = sum(torch.Size(s).numel() for role in shapes.values() for s in role)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {total / 1e6:.1f}M parameters")
    wanted = set(args.only.split(",")) if args.only else None
    for name_a, name_b in COMPARISONS:
        if wanted is not None and f"{name_a}/{name_b}" not in wanted:
            continue
        opt_a = make_optimizer(name_a, shapes, args.lr, args.weight_decay)
        opt_b = make_optimizer(name_b, shapes, args.lr, args.weight_decay)
        result = compare(name_a, opt_a, name_b, opt_b, args.reps)
        print(f"\n{name_b} vs {name_a}: time ratio {result.pop('ratio'):.3f} (median of {args.reps} paired steps)")
        for key, value in result.items():
            print(f"  {key:<24} {value:.4f}")
        for name, opt in ((name_a, opt_a), (name_b, opt_b)):
            print(f"  {name} state MiB: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in state_bytes(opt).items()))
        del opt_a, opt_b
    print("\nextra memory of one step (peak RSS over RSS before it, fresh process each):")
    for name in ("torch-adamw", "adamw", "rv-adamw", "lion", "rv-lion", "sgdm", "rv-sgdm", "lion:fused",
                 "rv-lion:fused", "rv-adamw:fused"):
        print(f"  {name:<12} +{peak_in_fresh_process(name, args) / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
