"""Which platform the programs being traced are for; a quiet start where an accelerator's JAX
plugin is installed but its chips are not; the environment its compiler needs to compile without them.

Tracing normally targets the host's default backend. Compiling ahead of time for a TPU or GPU
topology from another host (`mtp-compile`) targets another one, so the few platform-dependent
choices (compute dtype, attention kernel, the CPU matmul form, unrolling) ask `target()`.
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


def has_cuda_plugin() -> bool:
    """Whether JAX's CUDA plugin (the `gpu` extra) is installed."""
    return any(importlib.util.find_spec(p) for p in CUDA_PLUGINS)


def quiet_without_accelerator() -> None:
    """With libtpu or JAX's CUDA plugin installed (the `tpu` / `gpu` extras, for ahead-of-time
    compilation) on a host without that accelerator, JAX would try to start its runtime at every
    start and print the failure; select the CPU backend instead. An explicit JAX_PLATFORMS, or a
    host with the accelerator, is left alone. Compiling for a topology works either way."""
    if "JAX_PLATFORMS" in os.environ:
        return
    tpu = importlib.util.find_spec("libtpu") is not None
    cuda = has_cuda_plugin()
    if (tpu and _has_tpu_chips()) or (cuda and _has_nvidia_gpus()) or not (tpu or cuda):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


# What libtpu otherwise asks the Cloud TPU metadata server for, and prints warnings without. Any
# accelerator type serves: a compile-only topology describes its chips itself.
_COMPILE_ONLY_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                         "TPU_ACCELERATOR_TYPE": "v5p-8", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
# Lets JAX's CUDA plugin load for compile-only devices with no driver to check.
_COMPILE_ONLY_GPU_ENV = {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}


@contextlib.contextmanager
def compile_only(platform: str) -> Iterator[None]:
    """While the compiler for `platform` ("tpu" or "gpu") starts on a host without that accelerator:
    no metadata queries or warnings, no host-wide lock (nothing opens a chip). The variables are
    put back afterwards: left set, they would tell later processes (a trainer started from here)
    that they run on a multi-host TPU VM."""
    present = _has_tpu_chips() if platform == "tpu" else _has_nvidia_gpus()
    env = {} if present else (_COMPILE_ONLY_TPU_ENV if platform == "tpu" else _COMPILE_ONLY_GPU_ENV)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update({key: value for key, value in env.items() if saved[key] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
