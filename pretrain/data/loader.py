"""Train and val loaders over memory-mapped token shards.

Sampling rule (train). Every global step draws B = micro_batch_size * grad_accum * world_size
random windows of seq_len + 1 tokens, their starts uniform over the train stream (a window may
span shards), from `np.random.Generator(np.random.PCG64([seed, step]))`. Rank r at micro-step m
takes windows [(r * grad_accum + m) * micro_batch_size, ... + micro_batch_size). Hence:
- a batch is a pure function of (seed, step, rank, world_size): resuming at step s needs no replay
  and no skipping, and a fresh loader returns exactly the batch an old one would have;
- the set of windows of a global step does not depend on how it is split over ranks and
  micro-steps, as long as B is the same (e.g. 2 ranks x 1 micro-step == 1 rank x 2 micro-steps).
Windows are drawn with replacement, so there are no epochs to track.

Reading is memory-mapped (`np.memmap` per shard): nothing loads the corpus, and the page cache
is shared between ranks on a node. There is no prefetch thread: a batch costs about 0.1 ms at the
tiny recipe's shapes with a hot page cache (benchmarks/RESULTS.md), far below 1% of a training step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pretrain.data.shards import DTYPES, load_index
from pretrain.errors import UserError


class TokenStream:
    """One split's shards as a single read-only token sequence."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        index = load_index(data_dir)
        dtype = DTYPES[index["dtype"]]
        shards = index["splits"][split]["shards"]
        self.split = split
        self.data_dir = Path(data_dir)
        self._shards = [np.memmap(self.data_dir / s["file"], dtype=dtype, mode="r") for s in shards]
        self._offsets = np.cumsum([0] + [s["num_tokens"] for s in shards])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def require(self, window: int) -> None:
        """UserError unless the split holds at least one window of `window` tokens."""
        if len(self) < window:
            raise UserError(f"the {self.split} split of {self.data_dir} has {len(self)} tokens but seq_len="
                            f"{window - 1} needs at least {window}; use a bigger corpus"
                            f"{', a larger data.val_fraction' if self.split == 'val' else ''} or a smaller seq_len "
                            f"(and run `pretrain prepare` again)")

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 array [len(starts), length]: the tokens [start, start + length) for each start."""
        out = np.empty((len(starts), length), dtype=np.int64)
        shard_of = np.searchsorted(self._offsets, starts, side="right") - 1
        for row, (start, shard) in enumerate(zip(starts.tolist(), shard_of.tolist(), strict=True)):
            filled = 0
            while filled < length:  # more than one pass only when the window crosses into the next shard
                offset = start + filled - int(self._offsets[shard])
                piece = self._shards[shard][offset:offset + length - filled]
                out[row, filled:filled + len(piece)] = piece
                filled += len(piece)
                shard += 1
        return out


def _pairs(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, both contiguous int64 [batch, seq_len]."""
    tokens = torch.from_numpy(windows)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class TrainLoader:
    """Random windows of the train split; `get_batch(step, micro_step)` follows the sampling rule above."""

    def __init__(self, data_dir: str | Path, seq_len: int, micro_batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.stream = TokenStream(data_dir, "train")
        self.stream.require(seq_len + 1)
        self.seq_len, self.micro_batch_size, self.grad_accum = seq_len, micro_batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def step_starts(self, step: int) -> np.ndarray:
        """Start offsets of all B windows of global step `step`, every rank's included."""
        count = self.micro_batch_size * self.grad_accum * self.world_size
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        return rng.integers(0, len(self.stream) - self.seq_len, size=count)

    def get_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [micro_batch_size, seq_len], for this rank at (step, micro_step)."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step {micro_step} is outside grad_accum {self.grad_accum}")
        first = (self.rank * self.grad_accum + micro_step) * self.micro_batch_size
        starts = self.step_starts(step)[first:first + self.micro_batch_size]
        return _pairs(self.stream.windows(starts, self.seq_len + 1))


class ValLoader:
    """Fixed, evenly spaced windows of the val split, the same on every call; each rank gets its share.

    The evaluation set is ceil(num_batches / world_size) * world_size * micro_batch_size windows
    spread evenly over the split (overlapping if it is short): identical for every world size that
    divides num_batches, and every rank yields the same number of batches (so collectives inside the
    forward pass, as under FSDP, stay in step). Batch b of rank r holds windows
    [(b * world_size + r) * micro_batch_size, ... + micro_batch_size).
    """

    def __init__(self, data_dir: str | Path, seq_len: int, micro_batch_size: int, num_batches: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.stream = TokenStream(data_dir, "val")
        self.stream.require(seq_len + 1)
        self.seq_len, self.micro_batch_size, self.rank, self.world_size = seq_len, micro_batch_size, rank, world_size
        self.batches_per_rank = -(-num_batches // world_size)
        count = self.batches_per_rank * world_size * micro_batch_size
        self.starts = np.linspace(0, len(self.stream) - seq_len - 1, count).round().astype(np.int64)

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in range(self.batches_per_rank):
            first = (batch * self.world_size + self.rank) * self.micro_batch_size
            yield _pairs(self.stream.windows(self.starts[first:first + self.micro_batch_size], self.seq_len + 1))
