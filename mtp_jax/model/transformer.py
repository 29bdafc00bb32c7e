"""The MTP transformer: embedding, a scanned trunk, n stacked heads, shared norm and unembedding.

`MTPModel` is the NNX module (it owns parameter creation and logical axes). `MTP` exposes the
pieces the train step and decoder need as pure functions of a plain parameter dict, so the
jitted step shards, donates and checkpoints a pytree of arrays.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax import platforms
from mtp_jax.config import ModelConfig
from mtp_jax.model.heads import head_slice, make_heads, scan_heads, stacked
from mtp_jax.model.layers import Block, KVCache, RMSNorm, param
from mtp_jax.sharding import constrain

Params = dict[str, Any]
Feed = Callable[[jax.Array, jax.Array], jax.Array]  # (head index, previous head's output) -> (B, T, D)

# `layer_loop: auto` unrolls trunks up to this depth on CPU (accelerators scan). Unrolled, a step skips the scan's stacking of
# every block's residuals and slicing of its weights (0.975x the step time at the parity benchmark's
# small shape, 0.933x at its large one, alternated in one process) while compile time grows with
# depth (CPU, d_model 256: 7.4 -> 8.7 s at 6 blocks, 8.3 -> 15.1 s at 24).
UNROLL_MAX_LAYERS = 16

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class MTPModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, v = cfg.d_model, cfg.vocab_size
        self.embed = nnx.Dict(embedding=param(rngs, (v, d), ("vocab", "embed"), cfg.init_std))
        self.trunk = stacked(lambda r: Block(cfg, r), cfg.trunk_layers, "layers", rngs)
        kind = make_heads(cfg)
        self.heads = kind.create(rngs)
        self.norm = RMSNorm(d, cfg.norm_eps, rngs)
        if not (cfg.tie_embeddings or kind.own_unembedding):
            self.unembed = nnx.Dict(kernel=param(rngs, (d, v), ("embed", "vocab"), cfg.init_std))


def compute_dtype(name: str) -> str:
    """'auto' computes in bfloat16 on accelerators and float32 on CPU (where bf16 matmuls are slow)."""
    if name != "auto":
        return name
    return "float32" if platforms.target() == "cpu" else "bfloat16"


def _pure(tree: Any) -> Any:
    return nnx.to_pure_dict(tree)


class MTP:
    """Pure-function view of `MTPModel` for one config (hashable, so it can be a static jit arg)."""

    def __init__(self, cfg: ModelConfig):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.head_kind = make_heads(cfg)
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
        """z for every position; blocks applied with lax.scan (stacked parameters), unrolled per `model.layer_loop`.
        `tree_mask_BTS` (decoding only) replaces the causal mask over cache slots."""

        def body(x_BTD, layer):
            block_params, layer_cache = layer
            return nnx.merge(self.block_def, block_params)(x_BTD, positions_BT, segments_BT, layer_cache, tree_mask_BTS)

        if self.cfg.remat in _REMAT:
            body = jax.checkpoint(body, policy=_REMAT[self.cfg.remat])
        z_BTD, cache = jax.lax.scan(body, self.embed(params, tokens_BT), (params["trunk"], cache), unroll=self.unrolled)
        return z_BTD, cache

    @property
    def unrolled(self) -> bool:
        """Whether the trunk's layer scan is unrolled (`model.layer_loop`)."""
        loop = self.cfg.layer_loop
        if loop == "auto" and platforms.target() != "cpu":  # the unrolling gain was measured on CPU only
            return False
        return loop == "unroll" or (loop == "auto" and self.cfg.trunk_layers <= UNROLL_MAX_LAYERS)

    def head(
        self,
        head_params: Params,
        z_BTD: jax.Array,
        positions_BT: jax.Array,
        segments_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        prev_BTD: jax.Array | None = None,
        feed_BTD: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """One head's hidden state, from that head's (unstacked) parameters (and, for chained kinds,
        the output of the head processed before it; for sequential ones, Emb of the token fed)."""
        return self.head_kind.apply(head_params, z_BTD, positions_BT, segments_BT, cache, prev_BTD, feed_BTD=feed_BTD)

    def heads_hidden(
        self,
        heads_params: Params,
        z_BTD: jax.Array,
        positions_BT: jax.Array,
        segments_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        feed: Feed | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Every head's hidden state (N, B, T, D) in head order, and their caches: a lax.scan in the
        kind's processing order that hands chained kinds the previous head's output and sequential
        kinds `feed(i, prev_BTD)`, the embedding of the token head i reads."""
        def step(prev_BTD, hp, i, c):
            feed_BTD = None if feed is None else feed(i, prev_BTD)
            h_BTD, c = self.head(hp, z_BTD, positions_BT, segments_BT, c, prev_BTD, feed_BTD)
            return h_BTD, (h_BTD, c)

        return scan_heads(self.head_kind, heads_params, z_BTD, step, cache)

    def token_feed(self, shared: Params, tokens_BT: jax.Array, teacher_NBT: jax.Array | None = None,
                   known_B: jax.Array | None = None) -> Feed | None:
        """What a sequential head i (0-based) reads besides head i-1's output: Emb(x_{t+i}), the token
        before its target. Training passes the true tokens (`teacher_NBT[i]`). Decoding feeds the
        true token wherever it is known: the fed token for head 0, and x_{t+i} itself where t+i is
        among the first known_B[b] fed positions (a prompt's tokens in the prefill); elsewhere,
        head i-1's argmax at t. Every cache entry stays a function of the tokens known when it is
        written."""
        if not self.head_kind.reads_tokens:
            return None
        t = tokens_BT.shape[1]

        def feed(i: jax.Array, prev_BTD: jax.Array) -> jax.Array:
            if teacher_NBT is not None:
                return self.embed_rows(shared, teacher_NBT[i])
            guess_BT = jnp.argmax(self.logits(shared, prev_BTD), axis=-1).astype(tokens_BT.dtype)
            ahead_T = jnp.arange(t) + i
            known_BT = (ahead_T < (1 if known_B is None else known_B[:, None])) | (i == 0)
            true_BT = jnp.take(tokens_BT, jnp.minimum(ahead_T, t - 1), axis=1)
            return self.embed_rows(shared, jnp.where(known_BT, true_BT, guess_BT))

        return feed

    def embed_rows(self, shared: Params, tokens_BT: jax.Array) -> jax.Array:
        """Embedding lookup from `shared` (sequential kinds carry the table there, so its gradient
        flows through the per-head loss like the unembedding's)."""
        return jnp.take(shared["embed"], tokens_BT, axis=0).astype(self.dtype)

    def shared(self, params: Params) -> Params:
        """The parameters every head shares: the final norm, the unembedding (D, V) (head 1's, for
        kinds with their own), and for sequential kinds the embedding table."""
        if self.head_kind.own_unembedding:
            w_DV = params["heads"]["unembed"][0]
        else:
            w_DV = params["embed"]["embedding"].T if self.cfg.tie_embeddings else params["unembed"]["kernel"]
        out = {"norm": params["norm"], "unembed": w_DV}
        if self.head_kind.reads_tokens:
            out["embed"] = params["embed"]["embedding"]
        return out

    def head_unembedding(self, shared: Params, head_params: Params | None) -> jax.Array:
        """Head i's (D, V) unembedding: its own (replicated kind) or the shared one."""
        own = self.head_kind.own_unembedding and head_params is not None
        return head_params["unembed"] if own else shared["unembed"]

    def heads_logits(self, params: Params, h_NBTD: jax.Array, first: int = 0) -> jax.Array:
        """float32 logits (N, B, T, V) of heads first+1..first+N (decoding): one einsum over the
        shared unembedding (each weight read once), or each head's own where the kind has one."""
        shared = self.shared(params)
        if not self.head_kind.own_unembedding:
            hn_NBTD = self.final_norm(shared, h_NBTD)
            w_DV = shared["unembed"].astype(hn_NBTD.dtype)
            return jnp.einsum("nbtd,dv->nbtv", hn_NBTD, w_DV, preferred_element_type=jnp.float32)
        heads = head_slice(params["heads"], slice(first, first + h_NBTD.shape[0]))
        return jax.vmap(lambda hp, h_BTD: self.logits(shared, h_BTD, hp))(heads, h_NBTD)

    def final_norm(self, shared: Params, h_BTD: jax.Array) -> jax.Array:
        return nnx.merge(self.norm_def, shared["norm"])(h_BTD)

    def logits(self, shared: Params, h_BTD: jax.Array, head_params: Params | None = None) -> jax.Array:
        """float32 logits; only for short sequences (decoding) or the naive reference path.
        `head_params` (unstacked) picks that head's own unembedding where the kind has one."""
        hn_BTD = self.final_norm(shared, h_BTD)
        w_DV = self.head_unembedding(shared, head_params)
        return jnp.einsum("btd,dv->btv", hn_BTD, w_DV.astype(hn_BTD.dtype), preferred_element_type=jnp.float32)

    def forward(
        self, params: Params, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
        segments_BT: jax.Array | None = None, known_B: jax.Array | None = None,
    ) -> jax.Array:
        """All heads' logits (N, B, T, V) at once: the simple path, memory O(N x T x V). Sequential
        heads read what decoding feeds them (`token_feed`): the true token within the first known_B
        tokens (a prompt), their previous head's argmax past it (the loss feeds true tokens)."""
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        z_BTD, _ = self.trunk(params, tokens_BT, positions_BT, segments_BT)
        shared = self.shared(params)
        feed = self.token_feed(shared, tokens_BT, known_B=known_B)
        h_NBTD, _ = self.heads_hidden(params["heads"], z_BTD, positions_BT, segments_BT, feed=feed)
        return jnp.stack([self.logits(shared, h, head_slice(params["heads"], i)) for i, h in enumerate(h_NBTD)])

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict[str, KVCache | None]:
        """Zeroed KV caches for the trunk blocks and (transformer) heads, stacked on their leading axis."""
        cfg = self.cfg
        dtype = dtype or self.dtype
        shape = lambda n: (n, batch, max_len, cfg.kv_heads_, cfg.head_dim_)
        make = lambda n: KVCache(jnp.zeros(shape(n), dtype), jnp.zeros(shape(n), dtype))
        return {"trunk": make(cfg.trunk_layers), "heads": make(cfg.mtp_heads) if self.head_kind.uses_cache else None}
