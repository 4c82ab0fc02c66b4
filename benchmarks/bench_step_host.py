"""Host (Python) time of a training step's bookkeeping: gradient clipping and the rotation metrics.

On a GPU these are bound by the host: what gradient clipping and a measured step's `capture()`
and `measure()` do in Python around their kernels is most of what they cost, and the GPU waits
meanwhile (benchmarks/RESULTS.md). This measures that part on any machine: a model with the
tensor count of a real preset (12
blocks of llama-125m or GPT-2 124M) but 64 wide, so the torch ops themselves take microseconds;
the kernels the CUDA path launches (`fused_sums` batches, the optimizer's fused step) run under
Triton's interpreter as no-ops. Reported: medians of `capture()`, `measure()` and the optimizer
step itself, for torch's AdamW (the copy-and-compare `ModelSource`) and rv-adamw (`FusedSource`);
and of clipping the gradients (`engine.clip_grad_norm` against torch's `clip_grad_norm_`).

    PYTHONPATH=. python benchmarks/bench_step_host.py [--steps 30] [--set gpt2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: CPU tensors take the Triton paths
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_optim_host import NoLaunch  # noqa: E402
from torch.nn.utils import clip_grad_norm_  # noqa: E402

import pretrain.metrics.fused_sums as fused_sums  # noqa: E402
import pretrain.optim.fused as fused  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.metrics import RotationTracker  # noqa: E402
from pretrain.metrics.sources import FusedSource  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402
from pretrain.parallel.engine import clip_grad_norm  # noqa: E402
from pretrain.params import classify_parameters  # noqa: E402

NARROW = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=4", "model.intermediate_size=128"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", default="llama", choices=["llama", "gpt2"], help="whose tensor count")
    args = parser.parse_args()
    fused._step_kernel = NoLaunch()
    fused_sums._capture_kernel = fused_sums._delta_kernel = NoLaunch()
    fused_sums.RUN_ON_CPU = True
    preset = "llama-125m" if args.set == "llama" else "gpt2-124m"
    config = Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml"
    for name in ("adamw", "rv-adamw"):
        cfg = load_config(config, [*NARROW, f"optim.name={name}", f"optim.fused={'true' if 'rv' in name else 'null'}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, 256, 64, eos_id=0)
        table = classify_parameters(model, rotational_embeddings=cfg.optim.rotational_embeddings)
        optimizer = build_optimizer(model, table, cfg.optim)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        tracked = [spec for spec in table if spec.tracked]
        tracker = RotationTracker(model, table, cfg.optim, 1, FusedSource.build(model, optimizer, tracked))
        times = []
        for step in range(1, args.steps + 4):
            start = time.perf_counter()
            tracker.capture()
            captured = time.perf_counter()
            optimizer.step()
            stepped = time.perf_counter()
            tracker.measure(step, 1e-3)
            if step > 3:  # the first steps plan and compile
                times.append((captured - start, stepped - captured, time.perf_counter() - stepped))
        capture, step_time, measure = (statistics.median(t) * 1e3 for t in zip(*times, strict=True))
        print(f"{name:<9} {type(tracker.source).__name__:<12} {len(tracked)} tracked tensors: capture "
              f"{capture:.2f} ms, measure {measure:.2f} ms (optimizer step {step_time:.2f} ms)")
    params = list(model.parameters())
    clip = {"ours": lambda: clip_grad_norm(params, 1.0), "torch": lambda: clip_grad_norm_(params, 1.0)}
    times = {name: [] for name in clip}
    for _ in range(args.steps):
        for name, run in clip.items():  # alternated, so drift hits both alike
            start = time.perf_counter()
            float(run())
            times[name].append(time.perf_counter() - start)
    print(f"gradient clipping, {len(params)} tensors (norm read included): engine.clip_grad_norm "
          f"{statistics.median(times['ours']) * 1e3:.2f} ms, torch clip_grad_norm_ "
          f"{statistics.median(times['torch']) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
