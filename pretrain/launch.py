"""`python -m pretrain.launch`: torchrun, minus its failure report when rank 0 has said why the run stopped.

It takes exactly torchrun's arguments (`python -m pretrain.launch --nproc_per_node 2 -m pretrain train
CONFIG ...`). When rank 0 stops on bad input it has already printed the one-line `error: ...`, and
every rank exits with USER_ERROR; plain torchrun then adds its own ChildFailedError traceback and the
exit codes of every rank. The same holds for a run stopped by SIGTERM or SIGUSR1 after a checkpoint
(rank 0's `stopped by ...` line, exit code 128 + the signal). This wrapper drops that report in exactly
those cases and exits with the ranks' code itself; any other failure (a crash, a killed rank) keeps
torchrun's full report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from argparse import Namespace
from pathlib import Path
from types import FrameType

from pretrain.errors import STOP_SIGNALS, USER_ERROR

# The agent's own lines about a failed or stopped worker, held back until we know why it failed.
_FAILURE_LOGGER = "torch.distributed.elastic.multiprocessing.api"


class _HoldFailureLines(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.held.append(record)
            return False
        return True


def _said_on_stderr(failures: dict, forwarded: int) -> int | None:
    """The exit code, where the ranks ended the way a line on stderr says; None where some rank failed
    otherwise (its report is kept).

    Rank 0 has said it where the first rank to fail ended with USER_ERROR or 128 + a stop notice (a
    checkpoint was written: pretrain/parallel/stop.py) and the others did too or were stopped for it.
    Where this launcher passed on a notice (`forwarded`) and the workers died of it, before their loop
    listened for it, this function says it.
    """
    said = (USER_ERROR, *(128 + sig for sig in STOP_SIGNALS))
    first = min(failures.values(), key=lambda f: f.timestamp)
    codes = {f.exitcode for f in failures.values()}
    if first.exitcode in said and codes <= {-signal.SIGTERM, -signal.SIGKILL, first.exitcode}:
        return first.exitcode
    if forwarded and codes <= {-forwarded, 128 + forwarded, -signal.SIGTERM, -signal.SIGKILL}:
        print(f"stopped by {signal.Signals(forwarded).name} before the workers could checkpoint (they had not "
              "started training, or checkpoint.on_signal is false); continue with --resume auto",
              file=sys.stderr, flush=True)
        return 128 + forwarded
    return None


class _StopNoticeForwarder:
    """A stop notice sent to the launcher (a scheduler signals the task it started) goes on to the workers,
    which checkpoint and exit with 128 + the signal; the agent keeps watching them and reports that code.

    Left to torchrun's agent, SIGUSR1 would end it at once, the workers training on orphaned, and SIGTERM
    would raise in it after the workers stopped, with a traceback and exit code 1. The agent installs its
    handler for the signals of its list (`--signals-to-handle`) when it starts the workers; this puts
    the stop notices on the list and has that handler pass them on instead. Before the workers start
    (the agent may wait in its rendezvous, in C++, where no Python handler runs) a notice ends the
    launcher as it always did.
    """

    def __init__(self, args: Namespace) -> None:
        from torch.distributed.elastic.multiprocessing import api

        self.signal = 0  # the notice passed on, if any
        self._agents = getattr(api, "_terminate_process_handler", None)
        listed = getattr(args, "signals_to_handle", None) or os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE",
                                                                            "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
        names = [n.strip() for n in listed.split(",") if n.strip()]
        names += [sig.name for sig in STOP_SIGNALS if sig.name not in names]
        args.signals_to_handle = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = ",".join(names)
        if self._agents is None:  # another torch: no hook, so take the notices from the start
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
        else:
            api._terminate_process_handler = self._handle

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum not in STOP_SIGNALS:
            if self._agents is not None:
                self._agents(signum, frame)
            return
        workers = _children()
        if not workers and self._agents is not None:  # all gone, or /proc cannot list them: torchrun's own way
            self._agents(signum, frame)
            return
        if not workers:  # none started yet: the signal's own action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = self.signal or signum
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):  # one that has just exited
                os.kill(pid, signum)


def _children() -> list[int]:
    """This process's child processes (the agent's workers), from Linux's /proc."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    notices = _StopNoticeForwarder(args)
    hold = _HoldFailureLines()
    failure_logger = logging.getLogger(_FAILURE_LOGGER)
    failure_logger.addFilter(hold)
    try:
        run(args)
    except ChildFailedError as exc:
        said = _said_on_stderr(exc.failures, notices.signal)
        if said is not None:
            return said
        failure_logger.removeFilter(hold)
        for record in hold.held:
            failure_logger.handle(record)
        raise
    finally:
        failure_logger.removeFilter(hold)
    for record in hold.held:
        failure_logger.handle(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
