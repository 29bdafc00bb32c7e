"""The model and the memory-flat loss against an independent reference written here with plain
jnp ops (full (B, T, V) logits, log_softmax, masks from segment_ids), in float32.

The reference shares no code with `mtp_jax.model` or `mtp_jax.loss`: it reads the parameter
dict directly, so a wrong mask, rotary layout, GQA grouping, head offset or custom_vjp shows up
as a mismatch in the loss or in some parameter's gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.config import ModelConfig
from mtp_jax.flops import peak_flops
from mtp_jax.loss import as_metrics, chunk_size, loss_weights, mtp_loss
from mtp_jax.model.transformer import MTP

# fp32 throughout: the flat path only reorders sums (chunks, heads), so agreement is near round-off.
RTOL, ATOL = 1e-5, 1e-6


# --- independent reference -------------------------------------------------------------------
def ref_rmsnorm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def ref_rope(x_BTHE: jax.Array, theta: float) -> jax.Array:
    """Llama/NeoX rotary: the first and second halves of the head dim form the rotated pairs."""
    t, e = x_BTHE.shape[1], x_BTHE.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, e, 2) / e)  # (E/2,)
    angle = np.arange(t)[:, None] * inv_freq[None, :]  # (T, E/2)
    cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]
    x1, x2 = x_BTHE[..., : e // 2], x_BTHE[..., e // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def ref_block(p: dict, x_BTD: jax.Array, seg_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Pre-norm block; attention causal and within one document; kv head k serves query heads k*G..k*G+G-1."""
    a = p["attn"]
    h = ref_rmsnorm(x_BTD, p["attn_norm"]["scale"], cfg.norm_eps)
    q = ref_rope(jnp.einsum("btd,dhe->bthe", h, a["wq"]), cfg.rope_theta)
    k = ref_rope(jnp.einsum("btd,dke->btke", h, a["wk"]), cfg.rope_theta)
    v = jnp.einsum("btd,dke->btke", h, a["wv"])
    group = cfg.attn_heads // cfg.kv_heads_
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bthe,bshe->bhts", q, k) / math.sqrt(q.shape[-1])
    t = x_BTD.shape[1]
    allowed = np.tril(np.ones((t, t), bool))[None] & (seg_BT[:, :, None] == seg_BT[:, None, :])
    scores = jnp.where(allowed[:, None], scores, -jnp.inf)
    out = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(scores, axis=-1), v)
    x_BTD = x_BTD + jnp.einsum("bthe,hed->btd", out, a["wo"])
    m = p["mlp"]
    h = ref_rmsnorm(x_BTD, p["mlp_norm"]["scale"], cfg.norm_eps)
    return x_BTD + (jax.nn.silu(h @ m["w_gate"]) * (h @ m["w_up"])) @ m["w_down"]


def layer(stacked: dict, i: int) -> dict:
    return jax.tree.map(lambda x: x[i], stacked)


def ref_unembed(params: dict, cfg: ModelConfig) -> jax.Array:
    return params["embed"]["embedding"].T if cfg.tie_embeddings else params["unembed"]["kernel"]


def ref_mtp_loss(params: dict, batch: dict, weights: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """sum_i w_i * mean over valid t of -log p_i(x_{t+i} | x_<=t); valid = t and t+i in one non-padding document."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    n = cfg.mtp_heads
    t = tokens.shape[1] - n
    z = params["embed"]["embedding"][tokens[:, :t]]
    for i in range(params["trunk"]["mlp"]["w_up"].shape[0]):
        z = ref_block(layer(params["trunk"], i), z, seg[:, :t], cfg)
    losses, accs = [], []
    for i in range(1, n + 1):
        hp = layer(params["heads"], i - 1)
        h = ref_block(hp, z, seg[:, :t], cfg) if cfg.head_type == "transformer" else z @ hp["kernel"]
        logits = ref_rmsnorm(h, params["norm"]["scale"], cfg.norm_eps) @ ref_unembed(params, cfg)
        target = tokens[:, i : i + t]
        valid = (seg[:, :t] == seg[:, i : i + t]) & (seg[:, i : i + t] != 0)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[..., None], axis=-1)[..., 0]
        losses.append(jnp.sum(nll * valid) / jnp.sum(valid))
        accs.append(jnp.sum((jnp.argmax(logits, axis=-1) == target) & valid) / jnp.sum(valid))
    losses = jnp.stack(losses)
    return jnp.sum(weights * losses), {"loss": losses, "accuracy": jnp.stack(accs)}


# --- helpers ---------------------------------------------------------------------------------
def random_params(mtp: MTP, seed: int = 0, std: float = 0.1) -> dict:
    """Random float32 parameters of the model's shapes, drawn with numpy (no RNG program to
    compile); norm scales are 1 + noise, so a dropped or misplaced scale changes the loss."""
    rng = np.random.default_rng(seed)

    def draw(axes: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        noise = std * rng.standard_normal(leaf.shape)
        return jnp.asarray(1 + noise if "norm" in axes else noise, jnp.float32)

    return jax.tree.map(draw, mtp.logical_axes(), mtp.abstract_params(), is_leaf=lambda x: isinstance(x, tuple))


def assert_trees_close(actual: dict, expected: dict, rtol: float = RTOL, atol: float = ATOL) -> None:
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    assert len(flat_a) == len(flat_e)
    for path, a in flat_a:
        np.testing.assert_allclose(a, flat_e[path], rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def loss_and_grad(fn, params: dict, batch: dict):
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)


# --- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("length,requested,expected", [(24, 5, 4), (24, 512, 24), (17, 8, 1), (32, 8, 8)])
def test_chunk_size_is_largest_divisor_not_above_request(length: int, requested: int, expected: int) -> None:
    assert chunk_size(length, requested) == expected


# Each head type and each embedding mode once (with the n = 1 and metrics tests below, transformer
# heads are also checked untied); four combinations would double the compile time.
@pytest.mark.parametrize(
    "head_type,tie", [pytest.param("transformer", True, marks=pytest.mark.slow), ("linear", False)]
)
def test_loss_and_grads_match_reference(tiny, make_batch, head_type: str, tie: bool) -> None:
    """3 heads, weights (1, .5, .25), GQA, documents + padding, ce_chunk 5 over T=24 (chunks of 4)."""
    cfg = tiny(model__head_type=head_type, model__tie_embeddings=tie, model__mtp_heads=3, model__n_layers=5,
               train__seq_len=24, train__ce_chunk=5)
    mtp = MTP(cfg.model)
    params = random_params(mtp)
    batch = make_batch(4, 24 + 3, cfg.model.vocab_size, seed=1)
    weights = jnp.asarray([1.0, 0.5, 0.25])
    (ref, ref_m), ref_g = loss_and_grad(lambda p, b: ref_mtp_loss(p, b, weights, cfg.model), params, batch)
    assert np.all(np.asarray(ref_m["accuracy"]) <= 1)
    for impl in ("flat", "naive"):
        (loss, m), grads = loss_and_grad(lambda p, b: mtp_loss(mtp, p, b, weights, cfg.train.ce_chunk, impl), params, batch)
        np.testing.assert_allclose(loss, ref, rtol=RTOL, err_msg=impl)
        np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=RTOL, err_msg=impl)
        np.testing.assert_allclose(m["accuracy"], ref_m["accuracy"], rtol=RTOL, err_msg=impl)
        assert_trees_close(grads, ref_g)


@pytest.mark.slow
def test_per_head_metrics_count_only_masked_in_targets(tiny, make_batch) -> None:
    """Zero unembedding: every logit is 0, the loss is ln V, and the top-1 guess is token 0 at
    every position, so accuracy_i must be the share of token-0 targets among head i's valid
    targets. Token 0 is planted so that share differs from the share over all targets."""
    cfg = tiny(model__mtp_heads=3, train__seq_len=16)
    mtp = MTP(cfg.model)
    params = random_params(mtp)
    params["unembed"]["kernel"] = jnp.zeros_like(params["unembed"]["kernel"])
    batch = make_batch(4, 16 + 3, cfg.model.vocab_size, seed=2)
    tokens, seg = batch["tokens"], batch["segment_ids"]
    tokens[np.random.default_rng(0).random(tokens.shape) < 0.1] = 0
    # Token 0 at padding and at each document's first 3 tokens: the masked-out targets, which
    # would all count as correct if accuracy were taken over every position.
    starts = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    tokens[(seg == 0) | starts | np.roll(starts, 1, 1) | np.roll(starts, 2, 1)] = 0
    weights = loss_weights(3, [1.0, 2.0, 0.5])
    for impl in ("flat", "naive"):
        metrics_fn = jax.jit(lambda p, b: as_metrics(*mtp_loss(mtp, p, b, weights, chunk=8, impl=impl)))
        metrics = metrics_fn(params, batch)
        assert set(metrics) == {"loss"} | {f"{k}/head_{i}" for k in ("loss", "accuracy") for i in (1, 2, 3)}
        np.testing.assert_allclose(metrics["loss"], 3.5 * math.log(64), rtol=RTOL)
        for i in (1, 2, 3):
            target, t = tokens[:, i : i + 16], 16
            valid = (seg[:, :t] == seg[:, i : i + t]) & (seg[:, i : i + t] != 0)
            expected = np.sum((target == 0) & valid) / np.sum(valid)
            assert abs(np.mean(target == 0) - expected) > 0.05, "batch does not tell masked from unmasked accuracy"
            np.testing.assert_allclose(metrics[f"loss/head_{i}"], math.log(64), rtol=RTOL)
            np.testing.assert_allclose(metrics[f"accuracy/head_{i}"], expected, rtol=RTOL, err_msg=f"{impl} head {i}")


@pytest.mark.slow
def test_single_head_equals_plain_next_token_model(tiny, make_batch) -> None:
    """n = 1: the trunk blocks then the one head block are an ordinary n_layers-deep LM. The trunk
    runs as a rolled scan here (`layer_loop` scan); the other reference tests run it unrolled (auto)."""
    cfg = tiny(model__mtp_heads=1, model__n_layers=3, model__kv_heads=0, train__seq_len=16, model__layer_loop="scan")
    mtp = MTP(cfg.model)
    params = random_params(mtp, seed=3)
    tokens = make_batch(4, 17, cfg.model.vocab_size, seed=3)["tokens"]
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens)}

    def plain_loss(p: dict, b: dict) -> tuple[jax.Array, dict]:
        blocks = jax.tree.map(lambda a, h: jnp.concatenate([a, h]), p["trunk"], p["heads"])
        x = p["embed"]["embedding"][b["tokens"][:, :-1]]
        everywhere = jnp.ones(x.shape[:2], jnp.int32)
        for i in range(cfg.model.n_layers):
            x = ref_block(layer(blocks, i), x, everywhere, cfg.model)
        logits = ref_rmsnorm(x, p["norm"]["scale"], cfg.model.norm_eps) @ p["unembed"]["kernel"]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["tokens"][:, 1:, None], axis=-1)
        return jnp.mean(nll), {}

    (ref, _), ref_g = loss_and_grad(plain_loss, params, batch)
    (loss, _), grads = loss_and_grad(lambda p, b: mtp_loss(mtp, p, b, loss_weights(1), 8, "flat"), params, batch)
    np.testing.assert_allclose(loss, ref, rtol=RTOL)
    assert_trees_close(grads, ref_g)


def _scans(jaxpr: jax.extend.core.Jaxpr) -> list[tuple[int, int]]:
    """(length, unroll factor) of every scan in the program."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append((eqn.params["length"], eqn.params["unroll"]))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _scans(sub)
    return out


def _eqn_count(jaxpr: jax.extend.core.Jaxpr) -> int:
    return sum(1 + sum(_eqn_count(s) for s in jax.extend.core.jaxprs_in_params(e.params)) for e in jaxpr.eqns)


def _loss_grad_jaxpr(tiny, **overrides) -> tuple[jax.extend.core.Jaxpr, int]:
    cfg = tiny(model__mtp_heads=2, train__seq_len=16, **overrides)
    mtp = MTP(cfg.model)
    params = jax.eval_shape(mtp.init, jax.random.key(0))
    batch = {k: jax.ShapeDtypeStruct((2, 18), jnp.int32) for k in ("tokens", "segment_ids")}
    grad = jax.grad(lambda p, b: mtp_loss(mtp, p, b, loss_weights(2), 8, "flat")[0])
    return jax.make_jaxpr(grad)(params, batch).jaxpr, cfg.model.trunk_layers


def test_trunk_is_one_scan_so_program_size_is_flat_in_depth(tiny) -> None:
    """The trunk is one scan of trunk_layers iterations, so the traced loss-and-gradient program has
    the same size at 7 and 13 layers; `layer_loop` scan keeps it rolled when compiled too."""
    sizes = []
    for n_layers in (7, 13):
        jaxpr, trunk_layers = _loss_grad_jaxpr(tiny, model__n_layers=n_layers, model__layer_loop="scan")
        assert (trunk_layers, 1) in _scans(jaxpr)
        sizes.append(_eqn_count(jaxpr))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("loop,n_layers,unrolled", [("auto", 18, True), ("auto", 19, False), ("unroll", 40, True)])
def test_layer_loop_unrolls_shallow_trunks(tiny, loop: str, n_layers: int, unrolled: bool) -> None:
    """`auto` unrolls trunks of up to 16 blocks (2 of the layers are heads here), `unroll` any depth."""
    jaxpr, trunk_layers = _loss_grad_jaxpr(tiny, model__n_layers=n_layers, model__layer_loop=loop)
    assert (trunk_layers, trunk_layers if unrolled else 1) in _scans(jaxpr)  # jax records True as the length


def test_peak_flops_table() -> None:
    assert peak_flops(jax.devices("cpu")[0]) is None
    assert peak_flops("TPU v5 lite") == 197e12 and peak_flops("TPU v5") == 459e12  # v5e vs v5p
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12


def test_head_write_cache_holds_the_reference_keys_and_values(tiny) -> None:
    """A reduced verify pass writes a head's cache entries without running the head: they must be
    rope(norm(z) wk) and norm(z) wv at slots start.., from the reference above, and nothing else."""
    cfg = tiny(model__mtp_heads=2, model__n_layers=3)
    mtp = MTP(cfg.model)
    params = random_params(mtp)
    hp = layer(params["heads"], 1)
    z = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, cfg.model.d_model)), jnp.float32)
    start = 4
    positions = jnp.broadcast_to(jnp.arange(start, start + 5), (2, 5))
    cache = jax.tree.map(lambda x: x[1], mtp.init_cache(2, 12)["heads"])
    written = jax.jit(lambda p, z, c: mtp.head_kind.write_cache(p, z, positions, c))(hp, z, cache)
    h = ref_rmsnorm(z, hp["attn_norm"]["scale"], cfg.model.norm_eps)
    k = jnp.einsum("btd,dke->btke", h, hp["attn"]["wk"])
    v = jnp.einsum("btd,dke->btke", h, hp["attn"]["wv"])
    # reference rope starts at position 0: rotate a zero-padded sequence and keep positions start..
    k = ref_rope(jnp.concatenate([jnp.zeros((2, start) + k.shape[2:]), k], axis=1), cfg.model.rope_theta)[:, start:]
    np.testing.assert_allclose(written.k_BSKE[:, start:start + 5], k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(written.v_BSKE[:, start:start + 5], v, rtol=1e-5, atol=1e-6)
    assert not np.any(written.k_BSKE[:, :start]) and not np.any(written.v_BSKE[:, start + 5:])
    assert not mtp.head_kind.chained
