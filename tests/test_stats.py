"""Statistics of estimators (`naqs_cli.stats`) and chain-major concatenation of batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from naqs_cli.samplers import Samples, cat_chain_major, cat_samples
from naqs_cli.stats import Stats, integrated_time, split_r_hat

#: AR(1) coefficient of the test chains: ρ(t) = ρ^t, so τ = 1/2 + Σ_t ρ^t = (1 + ρ)/(2(1 − ρ))
#: = 4.5 in the convention of `integrated_time` (error² = Var·2τ/n; 2τ = 9 samples per
#: independent one).
RHO = 0.8
TAU = (1 + RHO) / (2 * (1 - RHO))


def _ar1_chains(n_chains: int, length: int, seed: int) -> np.ndarray:
    """Return (n_chains, length) stationary AR(1) chains x_t = ρ x_{t−1} + sqrt(1 − ρ²) ε_t."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n_chains, length))
    chains = np.empty_like(noise)
    chains[:, 0] = noise[:, 0]
    scale = math.sqrt(1 - RHO**2)
    for t in range(1, length):
        chains[:, t] = RHO * chains[:, t - 1] + scale * noise[:, t]
    return chains


def _tau_sigma(tau: float, n: int) -> float:
    """Sokal's standard error of τ̂ summed over a window of 5τ lags: τ·sqrt(2(2M + 1)/n)."""
    return tau * math.sqrt(2 * (2 * 5 * tau + 1) / n)


def _chunked(chains: np.ndarray, per_chain: list[int]) -> list[Samples]:
    """Split chains as a chunked Markov-chain sampler returns them: each chunk chain-major.

    x holds each sample's (chain, step) so the layout can be checked; log_psi its value.
    """
    n_chains, length = chains.shape
    steps = np.broadcast_to(np.arange(length), chains.shape)
    ids = np.stack([np.broadcast_to(np.arange(n_chains)[:, None], chains.shape), steps], -1)
    parts, start = [], 0
    for m in per_chain:
        stop = start + m
        parts.append(
            Samples(
                x=torch.from_numpy(ids[:, start:stop].reshape(-1, 2).copy()),
                log_psi=torch.from_numpy(chains[:, start:stop].reshape(-1).astype(np.complex128)),
                n_chains=n_chains,
                info={"acceptance": 0.5 if start == 0 else 0.25},
            )
        )
        start = stop
    assert start == length
    return parts


def test_integrated_time_and_error_of_ar1_chains():
    """τ̂ of AR(1) chains is (1 + ρ)/(2(1 − ρ)); the error bar is the true spread of the mean."""
    chains = _ar1_chains(32, 4096, seed=0)
    n = chains.size
    sigma = _tau_sigma(TAU, n)
    stats = Stats.markov(chains)
    print(f"tau = {stats.tau:.3f} ± {sigma:.3f} (truth {TAU}), r_hat = {stats.r_hat:.4f}")
    assert abs(stats.tau - TAU) < 4 * sigma
    # Unit-variance chains: the mean's standard error is sqrt(2τ/n); σ(error)/error = σ(τ)/2τ.
    truth = math.sqrt(2 * TAU / n)
    assert abs(stats.error / truth - 1) < 4 * sigma / (2 * TAU)
    # The i.i.d. error misses the correlation by sqrt(2τ) = 3 (the correction matters).
    assert Stats.iid(chains).error < truth / 2
    assert abs(stats.r_hat - 1) < 0.01
    assert integrated_time(chains) == stats.tau and split_r_hat(chains) == stats.r_hat


def test_cat_samples_keeps_chunked_chains_chain_major():
    """Chunks of 5 and 3 samples per chain in turn (as an evaluation drawing 1024-sample
    chunks from 256 chains: 4 per chain): `cat_samples` restores the chains exactly; plain
    concatenation then reshaping to (n_chains, −1) cuts every "chain" into pieces of all
    chains, underestimating τ and the error bars.
    """
    n_chains, length = 16, 2048
    chains = _ar1_chains(n_chains, length, seed=1)
    parts = _chunked(chains, [5, 3] * (length // 8))
    merged = cat_samples(parts)
    whole = _chunked(chains, [length])[0]
    assert merged.n_chains == n_chains
    assert torch.equal(merged.x, whole.x) and torch.equal(merged.log_psi, whole.log_psi)
    values = cat_chain_major([p.log_psi.real for p in parts], n_chains)  # as local energies
    assert torch.equal(values, whole.log_psi.real)
    good = Stats.markov(merged.log_psi.real.numpy().reshape(n_chains, -1))
    assert good == Stats.markov(chains)

    naive = torch.cat([p.log_psi for p in parts]).real.numpy().reshape(n_chains, -1)
    wrong = Stats.markov(naive)
    sigma = _tau_sigma(TAU, chains.size)
    print(f"tau: chain-major {good.tau:.2f}, naive {wrong.tau:.2f} (truth {TAU}, σ {sigma:.2f})")
    assert abs(good.tau - TAU) < 4 * sigma
    assert wrong.tau < TAU - 4 * sigma
    assert wrong.error < 0.8 * good.error
    first, rest = 5 * n_chains, (length - 5) * n_chains  # acceptance 0.5, then 0.25
    expected = (0.5 * first + 0.25 * rest) / (first + rest)
    assert merged.info["acceptance"] == pytest.approx(expected, rel=1e-12)


def test_cat_samples_keeps_stuck_chains_visible():
    """Chains stuck at different levels: R̂ ≫ 1 after `cat_samples`; plain concatenation
    mixes every chain into every row and hides it (R̂ ≈ 1)."""
    n_chains, length = 8, 512
    chains = 0.3 * _ar1_chains(n_chains, length, seed=2) + np.arange(n_chains)[:, None]
    parts = _chunked(chains, [4] * (length // 4))
    merged = cat_samples(parts).log_psi.real.numpy().reshape(n_chains, -1)
    naive = torch.cat([p.log_psi for p in parts]).real.numpy().reshape(n_chains, -1)
    assert split_r_hat(merged) > 2
    assert split_r_hat(naive) < 1.05


def test_cat_samples_plain_batches_and_refusals():
    x = torch.arange(12, dtype=torch.int8).reshape(6, 2)
    log_psi = torch.arange(6, dtype=torch.float64).to(torch.complex128)
    a = Samples(x=x[:2], log_psi=log_psi[:2], info={"acceptance": 1.0, "note": "a"})
    b = Samples(x=x[2:], log_psi=log_psi[2:], info={"acceptance": 0.0})
    merged = cat_samples([a, b])
    assert torch.equal(merged.x, x) and torch.equal(merged.log_psi, log_psi)
    assert merged.n_chains == 1 and merged.info == {"acceptance": 2 / 6}
    assert cat_samples([a]) is a
    assert cat_samples([a, Samples(x=x[2:])]).log_psi is None
    with pytest.raises(ValueError, match="at least one"):
        cat_samples([])
    with pytest.raises(ValueError, match="chain counts"):
        cat_samples([a, Samples(x=x[2:], n_chains=2)])
    with pytest.raises(ValueError, match="multiples"):
        cat_samples([Samples(x=x[:3], n_chains=2), Samples(x=x[3:5], n_chains=2)])
    weights = torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="full-sum"):
        cat_samples([Samples(x=x[:2], weights=weights), Samples(x=x[2:4], weights=weights)])


def test_iid_full_sum_and_short_chains():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(1000)
    iid = Stats.iid(values)
    assert iid.mean == pytest.approx(values.mean(), abs=1e-15)
    assert iid.error == pytest.approx(values.std(ddof=1) / math.sqrt(values.size), rel=1e-12)
    assert iid.tau == 0.0 and math.isnan(iid.r_hat) and iid.n == 1000
    assert Stats.iid(torch.from_numpy(values)) == iid

    weights = rng.random(1000)
    weights /= weights.sum()
    full = Stats.full_sum(values, weights)
    assert full.mean == pytest.approx(float(weights @ values), abs=1e-15)
    assert full.variance == pytest.approx(float(weights @ (values - full.mean) ** 2), rel=1e-12)
    assert full.error == 0.0

    short = Stats.markov(values[:30].reshape(10, 3))  # τ needs ≥ 4 samples per chain
    assert short == Stats.iid(values[:30])
    with pytest.raises(ValueError, match="n_chains, length"):
        Stats.markov(values)


@pytest.mark.parametrize("weighted", [False, True])
def test_rows_on_the_device_match_the_host_statistics(weighted):
    """`Stats.rows` (torch, with rows derived from the means) equals the numpy constructors."""
    generator = torch.Generator().manual_seed(4)
    values = torch.randn(3, 500, generator=generator, dtype=torch.float64) + 2.0
    weights = None
    if weighted:
        weights = torch.rand(500, generator=generator, dtype=torch.float64)
        weights /= weights.sum()

    def squared_deviation(means: torch.Tensor) -> torch.Tensor:
        return (values[:1] - means[0]) ** 2

    stats = Stats.rows(values, weights, derived=squared_deviation)
    assert stats.mean.shape == (4,)
    rows = list(values) + [(values[0] - stats.mean[0]) ** 2]
    for i, row in enumerate(rows):
        host = Stats.iid(row) if weights is None else Stats.full_sum(row, weights)
        assert float(stats.mean[i]) == pytest.approx(host.mean, rel=1e-13)
        assert float(stats.variance[i]) == pytest.approx(host.variance, rel=1e-12)
        assert float(stats.error[i]) == pytest.approx(host.error, rel=1e-12, abs=0.0)
    assert float(stats.n) == (0 if weighted else 500)
