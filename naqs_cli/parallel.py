"""Task parallelism on CPU threads for work that intra-op threads do not speed up.

The PixelCNN's convolutions have few channels: one oneDNN call gains almost nothing from a
second intra-op thread (measured: 0.98× with 2 threads on a 6 × 6 VMC step). Independent
pieces of work (reference configurations of the local energy, sample rows of the cached
sampler) run instead in up to `torch.get_num_threads()` Python threads (at most `MAX_WORKERS`)
that share the intra-op threads; torch releases the GIL inside its kernels. Results are joined
in a fixed order, so they do not depend on scheduling.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

#: Most Python threads for one piece of work (GIL contention grows with more); the intra-op
#: threads are shared out among them.
MAX_WORKERS = 8

_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}


def n_workers(n_items: int, min_items: int, device: torch.device) -> int:
    """Return how many threads should share `n_items` pieces of work (1: run inline).

    Args:
        n_items: pieces of work (e.g. configurations).
        min_items: fewest pieces worth a thread of their own.
        device: where the work runs (threads only on the CPU).
    """
    if device.type != "cpu" or threading.current_thread() is not threading.main_thread():
        return 1
    return max(1, min(torch.get_num_threads(), MAX_WORKERS, n_items // max(1, min_items)))


def split(n_items: int, parts: int) -> list[slice]:
    """Return `parts` contiguous, nearly equal slices covering range(n_items)."""
    bounds = [n_items * k // parts for k in range(parts + 1)]
    return [slice(bounds[k], bounds[k + 1]) for k in range(parts)]


@contextlib.contextmanager
def _restoring_threads() -> Iterator[None]:
    # set_num_threads is process-wide in torch's bookkeeping; restore it afterwards.
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_split(function: Callable[[slice], T], n_items: int, workers: int) -> list[T]:
    """Run function(part) on `workers` contiguous parts of range(n_items), in threads.

    Each thread runs with torch.get_num_threads() // workers intra-op threads (one on small
    machines) and the caller's grad mode; the results come back in part order. With
    workers = 1 the function runs inline on the whole range.
    """
    parts = split(n_items, workers)
    if workers == 1:
        return [function(parts[0])]
    grad = torch.is_grad_enabled()
    per_worker = max(1, torch.get_num_threads() // workers)

    def task(part: slice) -> T:
        torch.set_num_threads(per_worker)
        with torch.set_grad_enabled(grad):
            return function(part)

    with _LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="naqs")
    with _restoring_threads():
        return list(pool.map(task, parts))
