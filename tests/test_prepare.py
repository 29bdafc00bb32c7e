"""mtp-prepare at scale: lazy windows against the in-memory packer, sharded preparation merged,
an interrupted preparation resumed, and its bad inputs as one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtp_jax.config import ConfigError, load_config
from mtp_jax.data import build, pipeline, prepare, sources, store
from mtp_jax.data.tokenizer import build_tokenizer, train_bpe

T, N, B = 16, 3, 4
PART_BYTES = 300  # a few documents per part, so windows cross part boundaries


def write_corpus(folder: Path, count: int = 24, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta λ 数据 def return class import".split()
    for i in range(count):
        (folder / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) + "\n")


def yaml_for(tmp_path: Path, corpus: Path, tokenizer: str = "bpe") -> Path:
    path = tmp_path / f"exp_{corpus.name}.yaml"
    path.write_text(f"data:\n  source: files\n  path: {corpus}\n  val_fraction: 0.25\n  tokenizer: {tokenizer}\n"
                    f"  bpe_vocab_size: 300\nmodel:\n  mtp_heads: {N}\n  n_layers: 4\n"
                    f"train:\n  seq_len: {T}\n  batch_size: {B}\n")
    return path


def prepared_cfg(yaml: Path, out: Path):
    return load_config(yaml, ["data.source=prepared", f"data.path={out}"])


def rows(cfg, run_dir: Path, split: str) -> dict:
    tok = build_tokenizer(cfg.data, run_dir)
    windows = pipeline.split_windows(cfg, tok, build.dataset_folder(cfg, tok, run_dir), split)
    return windows.rows(np.arange(len(windows) + 2))  # two ids past the end: padding rows


def fail_line(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        prepare.main(list(argv))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus")
    return tmp_path / "corpus"


def test_lazy_windows_equal_the_packer_reference(tmp_path: Path, corpus: Path):
    yaml = yaml_for(tmp_path, corpus)
    out = tmp_path / "out"
    manifest = prepare.prepare(str(yaml), str(out), part_bytes=PART_BYTES, progress=False)
    assert len(manifest["parts"]) > 4
    cfg = prepared_cfg(yaml, out)
    tok = build_tokenizer(cfg.data, tmp_path / "run")
    text = sources.read_corpus(load_config(yaml).data)
    for split in sources.SPLITS:
        stream, starts = build.pack(tok.encode_batch(text.texts(split)), tok)
        got = rows(cfg, tmp_path / "run", split)
        count = len(got["tokens"]) - 2
        assert count == -(-(len(stream) - 1) // T)
        pos = np.arange(count + 2)[:, None] * T + np.arange(T + N)
        valid = (pos < len(stream)) & (np.arange(count + 2) < count)[:, None]
        doc = np.searchsorted(starts, pos, side="right")
        np.testing.assert_array_equal(got["tokens"], np.where(valid, stream[np.minimum(pos, len(stream) - 1)], tok.eot_id))
        np.testing.assert_array_equal(got["segment_ids"], np.where(valid, doc - doc[:, :1] + 1, 0))
        documents = list(store.SplitStream(out, split).documents())  # across the > 4 parts
        assert [a for a, _ in documents] == starts.tolist()
        assert [b for _, b in documents] == [*starts[1:].tolist(), len(stream)]
        assert manifest["totals"][split] == {"documents": len(starts), "tokens": len(stream),
                                             "bytes": sum(len(t.encode()) for t in text.texts(split))}
    ends = store.open_array(out / "parts" / manifest["parts"][0]["name"] / "train" / "doc_ends").read().result()
    tokens = store.open_array(out / "parts" / manifest["parts"][0]["name"] / "train" / "tokens").read().result()
    np.testing.assert_array_equal(np.flatnonzero(tokens == tok.eot_id) + 1, ends)


def test_shards_merged_equal_one_preparation(tmp_path: Path, corpus: Path, capsys):
    yaml = yaml_for(tmp_path, corpus)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert prepare.main([str(yaml), str(whole), "--workers", "2"]) == 0
    assert prepare.main([str(yaml), str(sharded), "--tokenizer-only", "--part-bytes", str(PART_BYTES)]) == 0
    for i in range(2):
        assert prepare.main([str(yaml), str(sharded), "--shard", f"{i}/2"]) == 0
    assert not (sharded / store.MANIFEST_FILE).exists()
    assert prepare.main([str(yaml), str(sharded), "--merge"]) == 0
    capsys.readouterr()
    one, merged = store.read_manifest(whole), store.read_manifest(sharded)
    assert len(one["parts"]) == 1 and len(merged["parts"]) > 4
    for key in ("totals", "fingerprint", "val_bytes_per_token", "invalid_utf8"):
        assert one[key] == merged[key], key
    for split in sources.SPLITS:
        np.testing.assert_array_equal(np.load(whole / f"{split}_counts.npy"), np.load(sharded / f"{split}_counts.npy"))
        a, b = rows(prepared_cfg(yaml, whole), tmp_path / "run_a", split), rows(prepared_cfg(yaml, sharded), tmp_path / "run_b", split)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_interrupted_preparation_resumes_at_its_part(tmp_path: Path, corpus: Path, capsys):
    yaml = yaml_for(tmp_path, corpus, tokenizer="bytes")
    out, marker = tmp_path / "out", tmp_path / "paused"
    env = {**os.environ, "MTP_PAUSE_AT": "prepare_part:2", "MTP_PAUSE_FILE": str(marker)}
    cmd = [sys.executable, "-m", "mtp_jax.data.prepare", str(yaml), str(out), "--part-bytes", str(PART_BYTES)]
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the preparation never reached part 2"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    parts = sorted((out / "parts").iterdir())
    assert [(p / store.PART_FILE).exists() for p in parts] == [True, True, False], "killed inside part 2"
    done = {p.name: (p / store.PART_FILE).stat().st_mtime_ns for p in parts[:2]}
    assert "--resume" in fail_line(capsys, str(yaml), str(out), "--part-bytes", str(PART_BYTES))
    assert prepare.main([str(yaml), str(out), "--resume"]) == 0
    assert {p: (out / "parts" / p / store.PART_FILE).stat().st_mtime_ns for p in done} == done, "finished parts kept"
    reference = tmp_path / "reference"
    prepare.prepare(str(yaml), str(reference), part_bytes=PART_BYTES, progress=False)
    assert store.read_manifest(out) == store.read_manifest(reference)
    for split in sources.SPLITS:
        a, b = rows(prepared_cfg(yaml, out), tmp_path / "run_a", split), rows(prepared_cfg(yaml, reference), tmp_path / "run_b", split)
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_bad_inputs_are_one_line(tmp_path: Path, corpus: Path, capsys):
    yaml = yaml_for(tmp_path, corpus)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    busy = fail_line(capsys, str(yaml), str(tmp_path / "busy"))
    assert "OUT_DIR" in busy and "is not empty" in busy
    out = tmp_path / "out"
    assert "--tokenizer-only" in fail_line(capsys, str(yaml), str(out), "--shard", "0/2")
    assert prepare.main([str(yaml), str(out), "--tokenizer-only", "--part-bytes", str(PART_BYTES)]) == 0
    assert prepare.main([str(yaml), str(out), "--shard", "0/2"]) == 0
    missing = fail_line(capsys, str(yaml), str(out), "--merge")
    assert "part 00001-of-" in missing and "--shard I/N with I = 1 mod N" in missing
    assert "needs 0 <= I < N" in fail_line(capsys, str(yaml), str(out), "--shard", "3/2")
    assert "data.val_fraction" in fail_line(capsys, str(yaml), str(out), "--shard", "1/2", "data.val_fraction=0.5")
    # data prepared with one BPE, a run directory holding another of the same name
    assert prepare.main([str(yaml), str(out), "--shard", "1/2"]) == 0 and prepare.main([str(yaml), str(out), "--merge"]) == 0
    train_bpe(["something else entirely " * 20], 300).save(tmp_path / "run" / "tokenizer")
    cfg = prepared_cfg(yaml, out)
    tok = build_tokenizer(cfg.data, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"was prepared with tokenizer bpe-300 \(\w+\) but .*run/tokenizer is bpe-300"):
        build.dataset_folder(cfg, tok, tmp_path / "run")
    with pytest.raises(ConfigError, match="holds no data_manifest.json.*mtp-prepare"):
        build.dataset_folder(prepared_cfg(yaml, tmp_path / "busy"), tok, tmp_path / "run2")
