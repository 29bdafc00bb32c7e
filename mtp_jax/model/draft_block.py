"""A block that writes its keys/values at every fed position but computes one query position.

In a reduced verify pass heads 2..k need their cache entries at all k fed positions (later
queries attend to them) and their output at one position only (the last accepted one, which
drafts the next tokens). Writing the entries (`Block.write_cache`) and then calling the block
at that one position would read the key/value projections twice and rewrite one entry; here
each weight matrix is read once: keys/values over the fed positions, then the query, output
projection and MLP at one position against the updated cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtp_jax.model.attention import dense_attention
from mtp_jax.model.layers import Block, KVCache, project, rope, unproject


def at_index(x_BT: jax.Array, index_B: jax.Array) -> jax.Array:
    """x[b, index_B[b]] for every sequence b, the time axis kept: (B, T, ...) -> (B, 1, ...)."""
    return jax.vmap(lambda x_T, i: jax.lax.dynamic_slice_in_dim(x_T, i, 1, axis=0))(x_BT, index_B)


def block_at(block: Block, x_BTD: jax.Array, positions_BT: jax.Array, index_B: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """(the block's output (B, D) at fed index index_B, the cache with entries at every fed
    position): what `block(x_BTD, positions_BT, cache=cache)` gives there, one query only."""
    cache = block.write_cache(x_BTD, positions_BT, cache)
    x_B1D, position_B1 = at_index(x_BTD, index_B), at_index(positions_BT, index_B)
    attn, dt = block.attn, x_BTD.dtype
    xn_B1D = block.attn_norm(x_B1D)
    q_B1HE = rope(project(xn_B1D, attn.wq[...].astype(dt)), position_B1, attn.theta, attn.rope_layout)
    mask_B1S = jnp.arange(cache.k_BSKE.shape[1])[None, None, :] <= position_B1[:, :, None]
    out_B1HE = dense_attention(q_B1HE, cache.k_BSKE.astype(dt), cache.v_BSKE.astype(dt), mask_B1S)
    x_B1D = x_B1D + unproject(out_B1HE, attn.wo[...].astype(dt))
    x_B1D = x_B1D + block.mlp(block.mlp_norm(x_B1D))
    return x_B1D[:, 0], cache
