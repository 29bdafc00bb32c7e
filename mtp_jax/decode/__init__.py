"""Generation and self-speculative decoding for MTP models."""

from mtp_jax.decode.generate import Result, Sampling, Stats, generate
from mtp_jax.decode.speculative import speculative_generate

__all__ = ["Result", "Sampling", "Stats", "generate", "speculative_generate"]
