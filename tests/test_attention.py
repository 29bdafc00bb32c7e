"""Every attention implementation against an independent NumPy reference: causal + document
masking, grouped-query heads, lengths that are not a multiple of the block; outputs, gradients,
and the full MTP loss and gradient at model level."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import xla_flags
from mtp_jax.config import ConfigError, ModelConfig
from mtp_jax.loss import loss_weights, mtp_loss
from mtp_jax.model import attention
from mtp_jax.model.transformer import MTP

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    """Full-precision float32 matmuls for this module's comparisons only: set for the whole session, the
    precision would reach other modules' programs (the splash kernel on TPU refuses it)."""
    with jax.default_matmul_precision("highest"):
        yield


def reference(q, k, v, seg, cot):
    """float64 NumPy attention with an explicit (T, T) mask and its hand-written backward:
    (output, dq, dk, dv) for the cotangent `cot` of the output."""
    q, k, v, cot = (np.asarray(x, np.float64) for x in (q, k, v, cot))
    b, t, h, e = q.shape
    g = h // k.shape[2]
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthe,bshe->bhts", q, kr) / np.sqrt(e)
    seg = np.asarray(seg)
    mask = np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshe->bthe", p, vr)
    dp = np.einsum("bthe,bshe->bhts", cot, vr)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) / np.sqrt(e)
    dq = np.einsum("bhts,bshe->bthe", ds, kr)
    per_group = lambda x: x.reshape(b, t, k.shape[2], g, e).sum(3)
    dk = per_group(np.einsum("bhts,bthe->bshe", ds, q))
    dv = per_group(np.einsum("bhts,bthe->bshe", p, cot))
    return out, dq, dk, dv


def inputs(b=2, t=37, h=4, kv=2, e=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, h, e), jnp.float32)
    k = jax.random.normal(keys[1], (b, t, kv, e), jnp.float32)
    v = jax.random.normal(keys[2], (b, t, kv, e), jnp.float32)
    # Documents of uneven lengths, different per row; row 1 ends in padding (segment 0).
    seg = np.ones((b, t), np.int32)
    seg[0, 11:] = 2
    seg[0, 30:] = 3
    seg[1, 5:] = 2
    seg[1, 33:] = 0
    return q, k, v, jnp.asarray(seg)


def blockwise7(q, k, v, seg):
    return attention.blockwise_attention(q, k, v, seg, block=7)


def blockwise19(q, k, v, seg):
    return attention.blockwise_attention(q, k, v, seg, block=19)


def splash_cpu(q, k, v, seg):
    return attention.splash_attention(q, k, v, seg, interpret=True)


IMPLS = {
    "xla": attention.xla_attention,
    "blockwise": attention.blockwise_attention,  # one block (T < BLOCK)
    "blockwise7": blockwise7,  # 6 blocks (flash loops), the last partly padding
    "blockwise19": blockwise19,  # 2 blocks (unrolled over key prefixes), the last partly padding
    "splash_interpret": splash_cpu,  # the TPU kernel through Pallas interpret mode
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "splash_interpret" else n for n in IMPLS]
)
def test_output_and_gradients_match_numpy_reference(name):
    fn = IMPLS[name]
    q, k, v, seg = inputs()
    cot = jax.random.normal(jax.random.key(9), q.shape)
    out, *want = reference(q, k, v, seg, cot)
    np.testing.assert_allclose(fn(q, k, v, seg), out, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a, seg) * cot), argnums=(0, 1, 2))(q, k, v)
    tol = 1e-4 if name == "splash_interpret" else 1e-5
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("block", [32, 4], ids=["unrolled", "flash"])
def test_blockwise_backward_stores_no_square_scores(block):
    """The jaxpr of the blockwise gradient holds no (T, T)-sized intermediate at T = 16 blocks
    (key blocks in loops), and no more than one query block's scores against the whole length
    (B x H x C x T) at 2 blocks (unrolled)."""
    unrolled = 64 // block <= attention.UNROLLED_BLOCKS
    assert unrolled == (block == 32)
    q, k, v, seg = inputs(b=2, t=64, h=2, kv=1, e=8)
    fn = lambda q, k, v: jnp.sum(attention.blockwise_attention(q, k, v, seg, block=block))
    jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(q, k, v)
    sizes = [int(np.prod(var.aval.shape)) for eqn in _all_eqns(jaxpr.jaxpr) for var in eqn.outvars]
    assert max(sizes) <= (2 * 2 * block * 64 if unrolled else 64 * 64 - 1), max(sizes)


def _all_eqns(jaxpr):
    yield from jaxpr.eqns
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from _all_eqns(sub)


def model_loss(attn):
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=3, attn_heads=4, kv_heads=2, mtp_heads=2, attention=attn, dtype="float32")
    mtp = MTP(cfg)
    params = mtp.init(jax.random.key(0))
    t = 29
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 61, (2, t + 2)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[0, 9:] = 2
    seg[1, 20:] = 0
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg)}
    fn = lambda p: mtp_loss(mtp, p, batch, loss_weights(2), chunk=8)[0]
    return jax.jit(jax.value_and_grad(fn))(params)


@pytest.mark.slow
@pytest.mark.parametrize("block", [15, 7], ids=["unrolled", "flash"])
def test_model_loss_and_gradients_blockwise_equal_xla(monkeypatch, block):
    """Full MTP loss (trunk + 2 heads, GQA, documents, odd T) at rtol 1e-5, blockwise over 2
    blocks (unrolled) and 5 (flash loops)."""
    monkeypatch.setattr(attention, "BLOCK", block)
    loss_x, grads_x = model_loss("xla")
    loss_b, grads_b = model_loss("blockwise")
    np.testing.assert_allclose(loss_b, loss_x, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_b, grads_x)


def test_auto_keeps_xla_for_short_sequences_and_blockwise_for_long():
    assert attention.resolve("auto", 128, jnp.float32, "cpu") == "xla"
    assert attention.resolve("auto", 256, jnp.float32, "cpu") == "blockwise"
    assert attention.resolve("auto", 8192, jnp.float32, "cpu") == "blockwise"
    assert attention.resolve("auto", 8192, jnp.bfloat16, "tpu") == "splash"
    assert attention.resolve("auto", 256, jnp.bfloat16, "gpu") == "cudnn"


def test_cudnn_off_gpu_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="model.attention='cudnn' needs a GPU"):
        attention.resolve("cudnn", 128, jnp.bfloat16, "cpu")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_xla_in_bf16():
    q, k, v, seg = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in inputs(t=64, e=64))
    np.testing.assert_allclose(
        attention.cudnn_attention(q, k, v, seg).astype(jnp.float32),
        attention.xla_attention(q, k, v, seg).astype(jnp.float32), rtol=2e-2, atol=2e-2,
    )


@pytest.mark.slow  # a fresh 8-device process, two train-step compiles
def test_blockwise_sharded_over_eight_devices_matches_xla_on_one():
    """data 2 x fsdp 2 x tensor 2 (kv heads split over tensor), micro_batches 2: one SGD step."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _sharded_worker() -> None:
    import optax

    from conftest import documents_batch, tiny_overrides
    from mtp_jax import sharding
    from mtp_jax.config import MeshConfig, load_config
    from mtp_jax.step import StepFns

    attention.BLOCK = 8  # 3 blocks at T = 21
    batch = documents_batch(8, 21 + 3, 64, seed=4)
    out = {}
    for attn, mesh_cfg, devices in [("xla", MeshConfig(data=1), jax.devices()[:1]),
                                    ("blockwise", MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())]:
        cfg = load_config(None, tiny_overrides(model__mtp_heads=3, model__n_layers=5, model__attn_heads=4, model__kv_heads=2,
                                               train__batch_size=8, train__seq_len=21, train__micro_batches=2, model__attention=attn))
        mtp = MTP(cfg.model)
        fns = StepFns(mtp, optax.sgd(0.5), cfg.train, sharding.make_mesh(mesh_cfg, devices), sharding.rules_dict(cfg.mesh.rules))
        params = jax.jit(mtp.init)(jax.random.key(0))
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": fns.tx.init(params)}
        state, metrics = fns.train_step(jax.device_put(state, fns.state_shardings), batch)
        out[attn] = jax.device_get((metrics, state["params"]))
    np.testing.assert_allclose(out["blockwise"][0]["loss"], out["xla"][0]["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out["blockwise"][1], out["xla"][1])


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    _sharded_worker()
