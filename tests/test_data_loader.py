"""Loaders: batches against a reference reading of the shards, the sampling rule, ranks, resume, errors."""

import numpy as np
import pytest
import torch

from pretrain.data import TrainLoader, ValLoader
from pretrain.errors import UserError

SEQ, MBS = 64, 4


def reference_windows(tokens: np.ndarray, seed: int, step: int, count: int, seq_len: int) -> np.ndarray:
    """The documented rule, written out: `count` windows with starts from PCG64([seed, step])."""
    starts = np.random.Generator(np.random.PCG64([seed, step])).integers(0, len(tokens) - seq_len, size=count)
    return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)


def test_batches_follow_the_sampling_rule(tiny_data_dir, read_split):
    train = read_split(tiny_data_dir, "train")
    loader = TrainLoader(tiny_data_dir, SEQ, MBS, grad_accum=3, seed=7)
    for step in (0, 1, 12345):
        windows = reference_windows(train, 7, step, 3 * MBS, SEQ)
        for micro in range(3):
            x, y = loader.get_batch(step, micro)
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (MBS, SEQ)
            assert x.is_contiguous() and y.is_contiguous()
            np.testing.assert_array_equal(x.numpy(), windows[micro * MBS:(micro + 1) * MBS, :-1])
            np.testing.assert_array_equal(y.numpy(), windows[micro * MBS:(micro + 1) * MBS, 1:])


def test_windows_span_shard_boundaries(tiny_data_dir, read_split):
    train = read_split(tiny_data_dir, "train")
    loader = TrainLoader(tiny_data_dir, 1000, 1, 1, seed=0)
    starts = np.array([0, 4096 - 1000, 4096 - 1, 4000, 3 * 4096 - 500, len(train) - 1001])  # shards of 4096 tokens
    np.testing.assert_array_equal(loader.stream.windows(starts, 1001), np.stack([train[s:s + 1001] for s in starts]))
    assert all(isinstance(shard, np.memmap) for shard in loader.stream._shards)  # memory-mapped, never loaded


def test_ranks_together_give_the_single_process_windows(tiny_data_dir):
    """2 ranks x 2 micro-steps == 1 rank x 4 micro-steps == 1 rank x 1 micro-step of 4 * MBS, for every step."""
    single = TrainLoader(tiny_data_dir, SEQ, MBS, grad_accum=4, seed=3)
    ranks = [TrainLoader(tiny_data_dir, SEQ, MBS, grad_accum=2, seed=3, rank=r, world_size=2) for r in range(2)]
    wide = TrainLoader(tiny_data_dir, SEQ, 4 * MBS, grad_accum=1, seed=3)
    for step in (0, 5):
        expected = torch.cat([single.get_batch(step, m)[0] for m in range(4)])
        distributed = torch.cat([loader.get_batch(step, m)[0] for loader in ranks for m in range(2)])
        assert torch.equal(distributed, expected) and torch.equal(wide.get_batch(step, 0)[0], expected)


def test_resume_is_exact_and_batches_vary(tiny_data_dir):
    first = TrainLoader(tiny_data_dir, SEQ, MBS, grad_accum=2, seed=11)
    seen = {(s, m): first.get_batch(s, m) for s in range(5) for m in range(2)}
    fresh = TrainLoader(tiny_data_dir, SEQ, MBS, grad_accum=2, seed=11)  # a restarted run, asked out of order
    for (s, m) in reversed(list(seen)):
        x, y = fresh.get_batch(s, m)
        assert torch.equal(x, seen[s, m][0]) and torch.equal(y, seen[s, m][1])
    assert not torch.equal(seen[0, 0][0], seen[1, 0][0])
    assert not torch.equal(seen[0, 0][0], TrainLoader(tiny_data_dir, SEQ, MBS, 2, seed=12).get_batch(0, 0)[0])


def test_val_loader_is_fixed_evenly_spaced_and_shared_by_ranks(tiny_data_dir, read_split):
    val = read_split(tiny_data_dir, "val")
    loader = ValLoader(tiny_data_dir, SEQ, MBS, num_batches=4)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    starts = np.linspace(0, len(val) - SEQ - 1, 4 * MBS).round().astype(int)
    expected = np.stack([val[s:s + SEQ + 1] for s in starts])
    np.testing.assert_array_equal(torch.cat([x for x, _ in batches]).numpy(), expected[:, :-1])
    np.testing.assert_array_equal(torch.cat([y for _, y in batches]).numpy(), expected[:, 1:])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, loader, strict=True))  # same on every pass

    ranks = [list(ValLoader(tiny_data_dir, SEQ, MBS, num_batches=4, rank=r, world_size=2)) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]
    interleaved = [ranks[b % 2][b // 2][0] for b in range(4)]
    assert torch.equal(torch.cat(interleaved), torch.cat([x for x, _ in batches]))
    # world size 3 does not divide 4 batches: every rank still gets the same number of batches
    assert [len(ValLoader(tiny_data_dir, SEQ, MBS, 4, rank=r, world_size=3)) for r in range(3)] == [2, 2, 2]


def test_split_shorter_than_a_window_is_a_user_error(tiny_data_dir, read_split):
    n_val = len(read_split(tiny_data_dir, "val"))
    with pytest.raises(UserError, match=f"the val split of .* has {n_val} tokens but seq_len={n_val} needs at least "
                                        f"{n_val + 1}.*val_fraction"):
        ValLoader(tiny_data_dir, n_val, 1, 1)
    ValLoader(tiny_data_dir, n_val - 1, 1, 1)  # exactly one window fits
    n_train = len(read_split(tiny_data_dir, "train"))
    with pytest.raises(UserError, match=f"the train split .* has {n_train} tokens"):
        TrainLoader(tiny_data_dir, n_train, 1, 1, seed=0)


def test_missing_data_and_bad_ranks(tmp_path, tiny_data_dir):
    with pytest.raises(UserError, match="no prepared data in .*; run `pretrain prepare CONFIG` first"):
        TrainLoader(tmp_path, SEQ, MBS, 1, seed=0)
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        TrainLoader(tiny_data_dir, SEQ, MBS, 1, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="micro_step 1 is outside grad_accum 1"):
        TrainLoader(tiny_data_dir, SEQ, MBS, 1, seed=0).get_batch(0, 1)
