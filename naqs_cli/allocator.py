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

Blocks above the threshold are fresh pages on every allocation; the largest of them (the
per-sample Jacobian rows of natural-gradient steps, hundreds of MB) are advised into
transparent huge pages and populated up front (`advise_huge_pages`): writing a fresh 130 MB
chunk took 13–22 ms instead of 62–67 ms on the 2-core test machine, 3.3 GB of MinSR rows
0.5 s instead of 1.1–2.8 s. The same switch turns this off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is not imported here: the thresholds are set before it loads
    import torch

#: glibc's `mallopt` parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: Free memory at the top of the heap kept before it is returned to the kernel.
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
#: The environment variable that turns the tuning off ("0").
ENV_SWITCH = "NAQS_MALLOC_TUNING"
#: `madvise` advice for transparent huge pages and for populating a range up front
#: (linux/mman.h; the latter since Linux 5.14), and the huge page size on x86-64/arm64.
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23
HUGE_PAGE_BYTES = 2 * 1024 * 1024
#: Smallest tensor `advise_huge_pages` advises: smaller blocks come from the heap (above).
HUGE_PAGE_MIN_BYTES = MMAP_THRESHOLD_BYTES


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


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask the kernel to back a freshly allocated, untouched CPU tensor with huge pages now.

    Only the 2 MiB pages entirely inside the tensor's memory are advised, and then populated
    in one call (`MADV_POPULATE_WRITE`, where the kernel has it) instead of one page fault at
    a time: on the 2-core test machine (a VM) 3.3 GB took 0.5 s instead of 1.1–2.8 s to
    first write. The contents are not changed. A no-op (False) for tensors under
    `HUGE_PAGE_MIN_BYTES`, off the CPU, off Linux, with `NAQS_MALLOC_TUNING=0`, or where the
    kernel refuses (no transparent huge pages); where they are switched to `never` the advice
    is accepted and has no effect.

    Returns:
        Whether the advice was given and accepted.
    """
    n_bytes = tensor.numel() * tensor.element_size()
    if (
        n_bytes < HUGE_PAGE_MIN_BYTES
        or tensor.device.type != "cpu"
        or not sys.platform.startswith("linux")
        or os.environ.get(ENV_SWITCH, "1") == "0"
    ):
        return False
    start = -(-tensor.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    stop = (tensor.data_ptr() + n_bytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if stop <= start:
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    if madvise(start, stop - start, MADV_HUGEPAGE) != 0:
        return False
    madvise(start, stop - start, MADV_POPULATE_WRITE)  # EINVAL before Linux 5.14: faults later
    return True


#: Whether the tuning is in effect in this process (set at import).
APPLIED = keep_freed_memory()
