"""The MTP transformer: embedding, a scanned trunk, n stacked heads, shared norm and unembedding.

`MTPModel` is the NNX module (it owns parameter creation and logical axes). `MTP` exposes the
pieces the train step and decoder need as pure functions of a plain parameter dict, so the
jitted step shards, donates and checkpoints a pytree of arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.config import ModelConfig
from mtp_jax.model.heads import HEAD_KINDS, processing_order, stacked
from mtp_jax.model.layers import Block, KVCache, RMSNorm, param
from mtp_jax.sharding import constrain

Params = dict[str, Any]

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class MTPModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, v = cfg.d_model, cfg.vocab_size
        self.embed = nnx.Dict(embedding=param(rngs, (v, d), ("vocab", "embed"), cfg.init_std))
        self.trunk = stacked(lambda r: Block(cfg, r), cfg.trunk_layers, "layers", rngs)
        self.heads = HEAD_KINDS[cfg.head_type](cfg).create(rngs)
        self.norm = RMSNorm(d, cfg.norm_eps, rngs)
        if not cfg.tie_embeddings:
            self.unembed = nnx.Dict(kernel=param(rngs, (d, v), ("embed", "vocab"), cfg.init_std))


def compute_dtype(name: str) -> str:
    """'auto' computes in bfloat16 on accelerators and float32 on CPU (where bf16 matmuls are slow)."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _pure(tree: Any) -> Any:
    return nnx.to_pure_dict(tree)


class MTP:
    """Pure-function view of `MTPModel` for one config (hashable, so it can be a static jit arg)."""

    def __init__(self, cfg: ModelConfig):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.head_kind = HEAD_KINDS[cfg.head_type](cfg)
        self.block_def = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))
        self.norm_def = nnx.graphdef(nnx.eval_shape(lambda: RMSNorm(cfg.d_model, cfg.norm_eps, nnx.Rngs(0))))
        self.dtype = jnp.dtype(compute_dtype(cfg.dtype))

    # --- parameters -------------------------------------------------------------------------
    def init(self, key: jax.Array) -> Params:
        return _pure(nnx.state(MTPModel(self.cfg, nnx.Rngs(key)), nnx.Param))

    @functools.cached_property
    def _abstract_state(self) -> Any:
        return nnx.state(nnx.eval_shape(lambda: MTPModel(self.cfg, nnx.Rngs(0))), nnx.Param)

    def abstract_params(self) -> Params:
        return _pure(self._abstract_state)

    def logical_axes(self) -> Params:
        """Same tree as the parameters, each leaf the tuple of logical axis names."""
        names = jax.tree.map(
            lambda v: tuple(v.get_metadata()["out_sharding"]),
            self._abstract_state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        return _pure(names)

    # --- forward pieces ---------------------------------------------------------------------
    def embed(self, params: Params, tokens_BT: jax.Array) -> jax.Array:
        # FSDP-style: gather the table whole, then look up batch-sharded rows (no involuntary resharding).
        table_VD = constrain(params["embed"]["embedding"], (None, None))
        x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(self.dtype)
        return constrain(x_BTD, ("batch", None, "embed"))

    def trunk(
        self,
        params: Params,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        segments_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        tree_mask_BTS: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """z for every position; blocks applied with lax.scan so compile time is flat in depth.
        `tree_mask_BTS` (decoding only) replaces the causal mask over cache slots."""

        def body(x_BTD, layer):
            block_params, layer_cache = layer
            return nnx.merge(self.block_def, block_params)(x_BTD, positions_BT, segments_BT, layer_cache, tree_mask_BTS)

        if self.cfg.remat in _REMAT:
            body = jax.checkpoint(body, policy=_REMAT[self.cfg.remat])
        z_BTD, cache = jax.lax.scan(body, self.embed(params, tokens_BT), (params["trunk"], cache))
        return z_BTD, cache

    def head(
        self,
        head_params: Params,
        z_BTD: jax.Array,
        positions_BT: jax.Array,
        segments_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        prev_BTD: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """One head's hidden state, from that head's (unstacked) parameters (and, for chained kinds,
        the output of the head processed before it)."""
        return self.head_kind.apply(head_params, z_BTD, positions_BT, segments_BT, cache, prev_BTD)

    def heads_hidden(
        self,
        heads_params: Params,
        z_BTD: jax.Array,
        positions_BT: jax.Array,
        segments_BT: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Every head's hidden state (N, B, T, D) in head order, and their caches: a lax.scan in the
        kind's processing order that hands chained kinds the previous head's output."""
        order = jnp.asarray(processing_order(self.head_kind, jax.tree.leaves(heads_params)[0].shape[0]))
        permute = lambda tree, idx: jax.tree.map(lambda x: x[idx], tree)
        chained = self.head_kind.chained

        def body(prev_BTD, xs):
            h_BTD, c = self.head(xs[0], z_BTD, positions_BT, segments_BT, xs[1], prev_BTD if chained else None)
            return (h_BTD if chained else prev_BTD), (h_BTD, c)

        _, (h_NBTD, cache) = jax.lax.scan(body, z_BTD, (permute(heads_params, order), permute(cache, order)))
        back = jnp.argsort(order)
        return permute(h_NBTD, back), permute(cache, back)

    def shared(self, params: Params) -> Params:
        """The parameters every head shares: the final norm and the unembedding (D, V)."""
        w_DV = params["embed"]["embedding"].T if self.cfg.tie_embeddings else params["unembed"]["kernel"]
        return {"norm": params["norm"], "unembed": w_DV}

    def final_norm(self, shared: Params, h_BTD: jax.Array) -> jax.Array:
        return nnx.merge(self.norm_def, shared["norm"])(h_BTD)

    def logits(self, shared: Params, h_BTD: jax.Array) -> jax.Array:
        """float32 logits; only for short sequences (decoding) or the naive reference path."""
        hn_BTD = self.final_norm(shared, h_BTD)
        return jnp.einsum("btd,dv->btv", hn_BTD, shared["unembed"].astype(hn_BTD.dtype), preferred_element_type=jnp.float32)

    def forward(
        self, params: Params, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, segments_BT: jax.Array | None = None
    ) -> jax.Array:
        """All heads' logits (N, B, T, V) at once: the simple path, memory O(N x T x V)."""
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        z_BTD, _ = self.trunk(params, tokens_BT, positions_BT, segments_BT)
        shared = self.shared(params)
        h_NBTD, _ = self.heads_hidden(params["heads"], z_BTD, positions_BT, segments_BT)
        return jnp.stack([self.logits(shared, h_BTD) for h_BTD in h_NBTD])

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict[str, KVCache | None]:
        """Zeroed KV caches for the trunk blocks and (transformer) heads, stacked on their leading axis."""
        cfg = self.cfg
        dtype = dtype or self.dtype
        shape = lambda n: (n, batch, max_len, cfg.kv_heads_, cfg.head_dim_)
        make = lambda n: KVCache(jnp.zeros(shape(n), dtype), jnp.zeros(shape(n), dtype))
        return {"trunk": make(cfg.trunk_layers), "heads": make(cfg.mtp_heads) if self.head_kind.uses_cache else None}
