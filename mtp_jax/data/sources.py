"""Where documents come from: the Python standard library's own source, files, JSONL, or a
generated task (generated.py). The first stage of the data layer: the tokenizer samples these
documents, preparation (build.py) encodes them, and nothing here knows about tokens.

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
from mtp_jax.data import generated

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
Files = list[tuple[str, Path]]  # (name, path) in sorted order
SPLITS = ("train", "val")  # the splits a document lands in
SPLIT_MARK = "::"  # a generated document's name is <split>::<index>
PART_BYTES = 1 << 30  # input bytes per part: the unit a preparation resumes at
ON_THE_FLY_MAX_BYTES = 2 << 30  # input bytes a run prepares itself; beyond, use mtp-prepare


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

    Holds the whole corpus: for small corpora and tests; preparation streams `cuts` instead.
    """
    corpus = Corpus(list(documents(cfg, input_files(cfg))))
    if not corpus.documents:
        where = "the standard library" if cfg.source == "stdlib" else f"data.path={cfg.path!r}"
        raise ConfigError(f"data.source={cfg.source} found no text in {where}; point data.path at non-empty documents")
    return corpus


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


def cuts(cfg: DataConfig, files: Files) -> Iterator[Cut]:
    """The documents of `files` within the max_bytes budget, not yet read: preparation's workers read them."""
    return budgeted(raw_documents(cfg, files), cfg.max_bytes)


def documents(cfg: DataConfig, files: Files) -> Iterator[Document]:
    """The documents of `files` within the max_bytes budget, read one at a time."""
    return (make_document(cut, cfg.val_fraction) for cut in cuts(cfg, files))


def input_files(cfg: DataConfig) -> Files:
    """(name, path) of a text source's files in sorted order: the units preparation splits into parts."""
    if cfg.source == "stdlib":
        return _stdlib_files()
    if cfg.source == "files":
        return _files(cfg.path)
    if cfg.source == "jsonl":
        return _files(cfg.path, suffix=".jsonl")
    if cfg.source in generated.SOURCES:
        return generated.task_files(cfg)
    raise ConfigError(f"data.source={cfg.source} holds tokens, not text; use it for training, not as text input")


def raw_documents(cfg: DataConfig, files: Files) -> Iterator[RawDoc]:
    """The documents of `files`, reading deferred."""
    if cfg.source in ("jsonl", *generated.SOURCES):
        return _jsonl_documents(files, cfg.text_field if cfg.source == "jsonl" else "text",
                                named=cfg.source in generated.SOURCES)
    return _file_documents(files)


def parts(cfg: DataConfig, part_bytes: int) -> list[Files]:
    """The source's files in consecutive groups of about part_bytes; one group when max_bytes cuts
    the stream (the cut depends on every earlier document). The grouping follows from the file
    list alone, so every machine of a sharded preparation computes the same one."""
    files = input_files(cfg)
    if cfg.max_bytes > 0:
        return [files]
    groups: list[Files] = [[]]
    size = 0
    for name, path in files:
        if groups[-1] and size >= part_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, path))
        size += path.stat().st_size
    return groups


def on_the_fly_parts(cfg: DataConfig) -> list[Files]:
    """The parts of a source small enough for a run to prepare itself (its tokenizer and data cache)."""
    found = parts(cfg, PART_BYTES)
    size = sum(path.stat().st_size for files in found for _, path in files)
    if min(size, cfg.max_bytes or size) > ON_THE_FLY_MAX_BYTES:
        raise ConfigError(f"data.source={cfg.source} has {size / 2**30:.1f} GiB of input, more than a run "
                          f"prepares on the fly ({ON_THE_FLY_MAX_BYTES >> 30} GiB); run `mtp-prepare CONFIG OUT_DIR` "
                          "and train with data.source=prepared data.path=OUT_DIR")
    return found


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


def _stdlib_files() -> Files:
    """The standard library's own modules, less tests, vendored packages and `looks_like_code` rejects."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    kept = [p for p in found if looks_like_code(p.read_bytes())]
    return sorted((p.relative_to(root).as_posix(), p) for p in kept)


def _files(value: str, suffix: str = "") -> Files:
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


def _file_documents(files: Files) -> Iterator[RawDoc]:
    for name, path in files:
        yield name, path.stat().st_size, functools.partial(_read_prefix, path)


def _read_prefix(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _slice_prefix(data: bytes, limit: int) -> bytes:
    return data[:limit]


def _jsonl_documents(files: Files, field: str, named: bool = False) -> Iterator[RawDoc]:
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
