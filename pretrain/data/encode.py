"""Parallel tokenization: documents in, token arrays out, in corpus order.

Documents are grouped into batches of about BATCH_CHARS characters; `num_proc` worker processes
each run the fast tokenizer's batched encoder single-threaded on one batch at a time. At most
2 * num_proc batches are in flight, so a corpus of any size (a stream included) passes through in
bounded memory; `Pool.imap` would instead read the whole input ahead. Each document is encoded
the way the tokenizer encodes a prompt, with its own special-token template (a BOS-adding
tokenizer puts BOS first, as `pipeline` and `generate` will at inference), and followed by the
eos id unless the template already ends it with eos; so documents are separated by eos in the
stream, and special tokens never come from the text itself.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain

import numpy as np
from tokenizers import Tokenizer

BATCH_CHARS = 1 << 20


class Encoder:
    """Encode a batch of documents into one token array (each document + eos) and the documents' lengths."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # A literal "<|endoftext|>" in a document is text, not a document boundary (like tiktoken's encode_ordinary).
        self.tokenizer.encode_special_tokens = True
        self.eos_id = eos_id
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # The tokenizer's own template (BOS, CLS, ...), the same one inference applies to a prompt.
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch_fast(texts, add_special_tokens=True)]
        for doc in ids:
            if not doc or doc[-1] != self.eos_id:
                doc.append(self.eos_id)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(chain.from_iterable(ids), self.dtype, int(lengths.sum())), lengths


def encode_documents(documents: Iterable[str], tokenizer_json: str, eos_id: int, dtype: str,
                     num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens, document lengths) per batch of documents, in order; `num_proc` 1 encodes in this process."""
    batches = _batches(documents)
    if num_proc == 1:
        yield from map(Encoder(tokenizer_json, eos_id, dtype), batches)
        return
    with _pool(num_proc, (tokenizer_json, eos_id, dtype)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextmanager
def _pool(num_proc: int, encoder_args: tuple) -> Iterator[multiprocessing.pool.Pool]:
    # fork starts workers in milliseconds without re-importing torch/transformers; elsewhere only spawn is safe.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    # Workers encode single-threaded (parallelism is across processes). Setting this before the fork also
    # keeps `tokenizers` from warning that its thread pool, used by BPE training here, was forked.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(num_proc, initializer=_init_worker, initargs=encoder_args)
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    with pool:
        yield pool


_worker_encoder: Encoder | None = None


def _init_worker(*encoder_args) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(*encoder_args)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_encoder is not None, "worker not initialised"
    return _worker_encoder(texts)
