"""Cost of the ZeRO segment-map all-reduce, and the RV step under ZeRO-2 against its plain rule, on CPU.

Run under torchrun with 2 ranks (gloo on CPU):

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/torchrun --nproc_per_node 2 \\
        benchmarks/bench_zero.py [--reps 4] [--opt-reps 8] [--pairs adamw:rv-adamw,lion:rv-lion]

The model is llama-125m from `configs/llama-125m.yaml` (random init, `--vocab` tokens, micro batch
`--micro-batch` x `--seq-len` random tokens per rank), wrapped exactly as training wraps it:
`build_engine` with `parallel.strategy=deepspeed parallel.zero_stage=2`, fp32. For each pair of
optimizers (plain, rotational) both engines are built in one process from the same initial weights
and their steps alternate (the order flips every repetition), so machine load hits both alike.

Measured, every repetition after a barrier, as the slowest rank's time (a step ends when its last
rank does):
- the full training step: the loop's `forward_backward` + `engine.step(loss)`, with the client
  optimizer's own step (what DeepSpeed calls on the flat fp32 partitions) timed inside it;
- the optimizer step alone: the client optimizer's `step()` on the flat partitions with fixed
  random gradients (no backward, no DeepSpeed reduce / all-gather around it);
- inside the RV steps, by wrappers: the segment-map `dist.all_reduce` of the [6, neurons] sums
  (including any wait for the other rank), `SegmentMap.rotation_sums` (the per-neuron sums, as row /
  column reductions over the partition's blocks) and `SegmentMap.apply` (a, b, c broadcast per block);
- the same all-reduce alone, on a [6, neurons] tensor right after a barrier (pure communication);
- the segment map's primitives on the real partition, against one plain elementwise pass over it
  (a diagnosis of where the flat RV step's time goes).
Ratios are medians of per-repetition ratios; times are medians.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.config import load_config
from pretrain.model import build_model
from pretrain.optim.segments import SegmentMap
from pretrain.parallel import build_engine, close_world, init_world
from pretrain.parallel.engine import Engine
from pretrain.parallel.world import launched_world
from pretrain.params import classify_parameters
from pretrain.train import forward_backward

# ----------------------------------------------------------------------------- timing wrappers


class Probe:
    """Seconds spent in wrapped calls while `active`, per label; reset per measured step."""

    def __init__(self) -> None:
        self.active = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1
        return timed

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False


PROBE = Probe()


def install_probes() -> None:
    """Time the segment-map collective and index work. `rotational.py` calls `dist.all_reduce` through the
    module, so patching the attribute reaches it; the probe is only active inside the client optimizer's
    step, where the segment-map all-reduce is the only collective."""
    dist.all_reduce = PROBE.wrap("all_reduce", dist.all_reduce)
    SegmentMap.rotation_sums = PROBE.wrap("sums", SegmentMap.rotation_sums)  # type: ignore[method-assign]
    SegmentMap.apply = PROBE.wrap("apply", SegmentMap.apply)  # type: ignore[method-assign]


def wrap_client_step(optimizer: torch.optim.Optimizer) -> None:
    """Time the client optimizer's step (DeepSpeed calls it once per param group) and arm the probes in it."""
    step = optimizer.step

    def timed(*args: Any, **kwargs: Any) -> Any:
        with PROBE.on():
            start = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                PROBE.seconds["client_step"] += time.perf_counter() - start
    optimizer.step = timed  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- setup


class RandomTokens:
    """The loader's interface over random tokens: a fixed batch per (rank, step, micro)."""

    def __init__(self, vocab: int, micro_batch: int, seq_len: int, rank: int) -> None:
        self.vocab, self.shape, self.rank = vocab, (micro_batch, seq_len + 1), rank

    def get_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1_000_003 * self.rank + 1009 * step + micro)
        tokens = torch.randint(0, self.vocab, self.shape, generator=gen)
        return tokens[:, :-1], tokens[:, 1:]


def build(args: argparse.Namespace, optim_name: str) -> tuple[Engine, Any]:
    overrides = [f"optim.name={optim_name}", f"data.seq_len={args.seq_len}", "train.device=cpu",
                 "train.precision=fp32", "train.compile=false", f"train.micro_batch_size={args.micro_batch}",
                 "train.grad_accum=1", "parallel.strategy=deepspeed", "parallel.zero_stage=2"]
    if args.deepspeed_config:
        overrides.append(f"parallel.deepspeed_config={args.deepspeed_config}")
    cfg = load_config(args.config, overrides)
    torch.manual_seed(cfg.train.seed)  # the same initial weights for every optimizer
    model = build_model(cfg.model, args.vocab, cfg.data.seq_len, eos_id=0)
    table = classify_parameters(model, rotational_embeddings=cfg.optim.rotational_embeddings)
    engine = build_engine(cfg, model, table, launched_world(), torch.float32)
    wrap_client_step(engine.optimizer)
    return engine, cfg


def flat_partitions(engine: Engine) -> list[torch.Tensor]:
    return list(engine.ds.optimizer.single_partition_of_fp32_groups)


def fake_grads(engine: Engine, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) * 1e-3 for p in flat_partitions(engine)]


# ----------------------------------------------------------------------------- measurement


def slowest(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure_pair(args: argparse.Namespace, plain: str, rv: str, rank: int) -> dict[str, Any]:
    engines = {}
    for name in (plain, rv):
        engines[name] = build(args, name)
    rv_engine = engines[rv][0]
    rot_flats = [flat for flat in rv_engine.maps if rv_engine.optimizer.state[flat].get("neuron_norm") is not None]
    rot_neurons = [rv_engine.maps[flat][0].num_neurons for flat in rot_flats]
    loader = RandomTokens(args.vocab, args.micro_batch, args.seq_len, rank)
    samples: dict[str, list[float]] = defaultdict(list)

    def train_step(name: str, step: int) -> None:
        engine, cfg = engines[name]
        dist.barrier()
        PROBE.reset()
        start = time.perf_counter()
        engine.step(forward_backward(engine, loader, step, 1, torch.device("cpu")))
        samples[f"{name} train"].append(time.perf_counter() - start)
        samples[f"{name} train/client"].append(PROBE.seconds["client_step"])
        for label in ("all_reduce", "sums", "apply"):
            samples[f"{name} train/{label}"].append(PROBE.seconds[label])

    grads = {name: fake_grads(engines[name][0], 7 + rank) for name in engines}

    def optimizer_step(name: str) -> None:
        engine = engines[name][0]
        for p, g in zip(flat_partitions(engine), grads[name], strict=True):
            p.grad = g
        dist.barrier()
        PROBE.reset()
        start = time.perf_counter()
        engine.optimizer.step()
        samples[f"{name} opt"].append(time.perf_counter() - start)
        for label in ("all_reduce", "sums", "apply"):
            samples[f"{name} opt/{label}"].append(PROBE.seconds[label])
        for p in flat_partitions(engine):
            p.grad = None

    scratch = [torch.zeros(6, n) for n in rot_neurons]

    def lone_all_reduce() -> None:
        times = []
        for _ in range(args.ar_per_rep):
            for buf in scratch:
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(buf)
                times.append(time.perf_counter() - start)
        samples["lone all_reduce"].append(statistics.median(times) * len(scratch))

    for name in engines:  # warm-up: state allocation, first-touch page faults, DeepSpeed's lazy init
        train_step(name, 0)
        optimizer_step(name)
    samples.clear()
    order = [plain, rv]
    step = 1
    for rep in range(args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            train_step(name, step)
        step += 1
    for rep in range(args.opt_reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            optimizer_step(name)
        lone_all_reduce()
    primitives(rv_engine.maps[rot_flats[0]][0], args.opt_reps, samples)
    result = {key: slowest(values) for key, values in samples.items()}
    result["neurons"] = rot_neurons
    result["numel"] = [p.numel() for p in flat_partitions(rv_engine)]
    result["rot_numel"] = [p.numel() for p in rot_flats]
    for engine, _ in engines.values():
        with contextlib.suppress(Exception):
            engine.ds.destroy()
    engines.clear()
    gc.collect()
    return result


def primitives(segment_map: SegmentMap, reps: int, samples: dict[str, list[float]]) -> None:
    """The segment map's operations on the real partition, against one in-place elementwise pass (diagnosis)."""
    n = segment_map.numel
    w, u = torch.randn(n), torch.randn(n)
    a, b, c = (torch.randn(segment_map.num_neurons) for _ in range(3))
    ops = {"prim rotation_sums": lambda: segment_map.rotation_sums(w, u, True),
           "prim apply": lambda: segment_map.apply(w, u, a, b, c),
           "prim in-place w*=1": lambda: w.mul_(1.0)}
    for rep in range(reps):
        for label, op in (ops.items() if rep % 2 == 0 else reversed(ops.items())):
            dist.barrier()
            start = time.perf_counter()
            op()
            samples[label].append(time.perf_counter() - start)


# ----------------------------------------------------------------------------- report


def med(values: list[float]) -> float:
    return statistics.median(values)


def paired(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True) if b > 0)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def report(plain: str, rv: str, r: dict[str, Any], args: argparse.Namespace) -> str:
    p, v = plain, rv
    lines = [f"### `{rv}` vs `{plain}` (ZeRO-2, 2 ranks)", "",
             f"Rotational flat group(s) per rank: {', '.join(f'{n:,}' for n in r['rot_numel'])} elements, "
             f"{', '.join(f'{n:,}' for n in r['neurons'])} neurons -> all-reduce of "
             f"{', '.join(f'[6, {n:,}] fp32 ({6 * 4 * n / 2**20:.2f} MiB)' for n in r['neurons'])}; "
             f"all flat partitions per rank: {sum(r['numel']):,} elements.", "",
             "| quantity (median, slowest rank) | time | share of RV optimizer step | share of RV training step |",
             "|---|---|---|---|"]
    ar_opt, ar_train = r[f"{v} opt/all_reduce"], r[f"{v} train/all_reduce"]
    rows = [
        ("segment-map all-reduce as called in the optimizer step (fake grads; incl. wait for the other rank)",
         med(ar_opt),
         paired(ar_opt, r[f"{v} opt"]), None),
        ("segment-map all-reduce as called in the training step (incl. wait)", med(ar_train),
         paired(ar_train, r[f"{v} train/client"]), paired(ar_train, r[f"{v} train"])),
        ("same all-reduce alone, after a barrier", med(r["lone all_reduce"]),
         med(r["lone all_reduce"]) / med(r[f"{v} opt"]), med(r["lone all_reduce"]) / med(r[f"{v} train"])),
        ("`SegmentMap.rotation_sums` (block reductions)", med(r[f"{v} opt/sums"]),
         paired(r[f"{v} opt/sums"], r[f"{v} opt"]), None),
        ("`SegmentMap.apply` (a, b, c per block, in place)", med(r[f"{v} opt/apply"]),
         paired(r[f"{v} opt/apply"], r[f"{v} opt"]), None),
        ("segment map in all (sums + apply + all-reduce)",
         med([a + b + c for a, b, c in zip(r[f"{v} opt/sums"], r[f"{v} opt/apply"], ar_opt, strict=True)]),
         paired([a + b + c for a, b, c in zip(r[f"{v} opt/sums"], r[f"{v} opt/apply"], ar_opt, strict=True)],
                r[f"{v} opt"]), None),
        (f"`{v}` optimizer step alone (flat partitions, fake grads)", med(r[f"{v} opt"]), 1.0, None),
        (f"`{v}` optimizer step inside the training step", med(r[f"{v} train/client"]), None,
         paired(r[f"{v} train/client"], r[f"{v} train"])),
        (f"`{v}` training step (fwd + bwd + engine.step)", med(r[f"{v} train"]), None, 1.0),
    ]
    for label, t, share_opt, share_train in rows:
        lines.append(f"| {label} | {ms(t)} | {pct(share_opt) if share_opt is not None else ''} | "
                     f"{pct(share_train) if share_train is not None else ''} |")
    lines += ["", f"| `{rv}` / `{plain}` under ZeRO-2 | `{plain}` | `{rv}` | ratio (median of paired ratios) |",
              "|---|---|---|---|"]
    for label, key in (("optimizer step alone (fake grads)", "opt"), ("optimizer step inside the training step",
                                                                      "train/client"),
                       ("training step", "train")):
        lines.append(f"| {label} | {ms(med(r[f'{p} {key}']))} | {ms(med(r[f'{v} {key}']))} | "
                     f"**{paired(r[f'{v} {key}'], r[f'{p} {key}']):.3f}** |")
    lines += ["", f"Segment-map primitives on the rotational partition ({r['rot_numel'][0]:,} elements), "
              "slowest rank: " + ", ".join(f"{k.removeprefix('prim ')} {ms(med(r[k]))}" for k in r
                                           if k.startswith("prim ")) + ".", ""]
    lines.append(f"Repetitions: {args.reps} training steps and {args.opt_reps} optimizer steps per optimizer "
                 f"(after warm-up), alternating; standalone all-reduce: median of {args.ar_per_rep} per repetition.")
    return "\n".join(lines)


def machine_info() -> str:
    import deepspeed

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"deepspeed {deepspeed.__version__}, backend {dist.get_backend()}, {dist.get_world_size()} ranks x "
            f"{torch.get_num_threads()} thread(s), load average {' '.join(load)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama-125m.yaml")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=4, help="timed training steps per optimizer")
    parser.add_argument("--opt-reps", type=int, default=8, help="timed optimizer-only steps per optimizer")
    parser.add_argument("--ar-per-rep", type=int, default=5, help="standalone all-reduces per repetition")
    parser.add_argument("--pairs", default="adamw:rv-adamw,lion:rv-lion",
                        help="comma-separated plain:rotational optimizer names")
    parser.add_argument("--deepspeed-config", default=None, help="parallel.deepspeed_config JSON (default none)")
    args = parser.parse_args()
    world = launched_world()
    if world.size < 2:
        sys.exit("run under torchrun with --nproc_per_node 2 (the segment-map all-reduce needs several ranks)")
    cfg = load_config(args.config, ["train.device=cpu", "parallel.strategy=deepspeed", "parallel.zero_stage=2",
                                    "train.precision=fp32"])
    init_world(cfg, torch.device("cpu"))
    install_probes()
    try:
        info = machine_info()
        out = [f"Machine: {info}",
               f"Shapes: {args.config} model, vocab {args.vocab}, micro batch {args.micro_batch} x seq "
               f"{args.seq_len} per rank, fp32", ""]
        started = time.perf_counter()
        for pair in args.pairs.split(","):
            plain, rv = pair.split(":")
            result = measure_pair(args, plain, rv, world.rank)
            out.append(report(plain, rv, result, args))
            out.append("")
            if world.is_main:
                print(f"[{plain} / {rv} done after {time.perf_counter() - started:.0f} s]", flush=True)
        if world.is_main:
            print("\n".join(out), flush=True)
    finally:
        close_world()


if __name__ == "__main__":
    main()
