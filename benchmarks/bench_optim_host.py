"""Host (Python) time of the fused Triton optimizer step, with its kernel launches stubbed out.

On a GPU the fused step is host-bound (benchmarks/RESULTS.md § GPU): what the optimizer does in
Python around its launches matters as much as the kernels. This measures that part on any
machine: the llama-125m parameter set (GPT-2 124M's with --set gpt2) on CPU, the optimizer built with `fused=True` under
Triton's interpreter (so the Triton path is planned), and the kernel replaced by a no-op.
Triton's own launch cost is not included.

    PYTHONPATH=. python benchmarks/bench_optim_host.py [--steps 50] [--set gpt2] [rv-adamw adamw rv-lion ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: CPU tensors take the Triton path
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_optim import gpt2_shapes, llama_shapes, make_groups  # noqa: E402

import pretrain.optim.fused as fused  # noqa: E402
from pretrain.optim import RotationalOptimizer  # noqa: E402


class NoLaunch:
    """Stands in for the Triton kernel: `kernel[grid](...)` counts the launch and returns; nothing compiles."""

    launches = 0

    def __getitem__(self, grid: tuple) -> object:
        def launch(*args: object, **kwargs: object) -> None:
            NoLaunch.launches += 1

        return launch

    def warmup(self, *args: object, **kwargs: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("optimizers", nargs="*", default=["rv-adamw", "adamw", "rv-lion"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--set", default="llama", choices=["llama", "gpt2"], help="whose parameter set")
    args = parser.parse_args()
    fused._step_kernel = NoLaunch()
    shapes = (llama_shapes if args.set == "llama" else gpt2_shapes)(12)
    for name in args.optimizers:
        rotational = name.startswith("rv-")
        opt = RotationalOptimizer(make_groups(shapes, 0.1, rotational), name.removeprefix("rv-"), lr=1e-3,
                                  weight_decay=0.1, fused=True)
        opt.step()  # the first step plans the launches
        NoLaunch.launches = 0
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        print(f"{name:<10} host {statistics.median(times) * 1e3:.3f} ms a step (min {min(times) * 1e3:.3f}), "
              f"{NoLaunch.launches / args.steps:.0f} launches a step, fused fraction {opt.fused_fraction:.2f}")


if __name__ == "__main__":
    main()
