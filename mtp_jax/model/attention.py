"""Causal, document-masked, grouped-query attention: one function per implementation.

Training attention takes segment ids (B, T) and never a (B, T, T) mask; the kernels mask by
comparing positions and segment ids inside each block. `model.attention` picks:
- `xla`: scores (B, H, T, T) in one fused XLA computation; fastest for short sequences.
- `blockwise`: pure JAX, memory linear in T on every platform, a `custom_vjp` backward that
  recomputes scores from the saved logsumexp. Up to `UNROLLED_BLOCKS` query blocks, each block
  attends to its whole causal key prefix in one softmax (unrolled, no loops: a quarter fewer
  matmul FLOPs than dense at 2 blocks); beyond, flash attention (online softmax over key blocks).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16); that API
  has no segment-id input, so document masking goes in as a (B, 1, T, T) boolean mask.
- `splash`: the TPU splash kernel with segment ids (`interpret=True` runs it on CPU).
- `auto`: per platform and sequence length, logged once per choice (`resolve`).
Decoding (KV cache, arbitrary masks for tree verification) uses `dense_attention`.

Shapes: B batch, T query positions, S key positions, H query heads, K kv heads, G = H / K
query heads per kv head, E head dim, C block length.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from mtp_jax import platforms, sharding
from mtp_jax.errors import ConfigError

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
BLOCK = 256  # blockwise query/key block length (fastest of 128/256/512 at T = 512-4096 on CPU)
UNROLLED_BLOCKS = 2  # query blocks up to which `blockwise` unrolls (key-prefix form): 0.76-0.84x the
# flash loops' time at T = 512 (fwd + bwd), but XLA keeps every unrolled block's scores alive, so its
# temp memory grows with the square of the block count (T = 2048, 8 blocks: 250 MiB against 29)
XLA_MAX_T = 128  # `auto` keeps the fused XLA path up to this length: on CPU forward + backward tie at
# T = 128 (B 16, E 32), blockwise is 0.84-0.89x of its time at T = 256 (B 4, E 64) and 0.71x at T = 512
_NEG = -1e30  # masked score: finite, so a row masked in a whole block never yields NaN


def resolve(name: str, seq_len: int, dtype: jnp.dtype, platform: str | None = None) -> str:
    """The implementation `name` stands for at this length, dtype and platform (`auto` logged once);
    a ConfigError where the platform or dtype cannot run it (`train` asks before writing RUN_DIR)."""
    platform = platform or platforms.target()
    if name == "auto":
        if platform == "tpu":
            choice = "splash"
        elif platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
            choice = "cudnn"
        else:
            choice = "xla" if seq_len <= XLA_MAX_T else "blockwise"
        _log_choice(platform, seq_len, jnp.dtype(dtype).name, choice)
        return choice
    if name == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attention='cudnn' needs a GPU but this host runs {platform}; use auto, blockwise or xla")
    if name == "splash" and platform != "tpu":
        raise ConfigError(f"model.attention='splash' needs a TPU but this host runs {platform}; use auto, blockwise or xla")
    if name == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ConfigError("model.attention='cudnn' runs in bfloat16/float16 only; set model.dtype=bfloat16 or use auto")
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention={name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    return name


@functools.cache
def _log_choice(platform: str, seq_len: int, dtype: str, choice: str) -> None:
    log.info("attention auto: %s on %s for T=%d (%s)", choice, platform, seq_len, dtype)


def causal_attention(name: str, q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, segments_BT: jax.Array | None) -> jax.Array:
    """Training attention (queries and keys are the same positions) by implementation name."""
    if segments_BT is None:
        segments_BT = jnp.zeros(q_BTHE.shape[:2], jnp.int32)
    impl = resolve(name, q_BTHE.shape[1], q_BTHE.dtype)
    return _IMPLS[impl](q_BTHE, k_BSKE, v_BSKE, segments_BT)


def dense_attention(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Any boolean mask (decoding against a KV cache, tree verification)."""
    return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask=mask_BTS[:, None, :, :])


def _allowed(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array, k_seg: jax.Array) -> jax.Array:
    """(B, 1, 1, Tq, Sk) causal-and-same-document mask from positions (Tq,), (Sk,) and segments (B, Tq), (B, Sk)."""
    causal = q_pos[:, None] >= k_pos[None, :]
    same_doc = q_seg[:, :, None] == k_seg[:, None, :]
    return (causal[None] & same_doc)[:, None, None]


def _grouped(q_BTHE: jax.Array, kv_heads: int) -> jax.Array:
    """(B, T, H, E) -> (B, K, G, T, E): query heads grouped under their kv head."""
    b, t, h, e = q_BTHE.shape
    return q_BTHE.reshape(b, t, kv_heads, h // kv_heads, e).transpose(0, 2, 3, 1, 4)


def _ungrouped(o_BKGTE: jax.Array) -> jax.Array:
    b, k, g, t, e = o_BKGTE.shape
    return o_BKGTE.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, e)


def xla_attention(q_BTHE, k_BSKE, v_BSKE, segments_BT):
    """All (T, T) scores at once; the mask is an expression XLA fuses into the select, not a buffer."""
    t, e = q_BTHE.shape[1], q_BTHE.shape[3]
    q = _grouped(q_BTHE, k_BSKE.shape[2])
    s = jnp.einsum("bkgte,bske->bkgts", q, k_BSKE, preferred_element_type=jnp.float32) / math.sqrt(e)
    pos = jnp.arange(t)
    s = jnp.where(_allowed(pos, pos, segments_BT, segments_BT), s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v_BSKE.dtype)
    return _ungrouped(jnp.einsum("bkgts,bske->bkgte", p, v_BSKE))


# --- blockwise (flash) attention ----------------------------------------------------------------


def _padded(x: jax.Array, axis: int, length: int, value: int = 0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def blockwise_attention(q_BTHE, k_BSKE, v_BSKE, segments_BT, block: int | None = None):
    """Pure-JAX attention in blocks of C: up to UNROLLED_BLOCKS query blocks, unrolled over key
    prefixes; beyond, flash attention with memory O(T x C) in forward and backward. Odd lengths are
    padded to whole blocks; padded keys sit after every real query, so causality hides them."""
    b, t, h, e = q_BTHE.shape
    c = min(block or BLOCK, t)
    tp = -(-t // c) * c
    q = _padded(_grouped(q_BTHE, k_BSKE.shape[2]), 3, tp) * jnp.asarray(1 / math.sqrt(e), q_BTHE.dtype)
    k, v = (_padded(x.transpose(0, 2, 1, 3), 2, tp) for x in (k_BSKE, v_BSKE))
    kernel = _prefix if tp // c <= UNROLLED_BLOCKS else _flash
    o = kernel(q, k, v, _padded(segments_BT, 1, tp, -1), c)
    return _ungrouped(o[:, :, :, :t])


def _block(x: jax.Array, i: jax.Array, c: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=axis)


def _scores(q, k, seg, i, j, c):
    """Masked fp32 scores (B, K, G, C, C) of query block i against key block j."""
    s = jnp.einsum("bkgqe,bkse->bkgqs", _block(q, i, c, 3), _block(k, j, c, 2), preferred_element_type=jnp.float32)
    allowed = _allowed(i * c + jnp.arange(c), j * c + jnp.arange(c), _block(seg, i, c, 1), _block(seg, j, c, 1))
    return jnp.where(allowed, s, _NEG), allowed


def _prefix_scores(q, k, seg, i, c):
    """Unmasked fp32 scores (B, K, G, C, (i+1) C) of query block i against its causal key prefix,
    and where they are allowed."""
    end = (i + 1) * c
    s = jnp.einsum("bkgqe,bkse->bkgqs", q[:, :, :, i * c:end], k[:, :, :end], preferred_element_type=jnp.float32)
    allowed = _allowed(i * c + jnp.arange(c), jnp.arange(end), seg[:, i * c:end], seg[:, :end])
    return s, allowed


def _prefix_forward(q, k, v, seg, c):
    """(output, logsumexp): each query block's exact softmax over its key prefix."""
    outs, lses = [], []
    for i in range(q.shape[3] // c):
        s, allowed = _prefix_scores(q, k, seg, i, c)
        s = jnp.where(allowed, s, _NEG)
        m = s.max(-1, keepdims=True)
        p = jnp.exp(s - m)
        l = p.sum(-1, keepdims=True)
        pv = jnp.einsum("bkgqs,bkse->bkgqe", p.astype(v.dtype), v[:, :, :(i + 1) * c], preferred_element_type=jnp.float32)
        outs.append(pv / l)  # normalised on (C, E), not on the (C, (i+1) C) probabilities
        lses.append((m + jnp.log(l))[..., 0])
    return jnp.concatenate(outs, 3).astype(q.dtype), jnp.concatenate(lses, 3)


def _prefix_bwd(c, res, do):
    """Per query block: p from the saved logsumexp, dq of the block, dk and dv of its key prefix
    added into the whole-length gradients."""
    q, k, v, seg, o, lse = res
    f32 = jnp.float32
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)  # (B, K, G, Tp)
    dqs, dk, dv = [], jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
    for i in range(q.shape[3] // c):
        end, rows = (i + 1) * c, slice(i * c, (i + 1) * c)
        s, allowed = _prefix_scores(q, k, seg, i, c)
        p = jnp.where(allowed, jnp.exp(s - lse[:, :, :, rows, None]), 0.0)
        q_i, do_i = q[:, :, :, rows], do[:, :, :, rows]
        dv_i = jnp.einsum("bkgqs,bkgqe->bkse", p.astype(do.dtype), do_i, preferred_element_type=f32)
        dp = jnp.einsum("bkgqe,bkse->bkgqs", do_i, v[:, :, :end], preferred_element_type=f32)
        ds = p * (dp - delta[:, :, :, rows, None])
        dk_i = jnp.einsum("bkgqs,bkgqe->bkse", ds.astype(q.dtype), q_i, preferred_element_type=f32)
        dqs.append(jnp.einsum("bkgqs,bkse->bkgqe", ds.astype(k.dtype), k[:, :, :end], preferred_element_type=f32))
        dk, dv = dk + _padded(dk_i, 2, dk.shape[2]), dv + _padded(dv_i, 2, dv.shape[2])  # 0.95x `.at[].add`
    return jnp.concatenate(dqs, 3).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


def _flash_forward(q, k, v, seg, c):
    """(output, logsumexp) per query; query block i visits key blocks 0..i (causal skip)."""
    b, kh, g, tp, e = q.shape

    def query_block(i):
        def body(j, carry):
            o, m, l = carry
            s, _ = _scores(q, k, seg, i, j, c)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            scale = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bkse->bkgqe", p.astype(v.dtype), _block(v, j, c, 2), preferred_element_type=jnp.float32)
            return o * scale[..., None] + pv, m_new, l * scale + p.sum(-1)

        init = (jnp.zeros((b, kh, g, c, e), jnp.float32), jnp.full((b, kh, g, c), _NEG), jnp.zeros((b, kh, g, c)))
        o, m, l = jax.lax.fori_loop(0, i + 1, body, init)
        return o / l[..., None], m + jnp.log(l)

    o, lse = jax.lax.map(query_block, jnp.arange(tp // c))  # (N, B, K, G, C, ...)
    o = jnp.moveaxis(o, 0, 3).reshape(b, kh, g, tp, e)
    return o.astype(q.dtype), jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, tp)


def _flash_bwd(c, res, do):
    """Key block j (outer) against query blocks j.. (inner): dk, dv of block j in registers, dq
    accumulated in place; p recomputed from the saved logsumexp."""
    q, k, v, seg, o, lse = res
    f32 = jnp.float32
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)  # (B, K, G, Tp)
    n = q.shape[3] // c

    def key_block(j, grads):
        def body(i, carry):
            dq, dk_j, dv_j = carry
            s, allowed = _scores(q, k, seg, i, j, c)
            p = jnp.where(allowed, jnp.exp(s - _block(lse, i, c, 3)[..., None]), 0.0)
            do_i = _block(do, i, c, 3)
            dv_j += jnp.einsum("bkgqs,bkgqe->bkse", p.astype(do.dtype), do_i, preferred_element_type=f32)
            dp = jnp.einsum("bkgqe,bkse->bkgqs", do_i, _block(v, j, c, 2), preferred_element_type=f32)
            ds = p * (dp - _block(delta, i, c, 3)[..., None])
            dk_j += jnp.einsum("bkgqs,bkgqe->bkse", ds.astype(q.dtype), _block(q, i, c, 3), preferred_element_type=f32)
            dq_i = _block(dq, i, c, 3) + jnp.einsum("bkgqs,bkse->bkgqe", ds.astype(k.dtype), _block(k, j, c, 2), preferred_element_type=f32)
            return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * c, axis=3), dk_j, dv_j

        dq, dk, dv = grads
        zero_kv = jnp.zeros(k.shape[:2] + (c, k.shape[3]), f32)
        dq, dk_j, dv_j = jax.lax.fori_loop(j, n, body, (dq, zero_kv, zero_kv))
        put = lambda full, blk: jax.lax.dynamic_update_slice_in_dim(full, blk, j * c, axis=2)
        return dq, put(dk, dk_j), put(dv, dv_j)

    zeros = lambda x: jnp.zeros(x.shape, f32)
    dq, dk, dv = jax.lax.fori_loop(0, n, key_block, (zeros(q), zeros(k), zeros(v)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


def _recomputing(forward, backward):
    """Kernel (q, k, v, seg, block) -> output whose backward gets only the inputs, the output
    and the logsumexp (`forward` returns (output, logsumexp)), never the scores."""

    def fwd(q, k, v, seg, c):
        o, lse = forward(q, k, v, seg, c)
        return o, (q, k, v, seg, o, lse)

    kernel = jax.custom_vjp(lambda q, k, v, seg, c: forward(q, k, v, seg, c)[0], nondiff_argnums=(4,))
    kernel.defvjp(fwd, backward)
    return kernel


_prefix = _recomputing(_prefix_forward, _prefix_bwd)
_flash = _recomputing(_flash_forward, _flash_bwd)


# --- platform kernels ---------------------------------------------------------------------------


def cudnn_attention(q_BTHE, k_BSKE, v_BSKE, segments_BT):
    """cuDNN flash attention; document masking as a boolean (B, 1, T, T) mask (no segment-id input)."""
    same_doc_B1TS = (segments_BT[:, :, None] == segments_BT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask=same_doc_B1TS, is_causal=True, implementation="cudnn")


SPLASH_BLOCK = 128


def splash_attention(q_BTHE, k_BSKE, v_BSKE, segments_BT, interpret: bool = False):
    """The TPU splash kernel on each device's shard. A Mosaic kernel cannot be partitioned by XLA, so
    under a mesh it runs inside shard_map: batch split as the "batch" rule says, heads as "q_heads" /
    "kv_heads" (tensor parallelism), every device attending over its whole sequences."""
    local = functools.partial(_splash_local, interpret=interpret)
    active = sharding.active()
    if active is None:
        return local(q_BTHE, k_BSKE, v_BSKE, segments_BT)
    mesh, rules = active
    q_spec = sharding.logical_to_spec(("batch", None, "q_heads", None), rules)
    kv_spec = sharding.logical_to_spec(("batch", None, "kv_heads", None), rules)
    seg_spec = sharding.logical_to_spec(("batch", None), rules)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q_BTHE, k_BSKE, v_BSKE, segments_BT)


def _splash_local(q_BTHE, k_BSKE, v_BSKE, segments_BT, interpret: bool = False):
    """The splash kernel (multi-query form per kv head, vmapped over batch and kv heads) with segment
    ids. Lengths are padded to whole 128-blocks; padded positions form their own document."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, e = q_BTHE.shape
    kv = k_BSKE.shape[2]
    tp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    mask = sm.MultiHeadMask([sm.CausalMask((tp, tp))] * (h // kv))
    sizes = dict(block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK)
    bwd = dict(block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK, block_kv_dkv_compute=SPLASH_BLOCK,
               block_q_dq=SPLASH_BLOCK, block_kv_dq=SPLASH_BLOCK)
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sk.BlockSizes(**sizes, **bwd), interpret=interpret)
    q = _padded(_grouped(q_BTHE, kv), 3, tp) * jnp.asarray(1 / math.sqrt(e), q_BTHE.dtype)  # (B, K, G, Tp, E)
    k, v = (_padded(x.transpose(0, 2, 1, 3), 2, tp) for x in (k_BSKE, v_BSKE))  # (B, K, Tp, E)
    seg = _padded(segments_BT, 1, tp, -1)

    def one(q_GTE, k_TE, v_TE, seg_T):
        return kernel(q_GTE, k_TE, v_TE, segment_ids=sk.SegmentIds(q=seg_T, kv=seg_T))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    o = jax.vmap(per_head)(q, k, v, seg)
    return _ungrouped(o[:, :, :, :t])


_IMPLS = {"xla": xla_attention, "blockwise": blockwise_attention, "cudnn": cudnn_attention, "splash": splash_attention}
