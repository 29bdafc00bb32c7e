"""mtp_jax: multi-token-prediction language models in JAX/Flax."""

from mtp_jax.host_memory import keep_freed_host_memory

keep_freed_host_memory()
