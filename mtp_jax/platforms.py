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


def _has_nvidia_gpus() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*"))


CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def quiet_without_accelerator() -> None:
    """With libtpu or JAX's CUDA plugin installed (the `tpu` / `gpu` extras, for ahead-of-time
    compilation) on a host without that accelerator, JAX would try to start its runtime at every
    start and print the failure; select the CPU backend instead. An explicit JAX_PLATFORMS, or a
    host with the accelerator, is left alone. Compiling for a topology works either way."""
    if "JAX_PLATFORMS" in os.environ:
        return
    tpu = importlib.util.find_spec("libtpu") is not None
    cuda = any(importlib.util.find_spec(p) for p in CUDA_PLUGINS)
    if (tpu and _has_tpu_chips()) or (cuda and _has_nvidia_gpus()) or not (tpu or cuda):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


# What libtpu otherwise asks the Cloud TPU metadata server for, and prints warnings without. Any
# accelerator type serves: a compile-only topology describes its chips itself.
_COMPILE_ONLY_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                     "TPU_ACCELERATOR_TYPE": "v5p-8", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def compile_only_gpu() -> None:
    """Lets JAX's CUDA plugin load for compile-only devices on a host with no GPU (no driver to check)."""
    if not _has_nvidia_gpus():
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def compile_only_tpu() -> None:
    """Prepares libtpu to compile for a topology on a host with no TPU: no metadata queries or
    warnings, and no host-wide lock (nothing opens a chip), so several compilations may run at once."""
    if not _has_tpu_chips():
        for key, value in _COMPILE_ONLY_ENV.items():
            os.environ.setdefault(key, value)

