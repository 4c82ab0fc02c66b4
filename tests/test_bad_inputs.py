"""Every bad input through the real CLI in a subprocess: exit code 2, one stderr line naming the key or
file, no traceback, and the run and data folders byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from pretrain.data import prepare_data
from pretrain.train import train
from tests.conftest import FIXTURE_CORPUS, FIXTURE_TOKENIZER
from tests.train_utils import REPO, tiny_args, tiny_config


@dataclass
class Case:
    argv: list[str]  # after `pretrain`
    named: str  # the key or file the one line must name
    watched: list[Path]  # folders that must not change


@dataclass
class Inputs:
    tmp: Path
    data: Path  # a prepared data dir (shared: copy it before damaging it)
    run: Path  # a finished run with one checkpoint, step 2 (shared: copy it too)

    def copy(self, what: Path, name: str) -> Path:
        return Path(shutil.copytree(what, self.tmp / name))

    def train(self, out: Path, *overrides: str, data: Path | None = None) -> list[str]:
        return ["train", *tiny_args(data or self.data, out, "train.steps=2", "checkpoint.every=2", *overrides)]


def override_yaml(i: Inputs) -> Case:
    return Case(i.train(i.tmp / "run", "optim.betas=[0.9, 0.95"), "optim.betas", [i.tmp / "run"])


def recipe_yaml(i: Inputs) -> Case:
    recipe = i.tmp / "bad.yaml"
    recipe.write_text("model:\n  arch: llama\n optim: [1\n")
    return Case(["train", str(recipe)], f"{recipe} is not valid YAML: line 3", [i.tmp])


def rv_without_weight_decay(i: Inputs) -> Case:
    return Case(i.train(i.tmp / "run", "optim.name=rv-adamw", "optim.weight_decay=0"), "optim.weight_decay",
                [i.tmp / "run"])


def max_positions_below_seq_len(i: Inputs) -> Case:
    return Case(i.train(i.tmp / "run", "model.max_position_embeddings=16"), "model.max_position_embeddings",
                [i.tmp / "run"])


def shard_deleted(i: Inputs) -> Case:
    data = i.copy(i.data, "data")
    (data / "train_000002.bin").unlink()
    return Case(i.train(i.tmp / "run", data=data), "train_000002.bin", [data, i.tmp / "run"])


def tokenizer_swapped(i: Inputs) -> Case:
    from transformers import AutoTokenizer

    data = i.copy(i.data, "data")
    bigger = AutoTokenizer.from_pretrained(str(FIXTURE_TOKENIZER))
    bigger.add_tokens([f"extra{k}" for k in range(40)])
    shutil.rmtree(data / "tokenizer")
    bigger.save_pretrained(str(data / "tokenizer"))
    return Case(i.train(i.tmp / "run", data=data), f"{data / 'tokenizer'}", [data, i.tmp / "run"])


def vocab_size_differs(i: Inputs) -> Case:
    from pretrain.config import DataConfig

    data = i.tmp / "bpe-data"
    prepare_data(DataConfig(source=str(FIXTURE_CORPUS), tokenizer="bpe", vocab_size=300, dir=str(data), seq_len=32,
                            shard_tokens=1 << 16, val_fraction=0.1, num_proc=1), progress=False)
    return Case(i.train(i.tmp / "run", "data.vocab_size=400", data=data), "data.vocab_size", [data, i.tmp / "run"])


def unwritable_out_dir(i: Inputs) -> Case:
    # /sys refuses new folders to every user, root included (chmod does not stop root).
    return Case(i.train(Path("/sys/pretrain-test-run")), "/sys/pretrain-test-run", [i.data])


def truncated_only_checkpoint(i: Inputs) -> Case:
    run = i.copy(i.run, "run")
    optimizer = run / "checkpoints" / "step_000002" / "state" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-64])
    return Case([*i.train(run), "--resume", "auto"], "optimizer.pt", [run])


def zeroed_weights(i: Inputs) -> Case:
    run = i.copy(i.run, "run")
    weights = run / "checkpoints" / "step_000002" / "state" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    weights.write_bytes(bytes(data))
    return Case([*i.train(run), "--resume", "auto"], "model.safetensors", [run])


def resume_path_missing(i: Inputs) -> Case:
    return Case([*i.train(i.tmp / "run"), "--resume", str(i.tmp / "nowhere")], "--resume", [i.tmp])


def rerun_over_a_finished_run(i: Inputs) -> Case:
    run = i.copy(i.run, "run")
    return Case(i.train(run, "optim.lr=1e-4"), f"{run}", [run])


def prepare_too_small_corpus(i: Inputs) -> Case:
    (i.tmp / "small").mkdir()
    (i.tmp / "small" / "a.txt").write_text(" ".join((FIXTURE_CORPUS / "bisect.py.1.txt").read_text().split()[:60]))
    argv = ["prepare", str(REPO / "configs" / "tiny-cpu.yaml"), f"data.source={i.tmp / 'small'}",
            f"data.tokenizer={FIXTURE_TOKENIZER}", f"data.dir={i.tmp / 'data'}", "data.num_proc=1"]
    return Case(argv, "data.seq_len", [i.tmp])


CASES: dict[str, Callable[[Inputs], Case]] = {f.__name__: f for f in (
    override_yaml, recipe_yaml, rv_without_weight_decay, max_positions_below_seq_len, shard_deleted,
    tokenizer_swapped, vocab_size_differs, unwritable_out_dir, truncated_only_checkpoint, zeroed_weights,
    resume_path_missing, rerun_over_a_finished_run, prepare_too_small_corpus)}


def digest(folder: Path) -> dict[str, str] | None:
    """sha256 of every file (and the name of every folder) under `folder`; None when it does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data_dir) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(tiny_data_dir, out, "train.steps=2", "checkpoint.every=2"))
    return out


@dataclass
class Outcome:
    case: Case
    result: subprocess.CompletedProcess
    unchanged: bool


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_data_dir, finished_run) -> dict[str, Outcome]:
    """Every case set up, then all run at once (a few at a time): each is a separate interpreter start."""
    cases = {name: make(Inputs(tmp_path_factory.mktemp(name), tiny_data_dir, finished_run))
             for name, make in CASES.items()}
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def run(case: Case) -> Outcome:
        watched = case.watched + [tiny_data_dir, finished_run]
        before = [digest(folder) for folder in watched]
        result = subprocess.run([sys.executable, "-m", "pretrain", *case.argv], cwd=case.watched[0].parent, env=env,
                                capture_output=True, text=True, timeout=600)
        return Outcome(case, result, [digest(folder) for folder in watched] == before)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(cases, pool.map(run, cases.values()), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(name, outcomes):
    case, result = outcomes[name].case, outcomes[name].result
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert case.named in lines[0], lines[0]
    assert outcomes[name].unchanged
