"""Llama-architecture tensor names <-> mtp_jax parameters, with every shape checked before reading.

Our blocks in order are the trunk blocks then head 1..n. Meta's multi-token code numbers the
trunk and head 1 together as `layers.*` (head 1 last) and the other heads as `extra_heads.*`;
Hugging Face Llama has `model.layers.*` (trunk + head 1) and our side file keeps the others under
`extra_heads.*`. Block weights are (out, in) matrices in both; ours are (in, ...) einsum kernels.
Meta's q/k rows rotate interleaved pairs; Hugging Face's are permuted to the half-split layout.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

from mtp_jax.config import ModelConfig
from mtp_jax.errors import UserError

# (our path inside a block, Meta suffix, Hugging Face suffix, kind)
BLOCK = [
    (("attn", "wq"), "attention.wq.weight", "self_attn.q_proj.weight", "q"),
    (("attn", "wk"), "attention.wk.weight", "self_attn.k_proj.weight", "k"),
    (("attn", "wv"), "attention.wv.weight", "self_attn.v_proj.weight", "v"),
    (("attn", "wo"), "attention.wo.weight", "self_attn.o_proj.weight", "o"),
    (("mlp", "w_gate"), "feed_forward.w1.weight", "mlp.gate_proj.weight", "ffn_in"),
    (("mlp", "w_up"), "feed_forward.w3.weight", "mlp.up_proj.weight", "ffn_in"),
    (("mlp", "w_down"), "feed_forward.w2.weight", "mlp.down_proj.weight", "ffn_out"),
    (("attn_norm", "scale"), "attention_norm.weight", "input_layernorm.weight", "norm"),
    (("mlp_norm", "scale"), "ffn_norm.weight", "post_attention_layernorm.weight", "norm"),
]
TOP = {  # our path -> (Meta name, Hugging Face name)
    ("embed", "embedding"): ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm", "scale"): ("norm.weight", "model.norm.weight"),
    ("unembed", "kernel"): ("output.weight", "lm_head.weight"),
}
IGNORED_SUFFIXES = ("rope.freqs", "rotary_emb.inv_freq")  # recomputed buffers some checkpoints carry
META, HF = 0, 1


def block_prefixes(cfg: ModelConfig, fmt: int, extra_heads: bool = True) -> list[str]:
    """External prefix of each of our blocks, trunk first, then heads 1..n."""
    main = "layers." if fmt == META else "model.layers."
    names = [f"{main}{i}." for i in range(cfg.trunk_layers + 1)]
    return names + ([f"extra_heads.{j}." for j in range(cfg.mtp_heads - 1)] if extra_heads else [])


def external_shape(cfg: ModelConfig, kind: str) -> tuple[int, ...]:
    d, h, k, e, f = cfg.d_model, cfg.attn_heads, cfg.kv_heads_, cfg.head_dim_, cfg.d_ff_
    return {"q": (h * e, d), "k": (k * e, d), "v": (k * e, d), "o": (d, h * e),
            "ffn_in": (f, d), "ffn_out": (d, f), "norm": (d,)}[kind]


def expected(cfg: ModelConfig, fmt: int, prefixes: list[str], top: bool = True) -> dict[str, tuple[int, ...]]:
    """External name -> shape the config implies."""
    out = {}
    if top:
        d, v = cfg.d_model, cfg.vocab_size
        out[TOP["embed", "embedding"][fmt]] = (v, d)
        out[TOP["norm", "scale"][fmt]] = (d,)
        if not cfg.tie_embeddings:
            out[TOP["unembed", "kernel"][fmt]] = (v, d)
    for prefix in prefixes:
        for _, meta, hf, kind in BLOCK:
            out[prefix + (meta if fmt == META else hf)] = external_shape(cfg, kind)
    return out


def check_tensors(tensors: dict[str, np.ndarray], want: dict[str, tuple[int, ...]], src: str, implied_by: str) -> None:
    """One line naming the first missing, unexpected or misshapen tensor."""
    for name in sorted(want):
        if name not in tensors:
            raise UserError(f"checkpoint {src} lacks tensor '{name}' that {implied_by} implies; is it complete?")
    for name in sorted(tensors):
        if name not in want and not name.endswith(IGNORED_SUFFIXES):
            raise UserError(f"checkpoint {src} has unexpected tensor '{name}' ({implied_by} implies no such tensor)")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"tensor '{name}' in {src} has shape {tuple(tensors[name].shape)}, "
                            f"but {implied_by} implies {shape}")


def half_permutation(head_dim: int) -> np.ndarray:
    """Index map interleaved -> half layout: half[..., c * E/2 + j] = interleaved[..., 2j + c]."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _to_ours(w: np.ndarray, kind: str, cfg: ModelConfig, permute: np.ndarray | None) -> np.ndarray:
    d, e = cfg.d_model, cfg.head_dim_
    w = np.asarray(w, np.float32)
    if kind in ("q", "k", "v"):
        w = w.T.reshape(d, -1, e)
        return w[..., permute] if permute is not None and kind != "v" else w
    if kind == "o":
        return w.T.reshape(-1, e, d)
    return w if kind == "norm" else w.T


def _to_external(w: np.ndarray, kind: str, cfg: ModelConfig, permute: np.ndarray | None) -> np.ndarray:
    d = cfg.d_model
    w = np.asarray(w, np.float32)
    if kind in ("q", "k", "v"):
        w = w[..., permute] if permute is not None and kind != "v" else w
        return w.reshape(d, -1).T
    if kind == "o":
        return w.reshape(-1, d).T
    return w if kind == "norm" else w.T


def _suffix(fmt: int, meta: str, hf: str) -> str:
    return meta if fmt == META else hf


def import_params(tensors: dict[str, np.ndarray], cfg: ModelConfig, fmt: int, prefixes: list[str],
                  permute: np.ndarray | None = None) -> dict:
    """Our parameter tree (float32 NumPy), one stacked leaf filled block by block so that only one
    source tensor is read into memory at a time. `prefixes` has trunk_layers + mtp_heads entries."""
    groups = {"trunk": prefixes[: cfg.trunk_layers], "heads": prefixes[cfg.trunk_layers:]}
    params: dict = {"embed": {}, "norm": {}}
    for (group, leaf), (meta, hf) in TOP.items():
        if group == "unembed" and cfg.tie_embeddings:
            continue
        w = np.asarray(tensors[(meta, hf)[fmt]], np.float32)
        params.setdefault(group, {})[leaf] = w.T if group == "unembed" else w
    for group, names in groups.items():
        tree: dict = {}
        for (module, leaf), meta, hf, kind in BLOCK:
            first = _to_ours(tensors[names[0] + _suffix(fmt, meta, hf)], kind, cfg, permute)
            stack = np.empty((len(names), *first.shape), np.float32)
            for i, prefix in enumerate(names):
                stack[i] = _to_ours(tensors[prefix + _suffix(fmt, meta, hf)], kind, cfg, permute)
            tree.setdefault(module, {})[leaf] = stack
        params[group] = tree
    return params


def export_blocks(stacked: dict, cfg: ModelConfig, prefixes: Iterable[str], fmt: int,
                  permute: np.ndarray | None) -> dict[str, np.ndarray]:
    """External tensors of the blocks stacked in `stacked` (a trunk or heads subtree), in order."""
    out = {}
    for i, prefix in enumerate(prefixes):
        for (module, leaf), meta, hf, kind in BLOCK:
            out[prefix + _suffix(fmt, meta, hf)] = _to_external(np.asarray(stacked[module][leaf][i]), kind, cfg, permute)
    return out


def export_top(params: dict, cfg: ModelConfig, fmt: int) -> dict[str, np.ndarray]:
    out = {TOP["embed", "embedding"][fmt]: np.asarray(params["embed"]["embedding"], np.float32),
           TOP["norm", "scale"][fmt]: np.asarray(params["norm"]["scale"], np.float32)}
    if not cfg.tie_embeddings:
        out[TOP["unembed", "kernel"][fmt]] = np.asarray(params["unembed"]["kernel"], np.float32).T
    return out


def meta_ffn_width(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama 2's FeedForward: 2/3 of 4d, times the optional multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


_REQUIRED = object()


def field(source: dict, key: str, where: str, default: object = _REQUIRED, check: Callable | None = None) -> object:
    """A config field (null counts as absent), or a one-line error naming it."""
    value = source.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"{where} lacks the field '{key}'")
        return default
    if check is not None and not check(value):
        raise UserError(f"{where} field {key}={value!r} is not supported by mtp-convert")
    return value


def count(source: dict, key: str, where: str, default: object = _REQUIRED) -> int:
    """A whole-number field >= 1 (a size: checked before anything divides by it or allocates it)."""
    value = field(source, key, where, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where} field {key}={value!r} must be a whole number >= 1")
    return value


def real(source: dict, key: str, where: str, default: object = _REQUIRED) -> float:
    """A finite number field > 0."""
    value = field(source, key, where, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{where} field {key}={value!r} must be a finite number > 0")
    return float(value)
