"""`naqs evaluate ... sampler=mcmc` draws its chains in chunks: the statistics must be those of
the chains, not of the chunks (τ, R̂ and the error bars of a known autocorrelated chain set)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from naqs_cli import evaluate
from naqs_cli.hamiltonians import TransverseFieldIsing
from naqs_cli.lattice import SquareLattice
from naqs_cli.samplers import Samples
from naqs_cli.stats import Stats
from naqs_cli.vmc import LocalEnergy

N_CHAINS, LENGTH, RHO = 4, 600, 0.8


def _ar1_chains(seed: int = 3) -> np.ndarray:
    """AR(1) chains x_t = ρ x_{t-1} + sqrt(1 − ρ²) ε_t, each chain at its own level."""
    rng = np.random.default_rng(seed)
    chains = np.zeros((N_CHAINS, LENGTH))
    x = rng.standard_normal(N_CHAINS)
    for t in range(LENGTH):
        x = RHO * x + np.sqrt(1 - RHO**2) * rng.standard_normal(N_CHAINS)
        chains[:, t] = x
    return chains + np.arange(N_CHAINS)[:, None] * 0.6


class ChunkedChains:
    """A Markov-chain sampler stand-in: each call continues every chain by n/n_chains samples
    and returns them chain-major, as `MetropolisSampler.sample` does."""

    def __init__(self, chains: np.ndarray, n_sites: int) -> None:
        self.chains, self.n_sites, self.position = chains, n_sites, 0
        self.generator = torch.Generator()

    def sample(self, model, n: int) -> Samples:
        m = n // N_CHAINS
        values = self.chains[:, self.position : self.position + m].reshape(-1)
        self.position += m
        x = torch.zeros(len(values), self.n_sites, dtype=torch.int8)
        batch = Samples(x=x, log_psi=torch.zeros(len(values), dtype=torch.complex128))
        batch.n_chains = N_CHAINS
        batch.info["values"] = torch.as_tensor(values, dtype=torch.complex128)
        return batch


@pytest.mark.parametrize("chunk", [LENGTH * N_CHAINS, 400, 240])
def test_chunked_chains_give_the_statistics_of_the_chains(monkeypatch, chunk):
    hamiltonian = TransverseFieldIsing(lattice=SquareLattice(2, 2), J=1.0, gamma=1.0)
    n_sites = hamiltonian.n_sites

    def energies(model, hamiltonian, batch, chunk_size=4096):
        total = batch.info["values"] * n_sites  # E_loc totals: per-site values × N
        return LocalEnergy(total, torch.zeros_like(total))

    monkeypatch.setattr(evaluate, "batch_local_energy", energies)
    chains = _ar1_chains()
    sampler = ChunkedChains(chains, n_sites)
    values = evaluate.evaluate_model(None, hamiltonian, sampler, N_CHAINS * LENGTH, chunk)
    truth = Stats.markov(chains)
    assert values["n_samples"] == N_CHAINS * LENGTH
    assert values["energy"] == pytest.approx(truth.mean, rel=1e-12)
    assert values["tau"] == pytest.approx(truth.tau, rel=1e-12)
    assert values["energy_err"] == pytest.approx(truth.error, rel=1e-12)
    assert values["r_hat"] == pytest.approx(truth.r_hat, rel=1e-12)
    if chunk < LENGTH * N_CHAINS:  # the old join: chunks concatenated, then cut into "chains"
        m = chunk // N_CHAINS
        parts = [chains[:, i : i + m].reshape(-1) for i in range(0, LENGTH, m)]
        naive = Stats.markov(np.concatenate(parts).reshape(N_CHAINS, -1))
        assert truth.r_hat > 1.1, "the chains sit at different levels"
        assert naive.r_hat < truth.r_hat - 0.05, "cutting chunks into 'chains' hides it"
    # τ of AR(1) is (1 + ρ)/(2(1 − ρ)) = 4.5 in this estimator's convention (½ + Σ ρ(t))
    assert truth.tau > 2.0, "strongly autocorrelated"
