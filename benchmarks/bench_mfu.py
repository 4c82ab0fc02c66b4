"""One-device training throughput and model FLOPs utilisation (MFU) of a recipe, e.g. on one GPU.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_mfu.py --config configs/llama-125m.yaml \\
        --device cuda --precision bf16 --compile --micro-batch 16 --seq-len 1024 --steps 30 --peak-tflops 989

Runs the training loop's own step (`forward_backward` + `engine.step()`, single strategy) on random
tokens, so no data needs preparing. MFU = achieved model FLOP/s / `--peak-tflops` (the device's dense
peak for the precision: H100 SXM bf16 989, H200 989, A100 bf16 312). Model FLOPs per token follow the
usual estimate 6 N + 12 L d T (N parameters counted once, tied embeddings included as the output
matmul; L layers, d hidden size, T sequence length; attention as if not causal-masked), i.e. the
forward and backward of every matmul, with no credit for activation recomputation.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from pretrain.config import load_config
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama-125m.yaml")
    parser.add_argument("--optim", default="rv-adamw")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation, allocator)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device dense peak for the precision")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra dotted config overrides")
    args = parser.parse_args()

    cfg = load_config(args.config, [f"optim.name={args.optim}", f"data.seq_len={args.seq_len}",
                                    f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1",
                                    f"train.device={args.device}", f"train.precision={args.precision}",
                                    "parallel.strategy=single", *args.overrides])
    device = pick_device(cfg.train.device)
    dtype = pick_precision(cfg.train.precision, device)
    torch.manual_seed(0)
    model = build_model(cfg.model, args.vocab, args.seq_len, eos_id=0).to(device)
    table = classify_parameters(model, cfg.optim.rotational_embeddings)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    engine = build_engine(cfg, model, table, World(0, 1, 0), dtype, scaler)
    if args.compile:
        engine.model = torch.compile(engine.model)
    autocast = ((lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32
                else contextlib.nullcontext)
    loader = RandomTokens(args.vocab, args.micro_batch, args.seq_len, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    times = []
    for step in range(1, args.warmup + args.steps + 1):
        sync()
        start = time.perf_counter()
        forward_backward(engine, loader, step, 1, cfg.train.grad_clip, device, autocast)
        engine.step()
        sync()
        if step > args.warmup:
            times.append(time.perf_counter() - start)

    size = resolve_size(cfg.model, args.seq_len)
    num_params = sum(p.numel() for p in model.parameters())
    tokens = args.micro_batch * args.seq_len
    step_time = statistics.median(times)
    achieved = flops_per_token(num_params, int(size["num_layers"]), int(size["hidden_size"]), args.seq_len) \
        * tokens / step_time
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.config} ({num_params / 1e6:.1f}M params), {args.optim}, {name}, {str(dtype).removeprefix('torch.')}"
          f"{', compiled' if args.compile else ''}, batch {args.micro_batch} x {args.seq_len}")
    print(f"step {step_time * 1e3:.1f} ms (median of {len(times)}), {tokens / step_time:,.0f} tokens/s, "
          f"{achieved / 1e12:.2f} TFLOP/s model FLOPs, MFU {100 * achieved / (args.peak_tflops * 1e12):.1f}% "
          f"of {args.peak_tflops:g} TFLOP/s")


if __name__ == "__main__":
    main()
