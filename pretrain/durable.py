"""Durable file writes: fsync before the rename that publishes, and sha256 checksums.

A rename is atomic, but without an fsync of the data first a power loss can publish a folder
whose files are still empty; without an fsync of the parent folder the rename itself may be lost.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a folder's entries (created, renamed or removed names)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, `root` included."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def durable_temp(path: Path) -> Path:
    """The temp file `write_text_durably` writes `path` through (an interrupted write leaves it behind)."""
    return path.with_name(f".{path.name}.tmp")


def write_text_durably(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically: temp file, fsync, rename, fsync of the folder."""
    tmp = durable_temp(path)
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
