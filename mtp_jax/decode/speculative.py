"""Self-speculative decoding with the MTP heads (blockwise parallel decoding, Stern et al. 2018).

Per sequence, between passes: `length` tokens are known and verified; the caches of the trunk
and of heads 1..k hold entries computed from the verified prefix for positions < length - 1;
token length - 1 is not fed yet; heads 2..k proposed k - 1 drafts for positions
length .. length + k - 2 from z at position length - 2, drawn from distributions q.

A pass feeds [token length - 1, drafts] at positions length - 1 .. length + k - 2, writing
every cache there (`passes.verify_pass`, wide or reduced). Head 1 then gives the target
distribution p at each fed position; the
drafts are accepted left to right (`verify`), the first rejected one replaced by a corrected
token (or, all accepted, a bonus token follows), so a pass yields 1..k tokens. Fresh drafts
come from heads 2..k at the last accepted position, whose z (like every z before it) now
belongs to the verified prefix. Rolling back is only not advancing `length`: cache slots past
it are masked and overwritten by the next pass before anything reads them.

Greedy (temperature 0) accepts a draft iff it equals head 1's argmax, so the output is head 1's
greedy decoding token for token. With temperature > 0 the acceptance rule is speculative
sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft x with probability
min(1, p(x) / q(x)), else draw from norm(max(0, p - q)). Every emitted token then follows
exactly the distribution of plain sampling with the same temperature, top-k and top-p. Drafts
drawn independently at one position are a valid proposal: given the accepted prefix, draft i
is still distributed as q_i, independent of the acceptance coins.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from mtp_jax.config import ConfigError
from mtp_jax.decode.generate import (
    Progress, Result, Sampling, append, draw, last_token, run_decoder, sample_next, start, token_probs,
)
from mtp_jax.decode.passes import Cache, verify_pass
from mtp_jax.model.transformer import MTP, Params


def verify(key: jax.Array, p_BKV: jax.Array, q_BJV: jax.Array, drafts_BJ: jax.Array,
           greedy: bool) -> tuple[jax.Array, jax.Array]:
    """(accepted drafts per sequence, K new tokens of which the first accepted + 1 count).

    p_BKV: head 1's distribution at each of the K = J + 1 fed positions; draft i (i < J) is a
    candidate for what p_BKV[:, i] predicts and was drawn from q_BJV[:, i].
    """
    b, k, v = p_BKV.shape
    q_BKV = jnp.concatenate([q_BJV, jnp.zeros((b, 1, v), q_BJV.dtype)], axis=1)  # q = 0: p itself after the last draft
    d_BK = jnp.concatenate([drafts_BJ, jnp.zeros((b, 1), jnp.int32)], axis=1)
    p_d_BK = jnp.take_along_axis(p_BKV, d_BK[..., None], axis=-1)[..., 0]
    q_d_BK = jnp.take_along_axis(q_BKV, d_BK[..., None], axis=-1)[..., 0]
    key_u, key_r = jax.random.split(key)
    u_BK = 0.0 if greedy else jax.random.uniform(key_u, (b, k))
    ok_BK = (u_BK * q_d_BK < p_d_BK) & (jnp.arange(k) < k - 1)  # P(ok) = min(1, p(x) / q(x))
    accepted_B = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)
    residual_BKV = jnp.maximum(p_BKV - q_BKV, 0.0)
    mass_BK1 = jnp.sum(residual_BKV, axis=-1, keepdims=True)
    residual_BKV = jnp.where(mass_BK1 > 0, residual_BKV / jnp.where(mass_BK1 > 0, mass_BK1, 1.0), p_BKV)
    corrected_BK = draw(key_r, residual_BKV, greedy)
    new_BK = jnp.where(jnp.arange(k) < accepted_B[:, None], d_BK, corrected_BK)
    return accepted_B, new_BK


def propose(key: jax.Array, logits_BJV: jax.Array, sampling: Sampling, mode: str) -> tuple[jax.Array, jax.Array]:
    """Drafts (B, J) from heads 2..J+1 at one position, and the distributions they came from."""
    q_BJV = token_probs(logits_BJV, sampling, mode)
    return draw(key, q_BJV, mode == "greedy"), q_BJV


@functools.partial(jax.jit, static_argnames=("mtp", "k", "max_new", "mode", "reduced"), donate_argnames=("cache",))
def _speculate(mtp: MTP, params: Params, cache: Cache, logits_BNV: jax.Array, prompt_BP: jax.Array,
               prompt_len_B: jax.Array, stop_X: jax.Array, key: jax.Array, sampling: Sampling, *, k: int, max_new: int,
               mode: str, reduced: bool = False) -> tuple[Progress, jax.Array, Cache]:
    """(progress, forward passes, caches) after the prefill; tests check that the caches hold
    only entries of the verified prefix."""
    key, key_first, key_draft = jax.random.split(key, 3)
    prog = start(prompt_BP, prompt_len_B, cache["trunk"].k_BSKE.shape[2])
    prog = append(prog, sample_next(key_first, logits_BNV[:, 0], sampling, mode)[:, None],
                  jnp.ones(prompt_len_B.shape, jnp.int32), prompt_len_B, stop_X, max_new)
    drafts_BJ, q_BJV = propose(key_draft, logits_BNV[:, 1:k], sampling, mode)

    def body(carry):
        prog, cache, key, drafts_BJ, q_BJV, passes = carry
        positions_BK = prog.length_B[:, None] - 1 + jnp.arange(k)
        fed_BK = jnp.concatenate([last_token(prog), drafts_BJ], axis=1)
        logits_BKV, draft = verify_pass(mtp, params, cache, fed_BK, positions_BK, k, reduced)
        p_BKV = token_probs(logits_BKV, sampling, mode)
        key, key_verify, key_draft = jax.random.split(key, 3)
        accepted_B, new_BK = verify(key_verify, p_BKV, q_BJV, drafts_BJ, mode == "greedy")
        prog = append(prog, new_BK, accepted_B + 1, prompt_len_B, stop_X, max_new)
        logits_BJV, cache = draft(accepted_B)
        drafts_BJ, q_BJV = propose(key_draft, logits_BJV, sampling, mode)
        return prog, cache, key, drafts_BJ, q_BJV, passes + 1

    init = (prog, cache, key, drafts_BJ, q_BJV, jnp.int32(1))
    prog, cache, _, _, _, passes = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done_B), body, init)
    return prog, passes, cache


def speculative_generate(mtp: MTP, params: Params, prompts: Sequence[Sequence[int]], k: int, max_new_tokens: int,
                         sampling: Sampling = Sampling(), seed: int = 0, stop_tokens: Sequence[int] = (),
                         reduced: bool = False) -> Result:
    """Decoding with heads 2..k drafting and head 1 verifying: up to k tokens per forward pass,
    the same output as `generate` when greedy (the same distribution when sampling). `reduced`
    picks the verify pass (`passes.verify_pass`)."""
    n = mtp.cfg.mtp_heads
    if not 1 <= k <= n:
        raise ConfigError(f"speculative k={k} must be between 1 and the model's {n} heads")
    return run_decoder(_speculate, {"k": k, "reduced": reduced}, mtp, params, prompts, max_new_tokens, sampling, seed,
                       stop_tokens)
