"""Head kinds beyond parallel blocks (the paper's causal and anticausal ablations, DeepSeek-style
sequential modules, the byte models' replicated unembedding): the flat loss and gradients against
a reference written from the equations, packed documents kept apart, and speculative greedy
decoding == plain greedy; and the registry's kinds are exactly those that config validation and
both decoding passes take."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax.config import ConfigError, load_config
from mtp_jax.decode.generate import generate
from mtp_jax.decode.passes import verify_pass
from mtp_jax.decode.speculative import speculative_generate
from mtp_jax.loss import loss_weights, mtp_loss
from mtp_jax.model.head_kinds import HEAD_KINDS
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


def _rms(x, scale, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def _reference_sequential(mtp: MTP, params, batch, weights, reverse=None) -> jax.Array:
    """h_0 = z; h_i = Block_i(W_i [RMSNorm(h_{i-1}); RMSNorm(E[x_{t+i-1}])]) (i = 1..n, the true token
    before head i's target, sliced from the window); logits_i = RMSNorm(h_i) U; same loss as above."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    b, eps, hp = tokens.shape[0], mtp.cfg.norm_eps, params["heads"]
    pos = jnp.broadcast_to(jnp.arange(T), (b, T))
    z, _ = mtp.trunk(params, tokens[:, :T], pos, segments[:, :T])
    block_def = nnx.graphdef(nnx.eval_shape(lambda: Block(mtp.cfg, nnx.Rngs(0))))
    total, h = 0.0, z
    for i in range(1, N + 1):
        emb = params["embed"]["embedding"][tokens[:, i - 1: i - 1 + T]]
        x = jnp.concatenate([_rms(h, hp["hidden_norm"]["scale"][i - 1], eps),
                             _rms(emb, hp["embed_norm"]["scale"][i - 1], eps)], -1) @ hp["proj"][i - 1]
        h, _ = nnx.merge(block_def, jax.tree.map(lambda p: p[i - 1], hp["block"]))(x, pos, segments[:, :T])
        total = total + weights[i - 1] * _mean_nll(_rms(h, params["norm"]["scale"], eps) @ params["unembed"]["kernel"],
                                                   tokens, segments, i)
    return total


def _reference_replicated(mtp: MTP, params, batch, weights, reverse=None) -> jax.Array:
    """No head layers: logits_i = RMSNorm(z) U_i with U = [U_1 ... U_n] of shape (d, n x V)."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    pos = jnp.broadcast_to(jnp.arange(T), (tokens.shape[0], T))
    z, _ = mtp.trunk(params, tokens[:, :T], pos, segments[:, :T])
    u_DNV = jnp.concatenate(list(params["heads"]["unembed"]), axis=1)  # (d, n x V), head i's columns i*V..
    logits = _rms(z, params["norm"]["scale"], mtp.cfg.norm_eps) @ u_DNV
    return sum(weights[i - 1] * _mean_nll(logits[..., (i - 1) * VOCAB: i * VOCAB], tokens, segments, i)
               for i in range(1, N + 1))


def _mean_nll(logits, tokens, segments, i: int) -> jax.Array:
    """Mean CE of predicting x_{t+i} at t over the positions where t and t+i share a document."""
    target = tokens[:, i: i + T]
    valid = (segments[:, :T] == segments[:, i: i + T]) & (segments[:, i: i + T] != 0)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[..., None], -1)[..., 0]
    return jnp.sum(nll * valid) / jnp.sum(valid)


REFERENCES = {"causal": (_reference_loss, False), "anticausal": (_reference_loss, True),
              "sequential": (_reference_sequential, None), "replicated": (_reference_replicated, None)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(REFERENCES))
@pytest.mark.parametrize("impl", ["flat", "naive"])
def test_loss_and_grads_match_equations(kind, impl):
    mtp, batch = _mtp(kind), _batch()
    params = _params(mtp)
    weights = loss_weights(N, [1.0, 0.5, 0.25])
    reference, reverse = REFERENCES[kind]
    got, g_got = jax.value_and_grad(lambda p: mtp_loss(mtp, p, batch, weights, 4, impl)[0])(params)
    want, g_want = jax.value_and_grad(lambda p: reference(mtp, p, batch, weights, reverse))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_got)[0], jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_chaining_changes_the_heads():
    """Guards the test above against a kind that silently ignores its input chain."""
    batch, weights = _batch(), loss_weights(N)
    kinds = ("transformer", "causal", "anticausal", "sequential")
    losses = {k: float(mtp_loss(_mtp(k), _params(_mtp(k)), batch, weights)[0]) for k in kinds}
    assert len({round(v, 4) for v in losses.values()}) == len(kinds), losses


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sequential", "replicated"])
def test_packed_documents_train_as_if_apart(kind):
    """Two documents packed in one window give the CE sums of the same documents in rows of their own
    (zero padding after each): nothing of the second document, not even a sequential head's token
    input, reaches a target of the first (a rolled target would)."""
    mtp = _mtp(kind)
    params, weights = _params(mtp), loss_weights(N)
    rng = np.random.default_rng(5)
    a, b = rng.integers(1, VOCAB, 7), rng.integers(1, VOCAB, 6)
    packed_t = np.zeros((1, T + N), np.int32)
    packed_t[0, :13] = np.concatenate([a, b])
    packed_s = np.zeros((1, T + N), np.int32)
    packed_s[0, :7], packed_s[0, 7:13] = 1, 2
    apart_t, apart_s = np.zeros((2, T + N), np.int32), np.zeros((2, T + N), np.int32)
    apart_t[0, :7], apart_t[1, :6], apart_s[0, :7], apart_s[1, :6] = a, b, 1, 1
    sums = []
    for tokens, segments in ((packed_t, packed_s), (apart_t, apart_s)):
        batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments)}
        _, aux = mtp_loss(mtp, params, batch, weights, 4, "flat", counts_N=jnp.ones(N))
        sums.append(np.asarray(aux["loss"]))
    np.testing.assert_allclose(sums[0], sums[1], rtol=1e-5)


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
@pytest.mark.parametrize("kind", ["causal", "anticausal", "sequential", "replicated"])
def test_speculative_greedy_equals_greedy(kind):
    mtp = _mtp(kind)
    params = _params(mtp, seed=3)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]
    plain = generate(mtp, params, prompts, 10).completions()
    assert plain == _uncached_greedy(mtp, params, prompts, 10)
    for k in (2, N):
        assert speculative_generate(mtp, params, prompts, k, 10).completions() == plain


def test_config_accepts_exactly_the_registered_kinds():
    """Every registered kind loads; a name the registry lacks is one config error naming the choices."""
    for kind in HEAD_KINDS:
        assert _mtp(kind).cfg.head_type == kind
    with pytest.raises(ConfigError, match="not one of " + ", ".join(HEAD_KINDS)):
        load_config(None, ["model.head_type=convolutional"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(HEAD_KINDS))
@pytest.mark.parametrize("reduced", [False, True], ids=["wide", "reduced"])
def test_both_verify_passes_match_the_uncached_forward(kind, reduced):
    """Each decoding pass over an empty cache gives head 1's logits at every fed position and the
    drafts of heads 2..N-1 at the chosen index, as the uncached forward pass over the same tokens
    (fewer heads than n: an anticausal head 1 still needs all of them)."""
    mtp = _mtp(kind)
    params = _params(mtp, seed=2)
    tokens = _batch()["tokens"][:, :T]
    positions = jnp.broadcast_to(jnp.arange(T), tokens.shape)
    index = jnp.array([T - 1, 4])

    @jax.jit
    def run(p):
        first, draft = verify_pass(mtp, p, mtp.init_cache(2, T + 4), tokens, positions, N - 1, reduced=reduced)
        return first, draft(index)[0]

    first, drafts = run(params)
    want = np.asarray(mtp.forward(params, tokens))  # (N, B, T, V)
    np.testing.assert_allclose(first, want[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(drafts, want[1:N - 1, [0, 1], np.asarray(index)].swapaxes(0, 1), rtol=2e-5, atol=2e-5)


def _reference_sequential_drafts(mtp: MTP, params, prompt: list[int]) -> np.ndarray:
    """Every head's logits (N, V) at a prompt's last token, from the equations with no cache: h_0 = z;
    head i (1-based) at t reads E[x_{t+i-1}] where t+i-1 is inside the prompt (the true token,
    known), else the argmax of head i-1's logits at t (not known yet)."""
    tokens = jnp.asarray([prompt], jnp.int32)
    p, eps, hp = len(prompt), mtp.cfg.norm_eps, params["heads"]
    pos = jnp.arange(p)[None]
    z, _ = mtp.trunk(params, tokens, pos, None)
    block_def = nnx.graphdef(nnx.eval_shape(lambda: Block(mtp.cfg, nnx.Rngs(0))))
    unembed = lambda h: _rms(h, params["norm"]["scale"], eps) @ params["unembed"]["kernel"]
    h, out = z, []
    for i in range(1, N + 1):
        guess = np.asarray(jnp.argmax(unembed(h), -1))[0] if i > 1 else np.zeros(p, np.int64)
        fed = [prompt[t + i - 1] if t + i - 1 < p else int(guess[t]) for t in range(p)]
        emb = params["embed"]["embedding"][jnp.asarray([fed])]
        x = jnp.concatenate([_rms(h, hp["hidden_norm"]["scale"][i - 1], eps),
                             _rms(emb, hp["embed_norm"]["scale"][i - 1], eps)], -1) @ hp["proj"][i - 1]
        h, _ = nnx.merge(block_def, jax.tree.map(lambda w: w[i - 1], hp["block"]))(x, pos, None)
        out.append(np.asarray(unembed(h))[0, -1])
    return np.stack(out)


def test_sequential_decoding_feeds_the_prompts_true_tokens():
    """The prefill's drafts (heads 2..n at the last prompt token) read, through each head's cache,
    entries computed from the prompt's own tokens (training's input), not from guesses; prompts of
    different lengths in one padded batch. The simple forward feeds the same given known_B."""
    from mtp_jax.decode.passes import prefill

    mtp = _mtp("sequential")
    params = _params(mtp, seed=5)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]
    padded = np.array([q + [0] * (8 - len(q)) for q in prompts], np.int32)
    lengths = np.array([len(q) for q in prompts], np.int32)
    got, _ = prefill(mtp, params, padded, lengths, slots=16)
    forward = mtp.forward(params, padded, known_B=lengths)
    for b, q in enumerate(prompts):
        want = _reference_sequential_drafts(mtp, params, q)
        np.testing.assert_allclose(np.asarray(got[b]), want, atol=1e-4)
        np.testing.assert_allclose(np.asarray(forward[:, b, len(q) - 1]), want, atol=1e-4)
