"""The variational state: a wave function, its sampler and the Hamiltonian, as one object.

This is the seam between the physics layer (models, samplers, Hamiltonians, `vmc`) and the
training code: the loop and the update rules see only these methods, never the config.

- `sample(n)` draws this rank's share of a batch (i.i.d., Markov chains, or the whole basis
  with |Ψ|² weights: the full-sum state is the same interface, its batches carry weights);
- `local_energy(batch)` returns E_loc(x) = Σ_x' H_xx' Ψ(x')/Ψ(x);
- `expect(batch, e_loc)` returns every observable per site with its statistics;
- `expect_and_grad(batch, e_loc)` accumulates the Eq. 4 gradient
  2 Re⟨(E_loc − Ē)* ∂ ln Ψ⟩ into the parameters' `.grad` (all-reduced over ranks) and returns Ē.

Per-sample log-derivatives O_k(x) = ∂ ln Ψ(x)/∂θ_k (for natural-gradient rules) belong here
too, computed in memory-bounded chunks of `chunk_size` samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from naqs_cli import distributed, jacobian, orbits, vmc
from naqs_cli.samplers import Samples


class VariationalState:
    """A wave function with its sampler and Hamiltonian.

    Args:
        model: the autoregressive wave function (possibly symmetrized).
        sampler: this rank's sampler (`direct`, `mcmc` or `fullsum`).
        hamiltonian: the Hamiltonian whose ground state is sought.
        chunk_size: samples per network pass in local energies and per backward pass.
        n_chains: Markov chains over all ranks (mcmc), for τ and R̂; None otherwise.
        world_size: number of data-parallel ranks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sampler,
        hamiltonian,
        *,
        chunk_size: int = 1024,
        n_chains: int | None = None,
        world_size: int = 1,
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.hamiltonian = hamiltonian
        self.chunk_size = chunk_size
        self.n_chains = n_chains
        self.world_size = world_size
        #: Whether samples group by orbits of the model's symmetry group (the Hamiltonian
        #: commutes with it) or only by configuration (`naqs_cli.orbits`).
        self.orbits_by_group = orbits.hamiltonian_is_invariant(hamiltonian, model)

    def parameters(self) -> list[torch.nn.Parameter]:
        """Return the trainable parameters."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def sample(self, n_samples: int) -> Samples:
        """Draw this rank's `n_samples` configurations (fullsum: the basis, any n).

        Sampled batches come grouped by orbit (`Samples.orbits`): of the model's symmetry
        group when the Hamiltonian commutes with it, else by distinct configuration; their
        number is `info["n_orbits"]` (a history column).
        """
        batch = self.sampler.sample(self.model, n_samples)
        if batch.weights is None and not batch.full_basis and batch.basis_part is None:
            batch.orbits = orbits.find_orbits(self.model, batch.x, self.orbits_by_group)
            batch.info["n_orbits"] = int(batch.orbits.counts.shape[0])
        return batch

    def per_orbit(self, batch: Samples, values: torch.Tensor) -> tuple[Samples, torch.Tensor]:
        """Return one sample per orbit with weight count / N_total, and `values` on them.

        Sums over the batch with uniform weights 1/N_total (N_total over all ranks) equal the
        weighted sums over the representatives (`naqs_cli.orbits`). A batch without orbits
        comes back as it is.

        Args:
            batch: this rank's samples.
            values: (B,) per-sample values (local energies).
        """
        if batch.orbits is None:
            return batch, values
        first = batch.orbits.first
        weights = batch.orbits.counts.to(torch.float64) / self.n_total(batch)
        return Samples(x=batch.x[first], weights=weights), values[first]

    def log_psi(self, x: torch.Tensor) -> torch.Tensor:
        """Return ln Ψ(x) (B,) complex128 at the current parameters, `chunk_size` at a time."""
        with torch.no_grad():
            return vmc._log_psi_chunked(self.model, x, self.chunk_size).to(torch.complex128)

    def local_energy(self, batch: Samples) -> vmc.LocalEnergy:
        """Return the local energies of a batch (also of one rank's share of a full basis)."""
        return vmc.batch_local_energy(self.model, self.hamiltonian, batch, self.chunk_size)

    def n_total(self, batch: Samples) -> int:
        """Return the number of samples of a batch over all ranks."""
        if batch.basis_part is not None:
            return int(batch.basis_part.x.shape[0])
        return batch.n_samples * self.world_size

    def expect(self, batch: Samples, e_loc: vmc.LocalEnergy) -> dict[str, torch.Tensor]:
        """Return every observable per site with its error (device tensors, no sync)."""
        return vmc.observable_estimates(batch, e_loc, self.hamiltonian, n_chains=self.n_chains)

    def expect_and_grad(self, batch: Samples, e_loc: torch.Tensor) -> torch.Tensor:
        """Accumulate the Eq. 4 energy gradient into `.grad` and return the baseline Ē.

        Gradients are zeroed first and all-reduced over ranks after, so every rank holds the
        gradient of the whole batch.

        Args:
            batch: this rank's samples (weights for full sums).
            e_loc: (B,) complex128 local energies (totals).

        Returns:
            Ē, the (all-reduced) weighted mean local energy: a 0-dim complex device tensor.
        """
        for p in self.model.parameters():
            p.grad = None
        n_total = batch.n_samples * distributed.world_size()
        e_mean = vmc.weighted_mean(e_loc, batch, n_total)
        reduced, e_reduced = self.per_orbit(batch, e_loc)
        vmc.vmc_gradient(self.model, reduced, e_reduced, self.chunk_size, n_total, e_mean=e_mean)
        distributed.all_reduce_grads(self.model)
        return e_mean

    def log_derivatives(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the per-sample log-derivatives O_k(x) = ∂ ln Ψ(x)/∂θ_k, chunk by chunk.

        Chunks hold at most `chunk_size` samples (lowered to fit `vmc.BACKWARD_BYTES`); see
        `naqs_cli.jacobian` for how the rows are computed.

        Args:
            x: (B, N) int8 configurations (this rank's).

        Yields:
            (b, P) complex tensors (complex64 for a float32 model), in the order of `x`; the
            columns are `parameters()`, flattened, in order.
        """
        for rows in self.log_derivative_rows(x):
            yield torch.complex(rows[0], rows[1])

    def log_derivative_rows(
        self, x: torch.Tensor, out: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield the same rows as real tensors (2, b, P) = [Re O; Im O], chunk by chunk.

        With `out` (2, B, P) the chunks are written into it (`jacobian.log_derivative_rows`)
        and hold as many samples as an autograd graph of `jacobian.ROWS_GRAPH_BYTES` allows.
        """
        budget = vmc.BACKWARD_BYTES if out is None else jacobian.ROWS_GRAPH_BYTES
        chunk_size = vmc.backward_chunk(self.model, self.chunk_size, budget)
        yield from jacobian.log_derivative_rows(self.model, x, chunk_size, out)
