"""Samplers: `direct` (exact autoregressive), `mcmc` (Metropolis), `fullsum` (all 2^N states)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Samples:
    """A batch of configurations with what the estimators downstream need.

    Attributes:
        x: (B, N) int8 configurations, 1 = up.
        weights: (B,) float64 normalized weights (|Ψ|² for fullsum), or None for uniform
            weights (i.i.d. and MCMC samples).
        log_psi: (B,) complex128 log-amplitudes of `x` (no graph), or None if not known.
        n_chains: number of Markov chains the samples come from (1 for i.i.d. samples).
            MCMC samples are ordered chain-major: x.view(n_chains, -1, N).
        info: sampler diagnostics (acceptance rate, ...), plain floats.
        full_basis: True when `x` is the whole basis in basis order (fullsum), so local
            energies can use the sparse Hamiltonian.
    """

    x: torch.Tensor
    weights: torch.Tensor | None = None
    log_psi: torch.Tensor | None = None
    n_chains: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    full_basis: bool = False

    @property
    def n_samples(self) -> int:
        """Number of configurations B."""
        return int(self.x.shape[0])
