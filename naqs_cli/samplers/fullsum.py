"""All 2^N basis states weighted by |Ψ|²: exact expectation values and exact gradients."""

from __future__ import annotations

import torch

from naqs_cli import distributed
from naqs_cli.basis import enumerate_basis
from naqs_cli.limits import FULLSUM_MAX_SITES
from naqs_cli.samplers import BasisPart, Samples


class FullSumSampler:
    """Return the whole basis with weights |Ψ(x)|² (N ≤ FULLSUM_MAX_SITES).

    Local energies of a full-basis batch are computed as (HΨ)(x)/Ψ(x) with `to_sparse()`
    (see `vmc.local_energy`), so the energy and the gradient of a training step are exact.

    On several ranks the basis is split into contiguous shares (`distributed.split`): each rank
    evaluates Ψ on its share, the log-amplitudes are all-gathered so that |Ψ|² is normalized
    over the whole basis, and the batch holds the rank's share with its global weights (and the
    whole basis in `basis_part`, for local energies). Sums over the shares, all-reduced, equal
    the one-rank sums up to rounding.

    Args:
        hamiltonian: gives N and, for local energies, the sparse matrix.
        n_samples: ignored (kept so configs that set it work with every sampler).
        seed: unused (nothing is random); kept for a uniform constructor.
        device: where the basis is built.
        chunk_size: configurations per network pass.
        rank: this process's rank (its share of the basis).
        world_size: number of ranks sharing the basis.
    """

    def __init__(
        self,
        *,
        hamiltonian,
        n_samples: int = 0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        chunk_size: int = 8192,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        n_sites = hamiltonian.n_sites
        if n_sites > FULLSUM_MAX_SITES:
            raise ValueError(
                f"sampler=fullsum holds all 2^N states: N <= FULLSUM_MAX_SITES ="
                f" {FULLSUM_MAX_SITES}, got N = {n_sites}; use sampler=direct"
            )
        self.n_samples = n_samples
        self.chunk_size = chunk_size
        self.basis = enumerate_basis(n_sites, device=device)
        self.world_size = world_size
        self.start, self.stop = self._share(rank)

    def _share(self, rank: int) -> tuple[int, int]:
        """Return the [start, stop) basis indices that `rank` evaluates."""
        return distributed.split(self.basis.shape[0], self.world_size, rank)

    def sample(self, model: torch.nn.Module, n_samples: int | None = None) -> Samples:
        """Return every basis state (this rank's share of them) with weights |Ψ|² normalized
        over the whole basis and log-amplitudes (no graph)."""
        part = self.basis[self.start : self.stop]
        with torch.no_grad():
            chunks = [model.log_psi(chunk) for chunk in part.split(self.chunk_size)]
            log_psi = torch.cat(chunks) if chunks else self._empty_log_psi()
        if self.world_size == 1:
            log_p = 2.0 * log_psi.real
            weights = torch.exp(log_p - torch.logsumexp(log_p, dim=0))
            return Samples(x=self.basis, weights=weights, log_psi=log_psi, full_basis=True)
        sizes = [stop - start for start, stop in map(self._share, range(self.world_size))]
        log_psi_all = distributed.all_gather_cat(log_psi.to(torch.complex128), sizes)
        log_p = 2.0 * log_psi_all.real
        weights = torch.exp(log_p - torch.logsumexp(log_p, dim=0))
        return Samples(
            x=part,
            weights=weights[self.start : self.stop],
            log_psi=log_psi,
            basis_part=BasisPart(self.basis, log_psi_all, self.start),
        )

    def _empty_log_psi(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.complex128, device=self.basis.device)

    def state_dict(self) -> dict:
        """Return an empty state (nothing random)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""
