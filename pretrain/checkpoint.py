"""Checkpoints: atomic writes, a `latest` pointer, keep-last-N pruning, exact resume.

Layout of `<run>/checkpoints/step_NNNNNN/`:
  model/        plain `transformers` model (save_pretrained, safetensors, gains folded)
  tokenizer/    the data's tokenizer
  state/        trainer.pt (step, tokens seen, rank 0's RNG, rotation-metrics history; tensors
                only, loaded with `weights_only=True`), rng_rank<R>.pt (each rank's RNG, in
                distributed runs) and the strategy's training state:
                single/DDP: model.safetensors (raw weights, gains unfolded) + optimizer.pt;
                FSDP2: dcp/ (torch distributed checkpoint, one shard file per rank, reshardable);
                DeepSpeed: deepspeed/ (its own per-rank files; same world size and stage to resume)
  rotation/     rotation metrics (see docs/rotation-metrics.md)
  config.yaml   the resolved run config
  README.md     model card
A checkpoint is written into a temp folder and renamed into place, and only then does
`checkpoints/latest` name it, so `latest` never points at a partial checkpoint. In a distributed
run every rank writes its part into the same temp folder; rank 0 alone creates, renames and prunes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from pretrain.config import Config, config_to_dict, save_config
from pretrain.errors import UserError

FORMAT_VERSION = 1
# Config keys that define the trajectory of a run; a checkpoint resumes only under equal values.
IDENTITY_SECTIONS = ("model", "optim", "schedule")
IDENTITY_KEYS = {"data": ("dir", "seq_len", "tokenizer", "vocab_size"),
                 "train": ("steps", "seed")}


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def find_latest(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has no complete checkpoint."""
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    ckpt = checkpoint_root(run_dir) / pointer.read_text().strip()
    return ckpt if (ckpt / "state" / "trainer.pt").is_file() else None


def write_checkpoint(run_dir: Path, step: int, keep_last: int, write_contents: Callable[[Path], None],
                     is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> Path:
    """Let `write_contents` fill a temp folder (on every rank), move it into place, point `latest` at it, prune."""
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        write_contents(tmp)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if is_main:
        if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / "latest")
        _prune(root, keep_last, keep=final.name)
    barrier()
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def save_trainer_state(state_dir: Path, trainer_state: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": FORMAT_VERSION, "rng": rng_state(), **trainer_state}, state_dir / "trainer.pt")


def save_rank_rng(state_dir: Path, rank: int) -> None:
    """This rank's RNG streams (dropout masks differ per rank), beside rank 0's in trainer.pt."""
    state_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), state_dir / f"rng_rank{rank}.pt")


def load_trainer_state(ckpt: Path, rank: int = 0) -> dict[str, Any]:
    """The trainer state (step, tokens, tracker, ...) of `ckpt`; restores this rank's RNG streams.

    A rank the checkpoint has no stream for (a resume on more ranks) takes rank 0's.
    """
    trainer = torch.load(ckpt / "state" / "trainer.pt", weights_only=True)
    if trainer.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {ckpt} has format version {trainer.get('format_version')}, "
                        f"this code reads version {FORMAT_VERSION}")
    own = ckpt / "state" / f"rng_rank{rank}.pt"
    set_rng_state(torch.load(own, weights_only=True) if own.is_file() else trainer["rng"])
    return trainer


def save_run_config(cfg: Config, ckpt_dir: Path) -> None:
    save_config(cfg, ckpt_dir / "config.yaml")


def check_compatible(ckpt: Path, cfg: Config) -> None:
    """Refuse to resume a checkpoint whose trajectory-defining config differs from `cfg`."""
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    current = config_to_dict(cfg)
    diffs = []
    for section in IDENTITY_SECTIONS + tuple(IDENTITY_KEYS):
        keys = IDENTITY_KEYS.get(section, current[section].keys())
        for key in keys:
            old, new = saved.get(section, {}).get(key), current[section][key]
            if old != new:
                diffs.append(f"{section}.{key}: {old!r} in the checkpoint vs {new!r} now")
    # The sample order is defined by the global step and the global batch, not by how the batch is
    # split over ranks and micro-steps: any world size that keeps the global batch resumes exactly.
    t, p = saved.get("train", {}), saved.get("parallel", {})
    old_batch = t.get("micro_batch_size", 0) * t.get("grad_accum", 0) * (p.get("world_size") or 1)
    if old_batch != cfg.global_batch_size:
        diffs.append(f"global batch (micro_batch_size x grad_accum x world size): {old_batch} sequences in the "
                     f"checkpoint vs {cfg.global_batch_size} now")
    if diffs:
        raise UserError(f"checkpoint {ckpt} was written by an incompatible config ({'; '.join(diffs[:3])}); "
                        "resume with the run's own config or choose a new train.out_dir")


def rng_state() -> dict[str, Any]:
    """Torch RNG streams (dropout). Data sampling needs none: it is a pure function of the step."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
