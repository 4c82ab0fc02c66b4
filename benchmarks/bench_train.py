"""Whole training-step throughput: tokens/s, data-loader share, and optimizer ratios.

Runs the loop's own `forward_backward` + `engine.step(loss)` on the prepared embedded corpus,
alternating the compared optimizers step by step so machine noise hits them alike, and
reports medians and ratios measured in this one run.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_train.py --shape tiny --steps 30
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_train.py --shape llama-125m --steps 4 --micro-batch 2
    ... --optimizers adamw,rv-adamw,rv-adamw:fused   # NAME:fused takes optim.fused=true (C++ step on CPU)
    ... --overrides optim.lr=1e-3                    # any config override, e.g. an lr for a larger shape

The recipe is configs/tiny-cpu.yaml. Its lr suits the tiny model: at llama-125m, plain AdamW and
Lion diverge at it, and a step over non-finite numbers is not a representative step: give an lr.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.data import TrainLoader, load_tokenizer
from pretrain.model import build_model
from pretrain.parallel import build_engine
from pretrain.parallel.world import World
from pretrain.params import classify_parameters
from pretrain.train import forward_backward

REPO = Path(__file__).resolve().parent.parent


def make_setup(shape: str, optimizer: str, micro_batch: int, seq_len: int, extra: list[str]):
    """`optimizer`: an optim.name, with `:fused` for optim.fused=true (the C++ step on CPU)."""
    name, _, mode = optimizer.partition(":")
    overrides = [f"optim.name={name}", f"optim.fused={str(mode == 'fused').lower()}",
                 f"train.micro_batch_size={micro_batch}", f"data.seq_len={seq_len}"]
    if shape != "tiny":
        overrides.append(f"model.preset={shape}")
    overrides += extra
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", overrides)
    tokenizer = load_tokenizer(cfg.data.dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(tokenizer), seq_len, tokenizer.eos_token_id)
    table = classify_parameters(model, rotational_embeddings=cfg.optim.rotational_embeddings)
    engine = build_engine(cfg, model, table, World(0, 1, 0), torch.float32)
    loader = TrainLoader(cfg.data.dir, seq_len, micro_batch, 1, cfg.train.seed)
    return cfg, engine, loader


def timed_step(setup, step: int) -> float:
    cfg, engine, loader = setup
    start = time.perf_counter()
    engine.step(forward_backward(engine, loader, step, 1, torch.device("cpu")))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", help="model preset: tiny, llama-125m, ...")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--optimizers", default="adamw,rv-adamw")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra dotted config overrides")
    args = parser.parse_args()

    names = args.optimizers.split(",")
    setups = {name: make_setup(args.shape, name, args.micro_batch, args.seq_len, args.overrides) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(1, args.steps + 2):
        for name in names:
            elapsed = timed_step(setups[name], step)
            if step > 1:  # the first step pays one-off allocation costs
                times[name].append(elapsed)
    loader = setups[names[0]][2]
    load_times = []
    for step in range(1, 200):
        start = time.perf_counter()
        loader.get_batch(step, 0)
        load_times.append(time.perf_counter() - start)

    tokens = args.micro_batch * args.seq_len
    params = sum(p.numel() for p in setups[names[0]][1].raw_model.parameters())
    print(f"shape {args.shape} ({params / 1e6:.1f}M params), batch {args.micro_batch}x{args.seq_len}, "
          f"{args.steps} steps each, torch threads {torch.get_num_threads()}")
    base = statistics.median(times[names[0]])
    for name in names:
        med = statistics.median(times[name])
        print(f"  {name:<16} step {med * 1e3:8.1f} ms  {tokens / med:9.0f} tokens/s  "
              f"throughput ratio vs {names[0]}: {base / med:.3f}")
    load = statistics.median(load_times)
    print(f"  loader get_batch {load * 1e3:.3f} ms = {100 * load / base:.3f}% of the {names[0]} step")


if __name__ == "__main__":
    main()
