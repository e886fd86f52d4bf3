"""Keep freed activation buffers in the process heap instead of returning them to the kernel.

A forward pass of a batch allocates its activations as a few MB-sized buffers. glibc's malloc
serves blocks above its mmap threshold with fresh `mmap` pages and unmaps them on free, so every
pass pays a page fault per 4 KiB page on first touch: on the 2-core test machine that was a
third of a 4 × 14 forward pass at L = 10 with 1,024 samples (58 ms per pass with the settings
below against 85 ms without). Raising the mmap threshold to glibc's 64-bit maximum (32 MiB)
and the trim threshold to 1 GiB keeps those blocks in the heap for the next pass; the cost is
that the process's resident memory stays at its peak instead of shrinking between passes.

Applied once, when `naqs_cli` is imported, on Linux with glibc; `NAQS_MALLOC_TUNING=0` turns it
off, and a threshold set explicitly through glibc's own environment (`MALLOC_MMAP_THRESHOLD_`,
or `malloc.mmap_threshold` in `GLIBC_TUNABLES`; e.g. `bench_natural.py`, which measures a
step's own memory high-water mark) is left alone. Elsewhere (musl, macOS, Windows) it does
nothing. Blocks above 32 MiB (Jacobian chunks, kernels) are still returned when freed. CUDA
memory has its own caching allocator and is not affected.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's `mallopt` parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: Free memory at the top of the heap kept before it is returned to the kernel.
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
#: The environment variable that turns the tuning off ("0").
ENV_SWITCH = "NAQS_MALLOC_TUNING"


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring).

    Returns:
        Whether both settings were applied (False: switched off, set by the user through
        glibc's environment, not Linux, or no `mallopt`).
    """
    if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False  # the user's own glibc setting wins
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt (musl)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and applied


#: Whether the tuning is in effect in this process (set at import).
APPLIED = keep_freed_memory()
