"""The host allocator settings: with them a repeated CPU step reuses its temporary buffers; with
glibc's defaults it page-faults through them every time (the kernel's fault counter is the
reference, read with getrusage in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource
import mtp_jax  # applies the settings before XLA's threads allocate
import jax, jax.numpy as jnp

def f(x, w):  # three (16384, 512) float32 intermediates XLA cannot fuse away: ~96 MiB of temporaries
    a = x @ w
    b = jnp.tanh(a) @ w
    c = jnp.tanh(b) @ w
    return jnp.sum(a * c) + jnp.sum(b)

x, w = jnp.ones((16384, 512)), jnp.full((512, 512), 1e-3)
step = jax.jit(f).lower(x, w).compile()
temp = step.memory_analysis().temp_size_in_bytes
step(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"temp_pages": temp / resource.getpagesize(), "faults": faults}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MTP_JAX_HOST_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_repeated_steps_reuse_their_temporaries():
    system, kept = _probe(MTP_JAX_HOST_MALLOC="system"), _probe()
    assert system["temp_pages"] > 64 * 2**20 / 4096  # above glibc's mmap ceiling: mmap-served by default
    assert system["faults"] > 0.5 * system["temp_pages"], system  # the default faults them in every step
    assert kept["faults"] < 0.1 * kept["temp_pages"], kept
