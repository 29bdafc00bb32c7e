"""Decoding against independent references: a no-cache argmax loop over `MTP.forward`, plain
greedy decoding (which speculative decoding must reproduce token for token), reference keys
and values of the output (test_model's blocks, no cache code), which the decoder's caches must
hold, a no-cache simulation of blockwise decoding (whose pass counts the decoder must match), and exact distributions
(which speculative sampling must keep).

One tiny n=3 model shape serves every test, random and trained, so the compiled decoders are
shared; the trained model learns a noisy walk (+1 with p=0.85, else +2, mod 16), which makes
heads 2..3 good but imperfect drafters and head 1's distribution worth sampling from.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtp_jax.config import ConfigError, to_yaml
from mtp_jax.data.build import pack
from mtp_jax.decode import Sampling, generate, speculative_generate
from mtp_jax.decode.acceptance import replay
from mtp_jax.decode.cli import main as cli_main
from mtp_jax.decode.generate import prefill, token_probs
from mtp_jax.decode.passes import forward_step, verify_pass
from mtp_jax.decode.tree import _tree_decode, make_tree, tree_generate
from mtp_jax.decode.speculative import _speculate, verify
from mtp_jax.loss import loss_weights, mtp_loss
from mtp_jax.model.layers import KVCache
from mtp_jax.model.transformer import MTP

from test_model import layer, ref_block, ref_rmsnorm, ref_rope

V, N, MAX_NEW = 16, 3, 16
SHAPE = dict(model__vocab_size=V, model__n_layers=5, model__mtp_heads=N)
REF_ROWS, REF_LEN = V * V, 32  # the one compiled shape of every no-cache reference forward
jitted_verify = jax.jit(verify, static_argnums=4)


def walk(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    steps = 1 + (rng.random((batch, length)) < 0.15)
    return ((rng.integers(0, V, (batch, 1)) + np.cumsum(steps, axis=1)) % V).astype(np.int32)


@pytest.fixture(scope="module")
def cfg(tiny):
    return tiny(**SHAPE)


@pytest.fixture(scope="module")
def mtp(cfg) -> MTP:
    return MTP(cfg.model)


def random_params(mtp: MTP, seed: int) -> dict:
    """N(0, 0.02) weights, unit norm scales, drawn with NumPy: no per-op compiles (eager
    `MTP.init` costs ~10 s of them on 2 cores)."""
    rng = np.random.default_rng(seed)
    leaf = lambda path, x: np.ones(x.shape, np.float32) if path[-1].key == "scale" else (
        0.02 * rng.standard_normal(x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(leaf, mtp.abstract_params())


@pytest.fixture(scope="module")
def models(mtp) -> dict:
    """{'random': random params, 'partial': 15 Adam steps on the walk (drafts often rejected),
    'trained': 60 steps (drafts mostly accepted)}."""
    tx, weights = optax.adam(1e-2), loss_weights(N)

    @jax.jit
    def step(params, opt, tokens):
        batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens)}
        grads, _ = jax.grad(lambda p: mtp_loss(mtp, p, batch, weights, 32), has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    params = random_params(mtp, 0)
    opt, rng, out = tx.init(params), np.random.default_rng(0), {"random": random_params(mtp, 1)}
    for i in range(1, 61):
        params, opt = step(params, opt, walk(rng, 16, 32 + N))
        if i == 15:
            out["partial"] = params
    return {**out, "trained": params}


def batch_prompts() -> list[list[int]]:
    """Different lengths; the first two on the walk, the last off it (partial acceptance)."""
    rng = np.random.default_rng(1)
    return [walk(rng, 1, 7)[0].tolist(), walk(rng, 1, 3)[0].tolist(), rng.integers(0, V, 9).tolist()]


@functools.cache
def jitted_forward(mtp: MTP):
    return jax.jit(mtp.forward)


def reference_logits(mtp: MTP, params, tokens_BT: np.ndarray) -> np.ndarray:
    """All heads' logits (N, B, T, V) without any cache; padded to one shape (causal: rows and
    positions past T change nothing) so every caller shares one compilation."""
    b, t = tokens_BT.shape
    padded = np.zeros((REF_ROWS, REF_LEN), np.int32)
    padded[:b, :t] = tokens_BT
    return np.asarray(jitted_forward(mtp)(params, padded))[:, :b, :t]


def naive_greedy(mtp: MTP, params, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Argmax of head 1 over the whole prefix, recomputed from scratch for every token."""
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((len(prompts), lengths.max() + max_new), np.int32)
    for row, p in zip(tokens, prompts):
        row[: len(p)] = p
    for _ in range(max_new):
        logits_BTV = reference_logits(mtp, params, tokens)[0]
        tokens[np.arange(len(prompts)), lengths] = logits_BTV[np.arange(len(prompts)), lengths - 1].argmax(-1)
        lengths += 1
    return [row[len(p) : n].tolist() for row, p, n in zip(tokens, prompts, lengths)]


@pytest.mark.slow
def test_greedy_matches_no_cache_loop(mtp, models):
    prompts = batch_prompts()
    result = generate(mtp, models["random"], prompts, MAX_NEW)
    assert result.completions() == naive_greedy(mtp, models["random"], prompts, MAX_NEW)
    assert result.stats.forward_passes == MAX_NEW and result.stats.tokens_per_forward == 1.0


@pytest.fixture(scope="module")
def greedy_runs(mtp, models) -> dict:
    """Per model: (stop token, plain greedy result with that stop), sequences stopping at different times."""
    prompts, runs = batch_prompts(), {}
    for name, params in models.items():
        free = generate(mtp, params, prompts, MAX_NEW).completions()
        stop = free[0][MAX_NEW // 2]
        stopped = generate(mtp, params, prompts, MAX_NEW, stop_tokens=[stop])
        new = stopped.lengths - stopped.prompt_lengths
        assert len(set(new.tolist())) > 1 and new.min() < MAX_NEW, "sequences must stop at different times"
        runs[name] = (stop, stopped)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("k, reduced", [(k, False) for k in range(2, N + 1)] + [(N, True)])
@pytest.mark.parametrize("model", ["random", "partial", "trained"])
def test_speculative_equals_greedy_in_a_batch(mtp, models, greedy_runs, model, k, reduced):
    stop, greedy = greedy_runs[model]
    spec = speculative_generate(mtp, models[model], batch_prompts(), k, MAX_NEW, stop_tokens=[stop], reduced=reduced)
    assert spec.completions() == greedy.completions()
    np.testing.assert_array_equal(spec.tokens, greedy.tokens)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["random", "partial", "trained"])
def test_speculative_equals_greedy_alone(mtp, models, model):
    """Batch 1, against the no-cache loop (the cached greedy equals it, see the first test)."""
    prompt = [walk(np.random.default_rng(2), 1, 6)[0].tolist()]
    spec = speculative_generate(mtp, models[model], prompt, N, MAX_NEW)
    assert spec.completions() == naive_greedy(mtp, models[model], prompt, MAX_NEW)


@pytest.mark.slow
def test_speculative_equals_greedy_in_bf16(cfg, models):
    """bf16 compute: a verify pass over k positions and k one-token passes round differently,
    yet head 1's argmax must agree token for token (the partially trained model's logits have
    margins far above bf16 rounding; the random one's near-ties would not)."""
    mtp16 = MTP(dataclasses.replace(cfg.model, dtype="bfloat16"))
    assert mtp16.dtype == jnp.bfloat16
    prompts = batch_prompts()
    for name in ("partial", "trained"):
        greedy = generate(mtp16, models[name], prompts, MAX_NEW)
        for k in (2, N):
            spec = speculative_generate(mtp16, models[name], prompts, k, MAX_NEW)
            assert spec.completions() == greedy.completions(), (name, k)


@pytest.mark.slow
def test_trained_heads_accept_drafts(mtp, models):
    prompts = walk(np.random.default_rng(3), 3, 9).tolist()  # the batch tests' shape: no new compile
    runs = [speculative_generate(mtp, models["trained"], prompts, k, MAX_NEW) for k in range(1, N + 1)]
    per_k = [r.stats.tokens_per_forward for r in runs]
    assert per_k[0] == 1.0 and per_k[-1] > 1.5 and per_k == sorted(per_k), per_k
    assert all(r.completions() == runs[0].completions() for r in runs)


@pytest.mark.parametrize("model", ["partial", "trained"])
def test_forward_passes_match_a_no_cache_simulation(mtp, models, model):
    """Each sequence's pass count equals blockwise decoding replayed on the greedy output with
    no cache (`acceptance.replay`): drafts are heads 2..k's argmax at the last accepted
    position, nowhere else."""
    params, prompts, k = models[model], batch_prompts(), N
    spec = speculative_generate(mtp, params, prompts, k, MAX_NEW)
    for prompt, completion, passes in zip(prompts, spec.completions(), spec.passes):
        full = np.array(prompt + completion)
        drafts_TJ = reference_logits(mtp, params, full[None])[1:k, 0].argmax(-1).T
        attempts, accepted, decoding_passes = replay(full.tolist(), len(prompt), drafts_TJ)
        assert passes == decoding_passes + 1  # the prefill
        assert attempts[0] >= attempts[1] >= accepted[1] and accepted[0] >= attempts[1]


@functools.cache
def jitted_reference_caches(mtp: MTP):
    """Keys and values (layer or head, B, T, K, E) of the trunk and of every head for a whole
    sequence, from test_model's reference (its rmsnorm, rope and block; no cache code)."""
    cfg = mtp.cfg

    def kv(p: dict, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
        h_BTD = ref_rmsnorm(x_BTD, p["attn_norm"]["scale"], cfg.norm_eps)
        k_BTKE = ref_rope(jnp.einsum("btd,dke->btke", h_BTD, p["attn"]["wk"]), cfg.rope_theta)
        return k_BTKE, jnp.einsum("btd,dke->btke", h_BTD, p["attn"]["wv"])

    def caches(params, tokens_BT):
        x_BTD, one_document = params["embed"]["embedding"][tokens_BT], jnp.ones(tokens_BT.shape, jnp.int32)
        trunk = []
        for i in range(cfg.trunk_layers):
            trunk.append(kv(layer(params["trunk"], i), x_BTD))
            x_BTD = ref_block(layer(params["trunk"], i), x_BTD, one_document, cfg)
        heads = [kv(layer(params["heads"], i), x_BTD) for i in range(cfg.mtp_heads)]
        stack = lambda kvs: KVCache(*(jnp.stack(xs) for xs in zip(*kvs)))
        return {"trunk": stack(trunk), "heads": stack(heads)}

    return jax.jit(caches)


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["chain", "reduced chain", "tree"])
@pytest.mark.parametrize("model", ["partial", "trained"])
def test_caches_hold_only_verified_entries(mtp, models, model, decoder):
    """After speculative decoding with rejections, every cache (trunk and all heads) below each
    sequence's last token holds the reference keys and values of the output: drafts left no
    trace, heads 2..k saw only verified z, and every entry sits in its position's slot."""
    params, prompts = models[model], batch_prompts()
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((3, lengths.max()), np.int32)
    for row, p in zip(tokens, prompts):
        row[: len(p)] = p
    fed = len(make_tree((3, 2)).depth) if decoder == "tree" else N
    h, cache = prefill(mtp, params, tokens, lengths, slots=tokens.shape[1] + MAX_NEW + fed)
    args = (tokens, lengths, np.array([-1], np.int32), jax.random.key(0), Sampling())
    run, static = (_tree_decode, {"widths": (3, 2)}) if decoder == "tree" else (
        _speculate, {"k": N, "reduced": decoder == "reduced chain"})
    prog, _, cache = run(mtp, params, cache, h, *args, max_new=MAX_NEW, mode="greedy", **static)
    out_len = np.asarray(prog.length_B)
    outputs = np.maximum(np.asarray(prog.tokens_BS)[:, : out_len.max()], 0)  # PAD -> 0 past each length
    want = jitted_reference_caches(mtp)(params, outputs)
    got_leaves = jax.tree.leaves((cache["trunk"], cache["heads"]))
    for got_leaf, want_leaf in zip(got_leaves, jax.tree.leaves((want["trunk"], want["heads"]))):
        for b, n in enumerate(out_len - 1):  # axes: (layer or head, batch, slot, ...)
            np.testing.assert_allclose(np.asarray(got_leaf)[:, b, :n], np.asarray(want_leaf)[:, b, :n], atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("reduced", [True, False])
@pytest.mark.parametrize("model", ["partial", "trained"])
def test_verify_pass_equals_feeding_tokens_one_at_a_time(mtp, models, model, reduced):
    """One verify pass (reduced: heads 2..N write KV entries at every fed position and run only
    at the last accepted one; wide: every head everywhere, one unembedding) leaves the caches
    that feeding the accepted tokens one at a time through every head leaves, and gives head
    1's logits at every fed position and drafts at the last accepted one as a no-cache forward
    does."""
    params, prompts = models[model], batch_prompts()
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((3, lengths.max()), np.int32)
    for row, p in zip(tokens, prompts):
        row[: len(p)] = p
    logits_BNV, start = prefill(mtp, params, tokens, lengths, slots=tokens.shape[1] + MAX_NEW + N)
    fed_BK = np.asarray(logits_BNV.argmax(-1), np.int32)  # head 1's token, drafts
    positions_BK = lengths[:, None] + np.arange(N)

    @jax.jit
    def verify_once(cache):
        logits_BKV, draft = verify_pass(mtp, params, cache, fed_BK, positions_BK, N, reduced)
        target_BK = logits_BKV.argmax(-1)
        accepted_B = jnp.sum(jnp.cumprod(fed_BK[:, 1:] == target_BK[:, :-1], axis=1), axis=1)
        return (logits_BKV, accepted_B, *draft(accepted_B))

    logits_BKV, accepted, drafts_BJV, got = verify_once(start)
    accepted = np.asarray(accepted)
    assert accepted.min() < N - 1 or model == "trained"
    step = jax.jit(forward_step, static_argnums=(0, 5))
    want = start
    for j in range(N):  # the full pass, one token at a time
        _, want = step(mtp, params, want, fed_BK[:, j : j + 1], positions_BK[:, j : j + 1], N)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        for b, n in enumerate(lengths + accepted + 1):  # every slot up to the last accepted token
            np.testing.assert_allclose(np.asarray(got_leaf)[:, b, :n], np.asarray(want_leaf)[:, b, :n], atol=2e-5)
    full = np.zeros((3, lengths.max() + N), np.int32)
    for b, (p, a) in enumerate(zip(prompts, accepted)):
        full[b, : len(p) + N] = p + fed_BK[b].tolist()
        ref_NKV = reference_logits(mtp, params, full[b : b + 1])[:, 0, len(p) : len(p) + N]
        np.testing.assert_allclose(np.asarray(logits_BKV[b]), ref_NKV[0], atol=1e-4)
        np.testing.assert_allclose(np.asarray(drafts_BJV[b]), ref_NKV[1:, a], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("reduced", [False, True])
def test_linear_heads_speculative_equals_no_cache_greedy(reduced):
    """Linear heads keep no cache: the wide pass vmaps them without one, the reduced pass projects
    z at the last accepted position (`LinearHeads.apply_at`)."""
    from test_head_kinds import _mtp, _params, _uncached_greedy

    mtp = _mtp("linear")
    params, prompts = _params(mtp, seed=3), [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]
    spec = speculative_generate(mtp, params, prompts, mtp.cfg.mtp_heads, 10, reduced=reduced)
    assert spec.completions() == _uncached_greedy(mtp, params, prompts, 10)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["random", "partial", "trained"])
def test_tree_equals_greedy_in_a_batch(mtp, models, greedy_runs, model):
    stop, greedy = greedy_runs[model]
    tree = tree_generate(mtp, models[model], batch_prompts(), (3, 2), MAX_NEW, stop_tokens=[stop])
    np.testing.assert_array_equal(tree.tokens, greedy.tokens)


@pytest.mark.slow
def test_tree_accepts_more_than_the_chain(mtp, models):
    prompts = walk(np.random.default_rng(3), 3, 9).tolist()
    chain = speculative_generate(mtp, models["partial"], prompts, N, MAX_NEW)
    tree = tree_generate(mtp, models["partial"], prompts, (3, 2), MAX_NEW)
    assert tree.completions() == chain.completions()
    assert tree.stats.tokens_per_forward > chain.stats.tokens_per_forward, (tree.stats, chain.stats)


def test_tree_refuses_sampling_and_bad_widths(mtp, models):
    with pytest.raises(ConfigError, match="greedy only"):
        tree_generate(mtp, models["random"], [[1]], (2, 2), 4, Sampling(temperature=1.0))
    with pytest.raises(ConfigError, match="tree widths"):
        tree_generate(mtp, models["random"], [[1]], (2, 2, 2), 4)


def test_make_tree_by_hand():
    tree = make_tree((2, 2))  # root, a b, aa ab ba bb
    np.testing.assert_array_equal(tree.depth, [0, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(tree.parent, [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(tree.rank, [0, 0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(tree.path[5], [0, 2, 5])
    assert tree.ancestors[6].tolist() == [True, False, True, False, False, False, True]


@pytest.mark.slow
def test_top_k_1_and_tiny_top_p_are_greedy(mtp, models):
    params, prompts = models["random"], batch_prompts()
    greedy = generate(mtp, params, prompts, MAX_NEW).completions()
    assert generate(mtp, params, prompts, MAX_NEW, Sampling(1.0, top_k=1), seed=5).completions() == greedy
    assert generate(mtp, params, prompts, MAX_NEW, Sampling(1.0, top_p=1e-3), seed=5).completions() == greedy


@pytest.mark.parametrize(
    "top_k, top_p, want",
    [(2, 1.0, [0.625, 0.375, 0, 0]), (0, 0.5, [1, 0, 0, 0]), (0, 0.85, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
     (3, 0.7, [0.625, 0.375, 0, 0]), (0, 1.0, [0.5, 0.3, 0.15, 0.05])],
)
def test_top_k_and_top_p_filters(top_k, top_p, want):
    """top-p keeps the most likely tokens until their mass reaches p; both filters: the stricter."""
    logits_1V = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    probs = jax.jit(token_probs, static_argnums=2)(logits_1V, Sampling(1.0, top_k, top_p), "filtered")
    np.testing.assert_allclose(probs[0], want, atol=1e-6)


def test_verify_greedy_accepts_only_a_matching_prefix():
    p_BKV = jax.nn.one_hot(jnp.array([[3, 5, 7]] * 4), V)
    drafts_BJ = jnp.array([[4, 5], [3, 6], [3, 5], [9, 9]], jnp.int32)  # row 0: 2nd matches after a miss
    q_BJV = jax.nn.one_hot(drafts_BJ, V)
    accepted, new = jitted_verify(jax.random.key(0), p_BKV, q_BJV, drafts_BJ, True)
    np.testing.assert_array_equal(accepted, [0, 1, 2, 0])
    np.testing.assert_array_equal(new[:, 0], 3)
    np.testing.assert_array_equal(new[1:3, 1], 5)
    assert new[2, 2] == 7


@pytest.mark.slow
def test_verify_keeps_the_target_distribution():
    """Drafts from q, accepted with min(1, p/q), else corrected from norm(max(0, p - q)): each
    emitted token follows p exactly, whatever q is."""
    rng = np.random.default_rng(0)
    p_KV, q_JV = rng.dirichlet(np.ones(6), 3), rng.dirichlet(np.ones(6) * 0.3, 2)
    b = 100_000
    key_d, key_v = jax.random.split(jax.random.key(0))
    drafts_BJ = jax.random.categorical(key_d, jnp.log(jnp.asarray(q_JV, jnp.float32)), shape=(b, 2)).astype(jnp.int32)
    broadcast = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (b, *x.shape))
    accepted, new = jitted_verify(key_v, broadcast(p_KV), broadcast(q_JV), drafts_BJ, False)
    accepted, new = np.asarray(accepted), np.asarray(new)
    tv = lambda tokens, p: 0.5 * np.abs(np.bincount(tokens, minlength=6) / len(tokens) - p).sum()
    assert tv(new[:, 0], p_KV[0]) < 0.01
    assert tv(new[accepted >= 1, 1], p_KV[1]) < 0.015
    assert tv(drafts_BJ[:, 0], p_KV[0]) > 0.1  # q is far from p: accepting every draft would fail


@pytest.mark.slow
def test_speculative_sampling_is_exact_and_reproducible(mtp, models):
    """Empirical joint of the first three sampled tokens vs the model's exact distribution; the
    same seed gives the same samples, another seed others."""
    params = models["trained"]
    prompt = walk(np.random.default_rng(4), 1, 6)[0].tolist()
    pairs = np.stack(np.meshgrid(np.arange(V), np.arange(V), indexing="ij"), -1).reshape(-1, 2)
    contexts = np.concatenate([np.tile(prompt, (len(pairs), 1)), pairs], axis=1).astype(np.int32)
    p_NCTV = jax.nn.softmax(reference_logits(mtp, params, contexts), axis=-1)
    p1, p2, p3 = (np.asarray(p_NCTV[0, :, t], np.float64) for t in (5, 6, 7))
    exact = p1[0][:, None, None] * p2[::V][:, :, None] * p3.reshape(V, V, V)
    draft_only = p1[0][:, None, None] * np.asarray(p_NCTV[1, 0, 5])[:, None] * np.asarray(p_NCTV[2, 0, 5])
    samples = 4000
    out = speculative_generate(mtp, params, [prompt] * samples, N, 3, Sampling(temperature=1.0), seed=0)
    x = np.array(out.completions())
    empirical = np.bincount((x[:, 0] * V + x[:, 1]) * V + x[:, 2], minlength=V**3).reshape(V, V, V) / samples
    tv = 0.5 * np.abs(empirical - exact).sum()
    assert tv < 0.05, tv
    assert 0.5 * np.abs(draft_only - exact).sum() > 3 * 0.05  # the check can tell a wrong rule apart
    assert 1.0 < out.stats.tokens_per_forward < 3.0
    again = lambda seed: speculative_generate(mtp, params, [prompt] * samples, N, 3, Sampling(1.0), seed=seed)
    assert again(0).completions() == out.completions() and again(1).completions() != out.completions()


# --- CLI -------------------------------------------------------------------------------------
class Letters:
    """A 16-token tokenizer for the tiny model: 0 is EOT, 1..15 are letters."""

    vocab_size, eot_id, bos_id = V, 0, None

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % 15 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("-abcdefghijklmno"[i] for i in ids)


@pytest.fixture
def run_dir(tmp_path, cfg):
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    return tmp_path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--speculative", "4"], "exceeds the run's 3 heads"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-k", "-2"], "top_k"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--max-new-tokens", "many"], "invalid int value"),
        (["--speculative", "-1"], "speculative"),
    ],
)
def test_cli_errors_are_one_line(run_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(run_dir), "--prompt", "hi", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_missing_run_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(tmp_path / "nowhere"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "not a run directory" in err


@pytest.mark.slow
def test_cli_prints_completion_and_stats(run_dir, cfg, mtp, models, capsys, monkeypatch):
    import mtp_jax.run

    monkeypatch.setattr(mtp_jax.run, "load_run", lambda *_, **__: (cfg, Letters(), mtp, models["trained"]))
    monkeypatch.setattr(mtp_jax.run, "read_tokenizer", lambda _: Letters())
    assert cli_main([str(run_dir), "--prompt", "abcde", "--speculative", "3", "--max-new-tokens", str(MAX_NEW)]) == 0
    completion, stats = capsys.readouterr().out.splitlines()
    prompt = Letters().encode("abcde")  # a document start, nothing before it
    want = naive_greedy(mtp, models["trained"], [prompt], MAX_NEW)[0]
    want = want[: want.index(Letters.eot_id) + 1] if Letters.eot_id in want else want  # EOT stops it
    assert completion == Letters().decode([t for t in want if t != Letters.eot_id]) and len(want) > 2
    assert stats.startswith(f"[{len(want)} tokens, ") and "tokens/pass" in stats and "tokens/s" in stats


@pytest.mark.slow
def test_decoding_sees_the_contexts_training_sees(run_dir, cfg, mtp, models, capsys, monkeypatch):
    """mtp-generate feeds the prompt as a document start with nothing before it (no end-of-text
    token); head 1's distribution there is the training forward's at that document inside a
    packed training window (after another document and its end-of-text token)."""
    import mtp_jax.run

    gen = importlib.import_module("mtp_jax.decode.generate")  # the package exports a function of that name
    params, seen, real = models["trained"], [], gen.generate
    monkeypatch.setattr(mtp_jax.run, "load_run", lambda *_, **__: (cfg, Letters(), mtp, params))
    monkeypatch.setattr(mtp_jax.run, "read_tokenizer", lambda _: Letters())
    monkeypatch.setattr(gen, "generate", lambda m, p, prompts, **kw: seen.append(prompts) or real(m, p, prompts, **kw))
    assert cli_main([str(run_dir), "--prompt", "abcde", "--max-new-tokens", "2"]) == 0
    prompt = Letters().encode("abcde")
    assert seen == [[prompt]]
    tokens, starts = pack([np.array([3, 4, 5, 6]), np.array(prompt)], Letters())
    segments = np.searchsorted(starts, np.arange(len(tokens)), side="right")
    train_V = jax.jit(mtp.forward)(params, tokens[None], None, segments[None])[0, 0, starts[1] + len(prompt) - 1]
    logits_BNV, _ = prefill(mtp, params, np.array([prompt]), np.array([len(prompt)]), slots=len(prompt) + 2 + N)
    np.testing.assert_allclose(np.asarray(logits_BNV[0, 0]), train_V, atol=1e-4)
    assert capsys.readouterr().err.startswith("memory plan: ")  # printed before loading
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(run_dir), "--prompt", ""])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "encodes to no tokens" in err and err.count("\n") == 1
