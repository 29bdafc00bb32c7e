"""The CPU-efficiency changes against independent references: the top-1 count taken
from the log-sum-exp's max (NumPy's argmax tie rule), the unembedding gradient accumulated in place
across heads (XLA's own memory analysis), and the parity benchmark's arithmetic (by hand)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.benchmarks.memory import compiled_step
from mtp_jax.benchmarks.parity import SHAPES, summarise
from mtp_jax.config import ModelConfig, TrainConfig
from mtp_jax.flops import model_flops_per_token
from mtp_jax.loss import chunked_xent
from mtp_jax.model.layers import dense


def test_top1_count_follows_argmax_ties_and_loss_matches_numpy() -> None:
    """Small integer logits tie often; each target is a random one of its row's maxima, so only
    the first-index rule (NumPy's argmax) gets the count right, and `any maximum` would not."""
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 20, 4, 12
    h = rng.integers(-1, 2, (b, t, d)).astype(np.float32)
    w = rng.integers(-1, 2, (d, v)).astype(np.float32)
    logits = h @ w
    maxima = [np.flatnonzero(row == row.max()) for row in logits.reshape(-1, v)]
    targets = np.array([rng.choice(m) for m in maxima]).reshape(b, t).astype(np.int32)
    mask = rng.random((b, t)) < 0.8
    first = np.argmax(logits, axis=-1) == targets
    assert np.sum(mask & ~first) >= 5, "too few targets at a later tied maximum to tell the rules apart"
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    loss, correct = chunked_xent(jnp.asarray(h), jnp.asarray(w), jnp.asarray(targets), jnp.asarray(mask), 8)
    assert float(correct) == np.sum(first & mask)
    np.testing.assert_allclose(float(loss), np.sum(nll * mask), rtol=1e-5)


@pytest.mark.slow  # compiles loss and gradient twice
def test_unembedding_gradient_is_not_duplicated_per_head_loop() -> None:
    """With one head XLA drops the head loop; with two it keeps it. The temp bytes of loss and
    gradient must not grow by a second (D, V) unembedding gradient when the loop appears (the
    per-head gradient goes straight into the running sum; before, n = 2 took 1.06 x D x V more)."""
    d, v = 64, 16384

    def temp(n: int) -> int:
        cfg = ModelConfig(vocab_size=v, d_model=d, n_layers=1 + n, attn_heads=2, mtp_heads=n)
        return compiled_step(cfg, "flat", 2, 64, 16)[0].memory_analysis().temp_size_in_bytes

    assert temp(2) - temp(1) < 0.5 * d * v * 4


def test_parity_summary_arithmetic() -> None:
    """Two rounds of made-up seconds: efficiency = tokens/s x FLOPs per token / matmul FLOP/s,
    ratios of medians and the median of within-round ratios, all by hand."""
    cfgs = {n: ModelConfig(vocab_size=4096, d_model=256, n_layers=6, attn_heads=4, mtp_heads=n) for n in (1, 4)}
    tcfg = TrainConfig(batch_size=4, seq_len=256)
    secs = {("jax", "mm"): [1.0, 2.0], ("torch", "mm"): [0.5, 0.5],
            ("jax", 1): [2.0, 4.0], ("torch", 1): [1.0, 2.0], ("jax", 4): [2.0, 2.0], ("torch", 4): [4.0, 1.0]}
    out = summarise("small", secs, cfgs, tcfg, 1e9, [1, 4], 1, {})
    tokens = 4 * 256
    fpt = {n: model_flops_per_token(cfgs[n], 256) for n in (1, 4)}
    # n = 1: jax 512 and 256 tokens/s on 1 and 0.5 GFLOP/s matmuls (efficiency 512 fpt / 1e9 in both
    # rounds); torch 1024 and 512 tokens/s on 2 GFLOP/s (median efficiency 384 fpt / 1e9).
    assert math.isclose(out["n1"]["efficiency"]["jax"], round(tokens / 2 * fpt[1] / 1e9, 3))
    assert math.isclose(out["n1"]["efficiency"]["torch"], round(tokens * 3 / 8 * fpt[1] / 1e9, 3))
    assert math.isclose(out["n1"]["raw_ratio"], round((tokens * 3 / 8) / (tokens * 3 / 4), 3))
    assert math.isclose(out["n1"]["normalised_ratio"], round(512 / 384, 3))
    # n = 4: within-round efficiency ratios 4 and 2 (the matmul rates differ by round), median 3.
    within = [(tokens / 2 / 1e9) / (tokens / 4 / 2e9), (tokens / 2 / 0.5e9) / (tokens / 1 / 2e9)]
    assert math.isclose(out["n4"]["normalised_ratio_within_rounds"], round(sum(within) / 2, 3))
    assert out["shape"] == dict(zip(("d_model", "blocks", "vocab", "batch", "seq"), SHAPES["small"]))
    assert out["matmul_gflops"] == {"jax": 0.8, "torch": 2.0}  # medians of 1 and 0.5 GFLOP/s; of 2 and 2


def test_cpu_dense_gradients_match_numpy() -> None:
    """The MLP's matmul with the row-major weight gradient: value and both gradients against NumPy
    (dx = dy w^T, dw = sum over batch and time of x^T dy) for a (B, T, D) input."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 4)).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(dense), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(y, x @ w, rtol=1e-5)
    np.testing.assert_allclose(dx, dy @ w.T, rtol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("btd,btf->df", x, dy), rtol=1e-5)
