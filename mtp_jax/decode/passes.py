"""The cached forward passes of decoding: trunk and heads over fed tokens, writing the KV caches.

A verify pass needs head 1 at every fed position (the target distributions) but heads 2..k only
at ONE position, the last accepted one, to draft the next tokens; at the other fed positions
those heads only need their key/value entries, so that later queries can attend to them.
`verify_pass` offers two ways to get exactly that. The wide pass runs every head at every fed
position side by side and unembeds all of them at once: every weight is read once per pass,
which is the cost of a memory-bound batch-1 pass (measured cheapest at batch 1). The reduced pass
runs the trunk and head 1 on the fed tokens and, once the accepted count is known, each head 2..k
writes its entries at every fed position and computes one query (`HeadKind.apply_at`): fewer
FLOPs, one more unembedding read. Both write the entries a one-token-at-a-time pass would write
(same z, same positions), so outputs are unchanged. Chained head kinds (head i reads head i-1's
output) always take the wide pass, one head after another (`forward_step`).
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
Drafter = Callable[[jax.Array], tuple[jax.Array, Cache]]  # index_B -> (draft logits (B, J, V), caches)


def logits(mtp: MTP, params: Params, h_BTD: jax.Array) -> jax.Array:
    return mtp.logits(mtp.shared(params), h_BTD)


def at_index(x_NBT: jax.Array, index_B: jax.Array) -> jax.Array:
    """x[:, b, index_B[b]] for every sequence b: (N, B, T, ...) -> (N, B, ...)."""
    return jax.vmap(lambda x_NT, i: x_NT[:, i], in_axes=(1, 0), out_axes=1)(x_NBT, index_B)


def _heads_slice(tree, lo: int, hi: int):
    return head_slice(tree, slice(lo, hi))


def _set_heads(cache: Cache, lo: int, new: KVCache | None) -> Cache:
    if new is None:
        return cache
    heads = jax.tree.map(lambda full, part: full.at[lo : lo + part.shape[0]].set(part), cache["heads"], new)
    return {"trunk": cache["trunk"], "heads": heads}


def forward_step(
    mtp: MTP, params: Params, cache: Cache, tokens_BT: jax.Array, positions_BT: jax.Array, heads: int,
    known_B: jax.Array | None = None,
) -> tuple[jax.Array, Cache]:
    """Hidden states (heads, B, T, D) of heads 1..`heads` at every fed position, writing their
    caches there: the full pass (plain decoding uses heads=1; chained kinds verify with it, and an
    anticausal kind runs every head, since head 1 reads the others). Heads are a lax.scan
    (`MTP.heads_hidden`), so compile time does not grow with k. Sequential kinds read the true
    token where it is known: the first known_B fed tokens (the prefill's prompt; a verify pass
    knows only its first fed token, the rest are drafts).
    """
    z_BTD, trunk_cache = mtp.trunk(params, tokens_BT, positions_BT, None, cache["trunk"])
    run = mtp.cfg.mtp_heads if mtp.head_kind.reverse else heads  # anticausal: head 1 reads all
    first = lambda tree: _heads_slice(tree, 0, run)
    feed = mtp.token_feed(mtp.shared(params), tokens_BT, known_B=known_B)  # sequential kinds
    h_NBTD, head_cache = mtp.heads_hidden(first(params["heads"]), z_BTD, positions_BT, None, first(cache["heads"]),
                                          feed)
    return h_NBTD[:heads], _set_heads({"trunk": trunk_cache, "heads": cache["heads"]}, 0, head_cache)


def _vmap_heads(run: Callable, params: Params, cache: Cache, heads: int) -> tuple[jax.Array, Cache]:
    """`run(params_i, cache_i)` for heads 1..`heads` side by side (vmapped over the stacked head
    axis): one batched call reads each head's weights once. Slicing fewer than all n heads out of
    the stacked weights copies them, so only a pass that needs fewer heads pays for it."""
    n = jax.tree.leaves(params["heads"])[0].shape[0]
    first = (lambda tree: tree) if heads == n else (lambda tree: _heads_slice(tree, 0, heads))
    out, head_cache = jax.vmap(run)(first(params["heads"]), first(cache["heads"]))
    if heads == n or head_cache is None:
        return out, {"trunk": cache["trunk"], "heads": head_cache if heads == n else cache["heads"]}
    return out, _set_heads(cache, 0, head_cache)


def wide_pass(mtp: MTP, params: Params, cache: Cache, tokens_BT: jax.Array, positions_BT: jax.Array,
              heads: int) -> tuple[jax.Array, Cache]:
    """Hidden states (heads, B, T, D) of heads 1..`heads` at every fed position; independent heads
    run side by side (`_vmap_heads`), chained kinds one after the other (`forward_step`)."""
    if mtp.head_kind.chained:
        return forward_step(mtp, params, cache, tokens_BT, positions_BT, heads)
    z_BTD, trunk_cache = mtp.trunk(params, tokens_BT, positions_BT, None, cache["trunk"])
    run = lambda params_i, cache_i: mtp.head(params_i, z_BTD, positions_BT, None, cache_i)
    return _vmap_heads(run, params, {"trunk": trunk_cache, "heads": cache["heads"]}, heads)


def later_heads(mtp: MTP, params: Params, cache: Cache, z_BTD: jax.Array, positions_BT: jax.Array,
                index_B: jax.Array, heads: int) -> tuple[jax.Array, Cache]:
    """Logits (B, heads - 1, V) of heads 2..`heads` at fed index index_B only, after writing their
    cache entries at every fed position (`HeadKind.apply_at`, which reads each weight once). Every
    head runs (vmapped), head 1 too (rewriting its entries with the same values): measured, that
    is cheaper than copying heads 2..k out of the stacked weights."""
    run = lambda params_i, cache_i: mtp.head_kind.apply_at(params_i, z_BTD, positions_BT, index_B, cache_i)
    h_NBD, cache = _vmap_heads(run, params, cache, mtp.cfg.mtp_heads)
    return mtp.heads_logits(params, h_NBD[1:heads, :, None], first=1)[:, :, 0].swapaxes(0, 1), cache


def verify_pass(mtp: MTP, params: Params, cache: Cache, tokens_BT: jax.Array, positions_BT: jax.Array,
                heads: int, reduced: bool = False) -> tuple[jax.Array, Drafter]:
    """Head 1's logits (B, T, V) at the fed positions, and `draft(index_B)`: the logits (B,
    heads - 1, V) of heads 2..`heads` at fed index index_B (the last accepted) and the caches
    after the whole pass.

    Wide (default): every head at every fed position and ONE unembedding over all of them, the
    drafts then picked at index_B: the weights of the trunk, of each head and the unembedding
    are read once per pass, which is what a memory-bound batch-1 pass costs. Reduced: heads
    2..k only at index_B (`later_heads`), fewer FLOPs but a second unembedding read once the
    accepted count is known; it pays where a pass is compute-bound (large batches). Chained
    kinds always take the wide pass (their `forward_step`)."""
    if reduced and not mtp.head_kind.chained:
        z_BTD, h_BTD, cache = trunk_and_first_head(mtp, params, cache, tokens_BT, positions_BT)
        return logits(mtp, params, h_BTD), functools.partial(later_heads, mtp, params, cache, z_BTD, positions_BT,
                                                             heads=heads)
    h_NBTD, cache = wide_pass(mtp, params, cache, tokens_BT, positions_BT, heads)
    logits_BNTV = mtp.heads_logits(params, h_NBTD).swapaxes(0, 1)  # each head's own unembedding where it has one
    drafts = jax.vmap(lambda logits_NTV, i: logits_NTV[1:, i])
    return logits_BNTV[:, 0], lambda index_B: (drafts(logits_BNTV, index_B), cache)


def trunk_and_first_head(mtp: MTP, params: Params, cache: Cache, tokens_BT: jax.Array, positions_BT: jax.Array,
                         tree_mask_BTS: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Cache]:
    """(z, head 1's hidden state, caches) over the fed tokens; `tree_mask_BTS` for a candidate tree."""
    z_BTD, trunk_cache = mtp.trunk(params, tokens_BT, positions_BT, None, cache["trunk"], tree_mask_BTS)
    first_cache = head_slice(cache["heads"], 0)
    h_BTD, first_cache = mtp.head_kind.apply(head_slice(params["heads"], 0), z_BTD, positions_BT, None, first_cache,
                                             tree_mask_BTS=tree_mask_BTS)
    cache = {"trunk": trunk_cache, "heads": cache["heads"]}
    if first_cache is not None:
        cache = _set_heads(cache, 0, KVCache(*(x[None] for x in first_cache)))
    return z_BTD, h_BTD, cache


@functools.partial(jax.jit, static_argnames=("mtp", "slots"))
def prefill(mtp: MTP, params: Params, prompt_BP: jax.Array, prompt_len_B: jax.Array, *,
            slots: int) -> tuple[jax.Array, Cache]:
    """Every head's logits (B, N, V) at each prompt's last token, and caches of `slots` slots
    holding the prompts: heads 2..n run at that token only (chained kinds: every head everywhere),
    so plain and speculative decoding of the same shapes share this compiled function."""
    b, p = prompt_BP.shape
    positions_BP = jnp.broadcast_to(jnp.arange(p), (b, p))
    last_B = prompt_len_B - 1
    if mtp.head_kind.chained:
        h_NBPD, cache = forward_step(mtp, params, mtp.init_cache(b, slots), prompt_BP, positions_BP, mtp.cfg.mtp_heads,
                                     prompt_len_B)
        return logits(mtp, params, at_index(h_NBPD, last_B).swapaxes(0, 1)), cache
    z_BPD, h_BPD, cache = trunk_and_first_head(mtp, params, mtp.init_cache(b, slots), prompt_BP, positions_BP)
    first_B1V = logits(mtp, params, at_index(h_BPD[None], last_B)[0][:, None])
    later_BJV, cache = later_heads(mtp, params, cache, z_BPD, positions_BP, last_B, mtp.cfg.mtp_heads)
    return jnp.concatenate([first_B1V, later_BJV], axis=1), cache
