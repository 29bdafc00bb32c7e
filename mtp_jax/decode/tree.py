"""Tree verification (Medusa-style, Cai et al. 2024): many candidate continuations in one pass.

Heads 2..k propose their top-t tokens at the last accepted position. A static candidate tree
(`widths[d]` children per node at depth d + 1: node tokens at depth d are head d+1's ranks)
is fed in one pass: node i at position length - 1 + depth(i), cache slot length - 1 + i, and
it attends to the verified prefix and to its own ancestors only (an explicit mask over the
cache slots). Head 1's argmax at every node verifies its children; children of one node are
distinct tokens, so the accepted nodes form one path, and the deepest accepted node gives the
corrected (or bonus) token. The trunk's and head 1's caches are then compacted to that path,
restoring "slot s holds position s", and heads 2..k write their entries along the path and run
at its end (`passes.later_heads`) to propose the next candidates.

Greedy only: the emitted tokens are head 1's argmax chain, so the output equals plain greedy
decoding. Sampling would need a multi-draft acceptance rule and is refused.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.config import ConfigError
from mtp_jax.decode.generate import (
    Progress, Result, Sampling, append, last_token, logits, run_decoder, sample_next, start,
)
from mtp_jax.decode.passes import Cache, later_heads, trunk_and_first_head
from mtp_jax.model.heads import head_slice
from mtp_jax.model.layers import KVCache
from mtp_jax.model.transformer import MTP, Params


class Tree(NamedTuple):
    """Static tree arrays; node 0 is the root (the last known token)."""

    depth: np.ndarray  # (T,)
    parent: np.ndarray  # (T,) the root is its own parent
    rank: np.ndarray  # (T,) candidate rank of its head; 0 at the root
    path: np.ndarray  # (T, D + 1) path[i, d]: i's ancestor at depth d (i itself past its depth)
    ancestors: np.ndarray  # (T, T) bool: j is i's ancestor or i itself


def make_tree(widths: Sequence[int]) -> Tree:
    """Every node at depth d has widths[d] children: ranks 0..widths[d]-1 of head d+2."""
    depth, rank, paths = [0], [0], [[0]]
    frontier = [0]
    for d, width in enumerate(widths):
        grown = []
        for parent in frontier:
            for r in range(width):
                depth.append(d + 1), rank.append(r), paths.append(paths[parent] + [len(depth) - 1])
                grown.append(len(depth) - 1)
        frontier = grown
    t, deepest = len(depth), len(widths)
    path = np.array([p + [p[-1]] * (deepest + 1 - len(p)) for p in paths], np.int32)
    ancestors = np.zeros((t, t), bool)
    for i, p in enumerate(paths):
        ancestors[i, p] = True
    parent = path[np.arange(t), np.maximum(np.array(depth) - 1, 0)]
    return Tree(np.array(depth, np.int32), parent, np.array(rank, np.int32), path, ancestors)


def tree_mask(tree: Tree, length_B: jax.Array, slots: int) -> jax.Array:
    """(B, T, S): node i sees slots below length - 1 and the slots of its ancestors."""
    rel_BS = jnp.arange(slots)[None, :] - (length_B[:, None] - 1)
    inside_BS = (rel_BS >= 0) & (rel_BS < len(tree.depth))
    anc_BTS = jnp.asarray(tree.ancestors)[:, jnp.clip(rel_BS, 0, len(tree.depth) - 1)].transpose(1, 0, 2)
    return (rel_BS < 0)[:, None, :] | (inside_BS[:, None, :] & anc_BTS)


def compact(cache: KVCache, path_BK: jax.Array, start_B: jax.Array) -> KVCache:
    """Moves the entries at slots start + path[j] to start + j (leading axis: layers)."""

    def one(c_LSKE, path_K, s):
        rows = jnp.take(c_LSKE, s + path_K, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(c_LSKE, rows, s, axis=1)

    move = jax.vmap(one, in_axes=(1, 0, 0), out_axes=1)
    return KVCache(move(cache.k_BSKE, path_BK, start_B), move(cache.v_BSKE, path_BK, start_B))


def candidates(logits_BJV: jax.Array, width: int) -> jax.Array:
    """(B, J, width) top tokens of heads 2..J+1."""
    return jax.lax.top_k(logits_BJV, width)[1].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("mtp", "widths", "max_new", "mode"), donate_argnames=("cache",))
def _tree_decode(mtp: MTP, params: Params, cache: Cache, logits_BNV: jax.Array, prompt_BP: jax.Array,
                 prompt_len_B: jax.Array, stop_X: jax.Array, key: jax.Array, sampling: Sampling, *,
                 widths: tuple[int, ...], max_new: int, mode: str) -> tuple[Progress, jax.Array, Cache]:
    tree, k, width = make_tree(widths), len(widths) + 1, max(widths)
    slots = cache["trunk"].k_BSKE.shape[2]
    prog = start(prompt_BP, prompt_len_B, slots)
    prog = append(prog, sample_next(key, logits_BNV[:, 0], sampling, mode)[:, None],
                  jnp.ones(prompt_len_B.shape, jnp.int32), prompt_len_B, stop_X, max_new)
    depth, parent, rank, path = (jnp.asarray(x) for x in (tree.depth, tree.parent, tree.rank, tree.path))

    def body(carry):
        prog, cache, cand_BJW, passes = carry
        start_B = prog.length_B - 1
        drafted_BT = cand_BJW[:, jnp.maximum(depth - 1, 0), rank]
        tokens_BT = jnp.where(depth == 0, last_token(prog), drafted_BT)
        z_BTD, h_BTD, cache = trunk_and_first_head(mtp, params, cache, tokens_BT, start_B[:, None] + depth,
                                                   tree_mask(tree, prog.length_B, slots))
        target_BT = jnp.argmax(logits(mtp, params, h_BTD), axis=-1).astype(jnp.int32)
        ok_BT = (tokens_BT == target_BT[:, parent]) | (depth == 0)
        accepted_BT = ~jnp.any(jnp.asarray(tree.ancestors)[None] & ~ok_BT[:, None, :], axis=-1)
        best_B = jnp.argmax(jnp.where(accepted_BT, depth, -1), axis=1)
        path_BK = path[best_B]
        d_B = depth[best_B]
        on_path_BK = jnp.take_along_axis(tokens_BT, path_BK, axis=1)
        bonus_B = jnp.take_along_axis(target_BT, best_B[:, None], axis=1)
        new_BK = jnp.where(jnp.arange(k) < d_B[:, None], jnp.roll(on_path_BK, -1, axis=1), bonus_B)
        prog = append(prog, new_BK, d_B + 1, prompt_len_B, stop_X, max_new)
        heads = cache["heads"]
        if heads is not None:  # head 1's cache is compacted; heads 2..k write along the path below
            heads = jax.tree.map(lambda full, first: full.at[:1].set(first), heads,
                                 compact(head_slice(heads, slice(0, 1)), path_BK, start_B))
        cache = {"trunk": compact(cache["trunk"], path_BK, start_B), "heads": heads}
        z_BKD = jnp.take_along_axis(z_BTD, path_BK[..., None], axis=1)
        logits_BJV, cache = later_heads(mtp, params, cache, z_BKD, start_B[:, None] + jnp.arange(k), d_B, k)
        return prog, cache, candidates(logits_BJV, width), passes + 1

    init = (prog, cache, candidates(logits_BNV[:, 1:k], width), jnp.int32(1))
    prog, cache, _, passes = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done_B), body, init)
    return prog, passes, cache


def tree_generate(mtp: MTP, params: Params, prompts: Sequence[Sequence[int]], widths: Sequence[int],
                  max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0,
                  stop_tokens: Sequence[int] = ()) -> Result:
    """Greedy decoding verifying a candidate tree per pass (heads 2..len(widths)+1 propose);
    the same output as plain greedy decoding."""
    widths = tuple(int(w) for w in widths)
    n = mtp.cfg.mtp_heads
    if not widths or len(widths) > n - 1 or min(widths) < 1:
        raise ConfigError(f"tree widths {list(widths)} need 1..{n - 1} positive entries (one per drafting head)")
    if sampling.temperature != 0:
        raise ConfigError("tree verification is greedy only; use temperature 0 or the chain (speculative k)")
    if mtp.head_kind.chained:
        raise ConfigError(f"tree verification needs independent heads; head_type={mtp.cfg.head_type} is chained")
    fed = len(make_tree(widths).depth)
    return run_decoder(_tree_decode, {"widths": widths}, mtp, params, prompts, max_new_tokens, sampling, seed,
                       stop_tokens, fed=fed)
