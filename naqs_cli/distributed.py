"""Process-group helpers: rank, world size, all-reduce, rank-0 guard (no-ops in one process).

`torchrun --nproc_per_node=P -m naqs_cli train ...` starts P processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `init()` joins them into one process group
(env://). The group uses gloo for CPU tensors and, where CUDA is present, NCCL for CUDA tensors
(``cpu:gloo,cuda:nccl``), so every collective below works on the device its tensors live on;
object collectives (run directory, sampler states, error reports) always go through the CPU.
Without a group (one process) every helper is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from naqs_cli.errors import PeerFailedError

T = TypeVar("T")

#: Exit code of a rank that stops because rank 0 failed, when rank 0's error names none.
DEFAULT_EXIT_CODE = 1


# --- launch environment (read before the process group exists) ---------------------------
def env_world_size() -> int:
    """Return WORLD_SIZE as set by torchrun (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_local_rank() -> int:
    """Return LOCAL_RANK as set by torchrun (0 when unset): the GPU index on this node."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def init() -> None:
    """Join the torchrun process group (env://) when WORLD_SIZE > 1; no-op otherwise.

    Where CUDA is present each rank takes GPU LOCAL_RANK (modulo the GPU count) as its current
    device, so NCCL collectives and `device=cuda` tensors land on the rank's own GPU.
    """
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env_local_rank() % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, init_method="env://")


def shutdown() -> None:
    """Leave the process group (if one is active)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- state --------------------------------------------------------------------------------
def is_distributed() -> bool:
    """Return whether a torch.distributed process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Return this process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Return the number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Return whether this process writes outputs (rank 0)."""
    return rank() == 0


def split(n: int, n_parts: int | None = None, part: int | None = None) -> tuple[int, int]:
    """Return the [start, stop) range of item indices that rank `part` owns out of `n`.

    Contiguous ranges in rank order; the first n mod P ranks hold one item more.

    Args:
        n: number of items.
        n_parts: number of ranks (default: the world size).
        part: the rank (default: this rank).
    """
    n_parts = world_size() if n_parts is None else n_parts
    part = rank() if part is None else part
    base, extra = divmod(n, n_parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


# --- tensor collectives -------------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Return the sum of `t` over ranks (in place where a group is active)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum the gradients of `model` over ranks in one collective per dtype.

    The loss on each rank is already weighted by 1/B_total (or by global |Ψ|² weights), so the
    sum of the ranks' gradients is the gradient of the whole batch.
    """
    if not is_distributed():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))


def all_gather_cat(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Return the ranks' tensors concatenated along dim 0 in rank order.

    The ranks' first dimensions may differ (the other dimensions must agree).

    Args:
        t: (n_rank, ...) this rank's part, on its device.
        sizes: every rank's first dimension, when known (else gathered first).
    """
    if not is_distributed():
        return t
    if sizes is None:
        sizes = all_gather_object(int(t.shape[0]))
    largest = max(sizes)
    padded = t
    if t.shape[0] < largest:
        pad = torch.zeros((largest - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded = torch.cat([t, pad])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def any_true(flag: bool) -> bool:
    """Return whether `flag` is set on any rank (a tiny CPU all-reduce; no device sync)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# --- object collectives (through the CPU) -------------------------------------------------
def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank `src`'s `obj` on every rank (a picklable value)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=torch.device("cpu"))
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Return every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any) -> list[Any] | None:
    """Return every rank's `obj` in rank order on rank 0 (None on the other ranks)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def exit_code_of(err: BaseException) -> int:
    """Return the exit code an error maps to: its `exit_code` attribute, 1 for OSError."""
    code = getattr(err, "exit_code", None)
    return int(code) if isinstance(code, int) else DEFAULT_EXIT_CODE


def on_main(function: Callable[[], T], share_result: bool = True) -> T | None:
    """Run `function` on rank 0 only and let every rank share its outcome.

    Rank 0 writes files; if that fails, the other ranks must stop too instead of waiting in the
    next collective. Rank 0 re-raises its own error; the others raise `PeerFailedError` with the
    exit code rank 0 stops with (see `exit_code_of`).

    Args:
        function: what rank 0 runs.
        share_result: send the result (a small picklable value) to every rank; otherwise the
            other ranks get None.

    Returns:
        the function's result (None on the other ranks unless shared).
    """
    result, error = None, None
    if is_main():
        try:
            result = function()
        except BaseException as err:  # shared with the other ranks, then re-raised
            error = err
    if is_distributed():
        report = None if error is None else (type(error).__name__, exit_code_of(error))
        shared = broadcast_object((result if share_result else None, report))
        if not is_main():
            result, report = shared
            if report is not None:
                raise PeerFailedError(f"rank 0 stopped ({report[0]})", report[1])
    if error is not None:
        raise error
    return result
