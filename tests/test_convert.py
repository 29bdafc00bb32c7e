"""mtp-convert against fixtures made by independent code (tests/fixtures/make_llama_fixtures.py, run
with torch + transformers outside this environment): Meta's complex-rotation Llama 2 model and
Hugging Face's LlamaForCausalLM. No torch here."""

from __future__ import annotations

import errno
import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from mtp_jax.convert.cli import main as convert
from mtp_jax.convert.check_logits import run_logits
from mtp_jax.convert.safetensors_io import read_safetensors, write_safetensors
from mtp_jax.convert.torch_zip import load_torch_file
from mtp_jax.run import load_run

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert")
    convert(["from-meta", str(FIX / "meta_tiny"), str(root / "meta")])
    convert(["from-hf", str(FIX / "hf_tiny"), str(root / "hf")])
    return root


def _leaves(params) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_torch_reader_honours_strides_offsets_and_dtypes():
    tensors, want = load_torch_file(FIX / "odd_tensors.pth"), np.load(FIX / "odd_tensors.npz")
    assert sorted(tensors) == sorted(want.files)
    for name in want.files:
        np.testing.assert_array_equal(tensors[name].astype(np.float32), want[name])
    assert tensors["half"].dtype == np.float16


@pytest.mark.slow
@pytest.mark.parametrize("name", ["meta", "hf"])
def test_conversion_reproduces_reference_logits(runs, name):
    ref = np.load(FIX / f"{name}_tiny" / "reference.npz")
    logits = run_logits(str(runs / name), ref["tokens"])
    assert logits.shape == ref["logits"].shape  # meta: both heads (n = 2)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)


def test_model_parallel_shards_join_to_the_same_parameters(runs, tmp_path):
    convert(["from-meta", str(FIX / "meta_tiny_mp2"), str(tmp_path / "mp2")])
    joined, single = _leaves(load_run(tmp_path / "mp2")[3]), _leaves(load_run(runs / "meta")[3])
    assert joined.keys() == single.keys()
    for key in single:
        assert np.array_equal(joined[key], single[key]), key


def test_converted_run_metadata(runs):
    cfg, tokenizer, _, _ = load_run(runs / "meta")
    assert (cfg.model.rope_layout, cfg.model.mtp_heads, cfg.model.n_layers, cfg.model.d_ff) == ("interleaved", 2, 4, 96)
    assert tokenizer.vocab_size == 256 and tokenizer.eot_id == 2
    text = "def f(x):\n    return x\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("name", ["meta", "hf"])
def test_round_trip_through_hugging_face_is_bitwise(runs, tmp_path, name):
    convert(["to-hf", str(runs / name), str(tmp_path / "hf")])
    convert(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    (cfg_a, _, _, a), (cfg_b, _, _, b) = load_run(runs / name), load_run(tmp_path / "back")
    assert cfg_a.model == cfg_b.model
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for key in la:
        assert la[key].dtype == lb[key].dtype and np.array_equal(la[key], lb[key]), key


def test_export_was_checked_in_transformers():
    """The committed result of tests/fixtures/check_hf_export.py (transformers loaded our to-hf output)."""
    result = json.loads((FIX / "hf_export_check.json").read_text())
    assert result["max_abs_diff_head1"] < 1e-4 and result["tokenizer_ids_match_mtp_jax"]


@pytest.mark.slow
def test_dropping_the_side_file_gives_the_next_token_model(runs, tmp_path):
    convert(["to-hf", str(runs / "meta"), str(tmp_path / "hf")])
    (tmp_path / "hf" / "mtp_heads.safetensors").unlink()
    convert(["from-hf", str(tmp_path / "hf"), str(tmp_path / "n1")])
    ref = np.load(FIX / "meta_tiny" / "reference.npz")
    logits = run_logits(str(tmp_path / "n1"), ref["tokens"])
    assert logits.shape[0] == 1
    np.testing.assert_allclose(logits[0], ref["logits"][0], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_add_heads_copies_the_last_block(runs, tmp_path):
    convert(["from-hf", str(FIX / "hf_tiny"), str(tmp_path / "n3"), "--add-heads", "2"])
    cfg, _, _, params = load_run(tmp_path / "n3")
    assert (cfg.model.mtp_heads, cfg.model.n_layers) == (3, 5)
    for leaf in jax.tree.leaves(params["heads"]):
        assert np.array_equal(leaf[1], leaf[0]) and np.array_equal(leaf[2], leaf[0])
    ref = np.load(FIX / "hf_tiny" / "reference.npz")
    np.testing.assert_allclose(run_logits(str(tmp_path / "n3"), ref["tokens"])[0], ref["logits"][0], atol=1e-4)


def _copy(src: str, tmp_path: Path) -> Path:
    dst = tmp_path / src
    shutil.copytree(FIX / src, dst)
    return dst


def _hf_with(tmp_path: Path, edit) -> Path:
    src = _copy("hf_tiny", tmp_path)
    tensors = {k: np.asarray(v) for k, v in read_safetensors(src / "model.safetensors").items()}
    edit(tensors)
    write_safetensors(src / "model.safetensors", tensors)
    return src


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_missing_tensor_is_named(tmp_path, capsys):
    src = _hf_with(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "lacks tensor 'model.layers.1.mlp.up_proj.weight'" in _error(capsys, ["from-hf", str(src), str(tmp_path / "r")])


def test_unexpected_tensor_is_named(tmp_path, capsys):
    src = _hf_with(tmp_path, lambda t: t.update({"model.layers.3.mlp.up_proj.weight": np.zeros((80, 32), np.float32)}))
    assert "unexpected tensor 'model.layers.3.mlp.up_proj.weight'" in _error(capsys, ["from-hf", str(src), str(tmp_path / "r")])


def test_wrong_shape_is_named(tmp_path, capsys):
    src = _hf_with(tmp_path, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    line = _error(capsys, ["from-hf", str(src), str(tmp_path / "r")])
    assert "tensor 'model.norm.weight'" in line and "(31,)" in line and "(32,)" in line


@pytest.mark.parametrize("field, value, expect", [
    ("n_future_tokens", 3, "lacks tensor 'extra_heads.1.attention."),
    ("dim", 64, "tensor 'tok_embeddings.weight'"),
    ("multiple_of", 64, "tensor 'layers.0.feed_forward.w1.weight' in"),
    ("vocab_size", 300, "params.json vocab_size=300 disagrees"),
])
def test_params_json_disagreeing_with_tensors(tmp_path, capsys, field, value, expect):
    src = _copy("meta_tiny", tmp_path)
    params = json.loads((src / "params.json").read_text())
    params[field] = value
    (src / "params.json").write_text(json.dumps(params))
    line = _error(capsys, ["from-meta", str(src), str(tmp_path / "r")])
    assert expect in line, line


@pytest.mark.parametrize("field, value", [("model_type", "gpt2"), ("hidden_act", "gelu"), ("attention_bias", True),
                                          ("mlp_bias", True), ("rope_scaling", {"rope_type": "linear", "factor": 2.0})])
def test_unsupported_architecture_names_the_field(tmp_path, capsys, field, value):
    src = _copy("hf_tiny", tmp_path)
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    assert f"config.json field {field}={value!r} is not supported" in _error(capsys, ["from-hf", str(src), str(tmp_path / "r")])


def test_side_file_missing_a_head_tensor_is_named(tmp_path, capsys):
    """An extra-heads side file whose n_future_tokens promises a head it does not hold."""
    src = _copy("hf_tiny", tmp_path)
    write_safetensors(src / "mtp_heads.safetensors", {"extra_heads.0.attention_norm.weight": np.ones(32, np.float32)},
                      {"n_future_tokens": "2", "rope_layout": "half"})
    line = _error(capsys, ["from-hf", str(src), str(tmp_path / "r")])
    assert "mtp_heads.safetensors" in line and "lacks tensor 'extra_heads.0." in line, line


@pytest.mark.slow
def test_mtp_train_fine_tunes_a_converted_run(tmp_path):
    """mtp-train on a converted run starts from its weights (fresh optimizer) and checkpoints on."""
    from mtp_jax.config import load_config
    from mtp_jax.data.build import dataset_folder
    from mtp_jax.data.pipeline import split_windows
    from mtp_jax.train import train

    run = tmp_path / "run"
    convert(["from-meta", str(FIX / "meta_tiny"), str(run)])
    before = _leaves(load_run(run)[3])
    overrides = [f"train.run_dir={run}", "train.steps=4", "train.batch_size=2", "train.seq_len=32",
                 "train.checkpoint_every=2", "train.eval_batches=1", "train.async_checkpoint=false",
                 "train.tensorboard=false", "train.progress=false", "data.max_bytes=400000", "data.val_fraction=0.3",
                 "optim.lr=1e-5", "optim.warmup_steps=0"]
    result = train(load_config(run / "config.yaml", overrides))
    assert np.isfinite(result["loss"])
    cfg, tokenizer, _, params = load_run(run)
    after = _leaves(params)
    assert max(float(np.abs(after[k] - before[k]).max()) for k in before) < 1e-3  # lr 1e-5 x 4 steps
    assert any(not np.array_equal(after[k], before[k]) for k in before)
    # Its documents are packed Llama's way: <s> opens each (right after the previous </s>) and starts its segment.
    windows = split_windows(cfg, tokenizer, dataset_folder(cfg, tokenizer, run), "train")
    rows = windows.rows(np.arange(len(windows)))
    tokens, segments = rows["tokens"], rows["segment_ids"]
    opens = (tokens[:, 1:] == tokenizer.bos_id) & (segments[:, 1:] > 0)
    assert opens.any() and np.array_equal(opens, (tokens[:, :-1] == tokenizer.eot_id) & (segments[:, 1:] > 0))
    assert np.all(np.diff(segments, axis=1)[opens] == 1) and np.all(np.diff(segments, axis=1)[~opens & (segments[:, 1:] > 0)] == 0)


def test_converted_meta_model_sees_bos_first_and_matches_the_reference(runs):
    """Llama's document convention: a prompt opens with <s>. The converted model's logits for that
    prompt equal Meta's forward (a NumPy port, itself checked against the torch reference.npz)."""
    import sentencepiece

    from mtp_jax.data.tokenizer import encode_prompt
    from tests.fixtures.meta_reference import meta_forward

    sd = {k: np.asarray(v, np.float32) for k, v in load_torch_file(FIX / "meta_tiny" / "consolidated.00.pth").items()}
    args = json.loads((FIX / "meta_tiny" / "params.json").read_text())
    ref = np.load(FIX / "meta_tiny" / "reference.npz")
    np.testing.assert_allclose(meta_forward(sd, args, ref["tokens"]), ref["logits"], atol=1e-4, rtol=0)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(FIX / "meta_tiny" / "tokenizer.model"))
    tokenizer = load_run(runs / "meta")[1]
    prompt = encode_prompt(tokenizer, "def add(a, b):\n    return")
    assert prompt == [sp.bos_id(), *sp.encode("def add(a, b):\n    return")] and sp.bos_id() >= 0
    want = meta_forward(sd, args, np.array([prompt]))
    np.testing.assert_allclose(run_logits(str(runs / "meta"), np.array([prompt])), want, atol=1e-4, rtol=0)


# --- hostile files: each is refused with one line before anything is read or written ----------------
def _rezip(pth: Path, edit) -> None:
    """Rewrites a torch.save zip with `edit(name, data) -> data` applied to every member (all stored)."""
    with zipfile.ZipFile(pth) as archive:
        members = [(i.filename, archive.read(i)) for i in archive.infolist()]
    with zipfile.ZipFile(pth, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            archive.writestr(name, edit(name, data))


def _patch_pickle(old: bytes, new: bytes):
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("data.pkl"):
            return data
        assert data.count(old) >= 1, old
        return data.replace(old, new, 1)  # the first tensor: tok_embeddings.weight
    return edit


def _edit_json(name: str, **fields):
    def edit(src: Path) -> None:
        data = json.loads((src / name).read_text())
        data.update(fields)
        (src / name).write_text(json.dumps(data))
    return edit


def _edit_header(edit):
    """Rewrites model.safetensors with `edit(header)` applied to its JSON header (data bytes unchanged)."""
    def apply(src: Path) -> None:
        raw = (src / "model.safetensors").read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + length])
        edit(header)
        text = json.dumps(header).encode()
        (src / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    return apply


def _last_offsets(header: dict) -> None:
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[name]["data_offsets"][1] += 4096


_PTH = "consolidated.00.pth"
# tok_embeddings.weight in the fixture's pickle: sizes (256, 32), then strides (32, 1)
_EMBED_STRIDES = b"K\x20K\x01\x86"
_EMBED_GEOMETRY = b"M\x00\x01K\x20\x86q\x08" + _EMBED_STRIDES
HOSTILE = {  # case: (command, the file named in the error line, corruption, what the line says)
    "truncated storage": ("from-meta", _PTH, lambda s: _rezip(s / _PTH, lambda n, d: d[:100] if n.endswith("data/0") else d),
                          "tensor 'tok_embeddings.weight' in"),
    "stride out of bounds": ("from-meta", _PTH, lambda s: _rezip(s / _PTH, _patch_pickle(_EMBED_STRIDES, b"K\x40K\x01\x86")),
                             "strides (64, 1) reach element 16351 of a storage of 8192 elements (out of bounds)"),
    "stride 0 with a huge params.json": (
        "from-meta", _PTH,
        lambda s: (_rezip(s / _PTH, _patch_pickle(_EMBED_GEOMETRY, b"M\x00\x7dM\x00\x10\x86q\x08K\x00K\x00\x86")),
                   _edit_json("params.json", dim=4096, vocab_size=32000)(s)),
        "strides (0, 0) for sizes (32000, 4096) overlap"),
    "garbage pickle": ("from-meta", _PTH, lambda s: _rezip(s / _PTH, lambda n, d: np.random.default_rng(0).bytes(len(d))
                                                           if n.endswith("data.pkl") else d), "data.pkl is malformed"),
    "foreign global": ("from-meta", _PTH, lambda s: _rezip(s / _PTH, lambda n, d: (
        b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(f"touch {s}/ran")) + f"touch {s}/ran".encode() + b"\x85R.")
        if n.endswith("data.pkl") else d), "names os.system, which a PyTorch state dict does not use"),
    "not a zip": ("from-meta", _PTH, lambda s: (s / _PTH).write_bytes(b"\x80\x02}q\x00."), "is not a PyTorch zip"),
    "heads=0 in params.json": ("from-meta", "params.json", _edit_json("params.json", n_heads=0),
                               "n_heads=0 must be a whole number >= 1"),
    "invalid params.json": ("from-meta", "params.json", lambda s: (s / "params.json").write_text('{"dim": 32,'),
                            "is not valid JSON"),
    "heads=0 in config.json": ("from-hf", "config.json", _edit_json("config.json", num_attention_heads=0),
                               "num_attention_heads=0 must be a whole number >= 1"),
    "invalid config.json": ("from-hf", "config.json", lambda s: (s / "config.json").write_text("[1, 2"), "is not valid JSON"),
    "offsets past the file": ("from-hf", "model.safetensors", _edit_header(_last_offsets), "outside the file's"),
    "header length past the file": ("from-hf", "model.safetensors", lambda s: (s / "model.safetensors").write_bytes(
        struct.pack("<Q", 2**62) + (s / "model.safetensors").read_bytes()[8:]), "-byte header but holds"),
    "shape larger than its bytes": ("from-hf", "model.safetensors",
                                    _edit_header(lambda h: h["model.norm.weight"].update(shape=[32, 4096])),
                                    "tensor 'model.norm.weight' in"),
    "index naming /etc/passwd": ("from-hf", "model.safetensors.index.json", lambda s: (s / "model.safetensors.index.json")
                                 .write_text(json.dumps({"weight_map": {"model.norm.weight": "/etc/passwd"}})),
                                 "names '/etc/passwd', outside the checkpoint folder"),
    "index naming ../": ("from-hf", "model.safetensors.index.json", lambda s: (s / "model.safetensors.index.json")
                         .write_text(json.dumps({"weight_map": {"model.norm.weight": "../../../../etc/passwd"}})),
                         "outside the checkpoint folder"),
    "side file metadata": ("from-hf", "mtp_heads.safetensors", lambda s: write_safetensors(
        s / "mtp_heads.safetensors", {}, {"n_future_tokens": "two"}), "n_future_tokens='two'"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_checkpoint_is_one_line_and_leaves_no_trace(tmp_path, case):
    """Through the CLI: exit 2, one `error:` line naming the problem, no traceback, no crash, RUN_DIR absent and
    no temporary sibling left; a pickle's foreign global never runs."""
    command, file, corrupt, expect = HOSTILE[case]
    src = _copy("meta_tiny" if command == "from-meta" else "hf_tiny", tmp_path)
    corrupt(src)
    done = subprocess.run([sys.executable, "-m", "mtp_jax.convert.cli", command, str(src), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert expect in lines[0] and file in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name] and not (src / "ran").exists()


def test_conversion_cut_while_writing_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    """A failure inside the write (here: a full disk at the checkpoint) removes the half-written folder."""
    from mtp_jax.checkpoint import Checkpointer

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Checkpointer, "save", full)
    assert "no space left on device" in _error(capsys, ["from-meta", str(FIX / "meta_tiny"), str(tmp_path / "run")])
    assert list(tmp_path.iterdir()) == []
