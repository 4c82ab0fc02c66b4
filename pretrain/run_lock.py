"""One writer per run folder: an OS lock that rank 0 holds from before it reads the folder until the run ends.

Two processes training into the same folder (a study started twice, a scheduler task run twice,
two `pretrain train` with the same `train.out_dir`) would write checkpoints, `metrics.jsonl` and
`checkpoints/latest` over each other. The lock is `flock(LOCK_EX | LOCK_NB)` on `<run>/.run.lock`:
the kernel drops it when its holder exits, however it exits, so a crashed or killed run never
leaves a stale lock. The file's text (pid, host, start time) is only for the refusal message;
whether the folder is taken is the kernel's answer, never the file's content.

The holder deletes the file when it lets go, so a run folder holds it only while a run is in it
(a killed run's leftover file is unlocked and taken over by the next run). A process that opened
the file just before the holder deleted it would lock a name that no longer exists: `acquire`
checks that the file it locked is still the one the name points to.

Without `fcntl` (Windows; the project targets Linux) and on file systems that refuse locks, the
run goes on unlocked after a notice saying so.
"""

from __future__ import annotations

import datetime
import errno
import os
import shutil
import socket
import time
from pathlib import Path

from pretrain.errors import UserError, disk_error

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; runs are not protected from each other
    fcntl = None

LOCK_FILE = ".run.lock"
# A status probe (`holder`) holds a shared lock for microseconds; a few short retries keep such a probe
# from turning a real start away.
_ATTEMPTS, _RETRY_S = 5, 0.05
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirInUse(UserError):
    """Another process holds the run folder's lock."""


class RunLock:
    """This process's hold on a run folder; `release` lets it go (and the kernel does, if the process dies)."""

    def __init__(self, run_dir: Path, fd: int | None, created_dir: bool) -> None:
        self.run_dir, self.created_dir = run_dir, created_dir  # created_dir: the folder did not exist before
        self._fd = fd  # None: held without an OS lock (see the module docstring)
        self._held = True

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock `run_dir` (created if missing) for this process, or refuse with RunDirInUse."""
        try:
            created = _make_dir(run_dir)
            return cls(run_dir, _lock(run_dir / LOCK_FILE) if fcntl is not None else None, created)
        except OSError as exc:
            explained = disk_error(exc)
            if explained is None:
                raise
            raise explained from None

    def release(self, remove_created_dir: bool = False) -> None:
        """Delete the lock file and unlock; with `remove_created_dir`, remove the whole folder if this lock
        created it (a run that never started leaves no trace). Calls after the first do nothing."""
        if not self._held:
            return
        self._held = False
        if remove_created_dir and self.created_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self._fd is not None:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)  # while still locked: no one else owns the name
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor unlocks
            self._fd = None


def holder(run_dir: Path) -> str | None:
    """Who holds `run_dir`'s lock ('pid P on host H, since T'), or None when no process does.

    Asks the kernel with a shared lock on a read-only descriptor, so it creates nothing. A lock held by
    this same process through another descriptor also counts as held.
    """
    if fcntl is None:
        return None
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # no lock file (or none we may read): no run holds the folder
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _described(fd)
        except OSError:
            return None  # a file system without locks: nothing to ask
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _make_dir(run_dir: Path) -> bool:
    """Create `run_dir` (and its parents) if missing; whether this call created it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.out_dir {run_dir} is a file, not a folder; set train.out_dir to a folder")
    try:
        run_dir.mkdir(parents=True)
    except FileExistsError:
        return False
    return True


def _lock(path: Path) -> int | None:
    """An open descriptor of `path` holding its exclusive lock, with this process's name written in; None
    where the file system refuses locks."""
    for attempt in range(_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _described(fd)
            os.close(fd)
            if attempt + 1 < _ATTEMPTS:
                time.sleep(_RETRY_S)
                continue
            raise RunDirInUse(f"run folder {path.parent} is in use by another process ({who}); wait for it to "
                              "finish, or set train.out_dir to another folder") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise
            print(f"notice: the file system of {path.parent} does not support locks; make sure no other process "
                  "trains into this folder at the same time")
            return None
        if not _still_named(fd, path):
            os.close(fd)  # its holder deleted the file between our open and our lock: lock the new one
            continue
        try:
            since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {since}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise RunDirInUse(f"run folder {path.parent} keeps being taken by other processes; wait for them, or set "
                      "train.out_dir to another folder")


def _still_named(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _described(fd: int) -> str:
    """The holder's own line from the lock file, for the message (never for the decision)."""
    text = os.pread(fd, 200, 0).decode(errors="replace").strip().splitlines()
    line = "".join(ch for ch in text[0] if ch.isprintable()) if text else ""
    return line or "a process that has not written its name yet"
