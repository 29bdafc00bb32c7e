"""Chained head kinds (the paper's causal and anticausal ablations): the flat loss and gradients
against a reference written from the equations, and speculative greedy decoding == plain greedy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax.config import load_config
from mtp_jax.decode.generate import generate
from mtp_jax.decode.speculative import speculative_generate
from mtp_jax.loss import loss_weights, mtp_loss
from mtp_jax.model.layers import Block
from mtp_jax.model.transformer import MTP

N, T, VOCAB = 3, 12, 37


def _mtp(kind: str) -> MTP:
    cfg = load_config(None, [f"model.head_type={kind}", f"model.mtp_heads={N}", "model.n_layers=5",
                             "model.d_model=16", "model.attn_heads=2", f"model.vocab_size={VOCAB}", "model.dtype=float32"])
    return MTP(cfg.model)


def _params(mtp: MTP, seed: int = 0):
    params = mtp.init(jax.random.key(seed))
    # Larger head weights than init, so a head's input visibly matters.
    return {**params, "heads": jax.tree.map(lambda x: x * 4 if x.ndim > 2 else x, params["heads"])}


def _batch() -> dict:
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, size=(2, T + N)).astype(np.int32)
    segments = np.ones((2, T + N), np.int32)
    segments[0, 6:] = 2  # a document boundary inside the window
    segments[1, T + 1:] = 0  # padding at the end
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments)}


def _reference_loss(mtp: MTP, params, batch, weights, reverse: bool) -> jax.Array:
    """h_0 = z; causal: h_i = Block_i(h_{i-1}) for i = 1..n; anticausal: h_n = Block_n(z),
    h_i = Block_i(h_{i+1}); logits_i = RMSNorm(h_i) W; L = sum_i w_i mean over valid t of CE(x_{t+i})."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    b = tokens.shape[0]
    pos = jnp.broadcast_to(jnp.arange(T), (b, T))
    z, _ = mtp.trunk(params, tokens[:, :T], pos, segments[:, :T])
    block_def = nnx.graphdef(nnx.eval_shape(lambda: Block(mtp.cfg, nnx.Rngs(0))))
    hidden, x = {}, z
    for i in (range(N - 1, -1, -1) if reverse else range(N)):
        block = nnx.merge(block_def, jax.tree.map(lambda p: p[i], params["heads"]))
        x, _ = block(x, pos, segments[:, :T])
        hidden[i] = x
    total = 0.0
    for i in range(N):
        h = hidden[i]
        hn = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + mtp.cfg.norm_eps) * params["norm"]["scale"]
        logp = jax.nn.log_softmax(hn @ params["unembed"]["kernel"], axis=-1)
        target = tokens[:, i + 1: i + 1 + T]
        valid = (segments[:, :T] == segments[:, i + 1: i + 1 + T]) & (segments[:, i + 1: i + 1 + T] != 0)
        nll = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
        total = total + weights[i] * jnp.sum(nll * valid) / jnp.sum(valid)
    return total


@pytest.mark.parametrize("kind, reverse", [("causal", False), ("anticausal", True)])
@pytest.mark.parametrize("impl", ["flat", pytest.param("naive", marks=pytest.mark.slow)])
def test_loss_and_grads_match_equations(kind, reverse, impl):
    mtp, batch = _mtp(kind), _batch()
    params = _params(mtp)
    weights = loss_weights(N, [1.0, 0.5, 0.25])
    got, g_got = jax.value_and_grad(lambda p: mtp_loss(mtp, p, batch, weights, 4, impl)[0])(params)
    want, g_want = jax.value_and_grad(lambda p: _reference_loss(mtp, p, batch, weights, reverse))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_got)[0], jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_chaining_changes_the_heads():
    """Guards the test above against a kind that silently ignores its input chain."""
    batch, weights = _batch(), loss_weights(N)
    losses = {k: float(mtp_loss(_mtp(k), _params(_mtp(k)), batch, weights)[0]) for k in ("transformer", "causal", "anticausal")}
    assert len({round(v, 4) for v in losses.values()}) == 3, losses


def _uncached_greedy(mtp: MTP, params, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Head 1's argmax from `forward` over the whole prefix, recomputed for every token (no cache);
    rows padded to one length, which a causal model's earlier positions never see."""
    forward = jax.jit(lambda p, x: mtp.forward(p, x)[0])
    rows = [list(p) for p in prompts]
    width = max(map(len, rows)) + new
    for _ in range(new):
        padded = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
        logits = np.asarray(forward(params, padded))
        rows = [r + [int(logits[i, len(r) - 1].argmax())] for i, r in enumerate(rows)]
    return [r[len(p):] for r, p in zip(rows, prompts)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal", "anticausal"])
def test_speculative_greedy_equals_greedy(kind):
    mtp = _mtp(kind)
    params = _params(mtp, seed=3)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]
    plain = generate(mtp, params, prompts, 10).completions()
    assert plain == _uncached_greedy(mtp, params, prompts, 10)
    for k in (2, N):
        assert speculative_generate(mtp, params, prompts, k, 10).completions() == plain
