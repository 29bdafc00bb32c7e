"""Model FLOPs per token and device peak FLOP/s, for throughput and MFU."""

from __future__ import annotations

from mtp_jax.config import ModelConfig


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (the unembedding once per head) + causal attention."""
    d, hd = cfg.d_model, cfg.head_dim_
    attn = d * hd * (2 * cfg.attn_heads + 2 * cfg.kv_heads_)
    block = attn + 3 * d * cfg.d_ff_
    head = block if cfg.head_type == "transformer" else d * d
    matmul = cfg.trunk_layers * block + cfg.mtp_heads * (head + d * cfg.vocab_size)
    blocks = cfg.trunk_layers + (cfg.mtp_heads if cfg.head_type == "transformer" else 0)
    attention = 6 * blocks * seq_len * cfg.attn_heads * hd  # QK^T and AV, causal half, x3 for fwd+bwd
    return 6.0 * matmul + attention


PEAK_BF16 = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
             "NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_BF16.items() if kind.startswith(k)), None)
