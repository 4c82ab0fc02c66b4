"""`python -m pretrain.launch`: torchrun, minus its failure report when the run stopped on a user error.

It takes exactly torchrun's arguments (`python -m pretrain.launch --nproc_per_node 2 -m pretrain train
CONFIG ...`). When rank 0 stops on bad input it has already printed the one-line `error: ...`, and
every rank exits with USER_ERROR; plain torchrun then adds its own ChildFailedError traceback and the
exit codes of every rank. This wrapper drops that report in exactly that case and exits with
USER_ERROR itself; any other failure (a crash, a killed rank) keeps torchrun's full report.
"""

from __future__ import annotations

import logging
import signal
import sys

from pretrain.errors import USER_ERROR

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


def _user_error_only(failures: dict) -> bool:
    """Whether the first rank to fail exited with USER_ERROR and the others did too or were stopped for it."""
    first = min(failures.values(), key=lambda f: f.timestamp)
    stopped = (-signal.SIGTERM, -signal.SIGKILL, USER_ERROR)
    return first.exitcode == USER_ERROR and all(f.exitcode in stopped for f in failures.values())


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    hold = _HoldFailureLines()
    failure_logger = logging.getLogger(_FAILURE_LOGGER)
    failure_logger.addFilter(hold)
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        if _user_error_only(exc.failures):
            return USER_ERROR
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
