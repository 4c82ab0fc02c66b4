"""The training loop: config -> data + model + optimizer -> steps -> metrics and checkpoints."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
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
from pretrain.metrics import RotationTracker
from pretrain.model import build_model, save_hf_model
from pretrain.parallel import (
    Engine,
    StepWatchdog,
    World,
    barrier,
    build_engine,
    check_world,
    close_world,
    decided_by_main,
    init_world,
    mean_over_ranks,
)
from pretrain.params import classify_parameters, summarize_table
from pretrain.schedule import lr_at


class TrainingDiverged(UserError):
    """The loss or gradient became non-finite and the policy says stop."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # global-batch train loss per optimizer step
    val_loss: float | None = None
    checkpoint: Path | None = None
    is_main: bool = True  # rank 0 (the one that writes the run directory)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is visible; use train.device=cpu")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU unless asked; bf16 on GPUs that support it (fp32 master weights either way)."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_resume(run_dir: Path, resume: str | None, cfg: Config) -> Path | None:
    """The checkpoint to continue (rules in checkpoint.choose_resume), decided and announced by rank 0."""
    return decided_by_main(lambda: choose_resume(run_dir, resume, cfg, print))


def evaluate(model: torch.nn.Module, loader: ValLoader, device: torch.device, autocast) -> float:
    """Mean val loss over every rank's share of the fixed val windows."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            with autocast():
                logits = model(input_ids=x.to(device)).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item()
            count += 1
    model.train()
    return mean_over_ranks([total / max(count, 1)], device)[0]


def forward_backward(engine: Engine, loader: TrainLoader, step: int, grad_accum: int, grad_clip: float,
                     device: torch.device, autocast) -> tuple[float, float | None]:
    """Accumulate this rank's share of one optimizer step's batch; unscale and clip the gradient.

    Returns (mean loss over the global batch, global gradient norm before clipping, or None where
    the strategy clips inside its step) as floats: the one host sync per step.
    """
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = loader.get_batch(step, micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with engine.accumulate(last=micro == grad_accum - 1), autocast():
            logits = engine.model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / grad_accum
            engine.backward(loss)
        loss_sum += loss.detach()
    grad_norm = engine.clip(grad_clip)
    return mean_over_ranks([loss_sum.item()], device)[0], grad_norm


def train(cfg: Config, resume: str | None = None, stop_at: int | None = None) -> TrainResult:
    """Run (or continue) the training run `cfg` describes; `stop_at` ends early with a checkpoint.

    Every rank of a distributed launch calls this; rank 0 alone writes the run directory.
    """
    world = check_world(cfg)
    device = pick_device(cfg.train.device, world.local_rank)
    created_group = init_world(cfg, device)
    try:
        return _train(cfg, world, device, resume, stop_at)
    finally:
        if created_group:
            close_world()


def _train(cfg: Config, world: World, device: torch.device, resume: str | None, stop_at: int | None) -> TrainResult:
    check_trackers_available(cfg)
    cfg.parallel.world_size = world.size  # recorded in the saved config: the global batch depends on it
    dtype = pick_precision(cfg.train.precision, device)
    run_dir = Path(cfg.train.out_dir)
    ckpt_in = resolve_resume(run_dir, resume, cfg)

    # --- data: validated before anything is written; each rank reads only its own windows
    data_dir = Path(cfg.data.dir)
    _, tokenizer = open_prepared(cfg.data)
    tcfg = cfg.train
    loader = TrainLoader(data_dir, cfg.data.seq_len, tcfg.micro_batch_size, tcfg.grad_accum, tcfg.seed,
                         world.rank, world.size)
    val_loader = ValLoader(data_dir, cfg.data.seq_len, tcfg.micro_batch_size, tcfg.eval_batches,
                           world.rank, world.size)

    # --- model, optimizer (inside the strategy's engine), metrics
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer.eos_token_id).to(device)
    match_model(tokenizer, model)  # config.json's special ids and the tokenizer's max length agree
    table = classify_parameters(model, cfg.optim.rotational_embeddings)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    engine = build_engine(cfg, model, table, world, dtype, scaler)
    # The same initial weights everywhere (above); from here on each rank draws its own dropout masks.
    torch.manual_seed(tcfg.seed + world.rank)
    tracker = RotationTracker(model, table, cfg.optim, cfg.logging.rotation_every,
                              engine.tracker_source([spec for spec in table if spec.tracked]))
    if tcfg.compile:
        engine.model = torch.compile(engine.model)
    # FSDP2 and DeepSpeed cast parameters themselves; the others run under autocast.
    casts_itself = cfg.parallel.strategy in ("fsdp2", "deepspeed")
    autocast = ((lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 and not casts_itself
                else contextlib.nullcontext)
    say = print if world.is_main else (lambda *_: None)
    zero = f" ZeRO-{cfg.parallel.zero_stage}" if engine.strategy == "deepspeed" else ""
    say(f"model: {cfg.model.arch}/{cfg.model.preset}, {sum(math.prod(s.shape) for s in table):,} parameters, "
        f"device {device}, {str(dtype).removeprefix('torch.')}, optimizer {cfg.optim.name}, "
        f"strategy {engine.strategy}{zero} x{world.size}")
    say(summarize_table(table))

    start_step, trainer_state = 0, {}
    if ckpt_in is not None:
        engine.load_state(ckpt_in / "state")
        trainer_state = load_trainer_state(ckpt_in, world.rank)
        tracker.load_state_dict(trainer_state["tracker"])
        start_step = int(trainer_state["step"])
        say(f"resumed from {ckpt_in} at step {start_step}")
    elif cfg.model.init_from:
        say(f"initialised from {cfg.model.init_from}")

    created = not run_dir.exists()
    barrier()  # every rank has seen whether the run dir existed before rank 0 creates it
    logger = None
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        logger = MetricsLogger(run_dir, cfg, resume_step=start_step)
    tokens_per_step = cfg.global_batch_size * cfg.data.seq_len
    result = TrainResult(run_dir, start_step, is_main=world.is_main)
    last_val: float | None = trainer_state.get("val_loss")
    end_step = min(tcfg.steps, stop_at) if stop_at is not None else tcfg.steps

    def save(step: int) -> Path:
        def contents(tmp: Path) -> None:
            engine.save_state(tmp / "state")
            weights = engine.export_state_dict()  # a collective: the full weights, on rank 0
            if world.size > 1:
                save_rank_rng(tmp / "state", world.rank)
            if not world.is_main:
                return
            save_hf_model(model, tmp / "model", weights)
            tokenizer.save_pretrained(tmp / "tokenizer")
            save_trainer_state(tmp / "state", {"step": step, "tokens_seen": step * tokens_per_step,
                                               "tracker": tracker.state_dict(), "val_loss": last_val,
                                               "strategy": engine.strategy, "world_size": world.size,
                                               "zero_stage": cfg.parallel.zero_stage})
            tracker.save(tmp / "rotation")
            save_run_config(cfg, tmp)
            (tmp / "README.md").write_text(model_card(cfg, step, step * tokens_per_step, last_val, tmp / "rotation"))
        with watchdog.paused():
            return write_checkpoint(run_dir, step, cfg.checkpoint.keep_last, contents, world.is_main, barrier)

    def checkpoint_due(step: int) -> bool:
        return step % cfg.checkpoint.every == 0 or (step == end_step and cfg.checkpoint.save_final)

    watchdog = StepWatchdog(cfg.parallel.step_timeout_s, world.rank, enabled=world.size > 1)
    progress = tqdm(total=tcfg.steps, initial=start_step, disable=not (cfg.logging.progress and world.is_main),
                    dynamic_ncols=True)
    skips, window_start, window_tokens, window_losses = 0, time.perf_counter(), 0, []
    try:
        for step in range(start_step + 1, end_step + 1):
            watchdog.beat(step)
            lr = lr_at(step, cfg.optim.lr, tcfg.steps, cfg.schedule)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            loss_value, grad_value = forward_backward(engine, loader, step, tcfg.grad_accum, tcfg.grad_clip, device,
                                                      autocast)
            if not (math.isfinite(loss_value) and math.isfinite(grad_value if grad_value is not None else 0.0)):
                skips += 1
                if tcfg.nan_policy == "stop" or skips > tcfg.max_skips:
                    last = find_latest(run_dir)
                    raise TrainingDiverged(
                        f"loss became {loss_value} (grad norm {grad_value}) at step {step}; stopped by "
                        f"train.nan_policy={tcfg.nan_policy}; the last good checkpoint is "
                        f"{last if last else 'none (lower optim.lr or add schedule.warmup_steps)'}")
                engine.skip()
                progress.write(f"step {step}: non-finite loss, update skipped ({skips} in a row)")
                result.step = step
                if checkpoint_due(step):  # the last good weights, under this step's number
                    result.checkpoint = save(step)
                continue
            skips = 0
            measuring = tracker.should_measure(step)
            if measuring:
                tracker.capture()
            norm_in_step = engine.step()
            grad_value = grad_value if grad_value is not None else norm_in_step
            result.losses[step] = loss_value
            result.step = step
            window_tokens += tokens_per_step
            window_losses.append(loss_value)

            record: dict[str, float] = {}
            if measuring:
                record.update(tracker.measure(step, lr))
            if step % cfg.logging.log_every == 0 or step == end_step:
                elapsed = time.perf_counter() - window_start
                record.update({"train/loss": sum(window_losses) / len(window_losses),  # the window's mean
                               "train/lr": lr, "train/tokens": step * tokens_per_step,
                               "perf/tokens_per_s": window_tokens / elapsed})
                if grad_value is not None:
                    record["train/grad_norm"] = grad_value
                window_start, window_tokens, window_losses = time.perf_counter(), 0, []
            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                with watchdog.paused():
                    last_val = evaluate(engine.model, val_loader, device, autocast)
                record["val/loss"] = last_val
            if record and logger is not None:
                logger.log(step, record)
                if not cfg.logging.progress and ("train/loss" in record or "val/loss" in record):
                    print(log_line(step, tcfg.steps, record), flush=True)
            progress.set_postfix_str(f"loss {loss_value:.3f} lr {lr:.2e} {tracker.summary_line()}", refresh=False)
            progress.update(1)
            if checkpoint_due(step):
                result.checkpoint = save(step)
    except BaseException:
        watchdog.stop()
        progress.close()
        if logger is not None:
            logger.close()
        if world.is_main and holds_run(run_dir):
            say(f"run kept in {run_dir}; continue it with --resume auto")
        elif world.is_main and created:
            shutil.rmtree(run_dir, ignore_errors=True)  # it logged nothing: no trace of a run that never got going
        raise
    watchdog.stop()
    progress.close()
    result.val_loss = last_val
    if logger is not None:
        logger.close()
        plot_loss_curves(read_metrics(run_dir), run_dir / "loss.png")
    return result
