"""Samplers: `direct` (exact autoregressive), `mcmc` (Metropolis), `fullsum` (all 2^N states)."""

from __future__ import annotations

from collections.abc import Sequence
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


@dataclass(frozen=True)
class Orbits:
    """A batch's samples grouped by symmetry orbit (`naqs_cli.orbits.find_orbits`).

    Attributes:
        first: (U,) int64 index of the first sample of each orbit.
        inverse: (B,) int64 orbit of each sample.
        counts: (U,) int64 samples per orbit.
    """

    first: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor


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
        orbits: the samples grouped by orbit of a symmetry of the state and the Hamiltonian
            (`VariationalState.sample`): local energies and log-derivatives are computed once
            per orbit. None: every sample on its own.
    """

    x: torch.Tensor
    weights: torch.Tensor | None = None
    log_psi: torch.Tensor | None = None
    n_chains: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    full_basis: bool = False
    basis_part: BasisPart | None = None
    orbits: Orbits | None = None

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


def cat_chain_major(tensors: Sequence[torch.Tensor], n_chains: int) -> torch.Tensor:
    """Concatenate per-sample tensors of successive batches as `cat_samples` joins them.

    With several chains each tensor is chain-major, (n_chains·m_i, ...), and they are joined
    chain by chain into (n_chains·Σm_i, ...), chain-major again; otherwise plainly.

    Args:
        tensors: one tensor per batch (configurations, local energies, ...), in drawing order.
        n_chains: the batches' number of chains (1 for i.i.d. samples).
    """
    if n_chains <= 1:
        return torch.cat(list(tensors))
    rest = tensors[0].shape[1:]
    chains = [t.reshape(n_chains, -1, *rest) for t in tensors]
    return torch.cat(chains, dim=1).reshape(-1, *rest)


def _merged_info(parts: Sequence[Samples]) -> dict[str, Any]:
    """Average the numeric `info` entries every part has, weighted by the parts' sizes."""
    total = sum(p.n_samples for p in parts)
    if total == 0:
        return {}
    keys = [k for k in parts[0].info if all(isinstance(p.info.get(k), (int, float)) for p in parts)]
    return {k: sum(p.info[k] * p.n_samples for p in parts) / total for k in keys}


def cat_samples(parts: Sequence[Samples]) -> Samples:
    """Concatenate batches drawn one after another from the same sampler.

    Markov-chain batches (`n_chains` > 1, each chain-major) are joined chain by chain, so the
    result is chain-major again: chain c's samples of every part in order, then chain c + 1's.
    Other batches are concatenated as they are. Per-sample values computed for each part
    (local energies, ...) join alike with `cat_chain_major`. `log_psi` is kept when every part
    has it; numeric `info` entries every part has are averaged, weighted by the parts' sizes
    (for the acceptance rate: the overall fraction, every sample having taken the same sweeps).

    Args:
        parts: batches with the same `n_chains`; full-sum batches (weights, a whole basis or a
            share of one) only alone.

    Returns:
        One batch of Σ n_samples configurations (the part itself when there is one).

    Raises:
        ValueError: no parts, different `n_chains`, a part whose size is not a multiple of
            its `n_chains`, or several full-sum batches.
    """
    if not parts:
        raise ValueError("cat_samples needs at least one batch")
    if len(parts) == 1:
        return parts[0]
    n_chains = parts[0].n_chains
    if any(p.n_chains != n_chains for p in parts):
        counts = sorted({p.n_chains for p in parts})
        raise ValueError(f"cannot concatenate batches of different chain counts {counts}")
    if any(p.weights is not None or p.full_basis or p.basis_part is not None for p in parts):
        raise ValueError("full-sum batches (weights over a whole basis) cannot be concatenated")
    if any(p.n_samples % n_chains for p in parts):
        sizes = [p.n_samples for p in parts]
        raise ValueError(f"batch sizes {sizes} are not multiples of their {n_chains} chains")
    has_log_psi = all(p.log_psi is not None for p in parts)
    return Samples(
        x=cat_chain_major([p.x for p in parts], n_chains),
        log_psi=cat_chain_major([p.log_psi for p in parts], n_chains) if has_log_psi else None,
        n_chains=n_chains,
        info=_merged_info(parts),
    )
