"""Running a study: each cell's state on disk, running the unfinished cells, launch commands.

Every cell is a normal run directory written by `pretrain.train.train`, so it has checkpoints,
a metrics log and rotation metrics. A cell is finished when its final checkpoint exists (or
when it stopped on a non-finite loss); finished cells are skipped and interrupted ones
continue from their newest checkpoint, whether they were run here or by `--print-commands`. A cell
whose run folder another process holds (pretrain/run_lock.py: a second study, a scheduler task) is
"running elsewhere" and left to that process.
Torch-heavy modules (checkpoint, train, data) are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shlex
import signal
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from pretrain.errors import STOP_SIGNALS, UserError
from pretrain.run_lock import RunDirInUse, holder
from pretrain.study import Cell, Study

DIVERGED_FILE = "study-diverged.json"
LOG_FILE = "train.log"
RUNNING_ELSEWHERE = "running elsewhere"
STOPPED = "stopped"


def cell_status(cell: Cell) -> str:
    """'done' (final checkpoint written), 'diverged' (stopped on a non-finite loss), 'running elsewhere'
    (another process holds its run folder), 'partial' (has a checkpoint, resumable) or 'pending'."""
    from pretrain.checkpoint import find_latest, step_dir_name

    if (cell.run_dir / DIVERGED_FILE).is_file():
        return "diverged"
    latest = find_latest(cell.run_dir)
    if latest is not None and latest.name == step_dir_name(cell.config.train.steps):
        return "done"
    if holder(cell.run_dir) is not None:
        return RUNNING_ELSEWHERE
    return "pending" if latest is None else "partial"


@dataclass(frozen=True)
class CellOutcome:
    name: str
    status: str  # done | diverged | failed | running elsewhere | stopped
    seconds: float
    message: str = ""
    signal: int = 0  # `stopped`: the stop notice (SIGTERM, SIGUSR1) the cell checkpointed and stopped for


def run_cell(cell: Cell) -> CellOutcome:
    """Train (or continue) one cell, its output going to `<cell>/train.log`; a cell another process holds is
    left alone, its folder untouched."""
    from pretrain.train import TrainingDiverged, train  # the loop pulls in torch, data and optim

    start = time.perf_counter()
    who = holder(cell.run_dir)
    if who is not None:
        return CellOutcome(cell.name, RUNNING_ELSEWHERE, 0.0, who)
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = cell.run_dir / LOG_FILE
    new_log = not log_path.exists()
    with log_path.open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            result = train(cell.config, resume="auto")
        except TrainingDiverged as exc:
            # Deterministic: re-running would diverge again, so the cell counts as finished.
            (cell.run_dir / DIVERGED_FILE).write_text(json.dumps({"message": str(exc)}) + "\n")
            return CellOutcome(cell.name, "diverged", time.perf_counter() - start, str(exc))
        except RunDirInUse as exc:  # taken since the check above: leave its folder as it was
            if new_log:
                log_path.unlink(missing_ok=True)
            return CellOutcome(cell.name, RUNNING_ELSEWHERE, time.perf_counter() - start, str(exc))
        except Exception as exc:  # one broken cell must not stop the others; the traceback is in its log
            traceback.print_exc()
            reason = str(exc).partition("\n")[0]
            return CellOutcome(cell.name, "failed", time.perf_counter() - start, f"{type(exc).__name__}: {reason}")
    if result.stopped_by is not None:  # a stop notice: checkpointed, resumable
        return CellOutcome(cell.name, STOPPED, time.perf_counter() - start,
                           f"by {result.stopped_by.name} after step {result.step}", int(result.stopped_by))
    val = f"val loss {result.val_loss:.4f}" if result.val_loss is not None else "no val loss"
    return CellOutcome(cell.name, "done", time.perf_counter() - start, val)


@dataclass(frozen=True)
class StudyRun:
    outcomes: list[CellOutcome]  # of the cells run, in the order they ended
    stopped_by: signal.Signals | None = None  # a stop notice ended the study early (no further cell started)


class _StopNotices:
    """A stop notice to the study (SIGTERM, SIGUSR1: pretrain/parallel/stop.py) ends it once its running cells
    have checkpointed; no further cell starts. The notice is passed on at once and then every second until the
    cells end (`send`: to this process, whose cell runs here, or to the pool's workers), so a cell that was
    still setting up when it came, before its loop listens, gets it once it trains."""

    def __init__(self, send: Callable[[int], None], enabled: bool) -> None:
        self.send = send
        self.seen = 0
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous: dict[int, Any] = {}
        self._done = threading.Event()
        # Started here, not in the handler: a handler that starts a thread can deadlock the main thread.
        self._passer = threading.Thread(target=self._pass_on, name="study-stop-notice", daemon=True)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if not self.seen:  # a second one, or our own passed on to this process, changes nothing
            self.seen = signum
            self.send(signum)

    def _pass_on(self) -> None:
        while not self._done.wait(1.0):
            if self.seen:
                self.send(self.seen)

    def __enter__(self) -> _StopNotices:
        if self.enabled:  # else (checkpoint.on_signal=false) the signals keep their default: the study ends
            self._previous = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}
            self._passer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._passer.is_alive():
            self._passer.join()
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)


def _init_worker(threads: int, listen: bool) -> None:
    if listen:  # first: between cells a worker lets the study's notice pass; its cells' loops take it
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)


def _signal_workers(pool: ProcessPoolExecutor, signum: int) -> None:
    """Pass a notice to the pool's workers that are ready for it: one still starting (the default action
    still set) would die of it and break the pool; it gets the notice a second later."""
    for process in list(pool._processes.values()):  # the executor's workers: it has no public accessor
        if _handles(process.pid, signum):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)


def _handles(pid: int, signum: int) -> bool:
    """Whether process `pid` ignores or catches `signum` (Linux's /proc/<pid>/status masks)."""
    try:
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
    except OSError:
        return False
    bit = 1 << (signum - 1)
    return bool((int(fields.get("SigIgn", "0"), 16) | int(fields.get("SigCgt", "0"), 16)) & bit)


def run_study(study: Study, jobs: int = 1) -> StudyRun:
    """Run every unfinished cell, `jobs` at a time in separate processes (in this process when 1)."""
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    todo = _cells_to_run(study, jobs)
    outcomes: list[CellOutcome] = []

    def report(outcome: CellOutcome) -> None:
        outcomes.append(outcome)
        print(f"[{len(outcomes)}/{len(todo)}] {outcome.name}: {outcome.status} in {outcome.seconds:.0f} s"
              f" ({outcome.message})", flush=True)

    def stopping() -> bool:  # a notice reached the study, or a cell (which then checkpointed and stopped)
        return bool(notices.seen) or any(o.status == STOPPED for o in outcomes)

    listen = all(cell.config.checkpoint.on_signal for cell in todo)
    if jobs == 1:
        with _StopNotices(lambda signum: os.kill(os.getpid(), signum), listen) as notices:
            for cell in todo:
                if stopping():
                    break
                report(run_cell(cell))
    else:
        # Split the cores between the workers instead of letting each grab them all.
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(threads, listen)) as pool, \
                _StopNotices(lambda signum: _signal_workers(pool, signum), listen) as notices:
            pending, running = list(todo), set[Future]()
            while pending or running:
                # At most one cell per worker is handed over, none waits in the pool's queue: no cell starts
                # after a notice.
                while pending and len(running) < jobs and not stopping():
                    running.add(pool.submit(run_cell, pending.pop(0)))
                done, running = wait(running, return_when=FIRST_COMPLETED) if running else (set(), set())
                for future in done:
                    report(future.result())
                pending = [] if stopping() else pending
    stopped = next((o.signal for o in outcomes if o.status == STOPPED), 0) or notices.seen
    return StudyRun(outcomes, signal.Signals(stopped) if stopped else None)


def _cells_to_run(study: Study, jobs: int) -> list[Cell]:
    """The unfinished cells not held by another process, each checked against its run folder; says which."""
    from pretrain.checkpoint import check_compatible

    todo, elsewhere = [], 0
    for cell in study.cells:
        if (cell.run_dir / "config.yaml").is_file():  # a cell changed since it ran must not be mixed up
            check_compatible(cell.run_dir, cell.config)
        status = cell_status(cell)
        if status in ("done", "diverged"):
            print(f"skip {cell.name}: {status}")
        elif status == RUNNING_ELSEWHERE:
            print(f"skip {cell.name}: {status} ({holder(cell.run_dir) or 'just finished'})")
            elsewhere += 1
        else:
            todo.append(cell)
    _check_data(todo)
    others = f"{elsewhere} {RUNNING_ELSEWHERE}, " if elsewhere else ""
    print(f"study {study.name}: {len(study.cells)} cells, {len(study.cells) - len(todo) - elsewhere} finished, "
          f"{others}{len(todo)} to run with {jobs} job(s); logs in <cell>/{LOG_FILE}")
    return todo


def _check_data(cells: list[Cell]) -> None:
    """Fail before any cell starts when a cell's data has not been prepared."""
    from pretrain.data import load_index

    for data_dir in sorted({c.config.data.dir for c in cells}):
        load_index(Path(data_dir))


# ----------------------------------------------------------------------------- commands


def launch_commands(study: Study, launcher: str = "pretrain train") -> list[str]:
    """One shell line per cell, in cell order: `launcher` (default `pretrain train`), the base recipe, the
    cell's overrides and `--resume auto`, so line i can be run as is by task i of a scheduler array."""
    prefix = shlex.split(launcher)
    if not prefix:
        raise UserError("--launcher is empty; give the command that takes a recipe and overrides, e.g. "
                        "'pretrain train' or 'bash launch/slurm/node.sh'")
    return [shlex.join([*prefix, str(study.base), *cell.overrides, "--resume", "auto"]) for cell in study.cells]
