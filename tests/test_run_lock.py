"""One writer per run folder (pretrain/run_lock.py): a second `pretrain train` into a folder another process
trains in is refused with one line and changes nothing, in one process and in a 2-rank launch; the lock
goes with its holder, after a normal end, a failure or a kill; a study leaves such a cell to its holder."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpoint import find_latest, step_of
from pretrain.run_lock import LOCK_FILE, RunDirInUse, RunLock, holder
from pretrain.study import load_study
from pretrain.train import train
from tests.test_distributed import free_port, launch_env
from tests.test_study import markdown_rows, study_cli, write_study
from tests.train_utils import REPO, tiny_args, tiny_config

HOLD_SNIPPET = ("import sys, time; from pathlib import Path; from pretrain.run_lock import RunLock; "
                "RunLock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file (and the name of every folder) under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def cli(*argv: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(launcher or ("-m", "pretrain")), *argv], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=600)


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture
def other_process(tmp_path):
    """Start a separate process that takes a folder's lock and sleeps; yields a starter, kills them all after."""
    started: list[subprocess.Popen] = []

    def start(run_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_SNIPPET, str(run_dir)], cwd=REPO, env=launch_env(),
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("resume", [["--resume", "auto"], []], ids=["resume", "fresh"])
def test_a_run_folder_in_use_is_refused_with_one_line_and_left_unchanged(tiny_data_dir, tmp_path, other_process,
                                                                          resume):
    run = tmp_path / "run"
    train(tiny_config(tiny_data_dir, run, "train.steps=4", "checkpoint.every=2"), stop_at=2)
    held = other_process(run)
    before = digest(run)
    assert LOCK_FILE in before and holder(run).startswith(f"pid {held.pid} on host ")
    result = cli("train", *tiny_args(tiny_data_dir, run, "train.steps=4", "checkpoint.every=2"), *resume)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: run folder {run} is in use by another process "
                                                   f"(pid {held.pid} on host "), lines
    assert "train.out_dir" in lines[0]
    assert digest(run) == before


def test_a_new_folder_another_process_just_took_is_left_alone(tiny_data_dir, tmp_path, other_process):
    run = tmp_path / "run"
    held = other_process(run)
    with pytest.raises(RunDirInUse, match=f"pid {held.pid} "):
        train(tiny_config(tiny_data_dir, run))
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # not removed: this process did not create it


def test_the_lock_is_released_after_a_run_a_failure_and_a_kill(tiny_data_dir, tmp_path, monkeypatch):
    run, recipe = tmp_path / "run", ("train.steps=100000", "checkpoint.every=3")
    cfg = tiny_config(tiny_data_dir, run, *recipe)
    train(cfg, stop_at=2)
    assert holder(run) is None and not (run / LOCK_FILE).exists()  # a normal end lets go and leaves no file

    import pretrain.train

    def crash(*args, **kwargs):
        raise RuntimeError("crash in the middle of a step")

    monkeypatch.setattr(pretrain.train, "train_step", crash)
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, resume="auto")
    monkeypatch.undo()
    assert holder(run) is None and not (run / LOCK_FILE).exists()

    # A holder killed with SIGKILL runs no cleanup: its file stays, its lock goes with it.
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain", "train", *tiny_args(tiny_data_dir, run, *recipe),
                                 "--resume", "auto"], cwd=REPO, env=launch_env(), stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step_000003").is_dir():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the subprocess never reached step 3"
            time.sleep(0.2)
        assert holder(run).startswith(f"pid {proc.pid} ")
    finally:
        proc.kill()
        proc.communicate()
    assert (run / LOCK_FILE).is_file() and holder(run) is None
    resumed = step_of(find_latest(run))
    result = train(cfg, resume="auto", stop_at=resumed + 1)
    assert resumed >= 3 and result.step == resumed + 1 and steps_logged(run)[-1] == resumed + 1
    assert holder(run) is None and not (run / LOCK_FILE).exists()


def test_a_held_folder_a_killed_holder_leaves_is_free(tiny_data_dir, tmp_path, other_process):
    run = tmp_path / "run"
    held = other_process(run)
    assert holder(run) is not None
    held.send_signal(signal.SIGKILL)
    held.wait()
    assert holder(run) is None
    assert train(tiny_config(tiny_data_dir, run, "train.steps=2", "checkpoint.every=2")).step == 2


def test_study_leaves_a_cell_held_elsewhere_to_its_holder(tiny_data_dir, tmp_path, capsys):
    path = write_study(tmp_path, tiny_data_dir, {"train.seed": [0, 1, 2]},
                       overrides=("train.steps=2", "checkpoint.every=2", "train.eval_every=2"))
    study = load_study(path)
    busy, *free = study.cells
    lock = RunLock.acquire(busy.run_dir)  # this process's own descriptor counts as another holder
    try:
        before = digest(busy.run_dir)
        study_cli(str(path))  # no "cells failed" error
        out = capsys.readouterr().out
        assert f"skip {busy.name}: running elsewhere (pid {os.getpid()} on host " in out, out
        assert "3 cells, 0 finished, 1 running elsewhere, 2 to run" in out, out
        assert digest(busy.run_dir) == before  # no train.log, nothing else
        for cell in free:
            assert f"{cell.name}: done" in out
        report = (study.out_dir / "report.md").read_text()
        assert "3 cells (3 seeds): 2 done, 1 running elsewhere." in report
        rows = markdown_rows(report)
        assert rows[busy.name]["status"] == "running elsewhere" and rows[busy.name]["last step"] == "–"
        assert all(rows[c.name]["status"] == "done" for c in free)
    finally:
        lock.release()
    study_cli(str(path))  # the holder is gone: the cell runs now
    out = capsys.readouterr().out
    assert f"{busy.name}: done" in out and "1 to run" in out


def test_a_cell_taken_after_the_studys_check_is_running_elsewhere(tiny_data_dir, tmp_path, monkeypatch):
    import pretrain.study_run
    from pretrain.study_run import RUNNING_ELSEWHERE, run_cell

    path = write_study(tmp_path, tiny_data_dir, {"train.seed": [0]}, overrides=("train.steps=2",))
    cell = load_study(path).cells[0]
    lock = RunLock.acquire(cell.run_dir)
    try:
        monkeypatch.setattr(pretrain.study_run, "holder", lambda run_dir: None)  # taken just after the check
        outcome = run_cell(cell)
        assert sorted(p.name for p in cell.run_dir.iterdir()) == [LOCK_FILE]  # no train.log left behind
    finally:
        lock.release()
    assert outcome.status == RUNNING_ELSEWHERE and f"pid {os.getpid()} " in outcome.message


@pytest.mark.slow
def test_a_two_rank_launch_into_a_folder_in_use_says_it_once(tiny_data_dir, tmp_path, other_process):
    run = tmp_path / "run"
    held = other_process(run)
    before = digest(run)
    result = cli("--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "pretrain",
                 "train", *tiny_args(tiny_data_dir, run, "parallel.strategy=ddp"),
                 launcher=("-m", "pretrain.launch"))  # bounded by cli's timeout: no rank may hang
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: run folder ") and f"(pid {held.pid} " in lines[0], lines
    assert digest(run) == before
