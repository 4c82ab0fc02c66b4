"""prepare_data: shard contents against an independent tokenization, the index, idempotency, dtypes, errors."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import pretrain.data.encode
from pretrain.config import DataConfig
from pretrain.data import load_index, prepare_data
from pretrain.data.corpus import embedded_files
from pretrain.data.prepare import choose_val_ranges
from pretrain.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
DOCS = [p.read_text() for p in sorted((FIXTURES / "corpus").glob("*.txt"))]


def split_documents(tokens: np.ndarray, eos_id: int) -> list[list[int]]:
    """The eos-terminated documents of a token stream (the stream must end with eos)."""
    ends = np.flatnonzero(tokens == eos_id)
    assert len(ends) and ends[-1] == len(tokens) - 1, "a split must end with a whole document"
    return [part.tolist() for part in np.split(tokens, ends + 1)[:-1]]


def reference_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text by the `transformers` tokenizer itself, eos appended."""
    return [tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
            for t in texts]


def snapshot(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


def test_shards_are_the_documents_tokenized_and_eos_separated(tiny_data_dir, read_split):
    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))
    expected = reference_ids(tokenizer, DOCS)
    train = split_documents(read_split(tiny_data_dir, "train"), 0)
    val = split_documents(read_split(tiny_data_dir, "val"), 0)
    assert val and all(doc in expected for doc in val)  # val is made of whole documents
    assert train == [doc for doc in expected if doc not in val]  # train: the rest, in corpus order
    assert sum(map(len, val)) >= 257  # one seq_len + 1 window at least


def test_index_describes_the_shards(tiny_data_dir, tiny_data_config):
    index = load_index(tiny_data_dir)
    assert (index["format"], index["dtype"], index["vocab_size"], index["eos_id"]) == (1, "uint16", 513, 0)
    assert index["documents"] == len(DOCS) and index["shard_tokens"] == 4096
    assert index["tokenizer"]["kind"] == "pretrained" and len(index["tokenizer"]["sha256"]) == 64
    assert [f["path"] for f in index["source"]["files"]] == sorted(p.name for p in (FIXTURES / "corpus").glob("*.txt"))
    assert set(index["timings"]) >= {"tokenizer_s", "tokenize_s", "total_s"}
    for split in ("train", "val"):
        shards = index["splits"][split]["shards"]
        assert [s["file"] for s in shards] == [f"{split}_{i:06d}.bin" for i in range(len(shards))]
        assert all(s["num_tokens"] == 4096 for s in shards[:-1]) and 0 < shards[-1]["num_tokens"] <= 4096
        assert index["splits"][split]["num_tokens"] == sum(s["num_tokens"] for s in shards)
        for shard in shards:
            data = (tiny_data_dir / shard["file"]).read_bytes()
            assert len(data) == 2 * shard["num_tokens"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert sorted(p.name for p in tiny_data_dir.iterdir() if p.is_file() and not p.name.endswith(".bin")) == \
        ["index.json"]  # no temporary stream left behind
    total = sum(index["splits"][s]["num_tokens"] for s in ("train", "val"))
    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))
    assert total == sum(map(len, reference_ids(tokenizer, DOCS)))
    assert 0.1 <= index["splits"]["val"]["num_tokens"] / total < 0.3


def test_bpe_prepare_and_parallel_tokenization_match(tmp_path, make_data_config, read_split, monkeypatch):
    """A BPE trained at prepare time equals the committed one; 2 processes write the same bytes as 1."""
    one = prepare_data(make_data_config(tmp_path / "one", tokenizer="bpe"), progress=False)
    monkeypatch.setattr(pretrain.data.encode, "BATCH_CHARS", 4096)  # several batches, so both workers get some
    two = prepare_data(make_data_config(tmp_path / "two", num_proc=2), progress=False)
    assert load_index(one)["tokenizer"]["sha256"] == load_index(two)["tokenizer"]["sha256"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_split(one, split), read_split(two, split))


def test_literal_eos_text_is_not_a_document_boundary(tmp_path, make_data_config, read_split):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("GPT-2 marks the end of a text with <|endoftext|> in its vocabulary. " * 40)
    data = prepare_data(make_data_config(tmp_path / "d", source=str(tmp_path / "c"), seq_len=16), progress=False)
    tokens = np.concatenate([read_split(data, "train"), read_split(data, "val")])
    assert (tokens == 0).sum() == 1 and tokens[-1] == 0  # only the separator after the one document


def test_second_prepare_is_a_no_op_and_changes_rebuild(tmp_path, make_data_config, read_split, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURES / "corpus", corpus)
    cfg = make_data_config(tmp_path / "data", source=str(corpus))
    out = prepare_data(cfg)
    before, index = snapshot(out), (out / "index.json").read_text()
    capsys.readouterr()
    assert prepare_data(cfg) == out
    assert "up to date" in capsys.readouterr().out
    assert snapshot(out) == before and (out / "index.json").read_text() == index

    (corpus / "macbeth.txt").write_text("Double, double toil and trouble; fire burn and cauldron bubble. " * 200)
    prepare_data(cfg, progress=False)
    assert load_index(out)["fingerprint"] != json.loads(index)["fingerprint"]
    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))
    all_docs = split_documents(read_split(out, "train"), 0) + split_documents(read_split(out, "val"), 0)
    assert reference_ids(tokenizer, [(corpus / "macbeth.txt").read_text()])[0] in all_docs

    fingerprint = load_index(out)["fingerprint"]
    prepare_data(make_data_config(tmp_path / "data", source=str(corpus), shard_tokens=1000), progress=False)
    assert load_index(out)["fingerprint"] != fingerprint and len(load_index(out)["splits"]["train"]["shards"]) > 10

    (out / "train_000003.bin").unlink()  # a damaged dir is rebuilt even though its inputs did not change
    prepare_data(make_data_config(tmp_path / "data", source=str(corpus), shard_tokens=1000), progress=False)
    assert (out / "train_000003.bin").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging dirs left


def test_forced_uint32_holds_the_same_tokens(tmp_path, tiny_data_dir, make_data_config, read_split):
    out = prepare_data(make_data_config(tmp_path / "d", dtype="uint32"), progress=False)
    index = load_index(out)
    assert index["dtype"] == "uint32"
    shard = index["splits"]["train"]["shards"][0]
    assert (out / shard["file"]).stat().st_size == 4 * shard["num_tokens"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_split(out, split), read_split(tiny_data_dir, split))


@pytest.fixture
def big_vocab_tokenizer(tmp_path) -> Path:
    """A word-level tokenizer with 70,000 entries: its ids do not fit in uint16."""
    words = sorted({w for doc in DOCS for w in doc.split()})
    vocab = {w: i for i, w in enumerate(words + [f"filler{i}" for i in range(70_000 - len(words) - 1)] + ["[UNK]"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(
        str(tmp_path / "big"))
    return tmp_path / "big"


def test_vocab_beyond_uint16(tmp_path, make_data_config, big_vocab_tokenizer, read_split):
    out = prepare_data(make_data_config(tmp_path / "d", tokenizer=str(big_vocab_tokenizer), seq_len=64), False)
    assert load_index(out)["dtype"] == "uint32" and load_index(out)["vocab_size"] == 70_000
    assert read_split(out, "train").max() >= 1 << 16 or read_split(out, "val").max() >= 1 << 16
    with pytest.raises(UserError, match="uint16 cannot hold a vocabulary of 70000 tokens"):
        prepare_data(make_data_config(tmp_path / "e", tokenizer=str(big_vocab_tokenizer), dtype="uint16"), False)
    with pytest.raises(UserError, match="uint16 cannot hold a vocabulary of 70001 tokens"):  # before any training
        prepare_data(make_data_config(tmp_path / "f", tokenizer="bpe", vocab_size=70_000, dtype="uint16"), False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_too_short_corpus_leaves_old_data_untouched(tmp_path, make_data_config):
    out = prepare_data(make_data_config(tmp_path / "data"), progress=False)
    before = snapshot(out)
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("To be, or not to be.")
    with pytest.raises(UserError, match=r"has \d+ tokens \(\d+ for training after the val split\) but data.seq_len=256 "
                                        r"needs at least 257"):
        prepare_data(make_data_config(tmp_path / "data", source=str(tmp_path / "short")), progress=False)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "short"]  # the staging dir is gone
    (tmp_path / "short" / "a.txt").write_text("")
    with pytest.raises(UserError, match="has 0 tokens"):
        prepare_data(make_data_config(tmp_path / "data", source=str(tmp_path / "short")), progress=False)


def test_other_user_errors(tmp_path, make_data_config):
    with pytest.raises(UserError, match="num_proc must be at least 1"):
        prepare_data(make_data_config(tmp_path / "a", num_proc=0), progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a prepared data dir"):
        prepare_data(make_data_config(tmp_path / "mine"), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_val_is_whole_documents_near_the_fraction():
    lengths = np.random.default_rng(1).integers(50, 400, size=1000)
    ranges = choose_val_ranges(lengths, 0.05, 257)
    assert ranges == choose_val_ranges(lengths, 0.05, 257)  # deterministic
    ends = set(np.cumsum(lengths).tolist()) | {0}
    assert all(start in ends and end in ends for start, end in ranges)
    val = sum(end - start for start, end in ranges)
    target = 0.05 * lengths.sum()
    assert target <= val < target + 400 and ranges == sorted(ranges)


def test_val_falls_back_to_the_stream_tail():
    assert choose_val_ranges(np.array([10_000]), 0.01, 257) == [(10_000 - 257, 10_000)]  # one document
    assert choose_val_ranges(np.array([5_000, 5_000]), 0.01, 101) == [(10_000 - 101, 10_000)]  # only huge ones
    assert choose_val_ranges(np.array([300]), 0.1, 257) == [(270, 300)]  # too short for two windows
    assert choose_val_ranges(np.zeros(0, np.int64), 0.1, 257) == []  # an empty corpus (prepare then says so)


@pytest.mark.slow
def test_embedded_corpus_prepares(tmp_path, read_split):
    """The real default corpus end to end (about 15 s): BPE 8192, uint16, val made of whole documents."""
    out = prepare_data(DataConfig(dir=str(tmp_path / "embedded")), progress=False)
    index = load_index(out)
    assert (index["dtype"], index["vocab_size"], index["eos_id"]) == ("uint16", 8193, 0)
    assert index["splits"]["train"]["num_tokens"] > 2_000_000 and index["splits"]["val"]["num_tokens"] >= 257
    assert len(index["source"]["files"]) == len(embedded_files())
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    texts = {path.read_text(encoding="utf-8") for _, path in embedded_files()}
    for doc in split_documents(read_split(out, "val"), 0):
        assert tokenizer.decode(doc[:-1]) in texts
    before = snapshot(out)
    prepare_data(DataConfig(dir=str(tmp_path / "embedded")), progress=False)
    assert snapshot(out) == before


def test_a_corpus_too_small_for_a_val_window_is_refused(tmp_path, make_data_config):
    (tmp_path / "small").mkdir()
    text = " ".join(DOCS[0].split()[:60])  # ~200 tokens, one short document: enough for training, not for val beside it
    (tmp_path / "small" / "a.txt").write_text(text)
    cfg = make_data_config(tmp_path / "data", source=str(tmp_path / "small"), seq_len=128)
    with pytest.raises(UserError, match=r"too few for a val split of one data.seq_len \+ 1 = 129 window"):
        prepare_data(cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]


def test_leftovers_of_a_killed_prepare_are_removed(tmp_path, make_data_config):
    dead_pid = 2 ** 22 + 12345  # above the kernel's pid_max: no such process
    leftovers = [tmp_path / f".data.{dead_pid}-0123abcd.tmp", tmp_path / ".data.89abcdef.tmp",
                 tmp_path / f".data.{dead_pid}-0123abcd.old"]
    for path in leftovers:
        (path / "tokenizer").mkdir(parents=True)
    alive = tmp_path / ".data.1-0123abcd.tmp"  # pid 1 always runs: a prepare still in progress
    alive.mkdir()
    prepare_data(make_data_config(tmp_path / "data"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "data"]


def test_a_swapped_tokenizer_is_not_up_to_date(tmp_path, make_data_config, big_vocab_tokenizer, capsys):
    cfg = make_data_config(tmp_path / "data")
    out = prepare_data(cfg, progress=False)
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(big_vocab_tokenizer, out / "tokenizer")
    capsys.readouterr()
    prepare_data(cfg)
    said = capsys.readouterr().out
    assert "up to date" not in said and "is not the tokenizer the shards were made with" in said
    assert len(AutoTokenizer.from_pretrained(str(out / "tokenizer"))) == load_index(out)["vocab_size"]
