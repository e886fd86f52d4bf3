"""Process-group helpers: rank, world size, all-reduce, rank-0 guard (no-ops in one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Return the sum of `t` over ranks (in place where a group is active)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Average the gradients of `model` over ranks (sums of per-rank 1/B_total-weighted terms).

    The loss on each rank is already weighted by 1/B_total, so the gradients are summed.
    """
    if not is_distributed():
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
