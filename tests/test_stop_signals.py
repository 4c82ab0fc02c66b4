"""A stop notice (SIGTERM, SIGUSR1) ends a run after the running step with a checkpoint: one process,
two ranks of which only one got the signal (they must still stop at the same step), and a study."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.parallel.stop import StopSignals
from pretrain.study import load_study
from tests.test_distributed import free_port, launch_env
from tests.test_study import write_study
from tests.train_utils import REPO, tiny_args

# Far more steps than the test waits for: the run is always stopped by the signal.
LONG = ["train.steps=100000", "checkpoint.every=100000", "train.eval_every=100000", "logging.rotation_every=3"]


@pytest.fixture
def handlers_restored():
    """This process's handlers as they were: an ignored SIGTERM would be inherited by every later subprocess."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_a_signal_is_noted_and_a_python_handler_before_hears_it_too(handlers_restored):
    heard: list[int] = []
    study = lambda signum, frame: heard.append(signum)  # noqa: E731 (a study's handler, say)
    signal.signal(signal.SIGUSR1, study)
    with StopSignals(torch.device("cpu"), enabled=True) as stop:
        stop.vote()  # one process: no vote to take
        assert stop.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed() == signal.SIGUSR1 and heard == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is study


def test_after_a_notice_the_default_becomes_ignore_else_it_comes_back(handlers_restored):
    """A stopping process must not die of a second notice in its last writes; one that saw none is as before."""
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    with StopSignals(torch.device("cpu"), enabled=True):
        pass
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    with StopSignals(torch.device("cpu"), enabled=True):
        os.kill(os.getpid(), signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_disabled_it_leaves_the_handlers_alone():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(torch.device("cpu"), enabled=False) as stop:
        assert signal.getsignal(signal.SIGTERM) is before
        assert stop.agreed() is None


def wait_for_steps(run_dir: Path, at_least: int, proc: subprocess.Popen) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        if metrics.exists() and len(metrics.read_text().splitlines()) >= at_least:
            return
        time.sleep(0.1)
    raise AssertionError("the run did not start stepping")


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_stopped_with_a_checkpoint(run_dir: Path, out: str, notice: signal.Signals = signal.SIGTERM) -> int:
    """The one line, and a checkpoint at the step it names, which the metrics file reaches."""
    lines = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {notice.name} after step "), out
    step = int(lines[0].split("after step ")[1].split(":")[0])
    assert f"checkpoints/step_{step:06d}" in lines[0] and lines[0].endswith("continue it with --resume auto")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:06d}"
    assert logged_steps(run_dir) == list(range(1, step + 1))  # every step, the measured ones' held records too
    return step


def test_sigterm_checkpoints_the_running_step_and_the_run_resumes_from_it(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pretrain", "train", *tiny_args(tiny_data_dir, run_dir, *LONG)]
    proc = subprocess.Popen(args, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for_steps(run_dir, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out
    step = assert_stopped_with_a_checkpoint(run_dir, out)
    assert "Traceback" not in out
    resumed = subprocess.run([*args, "--resume", "auto", "--stop-at", str(step + 2)], cwd=REPO, env=launch_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"checkpoints/step_{step:06d} at step {step}" in resumed.stdout
    assert logged_steps(run_dir) == list(range(1, step + 3))


def worker_pids(agent: int) -> dict[int, int]:
    """rank -> pid of the torchrun agent's worker processes."""
    out: dict[int, int] = {}
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next((int(v.split(b"=")[1]) for v in env if v.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = int(child)
    return out


# (who gets the notice, which notice, strategy)
NOTICES = [("rank 1", signal.SIGUSR1, "ddp"), ("rank 1", signal.SIGUSR1, "fsdp2"),
           ("launcher", signal.SIGTERM, "ddp"), ("launcher", signal.SIGUSR1, "ddp")]


@pytest.mark.slow
@pytest.mark.parametrize(("target", "notice", "strategy"), NOTICES, ids=lambda v: getattr(v, "name", str(v)))
def test_a_notice_to_one_rank_or_to_the_launcher_stops_every_rank_at_one_step(tiny_data_dir, tmp_path, target,
                                                                               notice, strategy):
    """Rank 1 alone gets it (a scheduler's notice reaches the ranks at different moments): rank 0 must stop at
    the same step, or the checkpoint's collectives would hang. The launcher gets it (a scheduler signals the
    task it started): it passes it on (torchrun's agent would die at once on SIGUSR1, its workers training on,
    and raise on SIGTERM). Either way: rank 0's line, the signal's exit code, no launcher report."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "pretrain", "train",
           *tiny_args(tiny_data_dir, run_dir, *LONG, f"parallel.strategy={strategy}")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    pids: dict[int, int] = {}
    try:
        wait_for_steps(run_dir, 5, proc)
        pids = worker_pids(proc.pid)
        assert sorted(pids) == [0, 1]
        os.kill(pids[1] if target == "rank 1" else proc.pid, notice)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + notice, err
        assert not any(word in err for word in ("Traceback", "ChildFailedError", "SignalException")), err
        step = assert_stopped_with_a_checkpoint(run_dir, err, notice)
        state = run_dir / "checkpoints" / f"step_{step:06d}" / "state"
        assert state.is_dir() and any(state.iterdir())
    finally:
        for pid in pids.values():  # orphaned workers would train on forever
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_study_stops_with_its_running_cell_checkpointed_and_starts_no_other(tiny_data_dir, tmp_path):
    path = write_study(tmp_path, tiny_data_dir, {"optim.name": ["rv-adamw"], "train.seed": [0, 1]}, overrides=LONG)
    study = load_study(path)
    first, second = (cell.run_dir for cell in study.cells)
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", "study", str(path)], cwd=REPO, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(first, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert err.strip().splitlines()[-1] == ("study stopped by SIGTERM: 1 cell(s) checkpointed; re-run the same "
                                           "command to resume")
    assert (first / "checkpoints" / "latest").is_file() and not second.exists()
    assert "stopped in" in out and "report:" in out


@pytest.mark.parametrize("during", ["train_step", "save_checkpoint"])
def test_a_notice_in_a_cells_last_step_stops_the_study(tiny_data_dir, tmp_path, monkeypatch, during):
    """The cell's last step ends its run anyway (`done`), and the study hears the notice too (the loop's
    handler passes it on): no further cell starts. Also while the final checkpoint is written (reviews s11,
    s11b: the notice was swallowed and the next cell started)."""
    import pretrain.train as train_module
    from pretrain.study_run import run_study

    path = write_study(tmp_path, tiny_data_dir, {"optim.name": ["rv-adamw"], "train.seed": [0, 1]},
                       overrides=["train.steps=3"])
    study = load_study(path)
    first, second = (cell.run_dir for cell in study.cells)
    real = getattr(train_module, during)

    def then_notice(run, step):
        if step == run.end_step and run.run_dir == first:
            os.kill(os.getpid(), signal.SIGTERM)  # as from a scheduler
        return real(run, step)

    monkeypatch.setattr(train_module, during, then_notice)
    ran = run_study(study, jobs=1)
    assert [o.status for o in ran.outcomes] == ["done"] and ran.stopped_by == signal.SIGTERM, ran
    assert not second.exists()


def test_a_study_with_two_jobs_passes_the_notice_to_its_cells(tiny_data_dir, tmp_path):
    """SIGTERM to a `--jobs 2` study: both running cells checkpoint and stop, the third never starts, and no
    worker is left training (the default would end the study at once, its workers training on)."""
    path = write_study(tmp_path, tiny_data_dir, {"optim.name": ["rv-adamw"], "train.seed": [0, 1, 2]},
                       overrides=LONG)
    cells = [cell.run_dir for cell in load_study(path).cells]
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", "study", str(path), "--jobs", "2"], cwd=REPO,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        wait_for_steps(cells[0], 5, proc)
        wait_for_steps(cells[1], 5, proc)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [int(pid) for pid in children  # the pool's, not multiprocessing's resource tracker
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + signal.SIGTERM, out + err
        assert err.strip().splitlines()[-1] == ("study stopped by SIGTERM: 2 cell(s) checkpointed; re-run the same "
                                               "command to resume")
        assert all((cell / "checkpoints" / "latest").is_file() for cell in cells[:2]) and not cells[2].exists()
        for pid in workers:  # ended with the study, not orphaned (a zombie waits for its reaper only)
            with contextlib.suppress(FileNotFoundError):
                assert "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_sigterm_to_the_launcher_before_its_workers_exist_is_not_lost(tmp_path):
    """While the agent waits for its rendezvous there are no workers to pass a notice to: it ends the launcher,
    as it did before the launcher passed notices on (review s11b: it was dropped, and the run would have
    trained to its end once the other node came)."""
    port = free_port()
    cmd = [sys.executable, "-m", "pretrain.launch", "--nnodes=2", "--node_rank=0", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "pretrain", "train", "configs/tiny-cpu.yaml",
           f"train.out_dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # node 0's store listens: the agent waits for node 1
            assert proc.poll() is None, proc.communicate()[1]
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (-signal.SIGTERM, 128 + signal.SIGTERM)
    finally:
        proc.kill()
        proc.communicate()


def test_a_notice_while_a_studys_workers_start_does_not_break_the_pool(tiny_data_dir, tmp_path):
    """A `--jobs 2` study passes a notice only to workers ready for it: one still starting would die of it and
    break the pool (review s11b: a BrokenProcessPool traceback, exit 1); it gets the notice a second later."""
    path = write_study(tmp_path, tiny_data_dir, {"optim.name": ["rv-adamw"], "train.seed": [0, 1, 2]},
                       overrides=LONG)
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", "study", str(path), "--jobs", "2"], cwd=REPO,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(children) < 3 and time.monotonic() < deadline:  # the resource tracker and two pool workers
            assert proc.poll() is None, proc.communicate()
            children = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, out + err
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
