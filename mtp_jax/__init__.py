"""mtp_jax: multi-token-prediction language models in JAX/Flax."""
