"""Data pipeline: corpus -> tokenizer -> token shards (`prepare_data`), then loaders over the shards.

Modules, one job each: `corpus` (sources and their manifest), `tokenizer` (train/load/hash),
`encode` (parallel tokenization), `shards` (on-disk format and index), `prepare` (the build),
`prepared` (the checks before training), `loader` (train/val batches).
"""

from pretrain.data.loader import TrainLoader, ValLoader
from pretrain.data.prepare import prepare_data
from pretrain.data.prepared import open_prepared
from pretrain.data.shards import load_index
from pretrain.data.tokenizer import EOS_TOKEN, load_tokenizer

__all__ = ["EOS_TOKEN", "TrainLoader", "ValLoader", "load_index", "load_tokenizer", "open_prepared", "prepare_data"]
