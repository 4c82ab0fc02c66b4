"""Training-step overhead and memory of the rotation tracker (results: benchmarks/RESULTS.md).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_metrics.py --models tiny llama-125m --pairs 6

Plain steps and measured steps (capture + optimizer step + measure) alternate in ABBA order in
one process, so drift and load from other processes hit both alike; the overheads are medians
of per-pair ratios. An unmeasured step costs the tracker one `step % every` test, so the
overhead at every=k is the measured-step extra cost divided by k plain steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pretrain.config import OptimConfig  # noqa: E402
from pretrain.metrics import RotationTracker  # noqa: E402
from pretrain.metrics.neurons import workspace_elements  # noqa: E402
from pretrain.params import classify_parameters  # noqa: E402

# Shapes of the `tiny` and `llama-125m` presets (pretrain/model.py), untied embeddings.
MODELS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384,
                 vocab_size=8192, batch=16),
    "llama-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048,
                       vocab_size=32000, batch=4),
}
SEQ_LEN = 256


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model, optimizer, x, tracker: RotationTracker | None, n: int, device: torch.device) -> tuple[float, float]:
    """One training step; returns (step seconds, seconds spent in capture + measure)."""
    sync(device)
    start = time.perf_counter()
    model(input_ids=x, labels=x).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    in_tracker = 0.0
    if tracker is not None:
        sync(device)
        t = time.perf_counter()
        tracker.capture()
        sync(device)
        in_tracker += time.perf_counter() - t
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if tracker is not None:
        sync(device)
        t = time.perf_counter()
        tracker.measure(n, 1e-3)
        in_tracker += time.perf_counter() - t
    sync(device)
    return time.perf_counter() - start, in_tracker


def bench(name: str, pairs: int, device: torch.device) -> dict[str, float]:
    shape = dict(MODELS[name])
    batch = shape.pop("batch")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False))
    model.to(device)
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1)
    table = classify_parameters(model, rotational_embeddings=cfg.rotational_embeddings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    tracker = RotationTracker(model, table, cfg, every=1)
    x = torch.randint(0, shape["vocab_size"], (batch, SEQ_LEN), device=device)
    n = 0
    for _ in range(2):  # warm-up: allocator, optimizer state, first measurement
        n += 1
        step(model, optimizer, x, tracker, n, device)
    plain, measured, tracker_s, ratios, peaks = [], [], [], [], {"plain": 0, "measured": 0}
    for i in range(pairs):
        times = {}
        for kind in (("plain", "measured") if i % 2 == 0 else ("measured", "plain")):
            n += 1
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[kind] = step(model, optimizer, x, tracker if kind == "measured" else None, n, device)
            if device.type == "cuda":
                peaks[kind] = max(peaks[kind], torch.cuda.max_memory_allocated())
        plain.append(times["plain"][0])
        measured.append(times["measured"][0])
        tracker_s.append(times["measured"][1])
        ratios.append(times["measured"][0] / times["plain"][0])
    tracked = [model.get_parameter(s.name) for s in table if s.tracked]
    plain_s = statistics.median(plain)
    return {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "tracked_M": sum(p.numel() for p in tracked) / 1e6,
        "plain_s": plain_s,
        "measured_s": statistics.median(measured),
        "tracker_s": statistics.median(tracker_s),
        "every1_step_ratio": statistics.median(ratios) - 1.0,
        "every1_tracker_time": statistics.median(tracker_s) / plain_s,
        "every10_tracker_time": statistics.median(tracker_s) / (10 * plain_s),
        "copy_MiB": sum(p.numel() * p.element_size() for p in tracked) / 2**20,
        "workspace_MiB": 8 * workspace_elements([s for s in table if s.tracked]) / 2**20,
        "cuda_peak_extra_MiB": (peaks["measured"] - peaks["plain"]) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.pairs} pairs")
    print("| model | params (tracked) | plain step | measured step | capture+measure | every=1: step ratio "
          "| every=1: tracker/step | every=10 | pre-step copy | float64 workspace | CUDA peak extra |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = bench(name, args.pairs, device)
        cuda_extra = f"{r['cuda_peak_extra_MiB']:.0f} MiB" if device.type == "cuda" else "-"
        print(f"| {name} | {r['params_M']:.1f}M ({r['tracked_M']:.1f}M) | {r['plain_s']:.3f} s "
              f"| {r['measured_s']:.3f} s | {r['tracker_s']:.3f} s | {r['every1_step_ratio']:+.1%} "
              f"| {r['every1_tracker_time']:.1%} | {r['every10_tracker_time']:.2%} | {r['copy_MiB']:.0f} MiB "
              f"| {r['workspace_MiB']:.0f} MiB | {cuda_extra} |", flush=True)


if __name__ == "__main__":
    main()
