"""A scheduler's stop notice ends the run with a checkpoint instead of losing the steps since the last one.

SLURM sends SIGTERM on preemption, `scancel` and at the time limit (and ahead of it with
`#SBATCH --signal=TERM@120`); torchrun's agent passes a SIGTERM on to its workers, then kills them
30 s later, and `pretrain.launch` passes SIGTERM and SIGUSR1 on. Python's default for both signals
ends the process at once. While a run trains, the handler here only notes the signal; the loop then
writes a checkpoint at the end of the running step and stops (exit code 128 + the signal).

Every rank must stop at the same step (writing a checkpoint is collective), but a signal reaches the
ranks at different moments. So at the start of each step every rank votes: a one-element MAX all-reduce
of the signal it has seen (0: none), queued on the device and copied to the host behind it. After the
step every rank reads the same result, which arrived long before (on a GPU no wait: the copy is not
queued behind the update; gloo's all-reduce blocks the host, a CPU's step anyway). A single process
needs no vote.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from pretrain.errors import STOP_SIGNALS
from pretrain.parallel.host_copy import HostCopy


class StopSignals:
    """Notes SIGTERM / SIGUSR1 while a run trains and tells the loop, the same on every rank, when to stop.

    A context manager: leaving it puts the previous handlers back, or, once a notice was seen and the
    previous one was the default (which would end the process), ignores further notices: the process
    is stopping anyway and must not die in its last writes. A previous Python handler (a study's) hears
    every notice too. Handlers can only be set from the main thread; elsewhere (a run driven from
    another thread) the signals keep their own behaviour.
    """

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device = device
        self._seen = 0
        self._previous: dict[int, object] = {}
        self._vote: HostCopy | None = None
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        self._voting = bool(self._previous) and dist.is_initialized() and dist.get_world_size() > 1

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._seen = signum
        previous = self._previous.get(signum)
        if callable(previous):  # a study listens too: it must start no further cell
            previous(signum, frame)

    def vote(self) -> None:
        """At the start of a step, on every rank: put this rank's signal (0: none) to the vote."""
        if self._voting:
            ballot = torch.full((1,), self._seen, dtype=torch.int32, device=self.device)
            dist.all_reduce(ballot, op=dist.ReduceOp.MAX)
            self._vote = HostCopy(ballot)

    def agreed(self) -> signal.Signals | None:
        """After the step: the signal every rank stops for now (the same on every rank), or None.

        Voting ranks read this step's vote (`vote` runs first in every step of the loop)."""
        seen = int(self._vote.tolist()[0]) if self._voting and self._vote is not None else self._seen
        return signal.Signals(seen) if seen else None

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            if previous is None:  # a handler set outside Python, which cannot be put back: the nearest
                previous = signal.SIG_DFL
            if self._seen and previous == signal.SIG_DFL:
                previous = signal.SIG_IGN
            signal.signal(sig, previous)
        self._previous.clear()
