"""The one exception type that reaches the user as a one-line message, the disk errors that become one, and
the exit codes of a run that stopped with a line saying why."""

from __future__ import annotations

import errno
import shutil
import signal
from pathlib import Path

USER_ERROR = 2  # the exit code of every rank that stops on a UserError
# Stop notices (a scheduler's preemption or time limit): the run checkpoints and every rank exits with
# 128 + the signal (pretrain/parallel/stop.py).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
# How libraries that write through their own I/O layer (safetensors, torch's zip writer) word the same errors.
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded")
_NOT_WRITABLE_TEXT = ("Permission denied", "os error 13", "Read-only file system", "os error 30")


class UserError(Exception):
    """Bad input the user can fix: the CLI prints `error: <message>` and exits non-zero."""


def disk_error(exc: BaseException, where: Path | None = None) -> UserError | None:
    """A one-line UserError for a write that failed because the disk is full or the folder not writable.

    `where` is the folder being written; when the library's error does not say why (torch's zip
    writer reports only a position mismatch), a disk with no room left there is taken as the reason.
    """
    code = getattr(exc, "errno", None)
    text = str(exc)
    target = getattr(exc, "filename", None) or where or "the output folder"
    if code in _DISK_FULL or any(t in text for t in _DISK_FULL_TEXT) or (where is not None and _full(where)):
        return UserError(f"no space left on the disk while writing {target}; free some space (or set train.out_dir / "
                         "data.dir to another disk) and run again")
    if code in _NOT_WRITABLE or any(t in text for t in _NOT_WRITABLE_TEXT):
        return UserError(f"cannot write {target}: permission denied or read-only file system; choose a writable "
                         "train.out_dir / data.dir or fix the folder's permissions")
    return None


def _full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False
