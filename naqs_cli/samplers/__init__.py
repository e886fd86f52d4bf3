"""Samplers: `direct` (exact autoregressive), `mcmc` (Metropolis), `fullsum` (all 2^N states)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class BasisPart:
    """The whole basis behind one rank's contiguous share of it (fullsum on several ranks).

    Attributes:
        x: (2^N, N) int8 the whole basis in basis order.
        log_psi: (2^N,) complex128 log-amplitudes of the whole basis (gathered over ranks).
        start: basis index of this rank's first configuration.
    """

    x: torch.Tensor
    log_psi: torch.Tensor
    start: int


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
        basis_part: set when `x` is this rank's contiguous share of the whole basis (fullsum
            on several ranks; `weights` are then normalized over the whole basis); local
            energies use `full_batch()`.
    """

    x: torch.Tensor
    weights: torch.Tensor | None = None
    log_psi: torch.Tensor | None = None
    n_chains: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    full_basis: bool = False
    basis_part: BasisPart | None = None

    @property
    def n_samples(self) -> int:
        """Number of configurations B (on this rank)."""
        return int(self.x.shape[0])

    def full_batch(self) -> Samples:
        """Return the whole-basis batch a rank's share belongs to (`self` when not a share)."""
        part = self.basis_part
        if part is None:
            return self
        return Samples(x=part.x, log_psi=part.log_psi, full_basis=True)
