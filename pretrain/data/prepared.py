"""Open a prepared data dir for training, refusing anything that does not match what was prepared.

A shard deleted or cut short, a tokenizer folder swapped for another one, or a train config whose
vocabulary differs from the prepared one would otherwise surface as an IndexError deep inside
the first forward pass, or train silently on the wrong ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from pretrain.config import DataConfig
from pretrain.data.shards import DTYPES, SPLITS, load_index
from pretrain.data.tokenizer import load_tokenizer, tokenizer_hash
from pretrain.errors import UserError

PREPARE_AGAIN = "run `pretrain prepare CONFIG` again"


def data_problem(data_dir: Path, index: dict[str, Any]) -> str | None:
    """What is wrong with a prepared dir against its own index (a missing or resized shard, another tokenizer)."""
    itemsize = DTYPES[index["dtype"]].itemsize
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            path = data_dir / shard["file"]
            if not path.is_file():
                return f"shard {path} is missing"
            if path.stat().st_size != shard["num_tokens"] * itemsize:
                return f"shard {path} has {path.stat().st_size} bytes, the index says {shard['num_tokens'] * itemsize}"
    try:
        tokenizer = load_tokenizer(data_dir)
    except (UserError, OSError, ValueError) as exc:
        return f"its tokenizer cannot be loaded ({str(exc).splitlines()[0]})"
    if len(tokenizer) != index["vocab_size"] or tokenizer_hash(tokenizer) != index["tokenizer"]["sha256"]:
        return (f"{data_dir / 'tokenizer'} ({len(tokenizer)} tokens) is not the tokenizer the shards were made with "
                f"({index['vocab_size']} tokens)")
    return None


def open_prepared(cfg: DataConfig) -> tuple[dict[str, Any], PreTrainedTokenizerBase]:
    """The index and tokenizer of `cfg.dir`, after checking them against each other and against `cfg`."""
    data_dir = Path(cfg.dir)
    index = load_index(data_dir)
    problem = data_problem(data_dir, index)
    if problem is not None:
        raise UserError(f"the prepared data in {data_dir} is damaged: {problem}; {PREPARE_AGAIN}")
    made_with = index["tokenizer"]
    if made_with.get("kind") == "bpe" and made_with.get("vocab_size") != cfg.vocab_size:
        raise UserError(f"data.vocab_size={cfg.vocab_size} but {data_dir} was prepared with data.vocab_size="
                        f"{made_with.get('vocab_size')}; set data.vocab_size to match or {PREPARE_AGAIN}")
    return index, load_tokenizer(data_dir)
