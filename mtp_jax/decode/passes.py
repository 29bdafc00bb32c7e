"""The cached forward passes of decoding: trunk and heads over fed tokens, writing the KV caches.

A verify pass needs head 1 at every fed position (the target distributions), but heads 2..k
only at ONE position, the last accepted one, to draft the next tokens. At the other fed
positions those heads only need their key/value entries, so that later queries can attend to
them. `verify_pass` therefore runs the trunk and head 1 on the fed tokens and, once the
accepted count is known, heads 2..k write their entries at every fed position (`write_cache`,
no attention or MLP) and run one query position against their caches. The entries they write
are what running them fully would write (same z, same positions), so the outputs are
unchanged. Chained head kinds (head i reads head i-1's output) cannot skip head i-1's output
at any position; they fall back to the full pass (`forward_step` with every head).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from mtp_jax.model.heads import head_slice
from mtp_jax.model.layers import KVCache
from mtp_jax.model.transformer import MTP, Params

Cache = dict[str, KVCache | None]
Drafter = Callable[[jax.Array], tuple[jax.Array, Cache]]


def at_index(x_NBT: jax.Array, index_B: jax.Array) -> jax.Array:
    """x[:, b, index_B[b]] for every sequence b: (N, B, T, ...) -> (N, B, ...)."""
    return jax.vmap(lambda x_NT, i: x_NT[:, i], in_axes=(1, 0), out_axes=1)(x_NBT, index_B)


def _heads_slice(tree, lo: int, hi: int):
    return jax.tree.map(lambda x: x[lo:hi], tree)


def _set_heads(cache: Cache, lo: int, new: KVCache | None) -> Cache:
    if new is None:
        return cache
    heads = jax.tree.map(lambda full, part: full.at[lo : lo + part.shape[0]].set(part), cache["heads"], new)
    return {"trunk": cache["trunk"], "heads": heads}


def forward_step(
    mtp: MTP, params: Params, cache: Cache, tokens_BT: jax.Array, positions_BT: jax.Array, heads: int
) -> tuple[jax.Array, Cache]:
    """Hidden states (heads, B, T, D) of heads 1..`heads` at every fed position, writing their
    caches there: the full pass (plain decoding uses heads=1; chained kinds verify with it, and an
    anticausal kind runs every head, since head 1 reads the others). Heads are a lax.scan
    (`MTP.heads_hidden`), so compile time does not grow with k.
    """
    z_BTD, trunk_cache = mtp.trunk(params, tokens_BT, positions_BT, None, cache["trunk"])
    run = mtp.cfg.mtp_heads if getattr(mtp.head_kind, "reverse", False) else heads  # anticausal: head 1 reads all
    first = lambda tree: _heads_slice(tree, 0, run)
    feed = mtp.token_feed(mtp.shared(params), tokens_BT)  # sequential kinds: the fed token, then argmaxes
    h_NBTD, head_cache = mtp.heads_hidden(first(params["heads"]), z_BTD, positions_BT, None, first(cache["heads"]),
                                          feed)
    return h_NBTD[:heads], _set_heads({"trunk": trunk_cache, "heads": cache["heads"]}, 0, head_cache)


def later_heads(mtp: MTP, params: Params, cache: Cache, z_BTD: jax.Array, positions_BT: jax.Array,
                index_B: jax.Array, heads: int) -> tuple[jax.Array, Cache]:
    """Heads 2..`heads`: hidden states (heads - 1, B, D) at fed index index_B only, after writing
    their cache entries at every fed position."""
    z_B1D = at_index(z_BTD[None], index_B)[0][:, None]
    if heads == 1:
        return jnp.zeros((0, *z_B1D.shape[::2]), z_BTD.dtype), cache
    position_B1 = jnp.take_along_axis(positions_BT, index_B[:, None], axis=1)
    j_count = heads - 1
    h_JBD = jnp.zeros((j_count, *z_B1D.shape[::2]), z_BTD.dtype)

    def one_head(i, carry):
        # A loop over the whole stacked tree, not a scan over a slice of it: slicing heads 2..k
        # out of the parameters and caches copies them every pass (a k = 4 pass then measured
        # slower than the full pass, which slices nothing at k = n).
        h_JBD, heads_cache = carry
        params_i = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), params["heads"])
        cache_i = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), heads_cache)
        cache_i = mtp.head_kind.write_cache(params_i, z_BTD, positions_BT, cache_i)
        h_B1D, cache_i = mtp.head(params_i, z_B1D, position_B1, None, cache_i)  # rewrites one entry, same value
        heads_cache = jax.tree.map(lambda full, new: jax.lax.dynamic_update_index_in_dim(full, new, i, 0),
                                   heads_cache, cache_i)
        return h_JBD.at[i - 1].set(h_B1D[:, 0]), heads_cache

    h_JBD, heads_cache = jax.lax.fori_loop(1, heads, one_head, (h_JBD, cache["heads"]))
    return h_JBD, {"trunk": cache["trunk"], "heads": heads_cache}


def verify_pass(mtp: MTP, params: Params, cache: Cache, tokens_BT: jax.Array, positions_BT: jax.Array,
                heads: int) -> tuple[jax.Array, Drafter]:
    """Head 1's hidden states (B, T, D) at the fed positions, and `draft(index_B)`: heads
    2..`heads` at fed index index_B (the last accepted) and the caches after the whole pass.
    Reduced for independent head kinds, the full pass for chained ones."""
    if mtp.head_kind.chained:
        h_NBTD, cache = forward_step(mtp, params, cache, tokens_BT, positions_BT, heads)
        return h_NBTD[0], lambda index_B: (at_index(h_NBTD[1:], index_B), cache)
    z_BTD, h_BTD, cache = trunk_and_first_head(mtp, params, cache, tokens_BT, positions_BT)
    return h_BTD, functools.partial(later_heads, mtp, params, cache, z_BTD, positions_BT, heads=heads)


def trunk_and_first_head(mtp: MTP, params: Params, cache: Cache, tokens_BT: jax.Array, positions_BT: jax.Array,
                         tree_mask_BTS: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Cache]:
    """(z, head 1's hidden state, caches) over the fed tokens; `tree_mask_BTS` for a candidate tree."""
    z_BTD, trunk_cache = mtp.trunk(params, tokens_BT, positions_BT, None, cache["trunk"], tree_mask_BTS)
    first_cache = None if cache["heads"] is None else KVCache(*(x[0] for x in cache["heads"]))
    h_BTD, first_cache = mtp.head_kind.apply(head_slice(params["heads"], 0), z_BTD, positions_BT, None, first_cache,
                                             tree_mask_BTS=tree_mask_BTS)
    cache = {"trunk": trunk_cache, "heads": cache["heads"]}
    if first_cache is not None:
        cache = _set_heads(cache, 0, KVCache(*(x[None] for x in first_cache)))
    return z_BTD, h_BTD, cache


@functools.partial(jax.jit, static_argnames=("mtp", "slots"))
def prefill(mtp: MTP, params: Params, prompt_BP: jax.Array, prompt_len_B: jax.Array, *,
            slots: int) -> tuple[jax.Array, Cache]:
    """Every head's hidden state (N, B, D) at each prompt's last token, and caches of `slots`
    slots holding the prompts: one (reduced) pass, so plain and speculative decoding of the
    same shapes share this compiled function."""
    b, p = prompt_BP.shape
    positions_BP = jnp.broadcast_to(jnp.arange(p), (b, p))
    h_BPD, draft = verify_pass(mtp, params, mtp.init_cache(b, slots), prompt_BP, positions_BP, mtp.cfg.mtp_heads)
    h_JBD, cache = draft(prompt_len_B - 1)
    return jnp.concatenate([at_index(h_BPD[None], prompt_len_B - 1), h_JBD]), cache
