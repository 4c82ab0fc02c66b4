"""Tokenizers: deterministic byte-level BPE, pretrained tokenizers, and the tokenizer saved with the data."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pretrain.data import EOS_TOKEN, load_tokenizer
from pretrain.data.tokenizer import load_pretrained, tokenizer_hash, train_bpe
from pretrain.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
DOCS = [p.read_text() for p in sorted((FIXTURES / "corpus").glob("*.txt"))]


def test_bpe_is_deterministic_byte_for_byte(tmp_path):
    for name in ("a", "b"):
        train_bpe(DOCS, 512).save_pretrained(str(tmp_path / name))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_bpe_vocab_eos_and_round_trip(tmp_path):
    tokenizer = train_bpe(DOCS, 512)
    assert len(tokenizer) == 513 and tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 0
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.eos_token == EOS_TOKEN and len(reloaded) == 513
    for text in DOCS + ["unseen bytes: \u00e9\u4e2d\U0001f600\t\r\n"]:  # byte-level: any text round-trips
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert reloaded.decode(ids) == text
    assert tokenizer_hash(reloaded) == tokenizer_hash(tokenizer)


def test_committed_fixture_tokenizer_is_the_bpe_of_the_fixture_corpus():
    assert tokenizer_hash(load_pretrained(str(FIXTURES / "tokenizer"))) == tokenizer_hash(train_bpe(DOCS, 512))


def test_vocab_too_small_for_byte_level():
    with pytest.raises(UserError, match="at least 256"):
        train_bpe(DOCS, 100)


def test_pretrained_without_eos_gets_one(tmp_path):
    backend = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(str(tmp_path))
    tokenizer = load_pretrained(str(tmp_path))
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 3 and len(tokenizer) == 4


def test_unloadable_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load tokenizer .*data.tokenizer"):
        load_pretrained(str(tmp_path / "missing"))


def test_load_tokenizer_from_prepared_dir(tiny_data_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_data_dir)
    assert tokenizer_hash(tokenizer) == tokenizer_hash(load_pretrained(str(FIXTURES / "tokenizer")))
    with pytest.raises(UserError, match="run `pretrain prepare CONFIG` first"):
        load_tokenizer(tmp_path)
