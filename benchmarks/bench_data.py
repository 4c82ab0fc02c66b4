"""Data pipeline benchmark: prepare throughput vs raw `tokenizers`, and loader time per batch.

(a) `prepare_data` on the embedded corpus with an already-trained tokenizer (so BPE training is
    not counted), end to end: hashing the inputs, reading, parallel tokenization, shards, index.
    Against it, in the same run and on the same documents already in memory, the raw
    `tokenizers.Tokenizer.encode_batch` and `encode_batch_fast` (Rust threads on every core).
    Ratio = raw time / prepare time for the same tokens (goal >= 0.8). Runs alternate; medians of
    `--repeat` are kept, of wall time and of CPU time (the latter is robust on a shared machine).
(b) `TrainLoader.get_batch` at the tiny recipe's shapes (micro batch 16, seq_len 256), hot page cache.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_data.py [--repeat 3] [--out FILE]

Writes its "Data" section to `--out` (default benchmarks/RESULTS_data.md), to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tokenizers

from pretrain.config import DataConfig
from pretrain.data import TrainLoader, load_index, prepare_data
from pretrain.data.corpus import open_corpus


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (prepare's pool workers are joined on exit)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _measure(samples: dict[str, list[tuple[float, float]]], name: str, fn: Callable[[], object]) -> object:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = fn()
    samples[name].append((time.perf_counter() - wall, _cpu_seconds() - cpu))
    return result


def bench_prepare(work: Path, tokenizer_dir: Path, repeat: int, num_proc: int) -> dict:
    texts = list(open_corpus(DataConfig()).documents())
    raw = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    samples: dict[str, list[tuple[float, float]]] = {"encode_batch": [], "encode_batch_fast": [], "prepare": []}
    for run in range(repeat):
        for method in ("encode_batch", "encode_batch_fast"):
            encodings = _measure(samples, method, lambda m=method: getattr(raw, m)(texts, add_special_tokens=False))
        cfg = DataConfig(tokenizer=str(tokenizer_dir), dir=str(work / f"run{run}"), num_proc=num_proc)
        _measure(samples, "prepare", lambda c=cfg: prepare_data(c, progress=False))
    index = load_index(cfg.dir)
    tokens = sum(split["num_tokens"] for split in index["splits"].values())
    assert tokens == sum(len(e.ids) + 1 for e in encodings), "prepare and raw tokenization disagree"  # + eos
    wall = {name: statistics.median(w for w, _ in values) for name, values in samples.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in samples.items()}
    return {"chars": sum(map(len, texts)), "tokens": tokens, "samples": samples, "wall": wall, "cpu": cpu}


def bench_loader(data_dir: Path, steps: int = 2000) -> dict:
    start = time.perf_counter()
    loader = TrainLoader(data_dir, seq_len=256, micro_batch_size=16, grad_accum=1, seed=1337)
    loader.get_batch(0, 0)
    first_ms = 1e3 * (time.perf_counter() - start)
    times = []
    for step in range(1, steps + 1):
        tick = time.perf_counter()
        loader.get_batch(step, 0)
        times.append(1e3 * (time.perf_counter() - tick))
    times.sort()
    return {"first_ms": first_ms, "mean_ms": statistics.fmean(times), "p50_ms": times[len(times) // 2],
            "p99_ms": times[int(0.99 * len(times))], "steps": steps}


def report(full: dict, prep: dict, load: dict, args: argparse.Namespace) -> str:
    timings = full["timings"]
    wall, cpu, tokens = prep["wall"], prep["cpu"], prep["tokens"]
    runs = "; ".join(f"{name} " + ", ".join(f"{w:.2f}/{c:.2f}" for w, c in values)
                     for name, values in prep["samples"].items())
    rows = [("raw `Tokenizer.encode_batch` (Rust threads on all cores, text already in memory)", "encode_batch"),
            ("raw `Tokenizer.encode_batch_fast` (no offsets: what prepare's workers call)", "encode_batch_fast"),
            (f"`prepare_data` end to end, num_proc={args.num_proc} (hash, read, tokenize, shards, index)", "prepare")]
    table = "\n".join(f"| {label} | {tokens / wall[key] / 1e3:,.0f} k | **{wall[key] / wall['prepare']:.2f}x** | "
                      f"{cpu[key]:.2f} | {cpu[key] / cpu['prepare']:.2f}x |" for label, key in rows)
    train, val = full["splits"]["train"], full["splits"]["val"]
    return f"""## Data

Command: `HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_data.py --repeat {args.repeat} \
--num-proc {args.num_proc}`
Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), Python \
{platform.python_version()}, tokenizers {tokenizers.__version__}. Other jobs shared the machine, so wall times are
noisy; CPU seconds (this process + its workers) are steadier and show the pipeline's own overhead.

Embedded corpus, `prepare_data(DataConfig())` from scratch (BPE 8192 trained at prepare time):
{full['documents']} documents, {prep['chars'] / 1e6:.1f} M characters -> {train['num_tokens']:,} train tokens in \
{len(train['shards'])} shard(s), {val['num_tokens']:,} val tokens, vocab {full['vocab_size']:,} as {full['dtype']}; \
{timings['total_s']:.1f} s total (inputs {timings['inputs_s']:.2f} s, BPE training {timings['tokenizer_s']:.1f} s, \
tokenization {timings['tokenize_s']:.1f} s, shards {timings['shards_s']:.2f} s). \
A re-run with the same inputs is a no-op.

(a) Tokenizing the same {tokens:,} tokens with the same tokenizer (goal: prepare >= 0.8x raw `encode_batch`):

| | tokens/s (wall) | prepare / this, wall | CPU s | prepare / this, CPU |
|---|---|---|---|---|
{table}

Medians of {args.repeat} alternating runs. Wall/CPU seconds per run: {runs}.

| (b) `TrainLoader.get_batch`, micro batch 16 x seq_len 256, hot page cache | ms |
|---|---|
| mean over {load['steps']} steps | {load['mean_ms']:.3f} |
| p50 / p99 | {load['p50_ms']:.3f} / {load['p99_ms']:.3f} |
| first batch, loader construction included | {load['first_ms']:.1f} |

Compare (b) with the step time of the tiny recipe: the loader is meant to stay below 1% of a step,
which is why it has no prefetch thread.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--num-proc", type=int, default=DataConfig().num_proc)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS_data.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        full_dir = prepare_data(DataConfig(dir=str(work / "embedded")), progress=False)
        full = load_index(full_dir)
        prep = bench_prepare(work, full_dir / "tokenizer", args.repeat, args.num_proc)
        load = bench_loader(full_dir)
    text = report(full, prep, load, args)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
