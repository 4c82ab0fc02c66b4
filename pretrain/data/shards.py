"""On-disk format of prepared data: fixed-size token shards and the index that describes them.

A data dir holds `index.json`, `tokenizer/` and, per split, `{split}_{i:06d}.bin`: raw
little-endian uint16 (when every token id fits) or uint32 token ids, `shard_tokens` per file
(the last one may be shorter). Concatenating a split's shards in order gives its token stream.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pretrain.errors import UserError

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int, requested: str) -> str:
    """The shard dtype name: uint16 whenever the largest id (vocab_size - 1) fits, unless uint32 is asked for."""
    fits_uint16 = vocab_size <= 1 << 16
    if requested == "uint16" and not fits_uint16:
        raise UserError(f"data.dtype=uint16 cannot hold a vocabulary of {vocab_size} tokens (ids up to "
                        f"{vocab_size - 1} > 65535); set data.dtype to uint32 or auto")
    if requested == "auto":
        return "uint16" if fits_uint16 else "uint32"
    return requested


class ShardWriter:
    """Append tokens to one split's stream, cut into files of exactly `shard_tokens` tokens, each checksummed."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, DTYPES[dtype], shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: BinaryIO | None = None
        self._digest = hashlib.sha256()
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._file is None:
                self._file = (self.directory / self._name(len(self.shards))).open("wb")
            take = min(len(tokens), self.shard_tokens - self._count)
            data = memoryview(tokens[:take]).cast("B")
            self._file.write(data)
            self._digest.update(data)
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish_shard()

    def close(self) -> dict[str, Any]:
        """Finish the last shard; return the split's index entry."""
        if self._file is not None:
            self._finish_shard()
        return {"num_tokens": sum(s["num_tokens"] for s in self.shards), "shards": self.shards}

    def _name(self, i: int) -> str:
        return f"{self.split}_{i:06d}.bin"

    def _finish_shard(self) -> None:
        assert self._file is not None
        self._file.close()
        self.shards.append({"file": self._name(len(self.shards)), "num_tokens": self._count,
                            "sha256": self._digest.hexdigest()})
        self._file, self._digest, self._count = None, hashlib.sha256(), 0


def write_index(directory: Path, index: dict[str, Any]) -> None:
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")


def read_index(data_dir: Path) -> dict[str, Any] | None:
    """The index of `data_dir`, or None if there is none or it cannot be read (a dir to rebuild)."""
    try:
        index = json.loads((data_dir / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("format") == FORMAT_VERSION else None


def load_index(data_dir: str | Path) -> dict[str, Any]:
    """The index of a prepared data dir; UserError if there is no usable one."""
    index = read_index(Path(data_dir))
    if index is None:
        raise UserError(f"no prepared data in {data_dir}; run `pretrain prepare CONFIG` first")
    return index
