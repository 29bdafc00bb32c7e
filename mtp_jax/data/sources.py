"""Where documents come from: the Python standard library's own source, files, JSONL, or a
generated task (`mtp_jax/tasks/`; the prepared token store that `mtp-prepare` writes is read by
store.py).

Text sources yield documents in a fixed sorted order; each lands in the train or validation
split by a stable hash of its name (sha1, not Python's per-process `hash()`), so the split
never depends on the machine, on `max_bytes`, or on how many documents there are. Generated task
documents are the exception: their split is fixed by the task (the test set is `val`) and written
into their names (`val::000012`).
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import string
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mtp_jax.config import ConfigError, DataConfig
from mtp_jax.data.store import SPLITS  # noqa: F401 (re-exported: the splits a document lands in)

# Vendored packages are not the standard library; its test suite (~3x the rest, full of deliberately
# odd code and encodings) would dominate the corpus.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})

# What a code-pretraining pipeline drops from the standard library (after StarCoder's filters):
# files a program wrote (a generator's mark in the first lines: codec tables, Sphinx's pydoc topics,
# token.py) and data tables: long lines, under a quarter ASCII letters and digits, or over a tenth
# decimal digits or hex literals and escapes (html.entities, stringprep, the encodings). All byte
# counts, so that the whole library is judged in about a second.
GENERATED_MARK = re.compile(rb"auto-?generated|generated (?:by|from|with) \S*\.(?:py|txt)\b|do not edit", re.I)
HEX_LITERAL = re.compile(rb"0[xX][0-9a-fA-F]+|\\[xuU][0-9a-fA-F]+")
ALNUM, DIGITS = (string.ascii_letters + string.digits).encode(), string.digits.encode()
HEAD_LINES = 5  # where a generator's mark is looked for
MAX_LINE_BYTES, MAX_MEAN_LINE_BYTES = 1000, 100
MIN_ALNUM_FRACTION, MAX_DIGIT_FRACTION, MAX_HEX_FRACTION = 0.25, 0.1, 0.1

# (name, size in bytes, read(limit) -> at most `limit` raw bytes): reading is deferred so that
# `max_bytes` stops before touching the rest of a large corpus.
RawDoc = tuple[str, int, Callable[[int], bytes]]
# (name, bytes to read, whether that is the whole document, read): a RawDoc after the max_bytes cut.
Cut = tuple[str, int, bool, Callable[[int], bytes]]
GENERATED_SOURCES = ("induction", "polynomial")
SPLIT_MARK = "::"  # a generated document's name is <split>::<index>


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


def split_of(name: str, val_fraction: float) -> str:
    """'val' for a stable val_fraction of names, whatever the order or number of documents."""
    bucket = int.from_bytes(hashlib.sha1(name.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return "val" if bucket < val_fraction * 2**64 else "train"


def split_for(name: str, val_fraction: float) -> str:
    """The split a document lands in: the one its name fixes (generated tasks), else `split_of`."""
    head, mark, _ = name.partition(SPLIT_MARK)
    return head if mark and head in SPLITS else split_of(name, val_fraction)


def _decode(data: bytes, complete: bool) -> tuple[str, bool]:
    """(text, was valid UTF-8). An incomplete last character of a document cut by max_bytes is not an error."""
    try:
        return codecs.getincrementaldecoder("utf-8")("strict").decode(data, final=complete), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), False


def read_corpus(cfg: DataConfig) -> Corpus:
    """Documents of a text source in sorted order, the total capped at max_bytes (the last one cut).

    Holds the whole corpus: for small corpora and tests; preparation streams `budgeted` instead.
    """
    documents = [make_document(doc, cfg.val_fraction) for doc in budgeted(raw_documents(cfg), cfg.max_bytes)]
    if not documents:
        where = "the standard library" if cfg.source == "stdlib" else f"data.path={cfg.path!r}"
        raise ConfigError(f"data.source={cfg.source} found no text in {where}; point data.path at non-empty documents")
    return Corpus(documents)


def budgeted(raw: Iterable[RawDoc], max_bytes: int) -> Iterator[Cut]:
    """Non-empty documents with the bytes to read of each: what the max_bytes budget (0 = none) allows."""
    budget = max_bytes if max_bytes > 0 else float("inf")
    for name, size, read in raw:
        if budget <= 0:
            return
        if size == 0:
            continue
        take = int(min(size, budget))
        budget -= take
        yield name, take, take == size, read


def make_document(cut: Cut, val_fraction: float) -> Document:
    """A `budgeted` document read, decoded and assigned its split (picklable input: workers call it)."""
    name, take, complete, read = cut
    text, valid = _decode(read(take), complete)
    return Document(name, text, split_for(name, val_fraction), len(text.encode("utf-8")), valid)


def input_files(cfg: DataConfig) -> list[tuple[str, Path]]:
    """(name, path) of a text source's files in sorted order: the units preparation splits into parts."""
    if cfg.source == "stdlib":
        return _stdlib_files()
    if cfg.source == "files":
        return _files(cfg.path)
    if cfg.source == "jsonl":
        return _files(cfg.path, suffix=".jsonl")
    if cfg.source in GENERATED_SOURCES:
        from mtp_jax.tasks.corpus import task_files

        return task_files(cfg)
    raise ConfigError(f"data.source={cfg.source} holds tokens, not text; use it for training, not as text input")


def raw_documents(cfg: DataConfig, files: list[tuple[str, Path]] | None = None) -> Iterator[RawDoc]:
    """The documents of `files` (default: all the source's files), reading deferred."""
    files = input_files(cfg) if files is None else files
    if cfg.source in ("jsonl", *GENERATED_SOURCES):
        return _jsonl_documents(files, cfg.text_field if cfg.source == "jsonl" else "text",
                                named=cfg.source in GENERATED_SOURCES)
    return _file_documents(files)


def looks_like_code(data: bytes) -> bool:
    """False for a generated file or a data table (the rules above): a few percent of the standard
    library that would otherwise teach a small model hex tables instead of Python."""
    lines = data.splitlines()
    if not lines:
        return False
    if GENERATED_MARK.search(b"\n".join(lines[:HEAD_LINES])):
        return False
    if max(map(len, lines)) > MAX_LINE_BYTES or len(data) > MAX_MEAN_LINE_BYTES * len(lines):
        return False
    counted = lambda keep: len(data) - len(data.translate(None, keep))  # bytes of data that are in `keep`
    hex_bytes = sum(map(len, HEX_LITERAL.findall(data)))
    return (counted(ALNUM) >= MIN_ALNUM_FRACTION * len(data) and counted(DIGITS) <= MAX_DIGIT_FRACTION * len(data)
            and hex_bytes <= MAX_HEX_FRACTION * len(data))


def _stdlib_files() -> list[tuple[str, Path]]:
    """The standard library's own modules, less tests, vendored packages and `looks_like_code` rejects."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    kept = [p for p in found if looks_like_code(p.read_bytes())]
    return sorted((p.relative_to(root).as_posix(), p) for p in kept)


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


def _jsonl_documents(files: list[tuple[str, Path]], field: str, named: bool = False) -> Iterator[RawDoc]:
    """One document per line. Invalid UTF-8 survives JSON parsing as surrogate escapes, so it is
    counted by the same `_decode` as files. `named`: each file's name is its documents' split."""
    for name, path in files:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{name}{SPLIT_MARK}{lineno:07d}" if named else f"{path}:{lineno}"
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
