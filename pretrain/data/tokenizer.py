"""Tokenizers: train our byte-level BPE, or load any `transformers` tokenizer; hash and reload them.

Every tokenizer ends up as a fast `transformers` tokenizer with an end-of-text (eos) token,
the document separator in the token stream, and is saved next to the shards so that
training, sampling and export all use exactly the tokenizer the data was made with.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pretrain.errors import UserError

EOS_TOKEN = "<|endoftext|>"
# BPE training reads at most this much text (the corpus prefix): plenty for vocabularies up to
# ~100k, and it bounds time and memory on a corpus of hundreds of GB.
BPE_TRAIN_MAX_CHARS = 1 << 30


def train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) with `vocab_size` tokens plus EOS_TOKEN (id 0).

    Deterministic: the same texts give a byte-identical tokenizer.json (checked in the tests).
    """
    if vocab_size < 256:
        raise UserError(f"data.vocab_size must be at least 256 for a byte-level BPE (one token per byte), "
                        f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 1, special_tokens=[EOS_TOKEN],
                                  show_progress=progress and sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_prefix(texts, BPE_TRAIN_MAX_CHARS), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN)


def load_pretrained(name: str) -> PreTrainedTokenizerBase:
    """A local tokenizer folder or hub id, given an EOS_TOKEN if it has no eos token of its own."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer {name!r} ({str(exc).splitlines()[0]}); set data.tokenizer to "
                        f"'bpe', a local tokenizer folder or a hub id") from None
    if not tokenizer.is_fast:
        raise UserError(f"tokenizer {name!r} has no fast (`tokenizers`) implementation; pick another one or 'bpe'")
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    return tokenizer


def load_tokenizer(data_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer that a prepared data dir was made with."""
    path = Path(data_dir) / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer in {data_dir}; run `pretrain prepare CONFIG` first")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:  # batched generation/eval needs one; EOS never collides with real text
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def match_model(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Make the model's special-token ids the tokenizer's, and the tokenizer's max length the model's context.

    Saved side by side, they then agree for `pipeline`, `generate` and any other client: config.json
    and generation_config.json carry the tokenizer's bos/eos/pad ids (bos falls back to eos for a
    tokenizer without one), and the tokenizer truncates where the positions end.
    """
    eos = tokenizer.eos_token_id
    ids = {"bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
           "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos}
    model.config.update(ids)
    if model.generation_config is not None:
        model.generation_config.update(**ids)
    config = model.config
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", None) or config.n_positions


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of everything that decides the token ids: the serialized fast tokenizer and the eos token."""
    state = tokenizer.backend_tokenizer.to_str() + "\0" + str(tokenizer.eos_token)
    return hashlib.sha256(state.encode()).hexdigest()


def _prefix(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The texts until `max_chars` characters have been taken (the one crossing the limit included)."""
    taken = 0
    for text in texts:
        if taken >= max_chars:
            return
        yield text
        taken += len(text)
