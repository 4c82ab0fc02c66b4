"""Checkpoint discovery, publishing and verification, and the resume rules that keep every run."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pretrain.train
from pretrain.checkpoint import (
    MANIFEST,
    candidates,
    find_latest,
    newest_verified,
    rng_state,
    set_rng_state,
    verify_checkpoint,
    write_checkpoint,
)
from pretrain.cli import main
from pretrain.errors import UserError
from pretrain.parallel.engine import SingleEngine
from pretrain.parallel.world import World
from pretrain.train import train
from tests.train_utils import tiny_args, tiny_config


def fake_contents(step: int):
    def write(tmp: Path) -> None:
        (tmp / "state").mkdir()
        (tmp / "state" / "weights.bin").write_bytes(bytes([step % 256]) * 1000)
    return write


def save_steps(run_dir: Path, steps: list[int], keep_last: int = 10) -> None:
    for step in steps:
        write_checkpoint(run_dir, step, keep_last, fake_contents(step))


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.mark.parametrize("device", [1, 3])
def test_a_gpu_rank_keeps_its_own_rng_stream_and_resumes_on_another_gpu_count(monkeypatch, device):
    # Faked CUDA: rank on cuda:1 of two visible GPUs. Its checkpoint holds its own device's stream, and
    # a resume sets it on the current device whatever the number of GPUs; a checkpoint of an older
    # version (every visible GPU's stream) gives the current device's, or the first where it has none.
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([device == "cuda"]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's stream was saved"))
    state = rng_state()
    assert state["cuda"].tolist() == [True]  # the current device's
    set_rng_state(state)
    old = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([0]), torch.tensor([1])]}
    set_rng_state(old)
    assert [(s.tolist(), d) for s, d in restored] == [([True], "cuda"), ([1 if device == 1 else 0], "cuda")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU checkpoint resumed on a CPU
    set_rng_state(state)
    assert len(restored) == 2


def test_every_rank_maps_the_saved_optimizer_state_onto_its_own_device(tmp_path, monkeypatch):
    # Rank 0 saved it from its GPU; loaded as saved, every DDP rank would put a full copy on GPU 0.
    model = torch.nn.Linear(4, 4)
    engine = SingleEngine(model, torch.optim.AdamW(model.parameters()), World(0, 1, 0), torch.float32, 1.0)
    model(torch.randn(2, 4)).sum().backward()
    engine.optimizer.step()
    engine.save_state(tmp_path)
    load, mapped = torch.load, {}

    def spied(path: Path, **kwargs: object) -> object:
        mapped[Path(path).name] = kwargs.get("map_location")
        return load(path, **kwargs)

    monkeypatch.setattr(torch, "load", spied)
    engine.load_state(tmp_path)
    assert mapped == {"optimizer.pt": engine.device}


def test_latest_names_the_newest_and_keep_last_prunes_the_oldest(tmp_path):
    save_steps(tmp_path, [2, 4, 6, 8], keep_last=2)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000008"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000006", "step_000008"]
    manifest = json.loads((root / "step_000008" / MANIFEST).read_text())
    assert manifest["files"]["state/weights.bin"]["bytes"] == 1000
    assert verify_checkpoint(root / "step_000008") is None


def test_pruning_keeps_checkpoints_beyond_the_step_being_redone(tmp_path):
    # Resumed from step 4 after step 8 failed to verify: saving step 6 must not delete step 4 for step 8.
    save_steps(tmp_path, [4, 8])
    save_steps(tmp_path, [6], keep_last=2)
    assert names(candidates(tmp_path)) == ["step_000006", "step_000008", "step_000004"]


def test_a_torn_temp_folder_is_ignored_and_cleaned_by_the_next_save(tmp_path):
    save_steps(tmp_path, [4])
    torn = tmp_path / "checkpoints" / ".tmp-step_000008"
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "weights.bin").write_bytes(b"half")
    assert names(candidates(tmp_path)) == ["step_000004"] and find_latest(tmp_path).name == "step_000004"
    save_steps(tmp_path, [6])
    assert not torn.exists()


def test_a_failed_write_publishes_nothing(tmp_path):
    save_steps(tmp_path, [4])

    def fails(tmp: Path) -> None:
        (tmp / "part").write_text("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="no space left on the disk while writing .*step_000008"):
        write_checkpoint(tmp_path, 8, 3, fails)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000004"]


def test_verification_falls_back_and_says_why(tmp_path):
    save_steps(tmp_path, [4, 8, 12])
    root = tmp_path / "checkpoints"
    weights = root / "step_000012" / "state" / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:500])  # truncated
    flipped = root / "step_000008" / "state" / "weights.bin"
    flipped.write_bytes(b"\0" * 1000)  # same size, other bytes
    notices: list[str] = []
    assert newest_verified(tmp_path, notices.append).name == "step_000004"
    assert "step_000012" in notices[0] and "500 bytes" in notices[0]
    assert "step_000008" in notices[1] and "sha256" in notices[1]
    (root / "step_000004" / MANIFEST).unlink()
    with pytest.raises(UserError, match="no checkpoint .* verifies"):
        newest_verified(tmp_path, notices.append)


def test_a_latest_pointing_at_a_missing_folder_falls_back(tmp_path):
    save_steps(tmp_path, [4, 8])
    (tmp_path / "checkpoints" / "latest").write_text("step_000012\n")
    notices: list[str] = []
    assert newest_verified(tmp_path, notices.append).name == "step_000008"
    assert "step_000012" in notices[0] and "does not exist" in notices[0]
    for step in (4, 8):  # and with nothing to fall back to, it refuses instead of starting from step 0
        shutil.rmtree(tmp_path / "checkpoints" / f"step_{step:06d}")
    with pytest.raises(UserError, match="step_000012: named by checkpoints/latest but missing"):
        newest_verified(tmp_path, notices.append)


# ----------------------------------------------------------------------------- through training


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(tiny_data_dir, tmp_path, capsys):
    straight = train(tiny_config(tiny_data_dir, tmp_path / "a", "checkpoint.every=2"))
    cfg = tiny_config(tiny_data_dir, tmp_path / "b", "checkpoint.every=2")
    train(cfg, stop_at=6)
    state = tmp_path / "b" / "checkpoints" / "step_000006" / "state" / "model.safetensors"
    state.write_bytes(state.read_bytes()[:-100])
    capsys.readouterr()
    resumed = train(cfg, resume="auto")
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step_000006" in out and "resumed from" in out and "step 4" in out
    assert min(resumed.losses) == 5 and resumed.losses == {s: v for s, v in straight.losses.items() if s > 4}
    final_a = load_file(straight.checkpoint / "state" / "model.safetensors")
    final_b = load_file(resumed.checkpoint / "state" / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_missing_latest_target_never_restarts_from_step_zero(tiny_data_dir, tmp_path):
    cfg = tiny_config(tiny_data_dir, tmp_path / "run", "checkpoint.every=2")
    train(cfg, stop_at=6)
    root = tmp_path / "run" / "checkpoints"
    for path in sorted((root / "step_000006").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "step_000006").rmdir()
    resumed = train(cfg, resume="auto")
    assert min(resumed.losses) == 5  # continued at step 4, not 0
    assert (root / "step_000002").is_dir() or (root / "step_000004").is_dir()


class Crash(KeyboardInterrupt):
    pass


def test_a_crash_before_the_first_checkpoint_keeps_the_run(tiny_data_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data_dir, tmp_path / "run", "checkpoint.every=100")
    lr_at = pretrain.train.lr_at

    def crash_at_step_3(step, *args):
        if step == 3:
            raise Crash
        return lr_at(step, *args)

    monkeypatch.setattr(pretrain.train, "lr_at", crash_at_step_3)
    with pytest.raises(Crash):
        train(cfg)
    monkeypatch.undo()
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[:2] == [1, 2] and (tmp_path / "run" / "config.yaml").is_file()
    # Without --resume the run is not overwritten; with it, it starts again (there is no checkpoint).
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg)
    assert train(cfg, resume="auto").step == 8


def test_rerun_over_a_finished_run_without_checkpoints_is_refused(tiny_data_dir, tmp_path, capsys):
    args = tiny_args(tiny_data_dir, tmp_path / "run", "checkpoint.every=100", "checkpoint.save_final=false")
    assert main(["train", *args]) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", *args, "optim.lr=1e-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume auto" in err[0]
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_nan_skip_still_writes_due_checkpoints_from_the_last_good_weights(tiny_data_dir, tmp_path, monkeypatch):
    reference = train(tiny_config(tiny_data_dir, tmp_path / "ref"), stop_at=3)  # weights after step 3
    forward_backward = pretrain.train.forward_backward

    def non_finite_at_4_and_8(engine, loader, step, *args):
        loss = forward_backward(engine, loader, step, *args)
        return torch.full_like(loss, float("nan")) if step in (4, 8) else loss

    monkeypatch.setattr(pretrain.train, "forward_backward", non_finite_at_4_and_8)
    result = train(tiny_config(tiny_data_dir, tmp_path / "run", "train.nan_policy=skip", "checkpoint.every=4"))
    root = tmp_path / "run" / "checkpoints"
    assert (root / "step_000004").is_dir() and (root / "step_000008").is_dir()  # both fall on skipped steps
    assert result.step == 8 and result.checkpoint == root / "step_000008"
    got = load_file(root / "step_000004" / "state" / "model.safetensors")
    want = load_file(reference.checkpoint / "state" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(result.losses) == [1, 2, 3, 5, 6, 7]


def test_without_the_bar_each_log_step_prints_a_line_with_the_window_mean_loss(tiny_data_dir, tmp_path, capsys):
    result = train(tiny_config(tiny_data_dir, tmp_path / "run", "logging.log_every=4"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 4/8", "step 8/8"]
    logged = {r["step"]: r["train/loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
              if "train/loss" in r}
    for step in (4, 8):
        assert logged[step] == pytest.approx(sum(result.losses[s] for s in range(step - 3, step + 1)) / 4, rel=1e-12)
        assert f"loss {logged[step]:.4f}" in lines[step // 4 - 1]


def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_keeps_the_run(tiny_data_dir, tmp_path, capsys,
                                                                              monkeypatch):
    save_trainer_state = pretrain.train.save_trainer_state

    def disk_full_at_step_8(state_dir, trainer_state):
        if trainer_state["step"] == 8:
            raise OSError(errno.ENOSPC, "No space left on device", str(state_dir / "trainer.pt"))
        save_trainer_state(state_dir, trainer_state)

    monkeypatch.setattr(pretrain.train, "save_trainer_state", disk_full_at_step_8)
    assert main(["train", *tiny_args(tiny_data_dir, tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on the disk while writing"), err
    assert "trainer.pt" in err[0]
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004"]  # nothing half-written
    assert verify_checkpoint(root / "step_000004") is None and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_checkpoint_written_before_checksums_resumes_once_sealed(tiny_data_dir, tmp_path, capsys):
    """An older version's checkpoint (no checksums.json) is refused by resume with one line naming
    `pretrain seal`; sealed, it resumes from its own step, and a second seal is refused."""
    args = tiny_args(tiny_data_dir, tmp_path / "run")
    assert main(["train", *args, "--stop-at", "4"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_000004"
    (ckpt / "checksums.json").unlink()  # as written before checksums were recorded
    capsys.readouterr()
    assert main(["train", *args, "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pretrain seal {ckpt}" in err[0]
    assert main(["seal", str(tmp_path / "run")]) == 2  # the run folder is not a checkpoint
    assert main(["seal", str(ckpt)]) == 0
    assert main(["seal", str(ckpt)]) == 2  # it has checksums now
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a complete checkpoint" in err[0] and "already has checksums.json" in err[1]
    assert main(["train", *args, "--resume", "auto"]) == 0
    assert f"resumed from {ckpt} at step 4" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000008"


def _unsealed_checkpoint(tmp_path: Path) -> Path:
    """The files of a complete checkpoint as written before checksums were recorded (contents stand-ins)."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_000004"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "model").mkdir()
    torch.save({"step": 4}, ckpt / "state" / "trainer.pt")
    (ckpt / "model" / "model.safetensors").write_bytes(b"w" * 100)
    return ckpt


def test_seal_leaves_out_the_manifest_temp_file_an_interrupted_seal_left(tmp_path, capsys):
    """A seal killed between writing `.checksums.json.tmp` and renaming it leaves that file; sealing again must
    not list it (the rename takes it away, and resume would then refuse the checkpoint for a missing file)."""
    ckpt = _unsealed_checkpoint(tmp_path)
    (ckpt / f".{MANIFEST}.tmp").write_text('{"format": 1, "fi')  # torn by the interrupted seal
    assert main(["seal", str(ckpt)]) == 0
    assert verify_checkpoint(ckpt) is None
    assert sorted(json.loads((ckpt / MANIFEST).read_text())["files"]) == ["model/model.safetensors",
                                                                           "state/trainer.pt"]


def test_seal_refuses_a_checkpoint_of_a_run_another_process_holds(tmp_path, capsys):
    """The holder of the run folder may prune or re-save the checkpoint while it is hashed: one line, exit 2."""
    from pretrain.run_lock import RunLock

    ckpt = _unsealed_checkpoint(tmp_path)
    lock = RunLock.acquire(tmp_path / "run")
    try:
        capsys.readouterr()
        assert main(["seal", str(ckpt)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by another process" in err[0] and not (ckpt / MANIFEST).exists()
    finally:
        lock.release()
    assert main(["seal", str(ckpt)]) == 0 and verify_checkpoint(ckpt) is None


def test_seal_refuses_a_checkpoint_holding_a_symbolic_link(tmp_path, capsys):
    """A linked folder is not looked into by the manifest, and resume would load its files unchecked."""
    ckpt = _unsealed_checkpoint(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (ckpt / "state").rename(elsewhere)
    (ckpt / "state").symlink_to(elsewhere, target_is_directory=True)
    capsys.readouterr()
    assert main(["seal", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link (state)" in err[0] and not (ckpt / MANIFEST).exists()
