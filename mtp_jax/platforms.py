"""Which platform the programs being traced are for, and a quiet start on hosts without a TPU.

Tracing normally targets the host's default backend. Compiling ahead of time for a TPU topology
from a CPU host (`mtp-compile`) targets another one, so the few platform-dependent choices
(compute dtype, attention kernel, the CPU matmul form) ask `target()` instead of JAX's backend.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
from typing import Iterator

_TARGET: list[str] = []
GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on a Cloud TPU VM's PCI bus


def target() -> str:
    """The platform being compiled for: the innermost `compiling_for`, else JAX's default backend."""
    if _TARGET:
        return _TARGET[-1]
    import jax

    return jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Traces inside this block make the choices of `platform` ("tpu", "gpu", "cpu")."""
    _TARGET.append(platform)
    try:
        yield
    finally:
        _TARGET.pop()


def _has_tpu_chips() -> bool:
    vendors = glob.glob("/sys/bus/pci/devices/*/vendor")
    for path in vendors:
        try:
            with open(path) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_without_tpu() -> None:
    """With libtpu installed (the `tpu` extra, for ahead-of-time compilation) on a host with no TPU
    and no GPU plugin, JAX would try to start the TPU runtime at every start and print its failure;
    select the CPU backend instead. An explicit JAX_PLATFORMS, a TPU host or a GPU plugin is left alone.
    Compilation for a TPU topology (`jax.experimental.topologies`) works either way."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")):
        return
    if _has_tpu_chips():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


# What libtpu otherwise asks the Cloud TPU metadata server for, and prints warnings without. Any
# accelerator type serves: a compile-only topology describes its chips itself.
_COMPILE_ONLY_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                     "TPU_ACCELERATOR_TYPE": "v5p-8", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def compile_only_tpu() -> None:
    """Prepares libtpu to compile for a topology on a host with no TPU: no metadata queries or
    warnings, and no host-wide lock (nothing opens a chip), so several compilations may run at once."""
    if not _has_tpu_chips():
        for key, value in _COMPILE_ONLY_ENV.items():
            os.environ.setdefault(key, value)

