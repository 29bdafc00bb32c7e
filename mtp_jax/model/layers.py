"""Llama-style building blocks in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Every parameter carries logical axis names (`out_sharding` metadata) that `mtp_jax.sharding`
maps onto the device mesh. Tensor names carry their shapes: B batch, T query positions,
S key positions, D model width, H query heads, K kv heads, E head dim, F MLP width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax import platforms
from mtp_jax.config import ModelConfig
from mtp_jax.model.attention import causal_attention, dense_attention
from mtp_jax.sharding import constrain


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float | None) -> nnx.Param:
    """A float32 parameter with logical axes; std=None means ones (norm scales)."""
    value = jnp.ones(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), None)
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BTD.dtype)


def rope(x_BTHE: jax.Array, positions_BT: jax.Array, theta: float, layout: str = "half") -> jax.Array:
    """Rotary embedding. Pair j (frequency theta^(-2j/E)) is dims (j, j + E/2) in the "half" layout
    (Hugging Face Llama, NeoX) and dims (2j, 2j + 1) in the "interleaved" layout (Meta's Llama code),
    so Meta checkpoints run unpermuted."""
    half = x_BTHE.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BT1E = (positions_BT[..., None].astype(jnp.float32) * freq)[:, :, None, :]
    sin, cos = jnp.sin(angle_BT1E), jnp.cos(angle_BT1E)
    x = x_BTHE.astype(jnp.float32)
    if layout == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        # x * (cos, cos) + (x2, x1) * (-sin, sin): one fusion forward and one backward, half the
        # time of rotating the halves separately and concatenating them (fwd + bwd on CPU).
        x1, x2 = jnp.split(x, 2, axis=-1)
        swapped = jnp.concatenate([x2, x1], axis=-1)
        out = x * jnp.concatenate([cos, cos], axis=-1) + swapped * jnp.concatenate([-sin, sin], axis=-1)
    return out.astype(x_BTHE.dtype)


def dense(x_BTD: jax.Array, w_DF: jax.Array) -> jax.Array:
    """x @ w. On CPU through `_cpu_dense`, whose weight gradient is a plain row-major GEMM."""
    return _cpu_dense(x_BTD, w_DF) if platforms.target() == "cpu" else x_BTD @ w_DF


@jax.custom_vjp
def _cpu_dense(x_BTD: jax.Array, w_DF: jax.Array) -> jax.Array:
    return x_BTD @ w_DF


def _cpu_dense_fwd(x_BTD, w_DF):
    return x_BTD @ w_DF, (x_BTD, w_DF)


def _cpu_dense_bwd(res, dy_BTF):
    """Left alone, XLA computes dW by transposing dy and contracting both operands on their leading
    axis, a form YNNPACK (its CPU GEMM) does not take, so Eigen runs it: 1.5x slower for the MLP
    stack forward + backward. A materialised x^T (the barrier stops XLA folding it back into the
    dot) keeps dW = x^T @ dy row-major."""
    x_BTD, w_DF = res
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    xt_DN = jax.lax.optimization_barrier(x_ND.T)
    dw_DF = xt_DN @ dy_BTF.reshape(-1, dy_BTF.shape[-1])
    return dy_BTF @ w_DF.T, dw_DF.astype(w_DF.dtype)


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


def project(x_BTD: jax.Array, w_DHE: jax.Array) -> jax.Array:
    """x @ w per head, (B, T, D) x (D, H, E) -> (B, T, H, E), as one `dense` (row-major gradients on CPU)."""
    d, h, e = w_DHE.shape
    return dense(x_BTD, w_DHE.reshape(d, h * e)).reshape(*x_BTD.shape[:-1], h, e)


def unproject(x_BTHE: jax.Array, w_HED: jax.Array) -> jax.Array:
    """Heads back to the model width, (B, T, H, E) x (H, E, D) -> (B, T, D), as one `dense`."""
    h, e, d = w_HED.shape
    return dense(x_BTHE.reshape(*x_BTHE.shape[:-2], h * e), w_HED.reshape(h * e, d))


class KVCache(NamedTuple):
    """Preallocated keys/values of one block; slot s holds absolute position s."""

    k_BSKE: jax.Array
    v_BSKE: jax.Array


def _write(cache_BSKE: jax.Array, new_BTKE: jax.Array, start_B: jax.Array) -> jax.Array:
    """Writes each sequence's new entries at its own offset (sequences advance at different rates)."""
    write = lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0)
    return jax.vmap(write)(cache_BSKE, new_BTKE.astype(cache_BSKE.dtype), start_B)


def write_cache(cache: KVCache, k_BTKE: jax.Array, v_BTKE: jax.Array, positions_BT: jax.Array) -> KVCache:
    """Writes new keys/values at slots positions[:, 0].. (contiguous positions per sequence)."""
    start_B = positions_BT[:, 0]
    return KVCache(_write(cache.k_BSKE, k_BTKE, start_B), _write(cache.v_BSKE, v_BTKE, start_B))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, e = cfg.d_model, cfg.attn_heads, cfg.kv_heads_, cfg.head_dim_
        std = cfg.init_std
        self.wq = param(rngs, (d, h, e), ("embed", "q_heads", None), std)
        self.wk = param(rngs, (d, k, e), ("embed", "kv_heads", None), std)
        self.wv = param(rngs, (d, k, e), ("embed", "kv_heads", None), std)
        self.wo = param(rngs, (h, e, d), ("q_heads", None, "embed"), std / (2 * cfg.n_layers) ** 0.5)
        self.theta, self.rope_layout = cfg.rope_theta, cfg.rope_layout
        self.impl = cfg.attention

    def keys_values(self, x_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Rotated keys and values (B, T, K, E) of these (normed) inputs."""
        dt = x_BTD.dtype
        k = rope(project(x_BTD, self.wk[...].astype(dt)), positions_BT, self.theta, self.rope_layout)
        return k, project(x_BTD, self.wv[...].astype(dt))

    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segments_BT: jax.Array | None,
        cache: KVCache | None,
        tree_mask_BTS: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        dt = x_BTD.dtype
        q = rope(project(x_BTD, self.wq[...].astype(dt)), positions_BT, self.theta, self.rope_layout)
        k, v = self.keys_values(x_BTD, positions_BT)
        q = constrain(q, ("batch", None, "q_heads", None))
        if cache is None:
            # Training: causal within the window, never across a document (segment ids, no mask tensor).
            out_BTHE = causal_attention(self.impl, q, k, v, segments_BT)
        else:
            # Decoding: slot s holds position s; slots past the query (stale drafts included) are
            # masked. A candidate tree (tree verification) brings its own mask over the slots.
            cache = write_cache(cache, k, v, positions_BT)
            k, v = cache.k_BSKE.astype(dt), cache.v_BSKE.astype(dt)
            slots_S = jnp.arange(k.shape[1])
            mask_BTS = slots_S[None, None, :] <= positions_BT[:, :, None] if tree_mask_BTS is None else tree_mask_BTS
            out_BTHE = dense_attention(q, k, v, mask_BTS)
        out_BTD = unproject(out_BTHE, self.wo[...].astype(dt))
        return out_BTD, cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std = cfg.d_model, cfg.d_ff_, cfg.init_std
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), std / (2 * cfg.n_layers) ** 0.5)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        dt = x_BTD.dtype
        gate_BTF = jax.nn.silu(dense(x_BTD, self.w_gate[...].astype(dt)))
        h_BTF = constrain(gate_BTF * dense(x_BTD, self.w_up[...].astype(dt)), ("batch", None, "mlp"))
        return dense(h_BTF, self.w_down[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segments_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        tree_mask_BTS: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        a_BTD, cache = self.attn(self.attn_norm(x_BTD), positions_BT, segments_BT, cache, tree_mask_BTS)
        x_BTD = x_BTD + a_BTD
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return constrain(x_BTD, ("batch", None, "embed")), cache

    def write_cache(self, x_BTD: jax.Array, positions_BT: jax.Array, cache: KVCache) -> KVCache:
        """Only this block's cache entries for these inputs (what `__call__` would write), without
        attention or MLP: later queries can attend to these positions, whose output is not needed."""
        return write_cache(cache, *self.attn.keys_values(self.attn_norm(x_BTD), positions_BT), positions_BT)
