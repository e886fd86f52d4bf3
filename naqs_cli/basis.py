"""The computational basis: configurations x ∈ {0, 1}^N (1 = up) and their indices.

Basis order is b = Σ_i x_i·2^(N−1−i): site 0 is the most significant bit, so row b of
`enumerate_basis(N)` is the configuration of index b. Exact diagonalization, full sums and
the tests all use this one order.
"""

from __future__ import annotations

import torch


def enumerate_basis(n_sites: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Return all 2^N configurations in basis order b = Σ_i x_i·2^(N−1−i).

    Args:
        n_sites: N.
        device: where to build the tensor.

    Returns:
        (2^N, N) int8 tensor, row b holds the configuration of basis index b (1 = up).
    """
    b = torch.arange(2**n_sites, device=device, dtype=torch.long)
    shifts = torch.arange(n_sites - 1, -1, -1, device=device, dtype=torch.long)
    return ((b[:, None] >> shifts[None, :]) & 1).to(torch.int8)


def basis_index(x: torch.Tensor) -> torch.Tensor:
    """Return the basis index b = Σ_i x_i·2^(N−1−i) of each configuration.

    Args:
        x: (B, N) int8 configurations.

    Returns:
        (B,) int64 indices.
    """
    n_sites = x.shape[-1]
    weights = 2 ** torch.arange(n_sites - 1, -1, -1, device=x.device, dtype=torch.long)
    return (x.long() * weights).sum(dim=-1)
