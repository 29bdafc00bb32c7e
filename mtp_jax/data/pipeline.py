"""Token batches for training and evaluation, built on Grain, read lazily from the token store.

Packing: each document is tokenized and followed by EOT; a split's documents form one token
stream, cut into windows of T + n tokens (T = train.seq_len, n = model.mtp_heads) with stride T.
The n extra tokens of window k are the first n of window k+1, so every token but the first is a
next-token target exactly once. `segment_ids` number the documents 1, 2, ... within each window
(a document's EOT is part of it) and are 0 on padding: the stream's end is padded with EOT. The
loss trains head i at position t only where segment_ids[t] == segment_ids[t+i] != 0, so no head
predicts across a document boundary or onto padding. `build.pack` lays documents out so when the
store is written, and serves as the reference the lazy reader is tested against.

Where the stream lives: the last stage of the data layer reads a prepared token store (store.py)
in the folder its caller gives: the one `build.dataset_folder` resolves once per run (mtp-prepare's
OUT_DIR, or the run's on-the-fly cache), so reading windows never builds a store or checks it
against the config.

Determinism: global batch s holds positions [s*B, (s+1)*B) of an endless stream of window
indices, each epoch a fresh Grain shuffle seeded by data.shuffle_seed; process p of P keeps rows
[p*B/P, (p+1)*B/P) and reads only those windows. The global batch therefore never depends on the
number of processes, and the iterator's whole state is the step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import grain
import numpy as np

from mtp_jax.config import Config, ConfigError
from mtp_jax.data import store
from mtp_jax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


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


def split_windows(cfg: Config, tokenizer: Tokenizer, folder: str | Path, split: str) -> Windows:
    """All windows of a split ('train' or 'val') of the prepared store in `folder`, in stream order."""
    return Windows(store.SplitStream(folder, split), cfg.train.seq_len, cfg.model.mtp_heads, tokenizer.eot_id)


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


def make_train_iterator(cfg: Config, tokenizer: Tokenizer, folder: str | Path,
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """This process's rows of the global training batches: {'tokens', 'segment_ids'} int32 [B/P, T + n]."""
    rows = local_rows(cfg.train.batch_size, process_index, process_count)
    windows = split_windows(cfg, tokenizer, folder, "train")
    ids = grain.MapDataset.range(len(windows)).shuffle(seed=cfg.data.shuffle_seed).repeat()
    return TrainIterator(ids.batch(cfg.train.batch_size).map(_LocalBatch(windows, rows)), cfg.data.worker_count)


def make_eval_batches(cfg: Config, tokenizer: Tokenizer, folder: str | Path, num_batches: int,
                      process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """This process's rows of the first `num_batches` global batches of validation windows, in order.

    A short split gives fewer batches, at least one, padded with segment-0 rows.
    """
    rows = local_rows(cfg.train.batch_size, process_index, process_count)
    windows = split_windows(cfg, tokenizer, folder, "val")
    size = cfg.train.batch_size
    count = max(1, min(num_batches, len(windows) // size))
    return [windows.rows(np.arange(b * size, (b + 1) * size)[rows]) for b in range(count)]
