"""The training loop: config -> data + model + optimizer -> steps -> metrics and checkpoints.

`setup` builds a `Run` once (engine, loaders, tracker, logger, tokenizer, world), `train_step`
performs one optimizer step and says what happened, `save_checkpoint` writes one checkpoint,
and `_loop` strings them together. The loop knows no strategy: it talks to an `Engine`
(pretrain/parallel/engine.py). Design notes: docs/design.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pretrain.card import model_card
from pretrain.checkpoint import (
    choose_resume,
    find_latest,
    holds_run,
    load_trainer_state,
    save_rank_rng,
    save_run_config,
    save_trainer_state,
    write_checkpoint,
)
from pretrain.config import Config, save_config
from pretrain.curves import plot_loss_curves
from pretrain.data import TrainLoader, ValLoader, open_prepared
from pretrain.data.tokenizer import match_model
from pretrain.errors import UserError
from pretrain.logger import MetricsLogger, check_trackers_available, log_line, read_metrics
from pretrain.loss import LossFn, build_loss, causal_lm_loss
from pretrain.metrics import RotationTracker
from pretrain.metrics.sources import FusedSource, OptimizerSource
from pretrain.model import build_model, save_hf_model
from pretrain.parallel import (
    Engine,
    StepWatchdog,
    StopSignals,
    World,
    average_over_ranks,
    barrier,
    build_engine,
    check_world,
    close_world,
    decided_by_main,
    init_world,
    mean_over_ranks,
)
from pretrain.params import ParamSpec, classify_parameters, summarize_table
from pretrain.run_lock import RunLock
from pretrain.schedule import lr_at


class TrainingDiverged(UserError):
    """The loss or gradient became non-finite and the policy says stop, or fp16 overflowed too long."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # global-batch train loss per optimizer step
    val_loss: float | None = None
    checkpoint: Path | None = None
    is_main: bool = True  # rank 0 (the one that writes the run directory)
    stopped_by: signal.Signals | None = None  # a stop notice (SIGTERM, SIGUSR1) ended the run early, checkpointed


@dataclass
class Run:
    """Everything a training run builds once, before its first step.

    Used as a context manager: leaving it stops the step watchdog, closes the logger and lets go of the
    run folder's lock. A run that fails keeps its folder once it holds anything (a checkpoint, a logged
    metric) and says how to continue it; only a folder this run created and never wrote into is removed.
    """

    cfg: Config  # resolved: parallel.world_size is the launched world size
    world: World
    device: torch.device
    run_dir: Path
    engine: Engine
    loader: TrainLoader
    val_loader: ValLoader
    tokenizer: Any
    tracker: RotationTracker
    logger: MetricsLogger | None  # rank 0 only
    start_step: int
    end_step: int  # train.steps, or --stop-at
    lock: RunLock | None  # rank 0's hold on run_dir (pretrain/run_lock.py); it knows whether this run created it
    val_loss: float | None = None  # the latest evaluation
    loss_fn: LossFn = causal_lm_loss  # model forward + loss; compiled as one region under train.compile
    watchdog: StepWatchdog | None = None  # ends a rank whose step stalls (a hung peer); multi-rank runs only
    evaluated: bool = False  # whether this process has evaluated yet (the first evaluation is not timed)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.global_batch_size * self.cfg.data.seq_len

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.logger is not None:
            self.logger.close()
        if self.lock is None:
            return  # not rank 0: the run folder is rank 0's
        failed = exc is not None
        kept = failed and bool(holds_run(self.run_dir))
        if kept:
            print(f"run kept in {self.run_dir}; continue it with --resume auto")
        # A failed run that wrote nothing leaves no trace of a run that never started (if it created the folder).
        self.lock.release(remove_created_dir=failed and not kept)


@dataclass
class StepOutcome:
    """What one call of `train_step` did."""

    step: int
    lr: float
    loss: float  # mean over the global batch
    grad_norm: float  # global, before clipping; NaN when the loss was already non-finite
    loss_scaled: bool = False  # the engine scales the loss (fp16): see `overflowed`
    measured: bool = False  # rotation metrics queued (`run.tracker.scalars(step)` reads them)

    @property
    def applied(self) -> bool:
        """Whether the update was applied (a non-finite loss or gradient drops it)."""
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)

    @property
    def overflowed(self) -> bool:
        """A loss-scaler overflow: finite loss, non-finite scaled gradient; the scaler skipped the update
        and lowered the scale. Without loss scaling a non-finite gradient is a divergence."""
        return self.loss_scaled and math.isfinite(self.loss) and not math.isfinite(self.grad_norm)


def pick_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """`auto`: this rank's GPU if there is one, else the CPU; `cuda`: this rank's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is visible; use train.device=cpu")
    device = torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)
    if name.startswith("cuda:") and world_size > 1:
        raise UserError(f"train.device={name} names one GPU for all {world_size} ranks; use train.device=cuda "
                        "(each rank takes the GPU of its LOCAL_RANK)")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and name == "cuda" and local_rank >= count:
        raise UserError(f"LOCAL_RANK={local_rank} but this process sees {count} GPU(s); launch at most {count} "
                        "processes per node (or set CUDA_VISIBLE_DEVICES)")
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise UserError(f"train.device={name} but this process sees {count} GPU(s) (indices from 0); pick one "
                        "of them or set CUDA_VISIBLE_DEVICES")
    return device


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU unless asked; bf16 on GPUs that support it (fp32 master weights either way)."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_resume(run_dir: Path, resume: str | None, cfg: Config) -> Path | None:
    """The checkpoint to continue (rules in checkpoint.choose_resume), decided and announced by rank 0."""
    return decided_by_main(lambda: choose_resume(run_dir, resume, cfg, print))


# ----------------------------------------------------------------------------- one step


def forward_backward(engine: Engine, loader: TrainLoader, step: int, grad_accum: int, device: torch.device,
                     loss_fn: LossFn = causal_lm_loss) -> torch.Tensor:
    """Accumulate this rank's share of one optimizer step's gradient; return the global batch's mean loss.

    The loss stays on the device (no host sync): `engine.step` reads it.
    """
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = loader.get_batch(step, micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with engine.accumulate(last=micro == grad_accum - 1), engine.autocast():
            loss = loss_fn(engine.model, x, y) / grad_accum
            engine.backward(loss)
        loss_sum += loss.detach()
    return average_over_ranks(loss_sum)


def train_step(run: Run, step: int) -> StepOutcome:
    """One optimizer step: scheduled lr, forward/backward, update, and the rotation metrics when due.

    A non-finite loss or gradient drops the step's gradients and changes nothing (an fp16 overflow
    also lowers the loss scale).
    """
    cfg, engine = run.cfg, run.engine
    lr = lr_at(step, cfg.optim.lr, cfg.train.steps, cfg.schedule)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    loss = forward_backward(engine, run.loader, step, cfg.train.grad_accum, run.device, run.loss_fn)
    measuring = run.tracker.should_measure(step)
    outcome = StepOutcome(step, lr, *engine.step(loss, run.tracker.capture if measuring else None),
                          loss_scaled=engine.scales_loss)
    if measuring and outcome.applied:
        run.tracker.queue_measure(step, lr)  # read a step later, once the update is done
        outcome.measured = True
    elif measuring:  # captured before the engine knew the step would be dropped
        run.tracker.discard()
    return outcome


def evaluate(engine: Engine, loader: ValLoader, device: torch.device, loss_fn: LossFn = causal_lm_loss,
             on_batch: Callable[[], None] | None = None) -> float:
    """Mean val loss over every rank's share of the fixed val windows; `on_batch` after each batch."""
    engine.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            with engine.autocast():
                total += loss_fn(engine.model, x.to(device), y.to(device)).item()
            count += 1
            if on_batch is not None:
                on_batch()
    engine.model.train()
    return mean_over_ranks(torch.tensor([total / max(count, 1)], dtype=torch.float64, device=device))[0]


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run, step: int) -> Path:
    """Write `checkpoints/step_NNNNNN` of `run` (every rank calls it) and return its folder."""
    with _paused(run):
        return write_checkpoint(run.run_dir, step, run.cfg.checkpoint.keep_last,
                                lambda tmp: _checkpoint_contents(run, step, tmp), run.world.is_main, barrier)


def _evaluate(run: Run) -> float:
    """Evaluation under the step watchdog. Its forward passes hold collectives (DDP's buffer broadcast,
    FSDP's all-gathers), so a hung peer can stop it anywhere: each val batch counts as progress. The
    process's first evaluation (warm-up, compiling the no-grad graph) is not timed, as step 1 is not."""
    if run.watchdog is not None and run.evaluated:
        return evaluate(run.engine, run.val_loader, run.device, run.loss_fn, run.watchdog.progress)
    run.evaluated = True
    with _paused(run):
        return evaluate(run.engine, run.val_loader, run.device, run.loss_fn)


def _paused(run: Run) -> contextlib.AbstractContextManager[None]:
    """Work that may take longer than a step (checkpoints, the first evaluation) is not a stall."""
    return run.watchdog.paused() if run.watchdog is not None else contextlib.nullcontext()


def _checkpoint_contents(run: Run, step: int, tmp: Path) -> None:
    """Fill a checkpoint's temp folder: each rank its training state, rank 0 everything else."""
    engine, world, cfg = run.engine, run.world, run.cfg
    engine.save_state(tmp / "state")
    weights = engine.export_state_dict()  # a collective: the full weights, on rank 0
    if world.size > 1:
        save_rank_rng(tmp / "state", world.rank)
    if not world.is_main:
        return
    tokens = step * run.tokens_per_step
    save_hf_model(engine.raw_model, tmp / "model", weights)
    run.tokenizer.save_pretrained(tmp / "tokenizer")
    save_trainer_state(tmp / "state", {"step": step, "tokens_seen": tokens, "tracker": run.tracker.state_dict(),
                                       "val_loss": run.val_loss, "strategy": engine.strategy,
                                       "world_size": world.size, "zero_stage": cfg.parallel.zero_stage})
    run.tracker.save(tmp / "rotation")
    save_run_config(cfg, tmp)
    (tmp / "README.md").write_text(model_card(cfg, step, tokens, run.val_loss, tmp / "rotation"))


# ----------------------------------------------------------------------------- setup


def setup(cfg: Config, world: World, device: torch.device, resume: str | None, stop_at: int | None) -> Run:
    """Take the run folder, check the inputs, then build the run; nothing is written before the inputs are
    known good, and a setup that fails lets the folder go as it found it."""
    check_trackers_available(cfg)
    # The saved config records the world size: the global batch depends on it.
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, world_size=world.size))
    lock = lock_run_dir(Path(cfg.train.out_dir), world)
    try:
        return _build_run(cfg, world, device, resume, stop_at, lock)
    except BaseException:
        if lock is not None:
            lock.release(remove_created_dir=True)
        raise


def lock_run_dir(run_dir: Path, world: World) -> RunLock | None:
    """Rank 0 locks the run folder before anything in it is read or written, and holds it for the whole run
    (None on the other ranks); a folder in use by another process stops every rank with one line."""
    held: list[RunLock] = []
    decided_by_main(lambda: held.append(RunLock.acquire(run_dir)))
    return held[0] if held else None


def _build_run(cfg: Config, world: World, device: torch.device, resume: str | None, stop_at: int | None,
               lock: RunLock | None) -> Run:
    run_dir = Path(cfg.train.out_dir)
    ckpt_in = resolve_resume(run_dir, resume, cfg)

    # Data, validated first; each rank reads only its own windows.
    data_dir, t = Path(cfg.data.dir), cfg.train
    _, tokenizer = open_prepared(cfg.data)
    loader = TrainLoader(data_dir, cfg.data.seq_len, t.micro_batch_size, t.grad_accum, t.seed, world.rank, world.size)
    val_loader = ValLoader(data_dir, cfg.data.seq_len, t.micro_batch_size, t.eval_batches, world.rank, world.size)

    engine, tracker = _build_engine_and_tracker(cfg, world, device, tokenizer)
    start_step, val_loss = 0, None
    if ckpt_in is not None:
        start_step, val_loss = _restore(ckpt_in, engine, tracker, world)
        _say(world, f"resumed from {ckpt_in} at step {start_step}")
    elif cfg.model.init_from:
        _say(world, f"initialised from {cfg.model.init_from}")

    logger = None
    if world.is_main:
        save_config(cfg, run_dir / "config.yaml")
        logger = MetricsLogger(run_dir, cfg, resume_step=start_step)
    end_step = min(t.steps, stop_at) if stop_at is not None else t.steps
    watchdog = StepWatchdog(cfg.parallel.step_timeout_s, world.rank, enabled=world.size > 1)
    return Run(cfg, world, device, run_dir, engine, loader, val_loader, tokenizer, tracker, logger, start_step,
               end_step, lock, val_loss, build_loss(cfg.train.compile), watchdog)


def _build_engine_and_tracker(cfg: Config, world: World, device: torch.device,
                              tokenizer: Any) -> tuple[Engine, RotationTracker]:
    """The model (same initial weights on every rank), its strategy's engine and the rotation tracker."""
    dtype = pick_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer.eos_token_id).to(device)
    match_model(tokenizer, model)  # config.json's special ids and the tokenizer's max length agree
    table = classify_parameters(model, rotational_embeddings=cfg.optim.rotational_embeddings)
    engine = build_engine(cfg, model, table, world, dtype)
    # From here on each rank draws its own dropout masks.
    torch.manual_seed(cfg.train.seed + world.rank)
    tracker = RotationTracker(model, table, cfg.optim, cfg.logging.rotation_every, _tracker_source(engine, table))
    zero = f" ZeRO-{cfg.parallel.zero_stage}" if engine.strategy == "deepspeed" else ""
    _say(world, f"model: {cfg.model.arch}/{cfg.model.preset}, {sum(math.prod(s.shape) for s in table):,} "
                f"parameters, device {device}, {str(dtype).removeprefix('torch.')}, optimizer {cfg.optim.name}, "
                f"strategy {engine.strategy}{zero} x{world.size}")
    _say(world, summarize_table(table))
    return engine, tracker


def _tracker_source(engine: Engine, table: list[ParamSpec]) -> OptimizerSource | FusedSource | None:
    """Read updates inside the optimizer where the engine says the parameters do not show them, or where
    the optimizer's fused step writes the sums itself; None: from the model's parameters."""
    specs = [spec for spec in table if spec.tracked]
    view = engine.optimizer_view()
    if view is None:
        return FusedSource.build(engine.raw_model, engine.optimizer, specs)
    return OptimizerSource(view.optimizer, specs, view.names, view.maps, view.group, view.device)


def _restore(ckpt: Path, engine: Engine, tracker: RotationTracker, world: World) -> tuple[int, float | None]:
    """Load a checkpoint into the engine and tracker (and this rank's RNG); return (step, val loss)."""
    engine.load_state(ckpt / "state")
    state = load_trainer_state(ckpt, world.rank)
    tracker.load_state_dict(state["tracker"])
    return int(state["step"]), state.get("val_loss")


def _say(world: World, text: str) -> None:
    if world.is_main:
        print(text)


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, resume: str | None = None, stop_at: int | None = None) -> TrainResult:
    """Run (or continue) the training run `cfg` describes; `stop_at` ends early with a checkpoint.

    Every rank of a distributed launch calls this; rank 0 alone writes the run directory.
    """
    world = check_world(cfg)
    device = pick_device(cfg.train.device, world.local_rank, world.size)
    created_group = init_world(cfg, device)
    try:
        return _run(cfg, world, device, resume, stop_at)
    except BaseException as failure:
        if created_group:  # its traceback's frames hold the run, which close_world must free first
            traceback.clear_frames(failure.__traceback__)
        raise
    finally:
        if created_group:
            close_world()


def _run(cfg: Config, world: World, device: torch.device, resume: str | None, stop_at: int | None) -> TrainResult:
    """Build, train, plot: the run's objects (model, optimizer, sharded tensors) die with this frame."""
    with setup(cfg, world, device, resume, stop_at) as run:
        result = _loop(run)
        if world.is_main:
            plot_loss_curves(read_metrics(run.run_dir), run.run_dir / "loss.png")
    if result.stopped_by is not None:
        # Every rank exits with 128 + the signal, and torchrun's agent stops the others at the first exit:
        # rank 0 finishes its plot and lets go of the run folder first.
        barrier()
    return result


def _loop(run: Run) -> TrainResult:
    """Steps start_step+1 .. end_step; eval, logging and checkpoints are all due at end_step too.

    A stop notice (SIGTERM, SIGUSR1; parallel/stop.py) ends it after the running step, with a checkpoint.
    """
    cfg, end = run.cfg, run.end_step
    result = TrainResult(run.run_dir, run.start_step, is_main=run.world.is_main)
    window, skips, records = Window(), 0, Records(run)
    with tqdm(total=cfg.train.steps, initial=run.start_step, dynamic_ncols=True,
              disable=not (cfg.logging.progress and run.world.is_main)) as progress, records, \
            StopSignals(run.device, cfg.checkpoint.on_signal) as stop:
        for step in range(run.start_step + 1, end + 1):
            if run.watchdog is not None:
                run.watchdog.beat(step)
            stop.vote()
            outcome = train_step(run, step)
            records.write_held()  # the step before's rotation metrics arrived while this step ran
            result.step = step
            if not outcome.applied:
                skips = _count_skip(run, outcome, skips)
                if run.world.is_main:  # one line per launch, not one per rank
                    progress.write(_skip_line(run, outcome, skips))
            else:
                skips, result.losses[step] = 0, outcome.loss
                window.add(run.tokens_per_step, outcome.loss)
                record = {}
                if _due(step, cfg.logging.log_every, end):
                    record.update(_train_scalars(run, outcome, *window.take()))
                if _due(step, cfg.train.eval_every, end):
                    run.val_loss = record["val/loss"] = _evaluate(run)
                records.add(step, record, outcome.measured)
                progress.set_postfix_str(f"loss {outcome.loss:.3f} lr {outcome.lr:.2e} "
                                         f"{run.tracker.summary_line()}", refresh=False)
                progress.update(1)
            signal_ = stop.agreed() if step < end else None  # the last step ends the run anyway
            if signal_ is not None or _due(step, cfg.checkpoint.every, end if cfg.checkpoint.save_final else None):
                records.write_held()  # the metrics file reaches every step a checkpoint holds
                # After a skipped step: the last good weights, under this step.
                result.checkpoint = save_checkpoint(run, step)
            if signal_ is not None:
                result.stopped_by = signal_
                if run.world.is_main:  # now: once a rank exits, torchrun's agent stops the others
                    print(f"stopped by {signal_.name} after step {step}: checkpoint {result.checkpoint}; continue it "
                          "with --resume auto", file=sys.stderr, flush=True)
                break
    result.val_loss = run.val_loss
    return result


class Records:
    """Writes the loop's records (`metrics.jsonl`, trackers, the text log line) in step order; rank 0 only.

    A measured step's record is held until the next step is queued (`write_held`): its rotation
    metrics then reach the host without the loop waiting for the update, which the loop would
    otherwise do once per measured step with the device idle. A checkpoint writes a held record
    first, and so does leaving the `with` block, at the end or on an exception; a hard stop
    (SIGKILL, the step watchdog's exit) loses it, as it would lose the step being run.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self._held: tuple[int, dict[str, float]] | None = None

    def add(self, step: int, record: dict[str, float], measured: bool) -> None:
        """Step `step`'s scalars; `measured`: its rotation metrics are queued and join the record."""
        if self.run.logger is None:  # not rank 0: its tracker records its measurements when next read
            return
        self.write_held()
        if measured:
            self._held = (step, record)
        else:
            self._write(step, record)

    def write_held(self) -> None:
        """Write the held record, if any, with its rotation metrics (waits for them if still on the way)."""
        if self._held is not None:
            step, record = self._held
            self._write(step, {**self.run.tracker.scalars(step), **record})
            self._held = None

    def _write(self, step: int, record: dict[str, float]) -> None:
        if record:
            self.run.logger.log(step, record)
            if not self.run.cfg.logging.progress and ("train/loss" in record or "val/loss" in record):
                print(log_line(step, self.run.cfg.train.steps, record), flush=True)

    def __enter__(self) -> Records:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            self.write_held()
        except Exception:
            # Leaving on an exception, that one says what went wrong (a broken device fails this
            # read too): it must not be replaced by this one.
            if exc is None:
                raise


def _due(step: int, every: int, end: int | None) -> bool:
    """Every `every` steps and at the run's last step."""
    return step % every == 0 or step == end


def _train_scalars(run: Run, outcome: StepOutcome, tokens_per_s: float, mean_loss: float) -> dict[str, float]:
    """The logged train scalars: the loss is the mean over the logging window's steps."""
    scalars = {"train/loss": mean_loss, "train/lr": outcome.lr, "train/tokens": outcome.step * run.tokens_per_step,
               "perf/tokens_per_s": tokens_per_s, "train/grad_norm": outcome.grad_norm}
    if outcome.loss_scaled:
        scalars["train/loss_scale"] = run.engine.loss_scale()
    fused = getattr(run.engine.optimizer, "fused_fraction", None)  # ours: did its fast path engage?
    if fused is not None:
        scalars["optim/fused_fraction"] = fused
    return scalars


def _count_skip(run: Run, outcome: StepOutcome, skips: int) -> int:
    """One more skipped step in a row; stop the run where `train.nan_policy` says so.

    One count serves both kinds of skip: steps skipped in a row, whatever the reason. An fp16 loss-scale
    overflow never stops the run by itself, but more than `train.max_skips` of them in a row (the
    gradient overflows at every scale tried) do, under either policy.
    """
    skips += 1
    t = run.cfg.train
    if skips <= t.max_skips and (outcome.overflowed or t.nan_policy == "skip"):
        return skips
    last = find_latest(run.run_dir)
    if outcome.overflowed:
        raise TrainingDiverged(
            f"the fp16 gradient overflowed on {skips} steps in a row, up to step {outcome.step} (loss scale now "
            f"{run.engine.loss_scale()}); stopped by train.max_skips={t.max_skips}; use train.precision=bf16 or "
            f"fp32, lower optim.lr or raise train.max_skips; the last good checkpoint is {last if last else 'none'}")
    raise TrainingDiverged(
        f"loss became {outcome.loss} (grad norm {outcome.grad_norm}) at step {outcome.step}; stopped by "
        f"train.nan_policy={t.nan_policy}; the last good checkpoint is "
        f"{last if last else 'none (lower optim.lr or add schedule.warmup_steps)'}")


def _skip_line(run: Run, outcome: StepOutcome, skips: int) -> str:
    """The progress output's line for a skipped step."""
    if outcome.overflowed:
        return (f"fp16 loss-scale overflow at step {outcome.step}, update skipped, loss scale now "
                f"{run.engine.loss_scale()} ({skips} skipped in a row)")
    return f"step {outcome.step}: non-finite loss or gradient, update skipped ({skips} in a row)"


class Window:
    """The logging window: tokens per second and the mean train loss since the last reading."""

    def __init__(self) -> None:
        self.start, self.tokens, self.losses = time.perf_counter(), 0, []

    def add(self, tokens: int, loss: float) -> None:
        self.tokens += tokens
        self.losses.append(loss)

    def take(self) -> tuple[float, float]:
        """(tokens per second, mean loss) of the window, which starts anew."""
        now = time.perf_counter()
        rate, mean = self.tokens / (now - self.start), sum(self.losses) / len(self.losses)
        self.start, self.tokens, self.losses = now, 0, []
        return rate, mean
