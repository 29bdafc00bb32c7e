"""The data pipeline: tokenizers, sources, packing into windows, masks, multi-host batches,
resumption, error messages and prepared data, on small corpora in tmp_path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mtp_jax.config import ConfigError, load_config
from mtp_jax.data import build, pipeline, prepare, sources, store
from mtp_jax.data.tokenizer import ByteTokenizer, build_tokenizer, load_tokenizer, train_bpe
from mtp_jax.loss import mask_for_head

T, N, B = 16, 3, 4  # seq_len, mtp heads, global batch
WORDS = "alpha beta gamma delta λ 数据 def return class import".split()


def write_corpus(folder: Path, count: int = 30) -> list[str]:
    """`count` files of varied length (some shorter than a window, some spanning several)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    texts = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) + "\n"
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


def config(tmp_path: Path, *overrides: str):
    base = ["data.source=files", f"data.path={tmp_path / 'corpus'}", "data.val_fraction=0.25",
            f"train.seq_len={T}", f"model.mtp_heads={N}", f"train.batch_size={B}", "model.n_layers=4"]
    return load_config(None, base + list(overrides))


@pytest.fixture
def corpus(tmp_path: Path) -> list[str]:
    return write_corpus(tmp_path / "corpus")


def all_rows(cfg, tokenizer, run_dir, split):
    windows = pipeline.split_windows(cfg, tokenizer, build.dataset_folder(cfg, tokenizer, run_dir), split)
    return windows.rows(np.arange(len(windows)))


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, 数据 ✓\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.decode(ids + [tok.eot_id, 300]) == text
    assert [a.tolist() for a in tok.encode_batch([text, ""])] == [ids, []]


def test_bpe_train_save_load_round_trip(tmp_path: Path):
    texts = [" ".join(WORDS * 3) + f" line {i}\n" for i in range(50)]
    tok = train_bpe(texts, 300)
    assert tok.vocab_size <= 300 and tok.name == "bpe-300"
    sample = "def gamma(λ): return 数据 <|endoftext|> unseen ✓"
    ids = tok.encode(sample)
    assert tok.eot_id not in ids, "the literal special-token text stays text"
    assert tok.decode(ids + [tok.eot_id, 10_000]) == sample
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2, "merges compress the training text"
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert (loaded.name, loaded.vocab_size, loaded.eot_id) == (tok.name, tok.vocab_size, tok.eot_id)
    assert loaded.encode(sample) == ids


def test_stdlib_source_is_deterministic_and_split_stable():
    small = load_config(None, ["data.max_bytes=200000", "data.val_fraction=0.2"]).data
    first, again = sources.read_corpus(small), sources.read_corpus(small)
    names = [d.name for d in first.documents]
    assert names == [d.name for d in again.documents] == sorted(names)
    assert first.texts("train") == again.texts("train")
    assert not any(part in ("test", "tests", "site-packages") for n in names for part in n.split("/")[:-1])
    assert sum(d.nbytes for d in first.documents) <= 200000
    larger = sources.read_corpus(load_config(None, ["data.max_bytes=400000", "data.val_fraction=0.2"]).data)
    splits = {d.name: d.split for d in larger.documents}
    assert all(splits[d.name] == d.split for d in first.documents[:-1]), "a document keeps its split as the corpus grows"
    assert {d.split for d in larger.documents} == {"train", "val"}


def test_packing_invariants_and_masks(tmp_path: Path, corpus: list[str]):
    cfg, tok = config(tmp_path), ByteTokenizer()
    docs = sources.read_corpus(cfg.data)
    for split in sources.SPLITS:
        ids = [np.append(d, tok.eot_id) for d in tok.encode_batch(docs.texts(split))]
        stream, doc_of = np.concatenate(ids), np.repeat(np.arange(len(ids)), [len(d) for d in ids])
        rows = all_rows(cfg, tok, tmp_path / "run", split)
        toks, segs = rows["tokens"], rows["segment_ids"]
        k = len(toks)
        assert toks.shape == segs.shape == (k, T + N) and toks.dtype == segs.dtype == np.int32
        assert k == math.ceil((len(stream) - 1) / T)
        # stride T: the n extra tokens of window j are the first n of window j+1
        np.testing.assert_array_equal(toks[:-1, T:], toks[1:, :N])
        # every token but the first is a next-token target exactly once
        valid = segs != 0
        np.testing.assert_array_equal(toks[:, :T][valid[:, :T]], stream[: valid[:, :T].sum()])
        assert valid[:, 1 : T + 1].sum() == len(stream) - 1
        # padding only at the stream's end: EOT tokens, segment 0
        assert (toks[~valid] == tok.eot_id).all() and valid[:-2].all()
        # segments: 1, 2, ... per window; a new one starts right after each EOT
        pos = np.arange(k)[:, None] * T + np.arange(T + N)
        truth = np.where(valid, doc_of[np.minimum(pos, len(stream) - 1)], -1)
        assert (segs[:, 0] == 1).all()
        np.testing.assert_array_equal(np.where(valid, segs, 0), np.where(valid, truth - truth[:, :1] + 1, 0))
        ends = np.flatnonzero(np.diff(np.append(doc_of, -1)))
        assert (stream[ends] == tok.eot_id).all(), "each document ends with its own EOT"
        # the trainer's masks: head i at t only within one document, never onto padding
        for i in range(1, N + 1):
            mask = np.asarray(mask_for_head(segs, i, T))
            np.testing.assert_array_equal(mask, (truth[:, :T] == truth[:, i : T + i]) & (truth[:, :T] >= 0) & (truth[:, i : T + i] >= 0))


def test_global_batch_does_not_depend_on_process_count(tmp_path: Path, corpus: list[str]):
    cfg, tok = config(tmp_path), ByteTokenizer()
    data = build.dataset_folder(cfg, tok, tmp_path / "run")
    single = pipeline.make_train_iterator(cfg, tok, data)
    halves = [pipeline.make_train_iterator(cfg, tok, data, p, 2) for p in range(2)]
    for _ in range(6):
        whole, parts = next(single), [next(h) for h in halves]
        assert whole["tokens"].shape == (B, T + N) and parts[0]["tokens"].shape == (B // 2, T + N)
        for key in ("tokens", "segment_ids"):
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    with pytest.raises(ConfigError, match="batch_size=4 is not divisible"):
        pipeline.make_train_iterator(cfg, tok, data, 0, 3)


def test_resume_yields_exactly_the_uninterrupted_batches(tmp_path: Path, corpus: list[str]):
    cfg, tok = config(tmp_path, "data.shuffle_seed=7"), ByteTokenizer()
    data = build.dataset_folder(cfg, tok, tmp_path / "run")
    it = pipeline.make_train_iterator(cfg, tok, data)
    epoch = len(pipeline.split_windows(cfg, tok, data, "train"))
    steps = 2 * epoch // B + 2  # crosses epoch boundaries
    saved, reference = None, []
    for step in range(steps):
        reference.append(next(it))
        if step == 2:
            saved = json.loads(json.dumps(it.get_state()))
    resumed = pipeline.make_train_iterator(cfg, tok, data)
    resumed.set_state(saved)
    for want in reference[3:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    seen = np.concatenate([b["tokens"][:, 0] for b in reference])
    assert len(np.unique(seen)) > 1 and not np.array_equal(reference[0]["tokens"], reference[epoch // B + 1]["tokens"])


def test_grain_workers_give_the_same_batches(tmp_path: Path, corpus: list[str]):
    cfg, tok = config(tmp_path), ByteTokenizer()
    data = build.dataset_folder(cfg, tok, tmp_path / "run")
    reference = pipeline.make_train_iterator(cfg, tok, data)
    want = [next(reference) for _ in range(4)]
    workers = pipeline.make_train_iterator(config(tmp_path, "data.worker_count=1"), tok, data)
    workers.set_state({"step": 2})  # a state saved in-process resumes with workers
    try:
        for expected in want[2:]:
            np.testing.assert_array_equal(next(workers)["tokens"], expected["tokens"])
    finally:
        workers.close()


def test_eval_batches_are_fixed_padded_and_need_a_val_split(tmp_path: Path, corpus: list[str]):
    cfg, tok = config(tmp_path), ByteTokenizer()
    windows = all_rows(cfg, tok, tmp_path / "run", "val")["tokens"]
    assert len(windows) >= 2 * B, "the fixture corpus should give at least two full val batches"
    data = build.dataset_folder(cfg, tok, tmp_path / "run")
    batches = pipeline.make_eval_batches(cfg, tok, data, 2)
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches]), windows[: 2 * B])
    halves = [pipeline.make_eval_batches(cfg, tok, data, 2, p, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h[1]["tokens"] for h in halves]), batches[1]["tokens"])
    assert len(pipeline.make_eval_batches(cfg, tok, data, 1000)) == len(windows) // B
    wide = config(tmp_path, "train.batch_size=64")
    (padded,) = pipeline.make_eval_batches(wide, tok, data, 3)
    assert padded["tokens"].shape == (64, T + N) and (padded["segment_ids"][len(windows):] == 0).all()
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "a.txt").write_text("only one document")
    lone = config(tmp_path, f"data.path={tmp_path / 'single'}", "data.val_fraction=0.01")
    with pytest.raises(ConfigError, match="val split is empty.*raise data.val_fraction"):
        build.dataset_folder(lone, tok, tmp_path / "run_lone")


def test_jsonl_source_and_bad_lines(tmp_path: Path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"document {i}", "id": i}) for i in range(5)) + "\n")
    docs = sources.read_corpus(load_config(None, ["data.source=jsonl", f"data.path={good}"]).data)
    assert [d.text for d in docs.documents] == [f"document {i}" for i in range(5)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ConfigError, match=f"{bad}:2 is not valid JSON"):
        sources.read_corpus(load_config(None, ["data.source=jsonl", f"data.path={bad}"]).data)
    with pytest.raises(ConfigError, match=f"{good}:1 has no string field 'body'"):
        sources.read_corpus(load_config(None, ["data.source=jsonl", f"data.path={good}", "data.text_field=body"]).data)


@pytest.mark.parametrize("path, message", [
    ("missing", "does not exist"), ("empty", "is a folder without any files"), ("empty/*.txt", "matches no files"),
])
def test_missing_or_empty_paths_are_config_errors(tmp_path: Path, path: str, message: str):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=message):
        sources.read_corpus(load_config(None, ["data.source=files", f"data.path={tmp_path / path}"]).data)


def test_invalid_utf8_is_counted_and_reported(tmp_path: Path, corpus: list[str], capsys):
    (tmp_path / "corpus" / "binary.txt").write_bytes(b"abc\xff\xfe def")
    cfg, tok = config(tmp_path), ByteTokenizer()
    assert store.corpus_stats(build.dataset_folder(cfg, tok, tmp_path / "run"), tok.vocab_size)["invalid_utf8"] == 1
    assert "warning: 1 of 31 documents were not valid UTF-8; decoded with replacement" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "run" / "data_manifest.json").read_text())
    assert len(manifest["documents"]) == 31 and manifest["totals"]["val"]["tokens"] > 0
    assert manifest["documents"][0] == {"name": "binary.txt", "bytes": len("abc\ufffd\ufffd def".encode()), "split": "train"}


def test_max_bytes_takes_a_sorted_prefix_and_cuts_cleanly(tmp_path: Path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("ab")
    (tmp_path / "c" / "b.txt").write_text("cd数据")  # 2 + 3 + 3 bytes
    (tmp_path / "c" / "c.txt").write_text("never read")
    cut = sources.read_corpus(load_config(None, ["data.source=files", f"data.path={tmp_path / 'c'}", "data.max_bytes=6"]).data)
    assert [(d.name, d.text) for d in cut.documents] == [("a.txt", "ab"), ("b.txt", "cd")]
    assert cut.invalid_utf8 == 0, "a character cut by max_bytes is not invalid UTF-8"


def test_prepared_data_matches_direct_files_source(tmp_path: Path, corpus: list[str], capsys):
    yaml = tmp_path / "exp.yaml"
    yaml.write_text(f"data:\n  source: files\n  path: {tmp_path / 'corpus'}\n  val_fraction: 0.25\n"
                    f"  tokenizer: bpe\n  bpe_vocab_size: 300\nmodel:\n  mtp_heads: {N}\n  n_layers: 4\n"
                    f"train:\n  seq_len: {T}\n  batch_size: {B}\n")
    out = tmp_path / "prepared"
    assert prepare.main([str(yaml), str(out)]) == 0
    assert "train with data.source=prepared" in capsys.readouterr().out
    direct = load_config(yaml)
    prepared = load_config(yaml, ["data.source=prepared", f"data.path={out}"])
    tok = build_tokenizer(prepared.data, tmp_path / "run_prep")
    assert (tmp_path / "run_prep" / "tokenizer" / "tokenizer.json").is_file() and tok.name == "bpe-300"
    for split in sources.SPLITS:
        want = all_rows(direct, tok, tmp_path / "run_files", split)
        got = all_rows(prepared, tok, tmp_path / "run_prep", split)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    prepared_data = build.dataset_folder(prepared, tok, tmp_path / "run_prep")
    direct_data = build.dataset_folder(direct, tok, tmp_path / "run_files")
    first = next(pipeline.make_train_iterator(prepared, tok, prepared_data))
    np.testing.assert_array_equal(first["tokens"], next(pipeline.make_train_iterator(direct, tok, direct_data))["tokens"])
    assert store.corpus_stats(prepared_data, tok.vocab_size) == store.corpus_stats(direct_data, tok.vocab_size)
    assert not (tmp_path / "run_prep" / build.CACHE_DIR).exists(), "a run on prepared data holds no copy of it"
    with pytest.raises(SystemExit) as exited:
        prepare.main([str(yaml), str(out)])
    assert exited.value.code == 2 and capsys.readouterr().err.startswith("error: OUT_DIR")


def test_arrayrecord_source_is_refused_with_the_migration(tmp_path: Path):
    with pytest.raises(ConfigError, match="data.source=arrayrecord was replaced.*mtp-prepare CONFIG OUT_DIR.*data.source=prepared"):
        config(tmp_path, "data.source=arrayrecord", "data.path=old/*.array_record")


def test_run_dir_tokenizer_must_match_config(tmp_path: Path, corpus: list[str]):
    build_tokenizer(config(tmp_path).data, tmp_path / "run")
    with pytest.raises(ConfigError, match="is 'bytes' but the config asks for 'bpe-4096'"):
        build_tokenizer(config(tmp_path, "data.tokenizer=bpe").data, tmp_path / "run")


def test_unigram_baseline_is_finite_and_beats_uniform(tmp_path: Path, corpus: list[str]):
    cfg, tok = config(tmp_path), ByteTokenizer()
    stats = store.corpus_stats(build.dataset_folder(cfg, tok, tmp_path / "run"), tok.vocab_size)
    baseline = stats["unigram_baseline"]
    assert math.isfinite(baseline) and 0 < baseline < math.log(tok.vocab_size)
    assert 0.9 < stats["val_bytes_per_token"] < 1.0  # bytes plus one EOT per document
