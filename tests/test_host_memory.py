"""The host allocator settings are applied on import on Linux with glibc, and each opt-out leaves
glibc's defaults alone (checked in fresh processes: the settings must precede XLA's threads).

What they are for, fewer page faults per CPU step, is a measurement, not a test: the fault count
of a repeated step varies between processes (docs/attention-performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import mtp_jax.host_memory as h; print(h.keep_freed_host_memory())"


def _applied(**env: str) -> bool:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("MTP_JAX_HOST_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_settings_apply_unless_opted_out():
    assert _applied()
    assert not _applied(MTP_JAX_HOST_MALLOC="system")
    assert not _applied(MALLOC_ARENA_MAX="4")  # the user's own glibc settings win
    assert not _applied(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
