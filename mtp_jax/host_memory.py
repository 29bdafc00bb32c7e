"""Host allocator settings, so a CPU train step reuses its memory instead of faulting it in anew.

XLA:CPU allocates each execution's temporary buffers (246 MiB for the parity benchmark's small
step, 1.8 GiB for its large one) with malloc, from its worker threads. glibc hands blocks that
large to a non-main arena, which serves them with a fresh mmap and unmaps them on free, so every
step page-faults through the whole arena again and the kernel zeroes every page: 63 K minor faults
per step at the small shape, 424 K at the large one. With every thread on the main arena, no
mmap-served blocks and no trimming, a step reuses the pages the previous one freed (0 and 47 K
faults per step; the small step in 0.84x the time, median of 4 alternated process pairs). Not in
every process: in 4 of 8 runs of a small program with ~96 MiB of temporaries a repeated step still
faulted through them (1 of 8 with the same settings from glibc's environment variables); the
cause is not found. It is not glibc handing memory back: faulting and clean runs make the same
mmap / munmap / madvise / brk calls, the kernel logs no reclaim, migration or huge-page events,
and runs without address randomisation fault as often. The process keeps its peak heap, which
every step reaches again anyway. `MTP_JAX_HOST_MALLOC=system` keeps glibc's defaults, as does
setting any of glibc's own MALLOC_* variables.

It must run before XLA's threads first allocate, so the package applies it on import.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
OPT_OUT = "MTP_JAX_HOST_MALLOC"


def keep_freed_host_memory() -> bool:
    """Applies the settings on Linux with glibc (unless opted out or the user set glibc's own
    MALLOC_* variables); True when they were applied."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT) == "system":
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # musl and other C libraries have no such symbol
    except (OSError, AttributeError):
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
