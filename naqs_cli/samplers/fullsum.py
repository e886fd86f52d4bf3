"""All 2^N basis states weighted by |Ψ|²: exact expectation values and exact gradients."""

from __future__ import annotations

import torch

from naqs_cli.exact import enumerate_basis
from naqs_cli.limits import FULLSUM_MAX_SITES
from naqs_cli.samplers import Samples


class FullSumSampler:
    """Return the whole basis with weights |Ψ(x)|² (N ≤ FULLSUM_MAX_SITES).

    Local energies of a full-basis batch are computed as (HΨ)(x)/Ψ(x) with `to_sparse()`
    (see `vmc.local_energy`), so the energy and the gradient of a training step are exact.

    Args:
        hamiltonian: gives N and, for local energies, the sparse matrix.
        n_samples: ignored (kept so configs that set it work with every sampler).
        seed: unused (nothing is random); kept for a uniform constructor.
        device: where the basis is built.
        chunk_size: configurations per network pass.
    """

    def __init__(
        self,
        *,
        hamiltonian,
        n_samples: int = 0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        chunk_size: int = 8192,
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

    def sample(self, model: torch.nn.Module, n_samples: int | None = None) -> Samples:
        """Return every basis state with weights |Ψ|² and log-amplitudes (no graph)."""
        with torch.no_grad():
            log_psi = torch.cat(
                [model.log_psi(chunk) for chunk in self.basis.split(self.chunk_size)]
            )
        log_p = 2.0 * log_psi.real
        weights = torch.exp(log_p - torch.logsumexp(log_p, dim=0))
        return Samples(x=self.basis, weights=weights, log_psi=log_psi, full_basis=True)

    def state_dict(self) -> dict:
        """Return an empty state (nothing random)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""
