"""The memory plan of inference (`mtp-generate`, `mtp-eval --task humaneval|mbpp`), checked before
anything is restored, so a plan that cannot fit is one line rather than an out-of-memory crash
after minutes of loading.

The plan counts the parameters in the load dtype, the KV caches (trunk blocks, plus head blocks
where the head kind keeps a cache) in the compute dtype, a verify pass's logits (every head at up
to n fed positions, float32) and the prefill's attention scores (every query head, prompt x cache
slots, float32). When one device cannot hold it, the parameters are split over the host's local
devices (an fsdp mesh, `sharding.param_shardings`); the cache and working set are counted whole
on every device (the batch is not split), so a split plan errs on the safe side.

A device's memory is its `memory_stats()["bytes_limit"]`. CPU devices report none and share the
host's memory, so on CPU the plan has one pool: the host's available memory (MemAvailable).
MTP_JAX_DEVICE_MEMORY_BYTES replaces the per-device figure, for tests and dry runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

from mtp_jax.capacity import host_available_bytes
from mtp_jax.config import Config, ConfigError

DEVICE_MEMORY_ENV = "MTP_JAX_DEVICE_MEMORY_BYTES"  # for tests and dry runs: bytes per device
DTYPES = ("float32", "bfloat16")
GIB = 2**30


def add_dtype_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="parameters and computation (so the KV cache) in this dtype; default: the checkpoint's "
                         "parameter dtype and the run's model.dtype. bfloat16 halves both")


def param_count(cfg: Config) -> int:
    """Parameters of the model, from abstract shapes (nothing allocated)."""
    import jax

    from mtp_jax.model.transformer import MTP

    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(MTP(cfg.model).abstract_params()))


def plan_bytes(cfg: Config, batch: int, prompt_len: int, slots: int, param_dtype: str) -> dict[str, int]:
    """Bytes per part for decoding `batch` sequences of up to `slots` cache slots after a
    `prompt_len`-token prefill, parameters held in `param_dtype`."""
    import jax.numpy as jnp

    from mtp_jax.model.transformer import MTP, compute_dtype

    m, mtp = cfg.model, MTP(cfg.model)
    layers = m.trunk_layers + (m.mtp_heads if mtp.head_kind.uses_cache else 0)
    cache_size = jnp.dtype(compute_dtype(m.dtype)).itemsize
    return {
        "parameters": param_count(cfg) * jnp.dtype(param_dtype).itemsize,
        "kv_cache": layers * 2 * batch * slots * m.kv_heads_ * m.head_dim_ * cache_size,
        "logits": batch * m.mtp_heads * m.mtp_heads * m.vocab_size * 4,
        "prefill_attention": batch * m.attn_heads * prompt_len * slots * 4,
    }


def per_device(parts: dict[str, int], devices: int) -> int:
    """Bytes on each of `devices` devices: the parameters split, everything else whole."""
    return -(-parts["parameters"] // devices) + sum(v for k, v in parts.items() if k != "parameters")


def available_memory() -> tuple[int, int]:
    """(bytes per device, devices the parameters may be split over) on this host."""
    import jax

    devices = jax.local_devices()
    limits = [int((d.memory_stats() or {}).get("bytes_limit") or 0) for d in devices]
    pools = len(devices) if all(limits) else 1  # CPU devices share the host's memory
    override = os.environ.get(DEVICE_MEMORY_ENV)
    if override is not None:
        try:
            return int(override), pools
        except ValueError:
            raise ConfigError(f"{DEVICE_MEMORY_ENV}={override!r} must be a whole number of bytes") from None
    return (min(limits) if all(limits) else host_available_bytes()), pools


@dataclasses.dataclass(frozen=True)
class Plan:
    parts: dict[str, int]
    devices: int  # local devices the parameters are split over (1: not split)
    param_dtype: str

    def describe(self) -> str:
        split = f", parameters split over {self.devices} devices" if self.devices > 1 else ""
        return (f"memory plan: {per_device(self.parts, self.devices) / GIB:.1f} GiB per device "
                f"({_parts(self.parts)}; parameters in {self.param_dtype}{split})")


def _parts(parts: dict[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v / GIB:.2f} GiB" for k, v in parts.items())


def make_plan(parts: dict[str, int], param_dtype: str, available: int, pools: int, fix: str) -> Plan:
    """One device when it holds everything, else the fewest local devices (a divisor of their
    number, so the mesh is regular) whose share fits; refuses in one line (needed vs available,
    and `fix`) when none does."""
    for devices in (d for d in range(1, pools + 1) if pools % d == 0):
        if per_device(parts, devices) <= available:
            return Plan(parts, devices, param_dtype)
    where = f"{pools} devices of" if pools > 1 else "one device with"
    raise ConfigError(
        f"decoding needs about {per_device(parts, pools) / GIB:.2f} GiB per device ({_parts(parts)}; parameters in "
        f"{param_dtype}{', split' if pools > 1 else ''}) but {where} {available / GIB:.2f} GiB available; {fix}"
    )


def plan_run(run_dir: str | Path, dtype: str | None, batch: int, prompt_len: int, slots: int, fix: str) -> Plan:
    """The plan for decoding from a run loaded in `dtype` (None: the checkpoint's parameter dtype and
    the run's model.dtype; `run.load_run` loads the same way) on this host's devices, or one line
    saying why it cannot fit."""
    from mtp_jax.run import checkpoint_dtype, read_config

    cfg = read_config(run_dir)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
    param_dtype = dtype or checkpoint_dtype(run_dir)
    available, pools = available_memory()
    return make_plan(plan_bytes(cfg, batch, prompt_len, slots, param_dtype), param_dtype, available, pools, fix)
