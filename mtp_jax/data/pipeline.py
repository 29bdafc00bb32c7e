"""Token batches for training and evaluation, built on Grain.

Packing: each document is tokenized and followed by EOT; a split's documents form one token
stream, cut into windows of T + n tokens (T = train.seq_len, n = model.mtp_heads) with stride T.
The n extra tokens of window k are the first n of window k+1, so every token but the first is a
next-token target exactly once. `segment_ids` number the documents 1, 2, ... within each window
(a document's EOT is part of it) and are 0 on padding: the stream's end is padded with EOT. The
loss trains head i at position t only where segment_ids[t] == segment_ids[t+i] != 0, so no head
predicts across a document boundary or onto padding.

The tokenized streams are cached as .npy files under RUN_DIR/data_cache/<key>/ (memory-mapped, so
start-up is fast the second time and Grain workers share pages instead of copies).

Determinism: global batch s holds positions [s*B, (s+1)*B) of an endless stream of window
indices, each epoch a fresh Grain shuffle seeded by data.shuffle_seed; process p of P keeps rows
[p*B/P, (p+1)*B/P). The global batch therefore never depends on the number of processes, and the
iterator's whole state is the step.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import grain
import numpy as np

from mtp_jax.config import Config, ConfigError, DataConfig
from mtp_jax.data.sources import SPLITS, Corpus, prepared_tokenizer_dir, read_corpus, read_token_shards
from mtp_jax.data.tokenizer import META_FILE, ByteTokenizer, Tokenizer, expected_name, load_tokenizer, train_bpe

Batch = dict[str, np.ndarray]
CACHE_DIR = "data_cache"
CACHE_VERSION = 1  # bump when the cache layout changes
STATS_FILE = "stats.json"  # written last: its presence marks a complete cache
MANIFEST_FILE = "data_manifest.json"


def build_tokenizer(data_cfg: DataConfig, run_dir: str | Path, corpus: Corpus | None = None) -> Tokenizer:
    """The run's tokenizer: loaded from RUN_DIR/tokenizer/ if there, else made and saved there.

    BPE trains on the train split (`corpus` if the caller already read it); ArrayRecord shards
    bring the tokenizer that tokenized them.
    """
    folder = Path(run_dir) / "tokenizer"
    if (folder / META_FILE).is_file():
        tokenizer = load_tokenizer(folder)
    elif data_cfg.source == "arrayrecord":
        tokenizer = load_tokenizer(prepared_tokenizer_dir(data_cfg.path))
    elif data_cfg.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    else:
        tokenizer = train_bpe((corpus or read_corpus(data_cfg)).texts("train"), data_cfg.bpe_vocab_size)
    if tokenizer.name != expected_name(data_cfg):
        raise ConfigError(
            f"the tokenizer for {run_dir} is '{tokenizer.name}' but the config asks for '{expected_name(data_cfg)}'; "
            "set data.tokenizer/data.bpe_vocab_size to match or use a new directory"
        )
    if not (folder / META_FILE).is_file():
        tokenizer.save(folder)
    return tokenizer


def require_split(split: str, tokens: int, data_cfg: DataConfig) -> None:
    """Both splits need a target (two packed tokens): training needs one, held-out evaluation the other."""
    if tokens > 1:
        return
    fix = "raise data.val_fraction" if split == "val" else "lower data.val_fraction"
    raise ConfigError(f"the {split} split is empty with data.val_fraction={data_cfg.val_fraction} "
                      f"(data.max_bytes={data_cfg.max_bytes}); {fix} or add documents")


def pack(documents: list[np.ndarray], eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, starts): the documents each followed by EOT, and where each document starts."""
    eot = np.array([eot_id], np.int32)
    tokens = np.concatenate([part for doc in documents for part in (doc, eot)]) if documents else eot[:0]
    lengths = np.array([len(doc) + 1 for doc in documents], np.int64)
    return tokens.astype(np.int32), np.cumsum(lengths) - lengths


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Several processes may build the same cache on a shared disk: each renames a complete file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _write_json(path: Path, value: dict) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def _cache_folder(data_cfg: DataConfig, tokenizer: Tokenizer, run_dir: Path) -> Path:
    """A folder per (what was read, how it was tokenized); shuffling and workers do not change tokens."""
    fields = dataclasses.asdict(data_cfg)
    for ignored in ("shuffle_seed", "worker_count"):
        fields.pop(ignored)
    fields.update(tokenizer=tokenizer.name, vocab=tokenizer.vocab_size, version=CACHE_VERSION)
    key = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return run_dir / CACHE_DIR / key


def _read_documents(data_cfg: DataConfig, tokenizer: Tokenizer) -> tuple[dict, dict[str, int], dict]:
    """(token arrays per split, UTF-8 bytes per split, manifest) of the configured source."""
    if data_cfg.source == "arrayrecord":
        docs = read_token_shards(data_cfg.path)
        nbytes = {s: sum(len(tokenizer.decode(d).encode("utf-8")) for d in docs[s]) for s in SPLITS}
        return docs, nbytes, {"shards": data_cfg.path}
    corpus = read_corpus(data_cfg)
    manifest = corpus.manifest()
    return tokenize(corpus, tokenizer), {s: manifest["totals"][s]["bytes"] for s in SPLITS}, manifest


def tokenize(corpus: Corpus, tokenizer: Tokenizer) -> dict[str, list[np.ndarray]]:
    """Token ids of every document, per split (warning once about invalid UTF-8)."""
    corpus.warn_invalid_utf8()
    return {s: tokenizer.encode_batch(corpus.texts(s)) for s in SPLITS}


def _build_cache(data_cfg: DataConfig, tokenizer: Tokenizer, folder: Path, run_dir: Path) -> None:
    docs, nbytes, manifest = _read_documents(data_cfg, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {}
    for split in SPLITS:
        tokens, starts = pack(docs[split], tokenizer.eot_id)
        _atomic_write(folder / f"{split}_tokens.npy", lambda f: np.save(f, tokens))
        _atomic_write(folder / f"{split}_starts.npy", lambda f: np.save(f, starts))
        stats[split] = {"documents": len(docs[split]), "tokens": len(tokens), "bytes": nbytes[split]}
    val = stats["val"]
    stats["val_bytes_per_token"] = val["bytes"] / val["tokens"] if val["tokens"] else None
    stats["invalid_utf8"] = manifest.get("invalid_utf8", 0)
    manifest = {"source": data_cfg.source, "tokenizer": tokenizer.name, **manifest,
                "totals": {s: stats[s] for s in SPLITS}}
    _write_json(run_dir / MANIFEST_FILE, manifest)
    _write_json(folder / STATS_FILE, stats)


def _cache(cfg: Config, tokenizer: Tokenizer, run_dir: str | Path) -> Path:
    """The run's tokenized corpus, built on first use."""
    folder = _cache_folder(cfg.data, tokenizer, Path(run_dir))
    if not (folder / STATS_FILE).is_file():
        _build_cache(cfg.data, tokenizer, folder, Path(run_dir))
    stats = json.loads((folder / STATS_FILE).read_text())
    for split in SPLITS:
        require_split(split, stats[split]["tokens"], cfg.data)
    return folder


def corpus_stats(cfg: Config, tokenizer: Tokenizer, run_dir: str | Path) -> dict:
    """Documents, tokens and UTF-8 bytes per split, and val_bytes_per_token (for bits per byte)."""
    return json.loads((_cache(cfg, tokenizer, run_dir) / STATS_FILE).read_text())


def _load(folder: Path, split: str, part: str) -> np.ndarray:
    return np.load(folder / f"{split}_{part}.npy", mmap_mode="r")


class Windows:
    """The windows of one packed split, computed on demand from the memory-mapped stream.

    Pickles as file paths, so Grain worker processes map the cache instead of receiving a copy.
    """

    def __init__(self, folder: Path, split: str, seq_len: int, n: int, eot_id: int):
        self.folder, self.split, self.seq_len, self.n, self.eot_id = folder, split, seq_len, n, eot_id

    @functools.cached_property
    def tokens(self) -> np.ndarray:
        return _load(self.folder, self.split, "tokens")

    @functools.cached_property
    def starts(self) -> np.ndarray:
        return _load(self.folder, self.split, "starts")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("tokens", "starts")}

    def __len__(self) -> int:
        return max(0, -(-(len(self.tokens) - 1) // self.seq_len))

    def rows(self, ids: np.ndarray) -> Batch:
        """Windows `ids` as a batch; an id past the last window gives a padding row (segment 0)."""
        ids = np.asarray(ids, np.int64)
        length = len(self.tokens)
        pos = ids[:, None] * self.seq_len + np.arange(self.seq_len + self.n)
        valid = (pos < length) & (ids < len(self))[:, None]
        tokens = np.where(valid, self.tokens[np.minimum(pos, length - 1)], self.eot_id)
        doc = np.searchsorted(self.starts, pos, side="right")  # 1-based document number
        segments = np.where(valid, doc - doc[:, :1] + 1, 0)
        return {"tokens": tokens.astype(np.int32), "segment_ids": segments.astype(np.int32)}


def split_windows(cfg: Config, tokenizer: Tokenizer, run_dir: str | Path, split: str) -> Windows:
    """All windows of a split ('train' or 'val'), in stream order."""
    return Windows(_cache(cfg, tokenizer, run_dir), split, cfg.train.seq_len, cfg.model.mtp_heads, tokenizer.eot_id)


def local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """This process's rows of every global batch."""
    if batch_size % process_count:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by the {process_count} processes; "
                          f"use a multiple of {process_count}")
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


@dataclasses.dataclass(frozen=True)
class _LocalBatch:
    """Grain map: a global batch of window ids -> this process's rows (a class, so workers can pickle it)."""

    windows: Windows
    rows: slice

    def __call__(self, ids: np.ndarray) -> Batch:
        return self.windows.rows(ids[self.rows])


def _allow_unparsed_absl_flags() -> None:
    """Grain's worker processes read an absl flag, which raises unless flags were parsed, and only
    absl.app programs parse them (google/grain#1355); unparsed flags keep their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainIterator(Iterator[Batch]):
    """Endless local batches; `get_state()` is {'step': s}, so resuming works across changes of
    data.worker_count and of the process count."""

    def __init__(self, batches: grain.MapDataset, worker_count: int):
        self._batches, self._workers = batches, worker_count
        self._step, self._it = 0, None

    def __next__(self) -> Batch:
        if self._it is None:
            stream = self._batches[self._step:].to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
            if self._workers:
                _allow_unparsed_absl_flags()
                stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
            self._it = iter(stream)
        # A private copy: worker output lives in shared memory that is otherwise freed only at exit.
        batch = {k: np.array(v) for k, v in next(self._it).items()}
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        self.close()
        self._step = int(state["step"])

    def close(self) -> None:
        """Stops Grain's prefetch threads and worker processes (restarted lazily by next())."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


def make_train_iterator(cfg: Config, tokenizer: Tokenizer, run_dir: str | Path,
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """This process's rows of the global training batches: {'tokens', 'segment_ids'} int32 [B/P, T + n]."""
    rows = local_rows(cfg.train.batch_size, process_index, process_count)
    windows = split_windows(cfg, tokenizer, run_dir, "train")
    ids = grain.MapDataset.range(len(windows)).shuffle(seed=cfg.data.shuffle_seed).repeat()
    return TrainIterator(ids.batch(cfg.train.batch_size).map(_LocalBatch(windows, rows)), cfg.data.worker_count)


def make_eval_batches(cfg: Config, tokenizer: Tokenizer, run_dir: str | Path, num_batches: int,
                      process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """This process's rows of the first `num_batches` global batches of validation windows, in order.

    A short split gives fewer batches, at least one, padded with segment-0 rows.
    """
    rows = local_rows(cfg.train.batch_size, process_index, process_count)
    windows = split_windows(cfg, tokenizer, run_dir, "val")
    size = cfg.train.batch_size
    count = max(1, min(num_batches, len(windows) // size))
    return [windows.rows(np.arange(b * size, (b + 1) * size)[rows]) for b in range(count)]


def unigram_baseline(cfg: Config, tokenizer: Tokenizer, run_dir: str | Path) -> float:
    """Cross-entropy (nats/token) on the val split of add-one-smoothed train token frequencies:
    the loss a model that ignores context would reach."""
    folder = _cache(cfg, tokenizer, run_dir)
    counts = np.bincount(_load(folder, "train", "tokens"), minlength=tokenizer.vocab_size) + 1.0
    log_p = np.log(counts) - math.log(counts.sum())
    return float(-log_p[_load(folder, "val", "tokens")].mean())
