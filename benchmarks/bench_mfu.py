"""One-device training throughput, MFU and peak memory of a recipe, e.g. on one GPU.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_mfu.py --config configs/llama-125m.yaml \\
        --device cuda --precision bf16 --compile --micro-batch 16 --seq-len 1024 --steps 30 --peak-tflops 989 \\
        --optims adamw,rv-adamw,rv-adamw:eager --rotation-every 0,1,10

Runs the training loop's own step (`forward_backward` + `engine.step()`, single strategy, the
loop's loss function and rotation tracker) on random tokens, so no data needs preparing. All
rows of one invocation share one model and one compiled loss: optimizers are swapped on the
same weights, so their ratios come from one process on one device.

- `--optims`: comma list; `NAME:eager` runs NAME with `optim.fused=false` (the eager step).
- `--rotation-every`: comma list of `logging.rotation_every` values, each a row per optimizer.
- `--loss plain`: the path before issue 10, for before/after rows: only the model is compiled,
  and the loss is `F.cross_entropy(logits.float())` outside the compiled region.

`fwd+bwd ms` is the forward and backward passes with their loss read (a device sync), `update ms`
the rest of the step: clipping (its norm read, a sync), the optimizer step until the device is
done, and the rotation metrics on a measured step. Each column is the median of its own part, so
they add up to `step ms` only approximately.

MFU = achieved model FLOP/s / `--peak-tflops` (the device's dense bf16 peak: H100 SXM and H200
989, A100 312). Model FLOPs per token follow the usual 6 N + 12 L d T (N parameters counted
once, tied embeddings included as the output matmul; attention as if not causal-masked).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.loss import build_loss
from pretrain.metrics import RotationTracker
from pretrain.metrics.sources import FusedSource
from pretrain.model import build_model, resolve_size
from pretrain.parallel import build_engine
from pretrain.parallel.world import World
from pretrain.params import classify_parameters
from pretrain.train import forward_backward, pick_device, pick_precision


class RandomTokens:
    """The train loader's interface over random tokens (throughput does not depend on the text)."""

    def __init__(self, vocab: int, micro_batch: int, seq_len: int, device: torch.device) -> None:
        self.tokens = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=device)

    def get_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[:, :-1], self.tokens[:, 1:]


def flops_per_token(num_params: int, layers: int, hidden: int, seq_len: int) -> float:
    return 6.0 * num_params + 12.0 * layers * hidden * seq_len


def plain_loss(compile: bool) -> Callable:
    """The pre-issue-10 loss path: compiled model, fp32 copy of the logits and eager loss outside it."""
    compiled: dict[int, torch.nn.Module] = {}

    def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if compile and id(model) not in compiled:
            compiled[id(model)] = torch.compile(model)
        logits = compiled.get(id(model), model)(input_ids=x).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    return loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama-125m.yaml")
    parser.add_argument("--optims", default="rv-adamw", help="comma list; NAME:eager forces optim.fused=false")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--loss", default="chunked", choices=["chunked", "plain"])
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation, allocator)")
    parser.add_argument("--rotation-every", default="0", help="comma list of logging.rotation_every values")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device dense peak for the precision")
    parser.add_argument("--profile", default="", help="write the first row's top kernels (torch.profiler) here")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra dotted config overrides")
    args = parser.parse_args()

    base = [f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
            f"train.grad_accum={args.grad_accum}", f"train.device={args.device}",
            f"train.precision={args.precision}", "parallel.strategy=single", *args.overrides]
    cfg = load_config(args.config, base)
    device = pick_device(cfg.train.device)
    dtype = pick_precision(cfg.train.precision, device)
    torch.manual_seed(0)
    model = build_model(cfg.model, args.vocab, args.seq_len, eos_id=0).to(device)
    loss_fn = build_loss(args.compile) if args.loss == "chunked" else plain_loss(args.compile)
    loader = RandomTokens(args.vocab, args.micro_batch, args.seq_len, device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    size = resolve_size(cfg.model, args.seq_len)
    num_params = sum(p.numel() for p in model.parameters())
    tokens = args.micro_batch * args.seq_len * args.grad_accum
    model_flops = flops_per_token(num_params, int(size["num_layers"]), int(size["hidden_size"]), args.seq_len)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{args.config} ({num_params / 1e6:.1f}M params), {name}, {str(dtype).removeprefix('torch.')}, "
          f"{'compiled' if args.compile else 'eager'}, loss {args.loss}, batch {args.micro_batch} x {args.seq_len}"
          f" x {args.grad_accum} accumulation, torch {torch.__version__}")
    print("| optimizer | rotation_every | step ms | fwd+bwd ms | update ms | tokens/s | MFU | peak GiB "
          "| vs first row |")
    print("|---|---|---|---|---|---|---|---|---|")
    first = None
    for spec in args.optims.split(","):
        optim_name, _, mode = spec.partition(":")
        run_cfg = load_config(args.config, [*base, f"optim.name={optim_name}",
                                            *(["optim.fused=false"] if mode == "eager" else [])])
        table = classify_parameters(model, rotational_embeddings=run_cfg.optim.rotational_embeddings)
        engine = build_engine(run_cfg, model, table, World(0, 1, 0), dtype)
        tracked = [s for s in table if s.tracked]
        for every in (int(e) for e in args.rotation_every.split(",")):
            tracker = RotationTracker(model, table, run_cfg.optim, every,
                                      FusedSource.build(model, engine.optimizer, tracked))
            times, passes = [], []
            profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
                        if args.profile and first is None else contextlib.nullcontext())
            for step in range(1, args.warmup + args.steps + 1):
                if step == args.warmup + 1 and cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                sync()
                start = time.perf_counter()
                with profiler if step == args.warmup + args.steps else contextlib.nullcontext():
                    forward_backward(engine, loader, step, args.grad_accum, device, loss_fn)  # ends in a sync
                    passed = time.perf_counter()
                    measuring = tracker.should_measure(step)
                    engine.step(tracker.capture if measuring else None)
                    if measuring:
                        tracker.measure(step, run_cfg.optim.lr)
                    sync()
                if step > args.warmup:
                    times.append(time.perf_counter() - start)
                    passes.append(passed - start)
            if args.profile and first is None:
                sort_by = "self_device_time_total" if cuda else "cpu_time_total"
                with open(args.profile, "w") as out:
                    out.write(profiler.key_averages().table(sort_by=sort_by, row_limit=40))
            step_time, pass_time = statistics.median(times), statistics.median(passes)
            update_time = statistics.median(t - p for t, p in zip(times, passes, strict=True))
            first = first or step_time
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
            print(f"| {spec} | {every} | {step_time * 1e3:.1f} | {pass_time * 1e3:.1f} | "
                  f"{update_time * 1e3:.1f} | {tokens / step_time:,.0f} | "
                  f"{100 * model_flops * tokens / step_time / (args.peak_tflops * 1e12):.1f}% | {peak:.2f} | "
                  f"{first / step_time:.3f}x |", flush=True)
        del engine
        model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
