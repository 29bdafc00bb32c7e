"""The n prediction heads: parameters stacked on a leading head axis, applied one at a time.

A head kind maps the trunk output z to head i's hidden state h_i; the shared final norm and
unembedding (in `transformer.py`) turn h_i into logits for token t+i. A new kind is one row of
the registry (`head_kinds.py`: its name, properties and class) and a class here implementing
`HeadKind`, without touching the trunk: chained kinds read the previous head's output, a
sequential one also the embedding of the token before its target, a replicated one brings its
own unembedding.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.config import ModelConfig
from mtp_jax.model.draft_block import at_index, block_at
from mtp_jax.model.head_kinds import HeadKindSpec, head_kind, processing_order
from mtp_jax.model.layers import Block, KVCache, RMSNorm, param


def stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, axis_name: str, rngs: nnx.Rngs) -> nnx.Module:
    """Creates `count` independent copies with parameters stacked on a leading axis (vmapped init)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: axis_name})
    def create(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return create(rngs)


class HeadKind(Protocol):
    """What the trunk, the train step and the decoder need from a head variant.

    `chained` kinds (head i reads head i-1's output, as the paper's causal ablation and
    DeepSeek-style sequential modules do) get that output as `prev_BTD`; independent kinds
    ignore it. Only independent kinds can use `apply_at` in a reduced verify pass: a chained
    head's entries at a position need the previous head's full output there.
    """

    spec: HeadKindSpec  # the kind's properties, from the registry (`head_kinds.py`); copied below
    chained: bool
    reverse: bool
    reads_tokens: bool
    own_unembedding: bool
    uses_cache: bool

    def create(self, rngs: nnx.Rngs) -> nnx.Module:
        """All n heads, parameters stacked on axis 0."""

    def apply(
        self, params_i: dict, z_BTD: jax.Array, positions_BT: jax.Array, segments_BT: jax.Array | None,
        cache: KVCache | None, prev_BTD: jax.Array | None = None, tree_mask_BTS: jax.Array | None = None,
        feed_BTD: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Head i's hidden state from the trunk output, given head i's (unstacked) parameters.
        `tree_mask_BTS` (decoding, independent kinds) replaces the causal mask over cache slots:
        tree verification runs head 1 over a candidate tree."""

    def write_cache(self, params_i: dict, z_BTD: jax.Array, positions_BT: jax.Array,
                    cache: KVCache | None) -> KVCache | None:
        """Head i's cache entries at these positions without its output (what `apply` would write)."""

    def apply_at(self, params_i: dict, z_BTD: jax.Array, positions_BT: jax.Array, index_B: jax.Array,
                 cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        """Head i's hidden state (B, D) at fed index index_B only, and its cache entries written at
        every fed position (what `apply` gives there and writes), each weight read once."""


class _Heads:
    """A kind's implementation carries its registry properties, read by the model, loss and decoder."""

    def __init__(self, cfg: ModelConfig, spec: HeadKindSpec):
        self.cfg, self.spec = cfg, spec
        self.chained, self.reverse, self.reads_tokens = spec.chained, spec.reverse, spec.reads_tokens
        self.own_unembedding, self.uses_cache = spec.own_unembedding, spec.block  # block heads cache keys/values


class TransformerHeads(_Heads):
    """The paper's default: each head is one transformer block reading z (parallel heads)."""

    def __init__(self, cfg: ModelConfig, spec: HeadKindSpec):
        super().__init__(cfg, spec)
        self.block_def = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))

    def create(self, rngs: nnx.Rngs) -> nnx.Module:
        return stacked(lambda r: Block(self.cfg, r), self.cfg.mtp_heads, "mtp", rngs)

    def apply(self, params_i, z_BTD, positions_BT, segments_BT, cache, prev_BTD=None, tree_mask_BTS=None,
              feed_BTD=None):
        return nnx.merge(self.block_def, params_i)(z_BTD, positions_BT, segments_BT, cache, tree_mask_BTS)

    def write_cache(self, params_i, z_BTD, positions_BT, cache):
        return nnx.merge(self.block_def, params_i).write_cache(z_BTD, positions_BT, cache)

    def apply_at(self, params_i, z_BTD, positions_BT, index_B, cache):
        return block_at(nnx.merge(self.block_def, params_i), z_BTD, positions_BT, index_B, cache)


class LinearProjection(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kernel = param(rngs, (cfg.d_model, cfg.d_model), ("embed", None), cfg.init_std)


class LinearHeads(_Heads):
    """Ablation from the paper: head i is a single d x d linear map before the shared unembedding."""

    def create(self, rngs: nnx.Rngs) -> nnx.Module:
        return stacked(lambda r: LinearProjection(self.cfg, r), self.cfg.mtp_heads, "mtp", rngs)

    def apply(self, params_i, z_BTD, positions_BT, segments_BT, cache, prev_BTD=None, tree_mask_BTS=None,
              feed_BTD=None):
        return z_BTD @ params_i["kernel"].astype(z_BTD.dtype), cache

    def write_cache(self, params_i, z_BTD, positions_BT, cache):
        return cache

    def apply_at(self, params_i, z_BTD, positions_BT, index_B, cache):
        return at_index(z_BTD, index_B)[:, 0] @ params_i["kernel"].astype(z_BTD.dtype), cache


class ChainedHeads(TransformerHeads):
    """The paper's causal ablation (head i is a block on top of head i-1's output, head 1 on z) and,
    with `reverse`, the anticausal one (the farthest head reads z, head i reads head i+1's output).
    `prev_BTD` is the output of the head processed before this one (z itself, or None, for the first)."""

    def apply(self, params_i, z_BTD, positions_BT, segments_BT, cache, prev_BTD=None, tree_mask_BTS=None,
              feed_BTD=None):
        x_BTD = z_BTD if prev_BTD is None else prev_BTD
        return nnx.merge(self.block_def, params_i)(x_BTD, positions_BT, segments_BT, cache, tree_mask_BTS)

    def write_cache(self, *args):
        raise ValueError("chained heads have no reduced verify pass: their cache entries need the previous head's "
                         "output")

    apply_at = write_cache


class SequentialModule(nnx.Module):
    """DeepSeek-V3's MTP module: h'_i = W_i [RMSNorm(h_{i-1}); RMSNorm(Emb(x_{t+i-1}))], h_i = Block_i(h'_i)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.hidden_norm = RMSNorm(d, cfg.norm_eps, rngs)
        self.embed_norm = RMSNorm(d, cfg.norm_eps, rngs)
        self.proj = param(rngs, (2 * d, d), (None, "embed"), cfg.init_std)
        self.block = Block(cfg, rngs)

    def __call__(self, prev_BTD, feed_BTD, positions_BT, segments_BT, cache, tree_mask_BTS=None):
        x_BTE = jnp.concatenate([self.hidden_norm(prev_BTD), self.embed_norm(feed_BTD)], axis=-1)
        return self.block(x_BTE @ self.proj[...].astype(x_BTE.dtype), positions_BT, segments_BT, cache, tree_mask_BTS)


class SequentialHeads(ChainedHeads):
    """DeepSeek-V3-style sequential heads: head i reads head i-1's output (h_0 = z) and the embedding of
    the token before its target, x_{t+i-1} (for head 1 that is x_t itself, the token at t). Training
    feeds the true tokens; decoding feeds them where they are known (the prompt) and head i-1's
    argmax at t where x_{t+i-1} is not known yet (`MTP.token_feed`), so every cache entry is a
    function of the tokens known when it is written."""

    def __init__(self, cfg: ModelConfig, spec: HeadKindSpec):
        _Heads.__init__(self, cfg, spec)
        self.module_def = nnx.graphdef(nnx.eval_shape(lambda: SequentialModule(cfg, nnx.Rngs(0))))

    def create(self, rngs: nnx.Rngs) -> nnx.Module:
        return stacked(lambda r: SequentialModule(self.cfg, r), self.cfg.mtp_heads, "mtp", rngs)

    def apply(self, params_i, z_BTD, positions_BT, segments_BT, cache, prev_BTD=None, tree_mask_BTS=None,
              feed_BTD=None):
        x_BTD = z_BTD if prev_BTD is None else prev_BTD
        module = nnx.merge(self.module_def, params_i)
        return module(x_BTD, feed_BTD, positions_BT, segments_BT, cache, tree_mask_BTS)


class Unembedding(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)


class ReplicatedHeads(LinearHeads):
    """The byte models' replicated unembedding (d, n x V): no head layers, head i's logits are
    RMSNorm(z) W_i with its own W_i (D, V), stacked as (n, D, V)."""

    def create(self, rngs: nnx.Rngs) -> nnx.Module:
        return stacked(lambda r: Unembedding(self.cfg, r), self.cfg.mtp_heads, "mtp", rngs)

    def apply(self, params_i, z_BTD, positions_BT, segments_BT, cache, prev_BTD=None, tree_mask_BTS=None,
              feed_BTD=None):
        return z_BTD, cache

    def apply_at(self, params_i, z_BTD, positions_BT, index_B, cache):
        return at_index(z_BTD, index_B)[:, 0], cache


def make_heads(cfg: ModelConfig) -> HeadKind:
    """The implementation of `cfg.head_type`, as the registry names it."""
    spec = head_kind(cfg.head_type)
    return globals()[spec.impl](cfg, spec)


def head_slice(tree: Any, index: int | slice | jax.Array) -> Any:
    """Entries `index` (a head, a range or an index array) of every leaf's leading head axis: head
    parameters or caches out of the stacked trees, or the heads put in another order."""
    return jax.tree.map(lambda x: x[index], tree)


def scan_heads(kind: HeadKind, heads_params: dict, z_BTD: jax.Array, step: Callable, xs: Any = None,
               head_order: bool = True) -> Any:
    """Runs `step(prev_BTD, params_i, i, x_i) -> (h_BTD, y_i)` over the heads as a lax.scan in the
    kind's processing order; a chained kind's head gets the output of the one before it as
    `prev_BTD` (z for the first), independent kinds get z. `xs` (stacked on the head axis, e.g.
    caches) is handed out per head. Returns the stacked y_i in head order (or processing order)."""
    order = jnp.asarray(processing_order(kind.spec, jax.tree.leaves(heads_params)[0].shape[0]))

    def body(prev_BTD, args):
        hp, i, x = args
        h_BTD, y = step(prev_BTD, hp, i, x)
        return (h_BTD if kind.chained else prev_BTD), y

    _, ys = jax.lax.scan(body, z_BTD, (head_slice(heads_params, order), order, head_slice(xs, order)))
    return head_slice(ys, jnp.argsort(order)) if head_order else ys
