"""Where documents come from: the Python standard library's own source, files, JSONL, or the
pre-tokenised ArrayRecord shards that `mtp-prepare` writes.

Text sources yield documents in a fixed sorted order; each lands in the train or validation
split by a stable hash of its name (sha1, not Python's per-process `hash()`), so the split
never depends on the machine, on `max_bytes`, or on how many documents there are.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import glob
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mtp_jax.config import ConfigError, DataConfig

SPLITS = ("train", "val")
# Vendored packages are not the standard library; its test suite (~3x the rest, full of deliberately
# odd code and encodings) would dominate the corpus.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})
RECORD_DTYPE = np.dtype("<i4")  # one ArrayRecord record = one document's token ids

# (name, size in bytes, read(limit) -> at most `limit` raw bytes): reading is deferred so that
# `max_bytes` stops before touching the rest of a large corpus.
RawDoc = tuple[str, int, Callable[[int], bytes]]


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    text: str
    split: str
    nbytes: int  # UTF-8 bytes of `text`, what the model sees (the denominator of bits per byte)
    valid_utf8: bool


@dataclasses.dataclass
class Corpus:
    documents: list[Document]

    def texts(self, split: str) -> list[str]:
        return [d.text for d in self.documents if d.split == split]

    @property
    def invalid_utf8(self) -> int:
        return sum(not d.valid_utf8 for d in self.documents)

    def warn_invalid_utf8(self) -> None:
        """One stderr line, so binary or mis-encoded files in a text corpus do not go unnoticed."""
        if self.invalid_utf8:
            print(f"warning: {self.invalid_utf8} of {len(self.documents)} documents were not valid UTF-8; "
                  "decoded with replacement", file=sys.stderr, flush=True)

    def manifest(self) -> dict:
        """What was read, so a run records exactly which documents it trained and validated on."""
        totals = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
        for d in self.documents:
            totals[d.split]["documents"] += 1
            totals[d.split]["bytes"] += d.nbytes
        return {
            "documents": [{"name": d.name, "bytes": d.nbytes, "split": d.split} for d in self.documents],
            "totals": totals,
            "invalid_utf8": self.invalid_utf8,
        }


def split_of(name: str, val_fraction: float) -> str:
    """'val' for a stable val_fraction of names, whatever the order or number of documents."""
    bucket = int.from_bytes(hashlib.sha1(name.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return "val" if bucket < val_fraction * 2**64 else "train"


def _decode(data: bytes, complete: bool) -> tuple[str, bool]:
    """(text, was valid UTF-8). An incomplete last character of a document cut by max_bytes is not an error."""
    try:
        return codecs.getincrementaldecoder("utf-8")("strict").decode(data, final=complete), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), False


def read_corpus(cfg: DataConfig) -> Corpus:
    """Documents of a text source in sorted order, the total capped at max_bytes (the last one cut)."""
    if cfg.source in ("induction", "polynomial"):  # generated task data (mtp_jax/tasks/)
        from mtp_jax.tasks.corpus import generated_corpus

        return generated_corpus(cfg)
    budget = cfg.max_bytes if cfg.max_bytes > 0 else float("inf")
    documents = []
    for name, size, read in _raw_documents(cfg):
        if budget <= 0:
            break
        if size == 0:
            continue
        take = int(min(size, budget))
        text, valid = _decode(read(take), complete=take == size)
        documents.append(Document(name, text, split_of(name, cfg.val_fraction), len(text.encode("utf-8")), valid))
        budget -= take
    if not documents:
        where = "the standard library" if cfg.source == "stdlib" else f"data.path={cfg.path!r}"
        raise ConfigError(f"data.source={cfg.source} found no text in {where}; point data.path at non-empty documents")
    return Corpus(documents)


def _raw_documents(cfg: DataConfig) -> Iterator[RawDoc]:
    if cfg.source == "stdlib":
        return _file_documents(_stdlib_files())
    if cfg.source == "files":
        return _file_documents(_files(cfg.path))
    if cfg.source == "jsonl":
        return _jsonl_documents(_files(cfg.path, suffix=".jsonl"), cfg.text_field)
    raise ConfigError(f"data.source={cfg.source} holds tokens, not text; use it for training, not as text input")


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted((p.relative_to(root).as_posix(), p) for p in found)


def _files(value: str, suffix: str = "") -> list[tuple[str, Path]]:
    """(name, path) of the regular files a folder holds (recursively) or a glob matches, sorted by name."""
    if any(c in value for c in "*?["):
        found = [(p, Path(p)) for p in glob.glob(value, recursive=True) if os.path.isfile(p)]
        if not found:
            raise ConfigError(f"data.path={value!r} matches no files; fix the pattern (e.g. 'docs/**/*.txt')")
        return sorted(found)
    root = Path(value)
    if not root.exists():
        raise ConfigError(f"data.path={value!r} does not exist; point it at a folder, a file or a glob of files")
    if root.is_file():
        return [(value, root)]
    found = [(p.relative_to(root).as_posix(), p) for p in root.rglob(f"*{suffix}") if p.is_file()]
    if not found:
        raise ConfigError(f"data.path={value!r} is a folder without {suffix or 'any'} files; add some or point data.path elsewhere")
    return sorted(found)


def _file_documents(files: list[tuple[str, Path]]) -> Iterator[RawDoc]:
    for name, path in files:
        yield name, path.stat().st_size, functools.partial(_read_prefix, path)


def _read_prefix(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _slice_prefix(data: bytes, limit: int) -> bytes:
    return data[:limit]


def _jsonl_documents(files: list[tuple[str, Path]], field: str) -> Iterator[RawDoc]:
    """One document per line. Invalid UTF-8 survives JSON parsing as surrogate escapes, so it is
    counted by the same `_decode` as files."""
    for _, path in files:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line.decode("utf-8", "surrogateescape"))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{where} is not valid JSON ({err.msg}); fix or remove that line") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise ConfigError(f"{where} has no string field {field!r}; fix the line or set data.text_field")
                data = _raw_bytes(record[field])
                yield where, len(data), functools.partial(_slice_prefix, data)


def _raw_bytes(text: str) -> bytes:
    """The field's original bytes; a JSON-escaped lone surrogate becomes invalid UTF-8 (and is counted)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def to_record(ids: np.ndarray) -> bytes:
    return np.asarray(ids, RECORD_DTYPE).tobytes()


def prepared_tokenizer_dir(value: str) -> Path:
    """The tokenizer folder that `mtp-prepare` wrote beside the shards."""
    return _files(value, suffix=".array_record")[0][1].parent / "tokenizer"


def read_token_shards(value: str) -> dict[str, list[np.ndarray]]:
    """Pre-tokenised documents per split from `train-*`/`val-*` ArrayRecord shards."""
    from grain.sources import ArrayRecordDataSource

    documents: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for _, path in _files(value, suffix=".array_record"):
        split = path.name.split("-", 1)[0]
        if split not in documents:
            raise ConfigError(f"ArrayRecord shard '{path}' is not named train-* or val-*; use the files mtp-prepare wrote")
        source = ArrayRecordDataSource([str(path)])
        documents[split].extend(np.frombuffer(source[i], RECORD_DTYPE) for i in range(len(source)))
    return documents
