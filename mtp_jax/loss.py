"""The multi-token loss, computed so that activation memory is flat in the number of heads.

L = sum_i w_i * mean_t CE(head_i(z_t), x_{t+i}), the paper's unweighted sum when w_i = 1.
Batches hold windows of T + n tokens so every head has T targets; `segment_ids` (0 = padding)
mask targets in another document.

Two tricks keep memory flat (`flat` path), both as `custom_vjp`s whose forward computes the
gradient in the same pass and whose backward only scales it by the incoming cotangent:
- `chunked_xent`: cross-entropy over sequence chunks; only one (B, chunk, V) logits block is
  ever live, never a (B, T, V) float32 tensor.
- `heads_loss`: a lax.scan over the stacked head parameters that runs head i's forward AND
  backward (`jax.vjp`) in iteration i, accumulating the gradient at the trunk output, exactly
  the paper's order of operations. Nothing is recomputed. Chained kinds (causal, anticausal, sequential),
  where a head's gradient needs the heads after it, keep each head's (B, T, D) input instead and
  back-propagate in a reverse scan (`_chained_fwd`): logits memory stays flat, hidden states
  grow by one (B, T, D) per head, each head's forward runs twice.
The `naive` path materialises every head's logits and uses plain autodiff (benchmarks, tests).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mtp_jax.model.head_kinds import processing_order
from mtp_jax.model.heads import head_slice, scan_heads
from mtp_jax.model.transformer import MTP, Params

Metrics = dict[str, jax.Array]


def mask_for_head(segments_BL: jax.Array, offset: int | jax.Array, length: int) -> jax.Array:
    """Head predicting t+offset trains at t only if t and t+offset are in the same (non-padding) document."""
    here = segments_BL[:, :length]
    there = jax.lax.dynamic_slice_in_dim(segments_BL, offset, length, axis=1)
    return (here == there) & (there != 0)


def targets_for_head(tokens_BL: jax.Array, offset: int | jax.Array, length: int) -> jax.Array:
    """Head predicting t+offset learns tokens[t + offset] at position t."""
    return jax.lax.dynamic_slice_in_dim(tokens_BL, offset, length, axis=1)


def chunk_size(length: int, requested: int) -> int:
    """Largest divisor of the sequence length not above the requested chunk (no padding copies)."""
    return max(c for c in range(1, min(length, requested) + 1) if length % c == 0)


def _chunked(x_BT: jax.Array, c: int) -> jax.Array:
    """(B, T, ...) -> (T/c, B, c, ...), the scan axis first."""
    b, t = x_BT.shape[:2]
    return x_BT.reshape(b, t // c, c, *x_BT.shape[2:]).swapaxes(0, 1)


def _unchunked(x_NBC: jax.Array) -> jax.Array:
    n, b, c = x_NBC.shape[:3]
    return x_NBC.swapaxes(0, 1).reshape(b, n * c, *x_NBC.shape[3:])


def _chunk_logits(h_BCD, w_DV, t_BC, m_BC):
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV.astype(h_BCD.dtype), preferred_element_type=jnp.float32)
    max_BC = jnp.max(logits_BCV, axis=-1)
    lse_BC = max_BC + jnp.log(jnp.sum(jnp.exp(logits_BCV - max_BC[..., None]), axis=-1))
    target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
    m_BC = m_BC.astype(jnp.float32)
    loss = jnp.sum((lse_BC - target_BC) * m_BC)
    # Top-1 = the first index holding the row maximum (argmax's tie rule), from the max the log-sum-exp
    # already needs: on CPU, XLA's argmax (a two-operand reduction) costs about as much as the logits matmul.
    vocab = logits_BCV.shape[-1]
    top1_BC = jnp.min(jnp.where(logits_BCV == max_BC[..., None], jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    correct = jnp.sum((top1_BC == t_BC) * m_BC)
    return logits_BCV, lse_BC, loss, correct


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_xent(h_BTD: jax.Array, w_DV: jax.Array, t_BT: jax.Array, m_BT: jax.Array, chunk: int):
    """(sum of masked token cross-entropies, number of correct top-1 predictions)."""
    c = chunk_size(h_BTD.shape[1], chunk)

    def body(acc, xs):
        _, _, loss, correct = _chunk_logits(xs[0], w_DV, xs[1], xs[2])
        return (acc[0] + loss, acc[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss, correct), _ = jax.lax.scan(body, (zero, zero), (_chunked(h_BTD, c), _chunked(t_BT, c), _chunked(m_BT, c)))
    return loss, correct


def _xent_grads(h_BTD, w_DV, t_BT, m_BT, chunk: int, scale, dw_DV):
    """One pass over the chunks: (CE sum, hits, dh (B, T, D), dw_DV + dw), the gradients already
    multiplied by `scale`. The scan adds into the accumulator `dw_DV` it is given, so a caller that
    passes its own running sum keeps one (D, V) buffer, never a second one to add afterwards."""
    c = chunk_size(h_BTD.shape[1], chunk)
    dt = h_BTD.dtype

    def body(acc, xs):
        h_BCD, t_BC, m_BC = xs
        logits_BCV, lse_BC, loss, correct = _chunk_logits(h_BCD, w_DV, t_BC, m_BC)
        dlogits_BCV = jnp.exp(logits_BCV - lse_BC[..., None]) - jax.nn.one_hot(t_BC, w_DV.shape[1], dtype=jnp.float32)
        dlogits_BCV = (dlogits_BCV * (m_BC.astype(jnp.float32) * scale)[..., None]).astype(dt)
        dh_BCD = jnp.einsum("bcv,dv->bcd", dlogits_BCV, w_DV.astype(dt))
        dw_DV = acc[2] + jnp.einsum("bcd,bcv->dv", h_BCD, dlogits_BCV, preferred_element_type=jnp.float32)
        return (acc[0] + loss, acc[1] + correct, dw_DV), dh_BCD

    zero = jnp.zeros((), jnp.float32)
    (loss, correct, dw_DV), dh = jax.lax.scan(body, (zero, zero, dw_DV), (_chunked(h_BTD, c), _chunked(t_BT, c), _chunked(m_BT, c)))
    return loss, correct, _unchunked(dh), dw_DV


def _xent_fwd(h_BTD, w_DV, t_BT, m_BT, chunk):
    loss, correct, dh_BTD, dw_DV = _xent_grads(h_BTD, w_DV, t_BT, m_BT, chunk, 1.0, jnp.zeros(w_DV.shape, jnp.float32))
    return (loss, correct), (dh_BTD, dw_DV.astype(w_DV.dtype))


def _xent_bwd(chunk, res, g):
    dh_BTD, dw_DV = res
    g_loss = g[0]
    return (g_loss.astype(dh_BTD.dtype) * dh_BTD, g_loss * dw_DV, None, None)


chunked_xent.defvjp(_xent_fwd, _xent_bwd)


def _positions(b: int, t: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def head_counts(segments_BL: jax.Array, n: int) -> jax.Array:
    """(N,) valid targets per head in this batch (at least 1): the denominators of the mean CE."""
    t = segments_BL.shape[1] - n
    return jnp.stack([jnp.maximum(jnp.sum(mask_for_head(segments_BL, i + 1, t)), 1) for i in range(n)]).astype(jnp.float32)


def _feed(mtp: MTP, shared: Params, tokens_BL, i, t: int) -> jax.Array | None:
    """Sequential kinds: Emb(x_{t+i}) for head i (0-based), the true token before its target, sliced
    from the window like the targets (never rolled across a document: those targets are masked)."""
    return mtp.embed_rows(shared, targets_for_head(tokens_BL, i, t)) if mtp.head_kind.reads_tokens else None


def _one_head(mtp: MTP, chunk: int, hp: Params, shared: Params, z_BTD, prev_BTD, tokens_BL, segments_BL, i, count):
    """Head i (0-based) predicts tokens t + i + 1: ((CE sum / count, its hidden state), top-1 hits / count)."""
    b, t = z_BTD.shape[:2]
    feed_BTD = _feed(mtp, shared, tokens_BL, i, t)
    h_BTD, _ = mtp.head(hp, z_BTD, _positions(b, t), segments_BL[:, :t], None, prev_BTD, feed_BTD)
    hn_BTD = mtp.final_norm(shared, h_BTD)
    mask_BT = mask_for_head(segments_BL, i + 1, t)
    w_DV = mtp.head_unembedding(shared, hp)
    loss, correct = chunked_xent(hn_BTD, w_DV, targets_for_head(tokens_BL, i + 1, t), mask_BT, chunk)
    return (loss / count, h_BTD), correct / count


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def heads_loss(mtp: MTP, chunk: int, heads: Params, shared: Params, z_BTD, tokens_BL, segments_BL, weights_N, counts_N):
    """Forward-only path (evaluation): one head at a time in processing order, chunked cross-entropy;
    a chained kind's head gets the previous head's output (independent kinds ignore it)."""
    def step(prev_BTD, hp, i, _):
        (loss, h_BTD), acc = _one_head(mtp, chunk, hp, shared, z_BTD, prev_BTD, tokens_BL, segments_BL, i, counts_N[i])
        return h_BTD, (loss, acc)

    losses, accs = scan_heads(mtp.head_kind, heads, z_BTD, step)
    return jnp.sum(weights_N * losses), {"loss": losses, "accuracy": accs}


def _f32_zeros(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def _heads_fwd(mtp, chunk, heads, shared, z_BTD, tokens_BL, segments_BL, weights_N, counts_N):
    if mtp.head_kind.chained:
        return _chained_fwd(mtp, chunk, heads, shared, z_BTD, tokens_BL, segments_BL, weights_N, counts_N)

    b, t = z_BTD.shape[:2]

    def body(carry, xs):
        dz_BTD, dnorm, dw_DV = carry
        hp, i, w = xs

        def hidden(hp_, norm_, z_):  # head i's normed hidden state: everything before the unembedding
            h_BTD, _ = mtp.head(hp_, z_, _positions(b, t), segments_BL[:, :t], None, None)
            return mtp.final_norm({"norm": norm_}, h_BTD)

        hn_BTD, vjp = jax.vjp(hidden, hp, shared["norm"], z_BTD)
        targets_BT, mask_BT = targets_for_head(tokens_BL, i + 1, t), mask_for_head(segments_BL, i + 1, t)
        # The unembedding's gradient accumulates in place across heads (the carry goes into the chunk scan);
        # a head with its own unembedding (replicated) gets a fresh accumulator, returned in its gradient.
        own = mtp.head_kind.own_unembedding
        acc_DV = jnp.zeros(hp["unembed"].shape, jnp.float32) if own else dw_DV
        loss, correct, dhn_BTD, acc_DV = _xent_grads(hn_BTD, mtp.head_unembedding(shared, hp), targets_BT, mask_BT,
                                                     chunk, w / counts_N[i], acc_DV)
        dhp, dn, dz = vjp(dhn_BTD)
        if own:
            dhp = {**dhp, "unembed": acc_DV.astype(hp["unembed"].dtype)}
        else:
            dw_DV = acc_DV
        dnorm = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), dnorm, dn)
        return (dz_BTD + dz.astype(jnp.float32), dnorm, dw_DV), (dhp, loss / counts_N[i], correct / counts_N[i])

    n = weights_N.shape[0]
    init = (_f32_zeros(z_BTD), _f32_zeros(shared["norm"]), _f32_zeros(shared["unembed"]))
    (dz_BTD, dnorm, dw_DV), (dheads, losses, accs) = jax.lax.scan(body, init, (heads, jnp.arange(n), weights_N),
                                                                  unroll=mtp.cfg.layer_loop == "unroll")
    dshared = {"norm": dnorm, "unembed": dw_DV}
    return _finish(weights_N, losses, accs, dheads, dshared, dz_BTD, shared, z_BTD)


def _chained_fwd(mtp, chunk, heads, shared, z_BTD, tokens_BL, segments_BL, weights_N, counts_N):
    """Chained heads: a forward scan keeps each head's input (n x (B, T, D), no logits), then a
    reverse scan recomputes head k from its input and back-propagates its loss together with the
    cotangent its output received from the next head. Logits memory stays one chunk; the inputs
    grow with n; each head's forward runs twice."""
    order = jnp.asarray(processing_order(mtp.head_kind.spec, weights_N.shape[0]))
    b, t = z_BTD.shape[:2]

    def forward(prev_BTD, hp, i, _):
        h_BTD, _ = mtp.head(hp, z_BTD, _positions(b, t), segments_BL[:, :t], None, prev_BTD,
                            _feed(mtp, shared, tokens_BL, i, t))
        return h_BTD, prev_BTD

    inputs_K = scan_heads(mtp.head_kind, heads, z_BTD, forward, head_order=False)

    def backward(carry, xs):
        dh_BTD, dz_BTD, dshared = carry
        hp, prev_BTD, i, w = xs
        head = lambda hp_, sh_, z_, prev_: _one_head(mtp, chunk, hp_, sh_, z_, prev_, tokens_BL, segments_BL, i,
                                                      counts_N[i])
        (loss, _), vjp, acc = jax.vjp(head, hp, shared, z_BTD, prev_BTD, has_aux=True)
        dhp, dsh, dz, dprev = vjp((w.astype(loss.dtype), dh_BTD.astype(z_BTD.dtype)))
        dshared = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), dshared, dsh)
        return (dprev.astype(jnp.float32), dz_BTD + dz.astype(jnp.float32), dshared), (dhp, loss, acc)

    init = (_f32_zeros(z_BTD), _f32_zeros(z_BTD), _f32_zeros(shared))
    (dfirst, dz_BTD, dshared), outs = jax.lax.scan(
        backward, init, (head_slice(heads, order), inputs_K, order, weights_N[order]), reverse=True
    )
    dheads, losses, accs = head_slice(outs, jnp.argsort(order))
    return _finish(weights_N, losses, accs, dheads, dshared, dz_BTD + dfirst, shared, z_BTD)  # head 0 read z


def _finish(weights_N, losses, accs, dheads, dshared, dz_BTD, shared, z_BTD):
    out = (jnp.sum(weights_N * losses), {"loss": losses, "accuracy": accs})
    dshared = jax.tree.map(lambda g, p: g.astype(p.dtype), dshared, shared)
    return out, (dheads, dshared, dz_BTD.astype(z_BTD.dtype))


def _heads_bwd(mtp, chunk, res, g):
    dheads, dshared, dz_BTD = res
    scale = lambda tree: jax.tree.map(lambda x: (g[0] * x).astype(x.dtype), tree)
    return scale(dheads), scale(dshared), scale(dz_BTD), None, None, None, None


heads_loss.defvjp(_heads_fwd, _heads_bwd)


def naive_heads_loss(mtp: MTP, heads: Params, shared: Params, z_BTD, tokens_BL, segments_BL, weights_N, counts_N):
    """Every head's full (B, T, V) logits at once, plain autodiff: memory O(n x T x V)."""
    b, t = z_BTD.shape[:2]
    losses, accs = [], []
    n = weights_N.shape[0]
    teacher_NBT = jnp.stack([targets_for_head(tokens_BL, i, t) for i in range(n)])
    feed = mtp.token_feed(shared, tokens_BL[:, :t], teacher_NBT)
    h_NBTD, _ = mtp.heads_hidden(heads, z_BTD, _positions(b, t), segments_BL[:, :t], feed=feed)
    for i, h_BTD in enumerate(h_NBTD):
        logits_BTV = mtp.logits(shared, h_BTD, head_slice(heads, i))
        targets_BT, mask_BT = targets_for_head(tokens_BL, i + 1, t), mask_for_head(segments_BL, i + 1, t)
        logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), targets_BT[..., None], axis=-1)[..., 0]
        losses.append(-jnp.sum(logp_BT * mask_BT) / counts_N[i])
        accs.append(jnp.sum((jnp.argmax(logits_BTV, -1) == targets_BT) * mask_BT) / counts_N[i])
    losses, accs = jnp.stack(losses), jax.lax.stop_gradient(jnp.stack(accs))
    return jnp.sum(weights_N * losses), {"loss": losses, "accuracy": accs}


def mtp_loss(
    mtp: MTP, params: Params, batch: dict[str, jax.Array], weights_N: jax.Array, chunk: int = 512, impl: str = "flat",
    counts_N: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Training loss of one batch {'tokens', 'segment_ids'}: (B, T + n) each. Each head's CE sum is
    divided by `counts_N` (default: this batch's valid targets); a micro-batch passes the whole
    batch's counts, so micro-batch losses and gradients add up to the whole batch's exactly."""
    tokens_BL, segments_BL = batch["tokens"], batch["segment_ids"]
    b, t = tokens_BL.shape[0], tokens_BL.shape[1] - mtp.cfg.mtp_heads
    if counts_N is None:
        counts_N = head_counts(segments_BL, mtp.cfg.mtp_heads)
    z_BTD, _ = mtp.trunk(params, tokens_BL[:, :t], _positions(b, t), segments_BL[:, :t])
    shared = mtp.shared(params)
    if impl == "flat":
        return heads_loss(mtp, chunk, params["heads"], shared, z_BTD, tokens_BL, segments_BL, weights_N, counts_N)
    return naive_heads_loss(mtp, params["heads"], shared, z_BTD, tokens_BL, segments_BL, weights_N, counts_N)


def loss_weights(n: int, weights: list | tuple = ()) -> jax.Array:
    """(n,) base loss weights: `train.loss_weights`, or all 1 (the paper's unweighted sum)."""
    return jnp.asarray(weights if weights else [1.0] * n, jnp.float32)


def as_metrics(loss: jax.Array, m: Metrics) -> dict[str, Any]:
    """Flat scalar metrics: loss, loss/head_i, accuracy/head_i (1-based as in the paper)."""
    out: dict[str, Any] = {"loss": loss}
    for i in range(m["loss"].shape[0]):
        out[f"loss/head_{i + 1}"] = m["loss"][i]
        out[f"accuracy/head_{i + 1}"] = m["accuracy"][i]
    return out
