"""Writing the prepared token store (store.py) from a text source, in bounded memory; and the
store a run reads: mtp-prepare's OUT_DIR, or one prepared on the fly into the run directory.

The third stage of the data layer: documents come from sources.py, tokens from the tokenizer
(tokenizer.py); the windows (pipeline.py) read what is written here. The input is cut into parts
(`sources.parts`); the plan (which files form part k of K) follows from the file list alone, so
any machine computes the same one. A part streams its documents in batches of about BATCH_BYTES
through the tokenizer (in `workers` processes, results kept in input order) into shard-buffered
arrays: memory is a few batches plus one shard per array, whatever the corpus size. Parts are the
unit of parallelism across machines (`--shard I/N` takes parts k = I mod N) and of resumption (a
part without part.json is redone). `merge` checks that all K parts are there and writes the manifest.

A run on data.source=prepared reads data.path and holds no copy of it. The small on-the-fly
sources (stdlib, files, jsonl, the generated tasks) are prepared once per run into
RUN_DIR/data_cache/<key>/ in the same format; that cache is bounded by
`sources.ON_THE_FLY_MAX_BYTES` of input (larger corpora must go through mtp-prepare) and may be deleted.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from mtp_jax.atomic import write_json
from mtp_jax.config import Config, ConfigError, DataConfig
from mtp_jax.data import sources, store
from mtp_jax.data.sources import SPLITS, Files
from mtp_jax.data.tokenizer import Tokenizer, document_start, load_tokenizer
from mtp_jax.errors import UserError
from mtp_jax.hooks import pause_point

PLAN_FILE = "prepare.json"
BATCH_BYTES = 4 << 20  # input bytes per tokenizer batch
IGNORED_FIELDS = ("shuffle_seed", "worker_count")  # data fields that do not change the tokens
CACHE_DIR = "data_cache"
CACHE_VERSION = 3  # 3: documents open with the tokenizer's start token; 2: the token store (older folders are ignored and may be deleted)


def data_fields(data_cfg: DataConfig) -> dict:
    fields = dataclasses.asdict(data_cfg)
    for key in IGNORED_FIELDS:
        fields.pop(key)
    return fields


def part_name(k: int, count: int) -> str:
    return f"{k:05d}-of-{count:05d}"


def _files_digest(files: Files) -> str:
    return hashlib.sha1("\n".join(name for name, _ in files).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def create(out: Path, data_cfg: DataConfig, tokenizer: Tokenizer, parts: list[Files], part_bytes: int) -> dict:
    """Starts a preparation: the tokenizer and the plan every part and the merge check against."""
    tokenizer.save(out / "tokenizer")
    plan = {"format": store.FORMAT_VERSION, "data": data_fields(data_cfg), "tokenizer": tokenizer.name,
            "fingerprint": tokenizer.fingerprint, "parts": len(parts), "part_bytes": part_bytes,
            "part_files": [_files_digest(p) for p in parts]}
    write_json(out / PLAN_FILE, plan)
    return plan


# ---- encoding (runs in worker processes when workers > 0) ----

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode_in_worker(batch: list[sources.Cut], val_fraction: float) -> dict:
    assert _worker_tokenizer is not None
    return encode(batch, val_fraction, _worker_tokenizer)


def pack(documents: list[np.ndarray], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, starts): each document as the tokenizer's convention lays it out ([BOS] + ids +
    EOT), and where each starts. A document ends at its EOT, so segment ids follow from the EOTs."""
    start = np.array(document_start(tokenizer), np.int32)
    eot = np.array([tokenizer.eot_id], np.int32)
    tokens = np.concatenate([part for doc in documents for part in (start, doc, eot)]) if documents else eot[:0]
    lengths = np.array([len(start) + len(doc) + 1 for doc in documents], np.int64)
    return tokens.astype(np.int32), np.cumsum(lengths) - lengths


def encode(batch: list[sources.Cut], val_fraction: float, tokenizer: Tokenizer) -> dict:
    """Per split: the packed tokens (`pack`), document lengths, bytes and token
    counts; plus the document records and the invalid-UTF-8 count."""
    docs = [sources.make_document(c, val_fraction) for c in batch]
    dtype = store.token_dtype(tokenizer.vocab_size)
    out: dict[str, Any] = {"records": [{"name": d.name, "bytes": d.nbytes, "split": d.split} for d in docs],
                           "invalid_utf8": sum(not d.valid_utf8 for d in docs)}
    for split in SPLITS:
        ids = tokenizer.encode_batch([d.text for d in docs if d.split == split])
        tokens, starts = pack(ids, tokenizer)
        lengths = np.diff(np.append(starts, len(tokens)))
        assert np.count_nonzero(tokens == tokenizer.eot_id) == len(ids), "EOT inside a document breaks segment ids"
        out[split] = {"tokens": tokens.astype(dtype), "lengths": lengths,
                      "bytes": sum(d.nbytes for d in docs if d.split == split),
                      "counts": np.bincount(tokens, minlength=tokenizer.vocab_size)}
    return out


def _batches(cuts: Iterable[sources.Cut]) -> Iterator[list[sources.Cut]]:
    batch: list[sources.Cut] = []
    size = 0
    for cut in cuts:
        batch.append(cut)
        size += cut[1]
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class Encoder:
    """Encodes batches in order, in-process or in a pool with a bounded number in flight."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_dir: Path, val_fraction: float, workers: int):
        self.tokenizer, self.val_fraction, self.workers = tokenizer, val_fraction, workers
        self._pool = (multiprocessing.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_dir),))
                      if workers > 0 else None)

    def imap(self, batches: Iterable[list[sources.Cut]]) -> Iterator[dict]:
        if self._pool is None:
            yield from (encode(b, self.val_fraction, self.tokenizer) for b in batches)
            return
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(self._pool.apply_async(_encode_in_worker, (batch, self.val_fraction)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()


# ---- parts ----

def write_part(folder: Path, data_cfg: DataConfig, files: Files, encoder: Encoder, plan: dict,
               on_tokens: Callable[[int], None]) -> dict:
    """Writes one part from scratch; part.json last."""
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted attempt
    folder.mkdir(parents=True)
    dtype = store.token_dtype(encoder.tokenizer.vocab_size)
    tokens = {s: store.ArrayWriter(folder / s / "tokens", dtype) for s in SPLITS}
    ends = {s: store.ArrayWriter(folder / s / "doc_ends", np.dtype("<i8")) for s in SPLITS}
    counts = {s: np.zeros(encoder.tokenizer.vocab_size, np.int64) for s in SPLITS}
    totals = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    invalid = 0
    with open(folder / "documents.jsonl", "w") as listing:
        for batch in encoder.imap(_batches(sources.cuts(data_cfg, files))):
            invalid += batch["invalid_utf8"]
            listing.writelines(json.dumps(r) + "\n" for r in batch["records"])
            for s in SPLITS:
                part, total = batch[s], totals[s]
                tokens[s].append(part["tokens"])
                ends[s].append(total["tokens"] + np.cumsum(part["lengths"]))
                counts[s] += part["counts"]
                total["documents"] += len(part["lengths"])
                total["tokens"] += len(part["tokens"])
                total["bytes"] += part["bytes"]
                on_tokens(len(part["tokens"]))
    for s in SPLITS:
        assert tokens[s].close() == totals[s]["tokens"] and ends[s].close() == totals[s]["documents"]
        np.save(folder / f"{s}_counts.npy", counts[s])
    pause_point("prepare_part", int(folder.name.split("-")[0]))  # tests stop a preparation mid-part here
    record = {"name": folder.name, "fingerprint": plan["fingerprint"], "files": _files_digest(files),
              "totals": totals, "invalid_utf8": invalid}
    write_json(folder / store.PART_FILE, record)
    return record


def write_parts(out: Path, data_cfg: DataConfig, parts: list[Files], plan: dict, tokenizer: Tokenizer,
                shard: tuple[int, int], workers: int, progress: bool) -> list[int]:
    """Writes the parts k = I mod N not already complete; returns the ones it wrote."""
    from tqdm import tqdm

    index, count = shard
    if len(parts) != plan["parts"]:
        raise UserError(f"the input files now make {len(parts)} parts, not the {plan['parts']} '{out}' was started "
                        "with; restore them or prepare into a new folder")
    mine = [k for k in range(len(parts)) if k % count == index]
    todo = [k for k in mine if not (out / store.PARTS_DIR / part_name(k, len(parts)) / store.PART_FILE).is_file()]
    bar = tqdm(desc=f"prepare {index}/{count}", unit="tok", unit_scale=True, disable=not progress, mininterval=1.0)
    encoder = Encoder(tokenizer, out / "tokenizer", data_cfg.val_fraction, workers)
    try:
        for k in todo:
            if _files_digest(parts[k]) != plan["part_files"][k]:
                raise UserError(f"the input files of part {k} changed since '{out}' was started; "
                                "restore them or prepare into a new folder")
            write_part(out / store.PARTS_DIR / part_name(k, len(parts)), data_cfg, parts[k], encoder, plan, bar.update)
    finally:
        encoder.close()
        bar.close()
    return todo


def require_split(split: str, tokens: int, data_cfg: DataConfig) -> None:
    """Both splits need a target (two packed tokens): training needs one, held-out evaluation the other."""
    if tokens > 1:
        return
    fix = "raise data.val_fraction" if split == "val" else "lower data.val_fraction"
    raise ConfigError(f"the {split} split is empty with data.val_fraction={data_cfg.val_fraction} "
                      f"(data.max_bytes={data_cfg.max_bytes}); {fix} or add documents")


def merge(out: Path, plan: dict, data_cfg: DataConfig) -> dict:
    """Checks that every part is there and from this tokenizer; writes the counts and the manifest."""
    records = []
    for k in range(plan["parts"]):
        path = out / store.PARTS_DIR / part_name(k, plan["parts"]) / store.PART_FILE
        if not path.is_file():
            raise UserError(f"part {part_name(k, plan['parts'])} of '{out}' is missing or unfinished; re-run the "
                            f"shard that owns it (--shard I/N with I = {k} mod N, plus --resume), then --merge")
        record = json.loads(path.read_text())
        if record["fingerprint"] != plan["fingerprint"]:
            raise UserError(f"part {record['name']} of '{out}' was encoded with tokenizer {record['fingerprint']}, "
                            f"not {plan['fingerprint']} of {out / 'tokenizer'}; delete that part and re-run its shard")
        records.append(record)
    totals = {s: {key: sum(r["totals"][s][key] for r in records) for key in ("documents", "tokens", "bytes")}
              for s in SPLITS}
    for s in SPLITS:
        require_split(s, totals[s]["tokens"], data_cfg)
        counts = sum(np.load(out / store.PARTS_DIR / r["name"] / f"{s}_counts.npy") for r in records)
        np.save(out / f"{s}_counts.npy", counts)
    invalid = sum(r["invalid_utf8"] for r in records)
    if invalid:  # one line, so binary or mis-encoded files in a text corpus do not go unnoticed
        documents = sum(t["documents"] for t in totals.values())
        print(f"warning: {invalid} of {documents} documents were not valid UTF-8; decoded with replacement",
              file=sys.stderr, flush=True)
    val = totals["val"]
    manifest = {"format": store.FORMAT_VERSION, "tokenizer": plan["tokenizer"], "fingerprint": plan["fingerprint"],
                "data": plan["data"], "totals": totals, "invalid_utf8": invalid,
                "val_bytes_per_token": val["bytes"] / val["tokens"],
                "parts": [{"name": r["name"], "tokens": {s: r["totals"][s]["tokens"] for s in SPLITS}} for r in records]}
    write_json(out / store.MANIFEST_FILE, manifest)
    return manifest


def document_listing(folder: Path, manifest: dict) -> list[dict]:
    """Every document's name, bytes and split, in stream order (for a small corpus's run manifest)."""
    return [json.loads(line) for p in manifest["parts"]
            for line in (folder / store.PARTS_DIR / p["name"] / "documents.jsonl").open()]


# ---- the store a run reads ----

def _cache_folder(data_cfg: DataConfig, tokenizer: Tokenizer, run_dir: Path) -> Path:
    """A folder per (what was read, how it was tokenized); shuffling and workers do not change tokens."""
    fields = data_fields(data_cfg)
    fields.update(tokenizer=tokenizer.fingerprint, vocab=tokenizer.vocab_size, version=CACHE_VERSION)
    key = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return run_dir / CACHE_DIR / key


def _build_cache(data_cfg: DataConfig, tokenizer: Tokenizer, folder: Path) -> None:
    """Prepares into a private folder and renames it into place: processes sharing a disk may race."""
    parts = sources.on_the_fly_parts(data_cfg)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plan = create(tmp, data_cfg, tokenizer, parts, sources.PART_BYTES)
        write_parts(tmp, data_cfg, parts, plan, tokenizer, (0, 1), workers=0, progress=False)
        merge(tmp, plan, data_cfg)
    except BaseException:  # a full disk, Ctrl-C: nothing half-built stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first: same tokens
        shutil.rmtree(tmp)


def dataset_folder(cfg: Config, tokenizer: Tokenizer, run_dir: str | Path) -> Path:
    """The prepared folder a run reads: data.path, or the on-the-fly cache (built on first use).
    Records its manifest as RUN_DIR/data_manifest.json. A run resolves it once and hands the folder
    to what reads it (pipeline.py's windows, store.py's counts): one build, one check per run."""
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
        if not (folder / store.MANIFEST_FILE).is_file():
            _build_cache(cfg.data, tokenizer, folder)
        manifest = store.read_manifest(folder)
    for split in SPLITS:
        require_split(split, manifest["totals"][split]["tokens"], cfg.data)
    if not (run_dir / store.MANIFEST_FILE).is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"source": cfg.data.source, "path": cfg.data.path, **manifest}
        if cfg.data.source != "prepared":  # a small corpus: list its documents, as the run trained on them
            record["documents"] = document_listing(folder, manifest)
        write_json(run_dir / store.MANIFEST_FILE, record)
    return folder
