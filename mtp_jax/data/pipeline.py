"""Token batches for training and evaluation, built on Grain, read lazily from the token store.

Packing: each document is tokenized and followed by EOT; a split's documents form one token
stream, cut into windows of T + n tokens (T = train.seq_len, n = model.mtp_heads) with stride T.
The n extra tokens of window k are the first n of window k+1, so every token but the first is a
next-token target exactly once. `segment_ids` number the documents 1, 2, ... within each window
(a document's EOT is part of it) and are 0 on padding: the stream's end is padded with EOT. The
loss trains head i at position t only where segment_ids[t] == segment_ids[t+i] != 0, so no head
predicts across a document boundary or onto padding. `pack` builds that stream in memory and is
kept as the reference the lazy reader is tested against.

Where the stream lives: data.source=prepared reads mtp-prepare's OUT_DIR (store.py) and the run
directory holds no copy of it. The small on-the-fly sources (stdlib, files, jsonl) are prepared
once per run into RUN_DIR/data_cache/<key>/ in the same format; that cache is bounded by
ON_THE_FLY_MAX_BYTES of input (larger corpora must go through mtp-prepare) and may be deleted.

Determinism: global batch s holds positions [s*B, (s+1)*B) of an endless stream of window
indices, each epoch a fresh Grain shuffle seeded by data.shuffle_seed; process p of P keeps rows
[p*B/P, (p+1)*B/P) and reads only those windows. The global batch therefore never depends on the
number of processes, and the iterator's whole state is the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import grain
import numpy as np

from mtp_jax.config import Config, ConfigError, DataConfig
from mtp_jax.data import build, sources, store
from mtp_jax.data.store import SPLITS
from mtp_jax.data.tokenizer import META_FILE, ByteTokenizer, Tokenizer, expected_name, load_tokenizer

Batch = dict[str, np.ndarray]
CACHE_DIR = "data_cache"
CACHE_VERSION = 3  # 3: documents open with the tokenizer's start token; 2: the token store (older folders are ignored and may be deleted)
ON_THE_FLY_MAX_BYTES = 2 << 30  # input bytes an on-the-fly source may have; beyond, use mtp-prepare
MANIFEST_FILE = store.MANIFEST_FILE


def _on_the_fly_parts(data_cfg: DataConfig) -> list[build.Files]:
    files = sources.input_files(data_cfg)
    size = sum(path.stat().st_size for _, path in files)
    if min(size, data_cfg.max_bytes or size) > ON_THE_FLY_MAX_BYTES:
        raise ConfigError(f"data.source={data_cfg.source} has {size / 2**30:.1f} GiB of input, more than a run "
                          f"prepares on the fly ({ON_THE_FLY_MAX_BYTES >> 30} GiB); run `mtp-prepare CONFIG OUT_DIR` "
                          "and train with data.source=prepared data.path=OUT_DIR")
    return build.plan_parts(files, build.PART_BYTES, data_cfg.max_bytes)


def build_tokenizer(data_cfg: DataConfig, run_dir: str | Path) -> Tokenizer:
    """The run's tokenizer: loaded from RUN_DIR/tokenizer/ if there, else made and saved there.

    Prepared data brings the tokenizer that encoded it; BPE trains on a bounded sample of the
    train split (data.bpe_train_chars).
    """
    folder = Path(run_dir) / "tokenizer"
    if (folder / META_FILE).is_file():
        tokenizer = load_tokenizer(folder)
    elif data_cfg.source == "prepared":
        tokenizer = load_tokenizer(Path(data_cfg.path) / "tokenizer")
    elif data_cfg.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    else:
        tokenizer = build.make_tokenizer(data_cfg, _on_the_fly_parts(data_cfg))
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


def _cache_folder(data_cfg: DataConfig, tokenizer: Tokenizer, run_dir: Path) -> Path:
    """A folder per (what was read, how it was tokenized); shuffling and workers do not change tokens."""
    fields = build.data_fields(data_cfg)
    fields.update(tokenizer=tokenizer.fingerprint, vocab=tokenizer.vocab_size, version=CACHE_VERSION)
    key = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return run_dir / CACHE_DIR / key


def _build_cache(data_cfg: DataConfig, tokenizer: Tokenizer, folder: Path) -> None:
    """Prepares into a private folder and renames it into place: processes sharing a disk may race."""
    parts = _on_the_fly_parts(data_cfg)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plan = build.create(tmp, data_cfg, tokenizer, parts, build.PART_BYTES)
        build.write_parts(tmp, data_cfg, parts, plan, tokenizer, (0, 1), workers=0, progress=False)
        build.merge(tmp, plan, lambda split, tokens: require_split(split, tokens, data_cfg))
    except BaseException:  # a full disk, Ctrl-C: nothing half-built stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first: same tokens
        shutil.rmtree(tmp)


def dataset_folder(cfg: Config, tokenizer: Tokenizer, run_dir: str | Path) -> Path:
    """The prepared folder a run reads: data.path, or the on-the-fly cache (built on first use).
    Records its manifest as RUN_DIR/data_manifest.json."""
    run_dir = Path(run_dir)
    if cfg.data.source == "prepared":
        folder = Path(cfg.data.path)
        manifest = store.read_manifest(folder)
        if manifest["fingerprint"] != tokenizer.fingerprint:
            raise ConfigError(f"data.path='{folder}' was prepared with tokenizer {manifest['tokenizer']} "
                              f"({manifest['fingerprint']}) but {run_dir / 'tokenizer'} is {tokenizer.name} "
                              f"({tokenizer.fingerprint}); use a new run directory or data prepared with this tokenizer")
    else:
        folder = _cache_folder(cfg.data, tokenizer, run_dir)
        if not (folder / MANIFEST_FILE).is_file():
            _build_cache(cfg.data, tokenizer, folder)
        manifest = store.read_manifest(folder)
    for split in SPLITS:
        require_split(split, manifest["totals"][split]["tokens"], cfg.data)
    if not (run_dir / MANIFEST_FILE).is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"source": cfg.data.source, "path": cfg.data.path, **manifest}
        if cfg.data.source != "prepared":  # a small corpus: list its documents, as the run trained on them
            record["documents"] = build.document_listing(folder)
        store.write_json(run_dir / MANIFEST_FILE, record)
    return folder


def corpus_stats(cfg: Config, tokenizer: Tokenizer, run_dir: str | Path) -> dict:
    """Documents, tokens and UTF-8 bytes per split, and val_bytes_per_token (for bits per byte),
    counted once at preparation."""
    manifest = store.read_manifest(dataset_folder(cfg, tokenizer, run_dir))
    return {**manifest["totals"], "val_bytes_per_token": manifest["val_bytes_per_token"],
            "invalid_utf8": manifest["invalid_utf8"]}


class Windows:
    """The windows of one split, each read on demand as one slice of the token stream.

    Pickles as paths and lengths, so Grain worker processes open their own readers.
    """

    def __init__(self, stream: store.SplitStream, seq_len: int, n: int, eot_id: int):
        self.stream, self.seq_len, self.n, self.eot_id = stream, seq_len, n, eot_id

    def __len__(self) -> int:
        return max(0, -(-(self.stream.length - 1) // self.seq_len))

    def rows(self, ids: np.ndarray) -> Batch:
        """Windows `ids` as a batch; an id past the last window gives a padding row (segment 0)."""
        ids = np.asarray(ids, np.int64)
        width = self.seq_len + self.n
        starts = np.where(ids < len(self), ids * self.seq_len, self.stream.length)
        tokens = np.full((len(ids), width), self.eot_id, np.int32)
        valid = np.zeros((len(ids), width), bool)
        for row, piece in enumerate(self.stream.read_many([(int(a), int(a) + width) for a in starts])):
            tokens[row, :len(piece)] = piece
            valid[row, :len(piece)] = True
        # A new document starts right after each EOT: count the EOTs before every position.
        ended = np.cumsum(tokens == self.eot_id, axis=1) - (tokens == self.eot_id)
        segments = np.where(valid, ended + 1, 0)
        return {"tokens": tokens, "segment_ids": segments.astype(np.int32)}


def split_windows(cfg: Config, tokenizer: Tokenizer, run_dir: str | Path, split: str) -> Windows:
    """All windows of a split ('train' or 'val'), in stream order."""
    stream = store.SplitStream(dataset_folder(cfg, tokenizer, run_dir), split)
    return Windows(stream, cfg.train.seq_len, cfg.model.mtp_heads, tokenizer.eot_id)


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
    the loss a model that ignores context would reach (from the counts made at preparation)."""
    folder = dataset_folder(cfg, tokenizer, run_dir)
    train = store.SplitStream(folder, "train").unigram_counts()[: tokenizer.vocab_size] + 1.0
    val = store.SplitStream(folder, "val").unigram_counts()[: tokenizer.vocab_size]
    log_p = np.log(train) - math.log(train.sum())
    return float(-(val * log_p).sum() / val.sum())
