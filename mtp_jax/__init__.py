"""mtp_jax: multi-token-prediction language models in JAX/Flax."""

from mtp_jax.host_memory import keep_freed_host_memory
from mtp_jax.platforms import quiet_without_accelerator

keep_freed_host_memory()
quiet_without_accelerator()
