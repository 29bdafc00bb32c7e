"""`mtp-convert heads`: dropping heads keeps head 1's next-token logits exactly (the n' = 1 fine-tuning
recipe), added heads start as copies of the last head, the new run fine-tunes through mtp-train,
and bad requests are one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.config import load_config
from mtp_jax.convert.cli import main, save_run
from mtp_jax.data.tokenizer import ByteTokenizer
from mtp_jax.model.transformer import MTP
from mtp_jax.run import load_run, read_config, resolve_vocab

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 250, (2, 10)), jnp.int32)


def make_run(run_dir: Path, n: int) -> tuple[MTP, dict]:
    """A run directory holding random weights (params only, as a converted run)."""
    cfg = load_config(None, ["model.d_model=32", f"model.n_layers={2 + n}", "model.attn_heads=2",
                             f"model.mtp_heads={n}", "model.dtype=float32", "data.tokenizer=bytes",
                             "data.max_bytes=200000", "data.val_fraction=0.3", "train.batch_size=2", "train.seq_len=16",
                             "train.progress=false",
                             "train.tensorboard=false", "train.eval_batches=1", "optim.warmup_steps=1"])
    cfg = resolve_vocab(cfg, ByteTokenizer().vocab_size)
    mtp = MTP(cfg.model)
    params = jax.tree.map(np.asarray, mtp.init(jax.random.key(n)))
    save_run(run_dir, cfg, params, ByteTokenizer())
    return mtp, params


@pytest.mark.slow
def test_keep_one_head_gives_the_next_token_model(tmp_path: Path):
    mtp, params = make_run(tmp_path / "n4", 4)
    assert main(["heads", str(tmp_path / "n4"), str(tmp_path / "n1"), "--keep", "1"]) == 0
    config, _, new_mtp, new_params = load_run(tmp_path / "n1")
    assert (config.model.mtp_heads, config.model.n_layers, config.model.trunk_layers) == (1, 3, 2)
    assert read_config(tmp_path / "n1").train.run_dir == str(tmp_path / "n1")
    want = mtp.forward(params, TOKENS)[:1]
    np.testing.assert_array_equal(np.asarray(new_mtp.forward(new_params, TOKENS)), np.asarray(want))


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_added_heads_start_as_copies_of_the_last_head(tmp_path: Path, n: int):
    mtp, params = make_run(tmp_path / "src", n)
    assert main(["heads", str(tmp_path / "src"), str(tmp_path / "more"), "--add-heads", "2"]) == 0
    config, _, new_mtp, new_params = load_run(tmp_path / "more")
    assert (config.model.mtp_heads, config.model.trunk_layers) == (n + 2, 2)
    before = np.asarray(mtp.forward(params, TOKENS))
    after = np.asarray(new_mtp.forward(new_params, TOKENS))
    np.testing.assert_array_equal(after[:n], before)
    for extra in after[n:]:  # the same block on the same z: head n's logits
        np.testing.assert_array_equal(extra, before[-1])


@pytest.mark.parametrize("args, message", [
    (["--keep", "0"], "--keep=0 must be between 1 and the run's 2 heads"),
    (["--keep", "3"], "--keep=3 must be between 1"),
    (["--add-heads", "0"], "--add-heads=0 must be >= 1"),
    ([], "give exactly one of --keep K"),
    (["--keep", "1", "--add-heads", "1"], "give exactly one of --keep K"),
])
def test_bad_requests_are_one_line(tmp_path: Path, capsys, args, message):
    make_run(tmp_path / "src", 2)
    with pytest.raises(SystemExit) as exit_info:
        main(["heads", str(tmp_path / "src"), str(tmp_path / "new"), *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_dropped_heads_fine_tune_with_mtp_train(tmp_path: Path):
    make_run(tmp_path / "n2", 2)
    assert main(["heads", str(tmp_path / "n2"), str(tmp_path / "n1"), "--keep", "1"]) == 0
    done = subprocess.run([sys.executable, "-m", "mtp_jax.cli", "train", str(tmp_path / "n1" / "config.yaml"),
                           "train.steps=2", "train.log_every=1"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fine-tuning the parameters" in done.stdout + done.stderr
    config, _, _, params = load_run(tmp_path / "n1")
    assert config.model.mtp_heads == 1 and jax.tree.leaves(params["heads"])[0].shape[0] == 1
