"""Model FLOPs per training token and device peak FLOP/s, for throughput and MFU.

Training FLOPs per token (PaLM appendix B convention, forward + backward = 3 x forward):

    6 * P_matmul + 6 * L_attn * T * (attn_heads * head_dim)

- P_matmul: parameters used in matmuls: every trunk block and every head (a block where the
  kind has one, plus its input projection: a linear head's d x d map, a sequential head's
  2d x d), plus the unembedding d x V counted ONCE PER HEAD, since each of the n heads
  multiplies its hidden state by it (its own, for a replicated kind). The embedding lookup is
  a gather (no FLOPs); norm scales are elementwise. (For n = 1 this is a plain LM's 6N without embeddings.)
- Attention scores and values: QK^T and AV, 2 matmuls of 2 * T * H * E FLOPs per token and
  layer forward over the full window, x3 for training = 12 * T * H * E; we count the CAUSAL
  HALF (6 * T * H * E), the work a causal model needs (MaxText's convention; PaLM counts the
  full 12). So MFU does not credit the masked upper triangle that XLA's attention computes
  anyway. L_attn counts every attention layer: trunk blocks plus heads with a block (n_layers
  in total for those kinds, whatever n is).

This is model FLOPs (what the architecture needs), not hardware FLOPs: remat recomputation,
softmax/norm elementwise work and optimizer updates are not counted.
"""

from __future__ import annotations

from typing import Any

from mtp_jax.config import ModelConfig
from mtp_jax.model.head_kinds import head_kind


def block_matmul_params(cfg: ModelConfig) -> int:
    """q, k, v, o projections (GQA: k and v have kv_heads) and the three SwiGLU matrices."""
    d, h, k, e, f = cfg.d_model, cfg.attn_heads, cfg.kv_heads_, cfg.head_dim_, cfg.d_ff_
    return d * e * (2 * h + 2 * k) + 3 * d * f


def matmul_params(cfg: ModelConfig) -> dict[str, int]:
    """Matmul parameters by part; 'unembed' already counts the n applications."""
    kind = head_kind(cfg.head_type)
    head = (block_matmul_params(cfg) if kind.block else 0) + kind.projection_in * cfg.d_model * cfg.d_model
    return {
        "trunk": cfg.trunk_layers * block_matmul_params(cfg),
        "heads": cfg.mtp_heads * head,
        "unembed": cfg.mtp_heads * cfg.d_model * cfg.vocab_size,
    }


def attention_layers(cfg: ModelConfig) -> int:
    return cfg.trunk_layers + (cfg.mtp_heads if head_kind(cfg.head_type).block else 0)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token for windows of seq_len positions."""
    attention = 6 * attention_layers(cfg) * seq_len * cfg.attn_heads * cfg.head_dim_  # causal half
    return float(6 * sum(matmul_params(cfg).values()) + attention)


# Dense bf16 peak FLOP/s per device (per chip for TPUs), from the vendors' data sheets.
# Matched against jax's device_kind in order, so the more specific names come first.
_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),  # TPU v5p reports "TPU v5"
    ("v4", 275e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("a100", 312e12),
)


def peak_flops(device: Any) -> float | None:
    """Peak dense bf16 FLOP/s of one device (a jax.Device or its device_kind), None if unknown (CPUs)."""
    kind = (device if isinstance(device, str) else getattr(device, "device_kind", "")).lower()
    for name, flops in _PEAK_BF16:
        if name in kind:
            return flops
    return None
