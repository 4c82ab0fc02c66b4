"""The training loop: config -> data + model + optimizer -> steps -> metrics and checkpoints."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pretrain.card import model_card
from pretrain.checkpoint import (
    check_compatible,
    find_latest,
    load_training_state,
    save_run_config,
    save_training_state,
    write_checkpoint,
)
from pretrain.config import Config, save_config
from pretrain.curves import plot_loss_curves
from pretrain.data import TrainLoader, ValLoader, load_index, load_tokenizer
from pretrain.errors import UserError
from pretrain.logger import MetricsLogger, check_trackers_available, read_metrics
from pretrain.metrics import RotationTracker
from pretrain.model import build_model, save_hf_model
from pretrain.optim import build_optimizer
from pretrain.params import classify_parameters, summarize_table
from pretrain.schedule import lr_at


class TrainingDiverged(UserError):
    """The loss or gradient became non-finite and the policy says stop."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # train loss per optimizer step of this process
    val_loss: float | None = None
    checkpoint: Path | None = None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU unless asked; bf16 on GPUs that support it (fp32 master weights either way)."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def check_world(cfg: Config) -> None:
    """Refuse a launch whose process count differs from what the config asks for."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel.world_size is not None and world != cfg.parallel.world_size:
        raise UserError(f"parallel.world_size={cfg.parallel.world_size} but the launcher started {world} "
                        "process(es); fix the launch command or the config")
    if world > 1 and cfg.parallel.strategy == "single":
        raise UserError(f"the launcher started {world} processes but parallel.strategy=single; "
                        "launch one process or choose a distributed strategy")


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """`auto` -> newest complete checkpoint (or None), a path -> that checkpoint, None -> fresh run."""
    if resume is None:
        if find_latest(run_dir) is not None:
            raise UserError(f"{run_dir} already holds checkpoints; pass --resume auto to continue it "
                            "or set train.out_dir to a new folder")
        return None
    if resume == "auto":
        return find_latest(run_dir)
    ckpt = Path(resume)
    if not (ckpt / "state" / "trainer.pt").is_file():
        raise UserError(f"--resume {resume} is not a complete checkpoint folder (no state/trainer.pt)")
    return ckpt


def evaluate(model: torch.nn.Module, loader: ValLoader, device: torch.device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            with autocast():
                logits = model(input_ids=x.to(device)).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item()
            count += 1
    model.train()
    return total / max(count, 1)


def forward_backward(model: torch.nn.Module, loader: TrainLoader, step: int, grad_accum: int, grad_clip: float,
                     optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
                     autocast) -> tuple[float, float]:
    """Accumulate the gradient of one optimizer step's batch; unscale and clip it.

    Returns (mean loss, gradient norm before clipping) as floats: the one host sync per step.
    """
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = loader.get_batch(step, micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / grad_accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    return loss_sum.item(), grad_norm.item()


def train(cfg: Config, resume: str | None = None, stop_at: int | None = None) -> TrainResult:
    """Run (or continue) the training run `cfg` describes; `stop_at` ends early with a checkpoint."""
    check_world(cfg)
    check_trackers_available(cfg)
    device = pick_device(cfg.train.device)
    dtype = pick_precision(cfg.train.precision, device)
    run_dir = Path(cfg.train.out_dir)
    ckpt_in = resolve_resume(run_dir, resume)
    if ckpt_in is not None:
        check_compatible(ckpt_in, cfg)

    # --- data: validated before anything is written
    data_dir = Path(cfg.data.dir)
    load_index(data_dir)
    tokenizer = load_tokenizer(data_dir)
    tcfg = cfg.train
    loader = TrainLoader(data_dir, cfg.data.seq_len, tcfg.micro_batch_size, tcfg.grad_accum, tcfg.seed)
    val_loader = ValLoader(data_dir, cfg.data.seq_len, tcfg.micro_batch_size, tcfg.eval_batches)

    # --- model, optimizer, metrics
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer.eos_token_id).to(device)
    table = classify_parameters(model, cfg.optim.rotational_embeddings)
    optimizer = build_optimizer(model, table, cfg.optim)
    tracker = RotationTracker(model, table, cfg.optim, cfg.logging.rotation_every)
    forward = torch.compile(model) if tcfg.compile else model
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    print(f"model: {cfg.model.arch}/{cfg.model.preset}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"device {device}, {str(dtype).removeprefix('torch.')}, optimizer {cfg.optim.name}")
    print(summarize_table(table))

    start_step, trainer_state = 0, {}
    if ckpt_in is not None:
        trainer_state = load_training_state(ckpt_in, model, optimizer)
        tracker.load_state_dict(trainer_state["tracker"])
        start_step = int(trainer_state["step"])
        print(f"resumed from {ckpt_in} at step {start_step}")
    elif cfg.model.init_from:
        print(f"initialised from {cfg.model.init_from}")

    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, cfg, resume_step=start_step)
    tokens_per_step = cfg.global_batch_size * cfg.data.seq_len
    result = TrainResult(run_dir, start_step)
    last_val: float | None = trainer_state.get("val_loss")
    end_step = min(tcfg.steps, stop_at) if stop_at is not None else tcfg.steps

    def save(step: int) -> Path:
        def contents(tmp: Path) -> None:
            save_hf_model(model, tmp / "model")
            tokenizer.save_pretrained(tmp / "tokenizer")
            save_training_state(tmp / "state", model, optimizer, {
                "step": step, "tokens_seen": step * tokens_per_step, "tracker": tracker.state_dict(),
                "val_loss": last_val})
            tracker.save(tmp / "rotation")
            save_run_config(cfg, tmp)
            (tmp / "README.md").write_text(model_card(cfg, step, step * tokens_per_step, last_val, tmp / "rotation"))
        return write_checkpoint(run_dir, step, cfg.checkpoint.keep_last, contents)

    progress = tqdm(total=tcfg.steps, initial=start_step, disable=not cfg.logging.progress, dynamic_ncols=True)
    skips, window_start, window_tokens = 0, time.perf_counter(), 0
    try:
        for step in range(start_step + 1, end_step + 1):
            lr = lr_at(step, cfg.optim.lr, tcfg.steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_value, grad_value = forward_backward(forward, loader, step, tcfg.grad_accum, tcfg.grad_clip,
                                                      optimizer, scaler, device, autocast)
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                optimizer.zero_grad(set_to_none=True)
                skips += 1
                if tcfg.nan_policy == "stop" or skips > tcfg.max_skips:
                    last = find_latest(run_dir)
                    raise TrainingDiverged(
                        f"loss became {loss_value} (grad norm {grad_value}) at step {step}; stopped by "
                        f"train.nan_policy={tcfg.nan_policy}; the last good checkpoint is "
                        f"{last if last else 'none (lower optim.lr or add schedule.warmup_steps)'}")
                progress.write(f"step {step}: non-finite loss, update skipped ({skips} in a row)")
                continue
            skips = 0
            measuring = tracker.should_measure(step)
            if measuring:
                tracker.capture()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            result.losses[step] = loss_value
            result.step = step
            window_tokens += tokens_per_step

            record: dict[str, float] = {}
            if measuring:
                record.update(tracker.measure(step, lr))
            if step % cfg.logging.log_every == 0 or step == end_step:
                elapsed = time.perf_counter() - window_start
                record.update({"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_value,
                               "train/tokens": step * tokens_per_step, "perf/tokens_per_s": window_tokens / elapsed})
                window_start, window_tokens = time.perf_counter(), 0
            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                last_val = evaluate(forward, val_loader, device, autocast)
                record["val/loss"] = last_val
            if record:
                logger.log(step, record)
            progress.set_postfix_str(f"loss {loss_value:.3f} lr {lr:.2e} {tracker.summary_line()}", refresh=False)
            progress.update(1)
            if step % cfg.checkpoint.every == 0 or (step == end_step and cfg.checkpoint.save_final):
                result.checkpoint = save(step)
    except BaseException as exc:
        progress.close()
        logger.close()
        if created and find_latest(run_dir) is None and not isinstance(exc, TrainingDiverged):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping from a run that never got going
        raise
    progress.close()
    logger.close()
    result.val_loss = last_val
    plot_loss_curves(read_metrics(run_dir), run_dir / "loss.png")
    return result

