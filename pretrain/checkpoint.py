"""Checkpoints: atomic writes, a `latest` pointer, keep-last-N pruning, exact resume.

Layout of `<run>/checkpoints/step_NNNNNN/`:
  model/        plain `transformers` model (save_pretrained, safetensors, gains folded)
  tokenizer/    the data's tokenizer
  state/        trainer.pt (step, tokens seen, rank 0's RNG, rotation-metrics history; tensors
                only, loaded with `weights_only=True`), rng_rank<R>.pt (each rank's RNG, in
                distributed runs) and the strategy's training state:
                single/DDP: model.safetensors (raw weights, gains unfolded) + optimizer.pt;
                FSDP2: dcp/ (torch distributed checkpoint, one shard file per rank, reshardable);
                both in fp16 also scaler.pt (the GradScaler's loss scale and growth count);
                DeepSpeed: deepspeed/ (its own per-rank files, with DeepSpeed's `latest`) and, under
                ZeRO 1-3, portable/ (per-tensor runs of master weights and optimizer state plus
                the RV per-neuron state, safetensors: resumes on another world size or stage)
  rotation/     rotation metrics (see docs/rotation-metrics.md)
  config.yaml   the resolved run config
  README.md     model card
  checksums.json  size and sha256 of every file above, recorded at write time
A checkpoint is written into a temp folder (`.tmp-*`), checksummed, fsync'ed and renamed into place,
and only then does `checkpoints/latest` name it, so `latest` never points at a partial checkpoint.
In a distributed run every rank writes its part into the same temp folder; rank 0 alone creates,
checksums, renames and prunes. Resume verifies every checksum before anything is loaded (so the
pickle-based loaders of DeepSpeed and DCP only ever see the bytes this code wrote) and falls back
to the newest checkpoint that verifies, naming the ones it skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from pretrain.config import Config, config_to_dict, save_config
from pretrain.durable import durable_temp, fsync_dir, fsync_tree, sha256_file, write_text_durably
from pretrain.errors import UserError, disk_error
from pretrain.run_lock import holder

FORMAT_VERSION = 1
# Config keys that define the trajectory of a run; a checkpoint resumes only under equal values.
IDENTITY_SECTIONS = ("model", "optim", "schedule")
IDENTITY_KEYS = {"data": ("dir", "seq_len", "tokenizer", "vocab_size"),
                 "train": ("steps", "seed")}


MANIFEST = "checksums.json"
_STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step_"))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The published checkpoint folders of a run, newest step first (temp and torn folders excluded)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=step_of, reverse=True)


def latest_target(run_dir: Path) -> Path | None:
    """The folder `checkpoints/latest` names (whether or not it still exists), or None without a pointer."""
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    return checkpoint_root(run_dir) / Path(pointer.read_text().strip()).name


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoints to try, best first: the one `latest` names, then every other one by step, newest first."""
    named = latest_target(run_dir)
    found = list_checkpoints(run_dir)
    return ([named] if named in found else []) + [p for p in found if p != named]


def find_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (the one `latest` names, else the highest step), without verifying it.

    For reading (metrics, generation, study reports); resuming takes `newest_verified`. A checkpoint
    written before checksums were recorded has no manifest: its trainer state marks it complete.
    """
    return next((p for p in candidates(run_dir)
                 if (p / MANIFEST).is_file() or (p / "state" / "trainer.pt").is_file()), None)


def verify_checkpoint(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be trusted (a missing, truncated or changed file), or None when every checksum matches."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return (f"no {MANIFEST} (an incomplete checkpoint, or one written before checksums were recorded: "
                f"if you trust its files, `pretrain seal {ckpt}` records them)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, entry in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written"
        if sha256_file(path) != entry["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def newest_verified(run_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint whose checksums match, saying which ones were skipped and why.

    None when the run has no checkpoint at all; UserError when it has some and none verifies
    (resuming from step 0 would silently throw them away).
    """
    named = latest_target(run_dir)
    skipped = []
    if named is not None and not named.is_dir():
        skipped.append(f"{named.name}: named by checkpoints/latest but missing")
        say(f"checkpoints/latest names {named.name}, which does not exist; trying the other checkpoints")
    for ckpt in candidates(run_dir):
        reason = verify_checkpoint(ckpt)
        if reason is None:
            return ckpt
        skipped.append(f"{ckpt.name}: {reason}")
        say(f"skipping checkpoint {ckpt}: {reason}")
    if skipped:
        raise UserError(f"no checkpoint in {checkpoint_root(run_dir)} verifies ({'; '.join(skipped[:3])}); "
                        "restore the damaged files, or set train.out_dir to a new folder")
    return None


def holds_run(run_dir: Path) -> str | None:
    """What makes `run_dir` a run a fresh start would overwrite (checkpoints, logged metrics), or None."""
    if list_checkpoints(run_dir) or latest_target(run_dir) is not None:
        return "checkpoints"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "logged metrics"
    return None


def choose_resume(run_dir: Path, resume: str | None, cfg: Config, say: Callable[[str], None]) -> Path | None:
    """The checkpoint to continue: `auto` -> newest that verifies, a path -> that one (verified), None -> fresh.

    Never a silent restart: a fresh start over an existing run is refused, and so is a run whose
    checkpoints all fail verification; a resumed config must match the one that wrote the run.
    """
    if resume is None:
        held = holds_run(run_dir)
        if held:
            raise UserError(f"{run_dir} already holds a run ({held}); pass --resume auto to continue it "
                            "or set train.out_dir to a new folder")
        return None
    if resume == "auto":
        ckpt = newest_verified(run_dir, say)
        if ckpt is not None:
            check_compatible(ckpt, cfg)
        elif holds_run(run_dir):
            check_compatible(run_dir, cfg)
            say(f"{run_dir} has no checkpoint yet; starting it again from step 0")
        return ckpt
    ckpt = Path(resume)
    if not ckpt.is_dir():
        raise UserError(f"--resume {resume} is not a checkpoint folder; pass a checkpoints/step_* folder or 'auto'")
    reason = verify_checkpoint(ckpt)
    if reason is not None:
        raise UserError(f"--resume {resume} does not verify: {reason}; pass another checkpoint folder")
    check_compatible(ckpt, cfg)
    return ckpt


def write_checkpoint(run_dir: Path, step: int, keep_last: int, write_contents: Callable[[Path], None],
                     is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> Path:
    """Let `write_contents` fill a temp folder (on every rank), then publish it: checksums, fsync, rename,
    `latest`, prune. A crash at any point leaves the previous checkpoints and `latest` intact."""
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".tmp-*"):  # torn by an earlier crash
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        with _quiet_transformers():  # no per-file progress bars on stderr in the middle of training
            write_contents(tmp)
        barrier()
        if is_main:
            _write_manifest(tmp)
            fsync_tree(tmp)
    except Exception as exc:
        explained = disk_error(exc, tmp)  # judged before the temp folder frees its space
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if explained is not None:
            raise explained from None
        raise
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main:
        _publish(tmp, final)
        write_text_durably(root / "latest", final.name + "\n")
        _prune(root, keep_last, step)
    barrier()
    return final


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _write_manifest(ckpt: Path) -> None:
    # Not its own temp file: an interrupted seal leaves it behind, and this write renames it away.
    temp = durable_temp(ckpt / MANIFEST)
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p != temp)
    entries = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    write_text_durably(ckpt / MANIFEST, json.dumps({"format": 1, "files": entries}, indent=1) + "\n")


def seal_checkpoint(ckpt: Path) -> None:
    """Record the checksums of a complete checkpoint written before checksums existed, so it can be resumed.

    Resume trusts only checksummed checkpoints (the pickles in `state/` load after they verify).
    Sealing says: these files are the ones that run wrote. It refuses a folder that already has
    checksums (verify it as it is), a temp folder or one without its trainer state and model
    (an interrupted write, which no checksum makes whole), and one holding a symbolic link.
    """
    if not ckpt.is_dir():
        raise UserError(f"{ckpt} is not a folder; pass a checkpoint folder (checkpoints/step_NNNNNN)")
    if (ckpt / MANIFEST).exists():
        raise UserError(f"{ckpt} already has {MANIFEST}; resume verifies it as it is (a checkpoint that does "
                        "not verify was changed after it was written)")
    if ckpt.name.startswith(".tmp-") or not (ckpt / "state" / "trainer.pt").is_file() \
            or not (ckpt / "model").is_dir():
        raise UserError(f"{ckpt} is not a complete checkpoint (a temp folder, or no state/trainer.pt or model/); "
                        "resume an earlier one")
    links = [p for p in ckpt.rglob("*") if p.is_symlink()]
    if links:  # the manifest would not look inside a linked folder, and resume would load it unchecked
        raise UserError(f"{ckpt} holds a symbolic link ({links[0].relative_to(ckpt)}); copy the files it points "
                        "to into the checkpoint, then seal it")
    run_dir = ckpt.resolve().parent.parent
    who = holder(run_dir)
    if who is not None:  # it may prune or re-save this very folder while its files are hashed
        raise UserError(f"run folder {run_dir} is in use by another process ({who}); seal after it ends")
    _write_manifest(ckpt)


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (a resumed run re-saving a step) is moved aside first."""
    old = final.with_name(f".tmp-old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep_last: int, step: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `step`; later ones (a trajectory being redone) stay."""
    for old in [p for p in list_checkpoints(root.parent) if step_of(p) <= step][keep_last:]:
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
    """Refuse to continue a checkpoint (or run folder) whose trajectory-defining config differs from `cfg`."""
    path = ckpt / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return  # a run folder that crashed before writing its config: nothing to contradict
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read {path} ({str(exc).splitlines()[0]}); restore it or choose a new "
                        "train.out_dir") from None
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
        what = "checkpoint" if _STEP_DIR.fullmatch(ckpt.name) else "run folder"
        raise UserError(f"{what} {ckpt} was written by an incompatible config ({'; '.join(diffs[:3])}); "
                        "resume with the run's own config or choose a new train.out_dir")


def rng_state() -> dict[str, Any]:
    """Torch RNG streams (dropout). Data sampling needs none: it is a pure function of the step.

    On a GPU, the stream of this rank's own device only (the current one, which `train` sets): a
    resume may see another number of GPUs (another node type, CUDA_VISIBLE_DEVICES).
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, list):  # written before session 10: every visible GPU's stream, this rank's among them
        device = torch.cuda.current_device()
        cuda = cuda[device] if device < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda)
