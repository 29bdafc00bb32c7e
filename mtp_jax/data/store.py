"""The prepared-data format: token streams in chunked TensorStore arrays, read lazily by window.

Why TensorStore zarr3 (not ArrayRecord + an index): a training window is a contiguous slice of a
split's token stream, so the natural store is one long array, not one record per document.
zarr3 with the `sharding_indexed` codec keeps files large (SHARD_TOKENS tokens each, few inodes
even at 200B tokens) while a read touches only the CHUNK_TOKENS-sized inner chunks it needs, and
TensorStore (already a dependency; Levanter's token cache uses it) reads many slices concurrently
from a local disk or GCS alike. ArrayRecord would need an index from token positions to records
and a record decode per window.

Layout of a prepared folder (`mtp-prepare`, see prepare.py):

    tokenizer/                 the tokenizer every part was encoded with
    prepare.json               what is being prepared: data config, tokenizer fingerprint, parts
    parts/00003-of-00008/      one slice of the input files, written by one process
        {train,val}/tokens     zarr3 uint16 (int32 when the vocabulary needs it): the packed
                               stream, every document followed by EOT
        {train,val}/doc_ends   zarr3 int64: the offset just past each document's EOT
        {train,val}_counts.npy token frequencies (the unigram baseline without a corpus scan)
        documents.jsonl        name, UTF-8 bytes and split of every document
        part.json              counts, written last: its presence marks a complete part
    data_manifest.json         the merged dataset (written last by the merge): per-split token,
                               document and byte totals and each part's token count

A window's segment ids follow from the EOT that ends every document (the tokenizers never emit
EOT inside one; preparation checks it against the document offsets), so reading a window is one
slice of one array, or two where it crosses a part boundary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorstore as ts

from mtp_jax.errors import UserError

MANIFEST_FILE = "data_manifest.json"
PART_FILE = "part.json"
PARTS_DIR = "parts"
SHARD_TOKENS = 1 << 22  # tokens per file (8 MiB as uint16): the writer buffers one shard per array
CHUNK_TOKENS = 1 << 15  # tokens per inner chunk: the read granularity
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk of any vocabulary up to 65536 (the paper's 32k included)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def _spec(path: Path, dtype: np.dtype | None = None) -> dict:
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if dtype is not None:
        spec["metadata"] = {
            "shape": [0],  # grown a shard at a time by the writer
            "data_type": {"<u2": "uint16", "<i4": "int32", "<i8": "int64"}[dtype.str],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [SHARD_TOKENS]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [CHUNK_TOKENS],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            }}],
        }
        spec["create"] = spec["delete_existing"] = True
    return spec


class ArrayWriter:
    """Appends to a 1-D zarr3 array in whole shards, so memory stays one shard whatever the length."""

    def __init__(self, path: Path, dtype: np.dtype):
        self._store = ts.open(_spec(path, dtype)).result()
        self._buffer = np.empty(SHARD_TOKENS, dtype)
        self._filled = 0
        self.length = 0

    def append(self, values: np.ndarray) -> None:
        while len(values):
            take = min(len(values), SHARD_TOKENS - self._filled)
            self._buffer[self._filled:self._filled + take] = values[:take]
            self._filled += take
            values = values[take:]
            if self._filled == SHARD_TOKENS:
                self._flush()

    def _flush(self) -> None:
        if not self._filled:
            return
        self._store = self._store.resize(exclusive_max=[self.length + self._filled], expand_only=True).result()
        self._store[self.length:self.length + self._filled].write(self._buffer[:self._filled]).result()
        self.length += self._filled
        self._filled = 0

    def close(self) -> int:
        self._flush()
        return self.length


def open_array(path: Path) -> Any:
    """A read-only handle; no cache pool, the OS page cache serves repeated reads."""
    return ts.open(_spec(path), read=True, context=ts.Context({"cache_pool": {"total_bytes_limit": 0}})).result()


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"data.path='{folder}' holds no {MANIFEST_FILE}; prepare it with `mtp-prepare CONFIG "
                        f"{folder}` (or finish a sharded preparation with `mtp-prepare CONFIG {folder} --merge`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"'{path}' is format {manifest.get('format')!r}, this version reads {FORMAT_VERSION}; "
                        "re-run mtp-prepare with this version")
    return manifest


def corpus_stats(folder: str | Path, vocab_size: int) -> dict:
    """Documents, tokens and UTF-8 bytes per split, val_bytes_per_token (for bits per byte) and the
    unigram baseline: all counted once at preparation, so none needs a corpus scan."""
    manifest = read_manifest(folder)
    return {**manifest["totals"], "val_bytes_per_token": manifest["val_bytes_per_token"],
            "invalid_utf8": manifest["invalid_utf8"], "unigram_baseline": _unigram_baseline(Path(folder), vocab_size)}


def _unigram_baseline(folder: Path, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on the val split of add-one-smoothed train token frequencies:
    the loss a model that ignores context would reach."""
    train = np.load(folder / "train_counts.npy")[:vocab_size] + 1.0
    val = np.load(folder / "val_counts.npy")[:vocab_size]
    log_p = np.log(train) - math.log(train.sum())
    return float(-(val * log_p).sum() / val.sum())


class SplitStream:
    """One split's token stream across all parts, read by position on demand.

    Holds only the manifest's part lengths; a part's array is opened on first touch. Pickles as
    paths, so Grain worker processes open their own handles.
    """

    def __init__(self, folder: str | Path, split: str):
        self.folder, self.split = Path(folder), split
        manifest = read_manifest(folder)
        self.parts = [p["name"] for p in manifest["parts"]]
        lengths = [p["tokens"][split] for p in manifest["parts"]]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.length = int(self.offsets[-1])

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

    def _array(self, part: int) -> Any:
        handles = self.__dict__.setdefault("_handles", {})
        if part not in handles:
            handles[part] = open_array(self.folder / PARTS_DIR / self.parts[part] / self.split / "tokens")
        return handles[part]

    def read_many(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """Tokens [a, b) for every range (clipped to the stream), all reads in flight at once."""
        pieces: list[list[Any]] = []
        for a, b in ranges:
            a, b = max(0, a), min(self.length, b)
            futures = []
            first = int(np.searchsorted(self.offsets, a, side="right")) - 1
            for part in range(max(first, 0), len(self.parts)):
                lo, hi = self.offsets[part], self.offsets[part + 1]
                if lo >= b:
                    break
                if hi > a and hi > lo:
                    futures.append(self._array(part)[max(a, lo) - lo:min(b, hi) - lo].read())
            pieces.append(futures)
        return [np.concatenate([f.result() for f in fs]) if fs else np.zeros(0, np.int32) for fs in pieces]

    def documents(self) -> Iterator[tuple[int, int]]:
        """(start, end) stream offsets of every document in order, its EOT at end - 1; the offsets
        are read a part at a time, so taking the first few documents reads little."""
        for part, name in enumerate(self.parts):
            ends = open_array(self.folder / PARTS_DIR / name / self.split / "doc_ends").read().result()
            ends = ends.astype(np.int64) + self.offsets[part]
            starts = np.concatenate([[self.offsets[part]], ends[:-1]])
            yield from zip(starts.tolist(), ends.tolist())
