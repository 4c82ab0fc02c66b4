"""One-device training throughput, MFU and peak memory of a recipe, e.g. on one GPU.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_mfu.py --config configs/llama-125m.yaml \\
        --device cuda --precision bf16 --compile --micro-batch 16 --seq-len 1024 --steps 30 --peak-tflops 989 \\
        --optims adamw,rv-adamw,rv-adamw:eager --rotation-every 0,1,10

Runs the training loop's own step (`forward_backward` + `engine.step(loss)`, single strategy, the
loop's loss function and rotation tracker) on random tokens, so no data needs preparing. All
rows of one invocation share one model and one compiled loss: optimizers are swapped on the
same weights, so their ratios come from one process on one device.

- `--optims`: comma list; `NAME:eager` runs NAME with `optim.fused=false` (the eager step).
- `--rotation-every`: comma list of `logging.rotation_every` values, each a row per optimizer.
- `--loss plain`: the path before issue 10, for before/after rows: only the model is compiled,
  and the loss is `F.cross_entropy(logits.float())` outside the compiled region.

`step ms` is the median of steps that each start and end with the device idle (a sync), as
nanoGPT's bench.py times its steps: its loss read, after the optimizer step, ends each one, and
nothing else in its step waits. Nothing else waits in ours either but the step's own loss and
norm read. The step is split into `fwd+bwd ms`, from its start to the end of the backward pass
on the device (a CUDA event, so the split adds no wait; on a CPU, the clock), and `update ms`,
the rest (clipping, the optimizer step until the device is done, and the rotation metrics on a
measured step). Until session 9 a sync split the two parts, which left the device idle while
the host started the update: step times of earlier reports are not comparable. Each column is
the median of its own part, so they add up to `step ms` only approximately. `measured ms` is
the median of the timed steps that recorded rotation metrics (`-`: none did); with
`--rotation-every 10` it gives their cost against the same row's other steps
(benchmarks/gpu_summary.py), a comparison that row-to-row drift does not blur. `loop ms` is the
mean of as many more steps run back to back, exactly as `pretrain train` runs them: no sync but
the step's own loss and norm read, which (`engine.step` on the device, pretrain/parallel/engine.py)
need not wait for the update, so the host prepares the next step while the device finishes the
last one's update. A measured step's rotation figures are read a step later, as the loop reads
them (`Records`, pretrain/train.py), so measuring adds no wait there either. That is the
throughput a run gets; tokens/s and MFU are `step ms`'s.

`--profile FILE` / `--trace FILE` (the rows `--profile-rows` lists, default 0, the first; rows
count optimizers x rotation_every values in table order): after that row's timed steps, one untimed
profiler warm-up step (CUPTI's start-up lands there) and `--profile-steps` more steps run
under torch.profiler, so the table's timings never include a profiled step. `--profile` writes
the kernels' key_averages table (totals over all profiled steps, as its first line says),
`--trace` the chrome trace of the same steps (gzip-compressed when FILE ends in .gz), with each
step's `forward_backward`, `engine.step` and `rotation metrics` marked as record_function
ranges. `benchmarks/trace_gaps.py FILE` then reports where in the step the GPU sits idle
(the profiler slows the host a little, so the trace's host-bound gaps run somewhat long).

MFU = achieved model FLOP/s / `--peak-tflops` (the device's dense bf16 peak: H100 SXM and H200
989, A100 312). Model FLOPs per token follow the usual 6 N + 12 L d T (N parameters counted
once, tied embeddings included as the output matmul; attention as if not causal-masked).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.loss import build_loss
from pretrain.metrics import RotationTracker
from pretrain.metrics.sources import FusedSource
from pretrain.model import build_model, resolve_size
from pretrain.parallel import Engine, build_engine
from pretrain.parallel.world import World
from pretrain.params import classify_parameters
from pretrain.train import StepOutcome, forward_backward, pick_device, pick_precision


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


Mark = Callable[[str], contextlib.AbstractContextManager]


class SplitTimer:
    """Where a step's first part ended, without a wait: a CUDA event queued behind its kernels, or on a
    CPU (where every op has finished when it returns) the clock. Made when the device is idle."""

    def __init__(self, device: torch.device) -> None:
        self.events = None
        if device.type == "cuda":
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            self.events[0].record()  # the device is idle: this runs at once
        self.host_mark: float | None = None

    def mark(self) -> None:
        if self.events is not None:
            self.events[1].record()
        else:
            self.host_mark = time.perf_counter()

    def seconds_to_mark(self, start: float) -> float:
        """Seconds from `start` (the clock when this timer was made) to the mark; after the step's last sync."""
        if self.events is not None:
            return self.events[0].elapsed_time(self.events[1]) / 1e3
        return self.host_mark - start


def no_mark(label: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class BenchStep:
    """The training loop's step on one row's engine and tracker, timed."""

    engine: Engine
    loader: RandomTokens
    tracker: RotationTracker
    loss_fn: Callable
    device: torch.device
    grad_accum: int
    lr: float
    unread: int | None = None  # the measured step whose scalars the next step reads

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, step: int, mark: Mark = no_mark) -> tuple[float, float]:
        """Seconds of the whole step and of its forward/backward part; `mark` labels the parts in a trace."""
        self._sync()
        start = time.perf_counter()
        split = SplitTimer(self.device)
        with mark("forward_backward"):
            loss = forward_backward(self.engine, self.loader, step, self.grad_accum, self.device, self.loss_fn)
        split.mark()
        self._update(loss, step, mark)
        self._sync()
        return time.perf_counter() - start, split.seconds_to_mark(start)

    def _update(self, loss: torch.Tensor, step: int, mark: Mark = no_mark) -> None:
        """Clip, step and (on a measured step) the rotation metrics, as the loop's train_step does; then
        read the step before's metrics, as the loop's `Records` does."""
        measuring = self.tracker.should_measure(step)
        with mark("engine.step"):
            outcome = StepOutcome(step, self.lr, *self.engine.step(loss, self.tracker.capture if measuring else None))
        if measuring:
            with mark("rotation metrics"):
                if outcome.applied:
                    self.tracker.queue_measure(step, self.lr)
                else:
                    self.tracker.discard()
        if self.unread is not None:
            self.tracker.scalars(self.unread)
        self.unread = step if measuring and outcome.applied else None

    def loop(self, first_step: int, count: int) -> float:
        """Seconds a step of `count` steps run back to back, as the training loop runs them: each step
        still reads its loss and its gradient norm, but nothing waits for a step's last kernels before
        the next step starts."""
        self._sync()
        start = time.perf_counter()
        for step in range(first_step, first_step + count):
            self._update(forward_backward(self.engine, self.loader, step, self.grad_accum, self.device,
                                          self.loss_fn), step)
        self._sync()
        return (time.perf_counter() - start) / count


def profile_steps(bench_step: BenchStep, first_step: int, count: int, shapes: bool = False) -> torch.profiler.profile:
    """`count` steps under torch.profiler, after one profiler warm-up step that the results leave out.

    `shapes`: record each op's input shapes too, which costs host time per op (so not for a trace,
    whose gaps would then show the profiler's host time)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if bench_step.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=count, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=shapes) as profiler:
        for step in range(first_step, first_step + 1 + count):
            bench_step(step, torch.profiler.record_function)
            profiler.step()
    return profiler


def row_path(path: str, row: int, rows: int) -> str:
    """`path` for a single profiled row, else `.row<row>` before its suffixes (t.json.gz -> t.row1.json.gz)."""
    if rows == 1:
        return path
    p = Path(path)
    stem = p.name.split(".", 1)
    return str(p.with_name(f"{stem[0]}.row{row}" + (f".{stem[1]}" if len(stem) > 1 else "")))


def write_profile(profiler: torch.profiler.profile, path: str, count: int, cuda: bool, row: int) -> None:
    sort_by = "self_device_time_total" if cuda else "cpu_time_total"
    with open(path, "w") as out:
        out.write(f"torch.profiler key_averages over {count} untimed step(s) after row {row}'s timed ones; "
                  f"times are totals over all {count}\n")
        out.write(profiler.key_averages().table(sort_by=sort_by, row_limit=40))
        if profiler.record_shapes:  # which tensors an op ran on tells calls of one name apart
            out.write("\n\nThe same, by input shapes (top 30):\n")
            out.write(profiler.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=30))


def write_trace(profiler: torch.profiler.profile, path: str) -> None:
    """The chrome trace, gzip-compressed here when `path` ends in .gz (whatever torch's export does with it)."""
    partial = f"{path}.partial"
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "trace.json")
        profiler.export_chrome_trace(plain)
        with open(plain, "rb") as source, (gzip.open if path.endswith(".gz") else open)(partial, "wb") as target:
            shutil.copyfileobj(source, target)
    os.replace(partial, path)


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
    parser.add_argument("--profile", default="", help="write a row's top kernels (torch.profiler) here")
    parser.add_argument("--trace", default="", help="write a row's profiled steps as a chrome trace "
                        "(.json, or .json.gz compressed) here; read it with benchmarks/trace_gaps.py")
    parser.add_argument("--profile-steps", type=int, default=1, help="untimed steps that --profile/--trace record")
    parser.add_argument("--profile-rows", default="0",
                        help="comma list of table rows (from 0) that --profile/--trace record; with several, "
                             "each row's files are named FILE with .rowN before its suffixes")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra dotted config overrides")
    parser.add_argument("--sdpa", default="auto", choices=["auto", "flash"],
                        help="attention: torch's choice (cuDNN's on Hopper), or SDPA's flash kernel, cuDNN's off")
    args = parser.parse_args()
    if args.profile_steps < 1:
        parser.exit(2, "error: --profile-steps must be at least 1\n")
    for path in (args.profile, args.trace):
        if path and not Path(path).resolve().parent.is_dir():
            parser.exit(2, f"error: the folder of {path} does not exist; create it or choose another path\n")

    base = [f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
            f"train.grad_accum={args.grad_accum}", f"train.device={args.device}",
            f"train.precision={args.precision}", "parallel.strategy=single", *args.overrides]
    cfg = load_config(args.config, base)
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # as `pretrain train` does: Triton launches on the current device
    dtype = pick_precision(cfg.train.precision, device)
    torch.manual_seed(0)
    model = build_model(cfg.model, args.vocab, args.seq_len, eos_id=0).to(device)
    loss_fn = build_loss(args.compile) if args.loss == "chunked" else plain_loss(args.compile)
    loader = RandomTokens(args.vocab, args.micro_batch, args.seq_len, device)
    cuda = device.type == "cuda"
    size = resolve_size(cfg.model, args.seq_len)
    num_params = sum(p.numel() for p in model.parameters())
    tokens = args.micro_batch * args.seq_len * args.grad_accum
    model_flops = flops_per_token(num_params, int(size["num_layers"]), int(size["hidden_size"]), args.seq_len)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{args.config} ({num_params / 1e6:.1f}M params), {name}, {str(dtype).removeprefix('torch.')}, "
          f"{'compiled' if args.compile else 'eager'}, loss {args.loss}, batch {args.micro_batch} x {args.seq_len}"
          f" x {args.grad_accum} accumulation, torch {torch.__version__}"
          + (f", sdpa {args.sdpa}" if args.sdpa != "auto" else ""))
    print("| optimizer | rotation_every | step ms | fwd+bwd ms | update ms | measured ms | loop ms | tokens/s | MFU "
          "| peak GiB | vs first row |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with sdpa_backends(args.sdpa):  # compilation picks the kernel, so the whole run is inside
        run_rows(args, model, loss_fn, loader, device, dtype, base, tokens, model_flops)


def sdpa_backends(choice: str) -> contextlib.AbstractContextManager:
    if choice == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                       set_priority=True)


def run_rows(args: argparse.Namespace, model: torch.nn.Module, loss_fn: Callable, loader: RandomTokens,
             device: torch.device, dtype: torch.dtype, base: list[str], tokens: int, model_flops: float) -> None:
    """One table row per optimizer and rotation_every, on the same model and compiled loss."""
    cuda = device.type == "cuda"
    first, row = None, -1
    profiled = {int(r) for r in args.profile_rows.split(",")}
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
            bench_step = BenchStep(engine, loader, tracker, loss_fn, device, args.grad_accum, run_cfg.optim.lr)
            times, passes, measured = [], [], []
            for step in range(1, args.warmup + args.steps + 1):
                if step == args.warmup + 1 and cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                step_seconds, pass_seconds = bench_step(step)
                if step > args.warmup:
                    times.append(step_seconds)
                    passes.append(pass_seconds)
                    if tracker.should_measure(step):
                        measured.append(step_seconds)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
            # Steps 1..warmup+steps ran; continuing the count keeps rotation_every's measured steps in step.
            loop_time = bench_step.loop(args.warmup + args.steps + 1, args.steps)
            row += 1
            if (args.profile or args.trace) and row in profiled:
                profiler = profile_steps(bench_step, args.warmup + 2 * args.steps + 1, args.profile_steps,
                                         shapes=not args.trace)
                if args.profile:
                    write_profile(profiler, row_path(args.profile, row, len(profiled)), args.profile_steps, cuda, row)
                if args.trace:
                    write_trace(profiler, row_path(args.trace, row, len(profiled)))
            step_time, pass_time = statistics.median(times), statistics.median(passes)
            update_time = statistics.median(t - p for t, p in zip(times, passes, strict=True))
            first = first or step_time
            measured_ms = f"{statistics.median(measured) * 1e3:.1f}" if measured else "-"
            print(f"| {spec} | {every} | {step_time * 1e3:.1f} | {pass_time * 1e3:.1f} | "
                  f"{update_time * 1e3:.1f} | {measured_ms} | {loop_time * 1e3:.1f} | {tokens / step_time:,.0f} | "
                  f"{100 * model_flops * tokens / step_time / (args.peak_tflops * 1e12):.1f}% | {peak:.2f} | "
                  f"{first / step_time:.3f}x |", flush=True)
        del engine
        model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
