"""Shared fixtures: a tiny prepared data dir (fixture corpus + committed fixture tokenizer), built once per session.

Other tests train tiny models on `tiny_data_dir`; it prepares in well under a second (no BPE
training: the committed tokenizer is used as a pretrained one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_optim_fused.py). Triton
# decides that when it is first imported, so it is set here, before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_CORPUS = FIXTURES / "corpus"
FIXTURE_TOKENIZER = FIXTURES / "tokenizer"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes tens of seconds; still part of the default (CI) run")


@pytest.fixture(scope="session")
def make_data_config() -> Callable[..., object]:
    """Factory: DataConfig over the fixture corpus and tokenizer (24 documents, ~21k tokens, vocab 513).

    `make(directory, **overrides)`: prepared data goes to `directory`; overrides are DataConfig fields.
    """
    from pretrain.config import DataConfig

    def make(directory: Path, **overrides) -> DataConfig:
        fields = {"source": str(FIXTURE_CORPUS), "tokenizer": str(FIXTURE_TOKENIZER), "vocab_size": 512,
                  "dir": str(directory), "shard_tokens": 4096, "val_fraction": 0.1, "seq_len": 256, "num_proc": 1}
        return DataConfig(**{**fields, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_data_config(tmp_path_factory: pytest.TempPathFactory, make_data_config):
    """The DataConfig of the tiny prepared data; its `dir` is prepared (5 train shards, val >= 257 tokens)."""
    from pretrain.data import prepare_data

    cfg = make_data_config(tmp_path_factory.mktemp("tiny-data") / "data")
    prepare_data(cfg, progress=False)
    return cfg


@pytest.fixture(scope="session")
def tiny_data_dir(tiny_data_config) -> Path:
    """A prepared data dir (index.json, tokenizer/, train_*.bin, val_*.bin) for training tiny models."""
    return Path(tiny_data_config.dir)


@pytest.fixture(scope="session")
def read_split() -> Callable[[Path, str], np.ndarray]:
    """Reference reader: a split's tokens, by concatenating its shard files with plain numpy."""
    import json

    def read(data_dir: Path, split: str) -> np.ndarray:
        index = json.loads((Path(data_dir) / "index.json").read_text())
        dtype = {"uint16": "<u2", "uint32": "<u4"}[index["dtype"]]
        shards = [np.fromfile(Path(data_dir) / s["file"], dtype=dtype) for s in index["splits"][split]["shards"]]
        return np.concatenate(shards) if shards else np.zeros(0, dtype)

    return read
