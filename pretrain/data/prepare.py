"""`prepare_data`: corpus -> tokenizer -> train/val token shards in `data.dir`, done once.

The fingerprint of all inputs (source manifest with a sha256 per file, tokenizer identity,
vocab size, shard size, val fraction, seq_len, dtype) is stored in index.json; a re-run with the
same fingerprint and all shards present is a no-op, anything else rebuilds. A build happens in a
temp dir beside `data.dir` that is renamed into place at the end, so `data.dir` is never
half-written: tokenizer (trained or loaded) -> parallel tokenization into one temporary stream ->
train/val split by document -> fixed-size shards + index.

Train/val split, deterministic and by document: documents are visited in a fixed pseudo-random
order (seed 0) and moved to val until it holds `target = max(ceil(val_fraction * tokens), seq_len + 1)`
tokens, skipping documents longer than 2 * target (one would skew the fraction). When whole documents
cannot make up the target (a one-file corpus, a few huge files) or would leave train without a
full window, val is the last `target` tokens of the stream instead. When the corpus cannot give
both splits a seq_len + 1 window, val gets just ceil(val_fraction * tokens).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pretrain.config import DataConfig
from pretrain.data.corpus import Corpus, open_corpus
from pretrain.data.encode import encode_documents
from pretrain.data.prepared import data_problem
from pretrain.data.shards import (
    DTYPES,
    FORMAT_VERSION,
    INDEX_NAME,
    SPLITS,
    ShardWriter,
    read_index,
    token_dtype,
    write_index,
)
from pretrain.data.tokenizer import BPE_TRAIN_MAX_CHARS, load_pretrained, tokenizer_hash, train_bpe
from pretrain.durable import fsync_dir, fsync_tree
from pretrain.errors import UserError


def prepare_data(cfg: DataConfig, progress: bool = True) -> Path:
    """Build (or confirm up to date) the prepared data in `cfg.dir` and return that path."""
    started = time.perf_counter()
    out = Path(cfg.dir)
    _check_target(out)
    if cfg.num_proc < 1:
        raise UserError(f"data.num_proc must be at least 1, got {cfg.num_proc}")
    corpus = open_corpus(cfg)
    pretrained = None if cfg.tokenizer == "bpe" else load_pretrained(cfg.tokenizer)
    # Checked before any long work: a vocabulary that does not fit the requested dtype.
    dtype = token_dtype(cfg.vocab_size + 1 if pretrained is None else len(pretrained), cfg.dtype)
    identity = _tokenizer_identity(cfg, pretrained)
    inputs = {"format": FORMAT_VERSION, "source": corpus.manifest, "tokenizer": identity, "dtype": dtype,
              "shard_tokens": cfg.shard_tokens, "val_fraction": cfg.val_fraction, "seq_len": cfg.seq_len}
    fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    old = read_index(out)
    if old is not None and old["fingerprint"] == fingerprint:
        problem = data_problem(out, old)
        if problem is None:
            _say(progress, f"{out} is up to date ({_summary(old)}); nothing to do")
            return out
        _say(progress, f"{out} is damaged ({problem}); rebuilding it")

    timings = {"inputs_s": time.perf_counter() - started}
    with _staging_dir(out) as tmp:
        tick = time.perf_counter()
        tokenizer = train_bpe(corpus.documents(), cfg.vocab_size, progress) if pretrained is None else pretrained
        tokenizer.model_max_length = cfg.seq_len  # the context the data is cut for; a model sets its own
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        timings["tokenizer_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        stream = tmp / "stream.tmp"
        lengths = _tokenize(corpus, tokenizer, dtype, cfg.num_proc, stream, progress)
        timings["tokenize_s"] = time.perf_counter() - tick
        val_ranges = choose_val_ranges(lengths, cfg.val_fraction, cfg.seq_len + 1)
        train_tokens = int(lengths.sum()) - sum(end - start for start, end in val_ranges)
        if train_tokens < cfg.seq_len + 1:
            raise UserError(f"data source {cfg.source} has {int(lengths.sum())} tokens ({train_tokens} for training "
                            f"after the val split) but data.seq_len={cfg.seq_len} needs at least {cfg.seq_len + 1} "
                            f"for training; use a bigger corpus or a smaller data.seq_len")

        val_tokens = sum(end - start for start, end in val_ranges)
        if val_tokens < cfg.seq_len + 1:
            raise UserError(f"data source {cfg.source} has {int(lengths.sum())} tokens, too few for a val split of one "
                            f"data.seq_len + 1 = {cfg.seq_len + 1} window beside the training tokens (val would get "
                            f"{val_tokens}); use a bigger corpus, a larger data.val_fraction or a smaller data.seq_len")

        tick = time.perf_counter()
        splits = _write_shards(tmp, stream, dtype, cfg.shard_tokens, val_ranges)
        stream.unlink()
        timings["shards_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - started
        index = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "dtype": dtype, "vocab_size": len(tokenizer),
                 "eos_id": tokenizer.eos_token_id, "documents": len(lengths), "splits": splits,
                 "tokenizer": {**identity, "sha256": tokenizer_hash(tokenizer)}, "source": corpus.manifest,
                 "shard_tokens": cfg.shard_tokens, "val_fraction": cfg.val_fraction, "seq_len": cfg.seq_len,
                 "timings": {k: round(v, 3) for k, v in timings.items()}}
        write_index(tmp, index)
    _say(progress, f"prepared {out}: {_summary(index)} in {timings['total_s']:.1f}s")
    return out


def choose_val_ranges(doc_lengths: np.ndarray, val_fraction: float, window: int) -> list[tuple[int, int]]:
    """Sorted [start, end) token ranges of the stream that form the val split (rule in the module docstring)."""
    total = int(doc_lengths.sum())
    if total == 0:
        return []
    target = max(math.ceil(val_fraction * total), window)
    if total - target < window:
        target = math.ceil(val_fraction * total)
    ends = np.cumsum(doc_lengths)
    chosen, taken = [], 0
    for doc in np.random.default_rng(0).permutation(len(doc_lengths)):
        if taken >= target:
            break
        if doc_lengths[doc] <= 2 * target:
            chosen.append(doc)
            taken += int(doc_lengths[doc])
    if taken < target or total - taken < window:
        return [(total - target, total)]
    return sorted((int(ends[doc] - doc_lengths[doc]), int(ends[doc])) for doc in chosen)


def _tokenizer_identity(cfg: DataConfig, pretrained: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """What decides the tokenizer before it exists: a trained BPE is a function of these and the corpus."""
    if pretrained is None:
        return {"kind": "bpe", "vocab_size": cfg.vocab_size, "tokenizers": tokenizers.__version__,
                "max_train_chars": BPE_TRAIN_MAX_CHARS}
    return {"kind": "pretrained", "name": cfg.tokenizer, "sha256": tokenizer_hash(pretrained),
            "special_tokens": "template"}  # documents carry the tokenizer's own template (BOS, ...)


def _tokenize(corpus: Corpus, tokenizer: PreTrainedTokenizerBase, dtype: str, num_proc: int, path: Path,
              progress: bool) -> np.ndarray:
    """Write the whole token stream to `path`; return the documents' lengths (eos included)."""
    lengths = []
    batches = encode_documents(corpus.documents(), tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id,
                               DTYPES[dtype].str, num_proc)
    with path.open("wb") as f, tqdm(desc=f"tokenize ({num_proc} proc)", unit="tok", unit_scale=True,
                                    disable=None if progress else True) as bar:  # None: no bar off a terminal
        for tokens, doc_lengths in batches:
            f.write(memoryview(tokens).cast("B"))
            lengths.append(doc_lengths)
            bar.update(len(tokens))
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


def _write_shards(directory: Path, stream_path: Path, dtype: str, shard_tokens: int,
                  val_ranges: list[tuple[int, int]]) -> dict[str, Any]:
    stream = np.memmap(stream_path, DTYPES[dtype], mode="r")
    writers = {split: ShardWriter(directory, split, dtype, shard_tokens) for split in SPLITS}
    position = 0
    for start, end in val_ranges:
        writers["train"].write(stream[position:start])
        writers["val"].write(stream[start:end])
        position = end
    writers["train"].write(stream[position:])
    return {split: writer.close() for split, writer in writers.items()}


def _check_target(out: Path) -> None:
    """Refuse to replace anything that is not a prepared data dir (or an empty dir)."""
    if out.exists() and not (out.is_dir() and ((out / INDEX_NAME).is_file() or not any(out.iterdir()))):
        raise UserError(f"{out} exists and is not a prepared data dir (no {INDEX_NAME}); remove it or set data.dir "
                        f"to another path")


@contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A fresh dir beside `target` that replaces it when the block succeeds and is deleted when it fails.

    Its name carries this process id, so leftovers of a killed prepare (whose process is gone) are
    recognised and removed by the next one. The new dir is fsync'ed before the rename publishes it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = tmp.with_suffix(".old")
            target.rename(old)
            tmp.rename(target)
            fsync_dir(target.parent)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
            fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    """Delete the staging dirs of earlier prepares of `target` whose process no longer runs."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        match = re.fullmatch(rf"\.{re.escape(target.name)}\.(\d+-)?[0-9a-f]{{8}}\.(tmp|old)", path.name)
        if match and not _process_alive(int(match.group(1)[:-1]) if match.group(1) else None):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int | None) -> bool:
    if pid is None:  # named before the pid was part of the name
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _summary(index: dict[str, Any]) -> str:
    train, val = index["splits"]["train"], index["splits"]["val"]
    return (f"{train['num_tokens']:,} train tokens in {len(train['shards'])} shards, {val['num_tokens']:,} val tokens, "
            f"vocab {index['vocab_size']:,} as {index['dtype']}")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)
