"""Metropolis sampler: exact stationary distribution, detailed balance, chains, checkpoints."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy import stats

from naqs_cli.basis import basis_index, enumerate_basis
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.lattice import SquareLattice
from naqs_cli.models.dense import DenseNAQS
from naqs_cli.samplers import cat_samples
from naqs_cli.samplers.metropolis import MetropolisSampler
from naqs_cli.stats import integrated_time

#: p-value threshold of the statistical tests (fixed seeds: a failure is a real deviation).
P_MIN = 1e-3


def _sharpened(model: torch.nn.Module, ratio: float = 100.0) -> torch.nn.Module:
    """Double all parameters until max/min |Ψ|² over the basis exceeds `ratio`."""
    basis = enumerate_basis(model.n_sites)
    for _ in range(20):
        with torch.no_grad():
            log_p = 2.0 * model.log_psi(basis).real
        if float(log_p.max() - log_p.min()) > math.log(ratio):
            return model
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)
    raise AssertionError("could not sharpen the model")


def _probabilities(model: torch.nn.Module) -> torch.Tensor:
    basis = enumerate_basis(model.n_sites)
    with torch.no_grad():
        log_p = 2.0 * model.log_psi(basis).real
    return torch.softmax(log_p, dim=0)


def g_test(counts: np.ndarray, probabilities: np.ndarray) -> tuple[float, float, int]:
    """Return (G, p-value, dof) of observed counts against probabilities.

    Bins with expected count < 5 are pooled into one bin (merged with the smallest other bin
    if the pool itself stays below 5).
    """
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() * np.asarray(probabilities, dtype=np.float64)
    small = expected < 5
    obs = list(counts[~small])
    exp = list(expected[~small])
    if small.any():
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
        if exp[-1] < 5:
            i = int(np.argmin(exp[:-1]))
            obs[i] += obs.pop()
            exp[i] += exp.pop()
    obs, exp = np.array(obs), np.array(exp)
    nonzero = obs > 0
    g = 2.0 * float(np.sum(obs[nonzero] * np.log(obs[nonzero] / exp[nonzero])))
    dof = len(obs) - 1
    return g, float(stats.chi2.sf(g, dof)), dof


@pytest.fixture(scope="module")
def tfim_3x3():
    lattice = SquareLattice(3, 3)
    hamiltonian = TransverseFieldIsing(lattice=lattice, J=1.0, gamma=1.0)
    torch.manual_seed(0)
    model = _sharpened(DenseNAQS(lattice=lattice, layers=1, hidden=16, phase=True).double())
    return hamiltonian, model, _probabilities(model)


def test_chains_sample_born_probabilities(tfim_3x3):
    """≥ 2^15 samples of 2048 chains, thinned by ≥ 5τ, match |Ψ|² and reject a perturbed Ψ.

    Negative control: a relative ±1 % change of every amplitude moves the G statistic by its
    noncentrality n·Σ p δ² ≤ 2^15·(0.02)² ≈ 13, far below the √(2·dof) ≈ 30 spread of G over
    ~500 bins: no test on 2^15 samples can see it. Instead |Ψ'|² = 0.99 |Ψ|² + 0.01 q moves 1 %
    of the probability (total variation 0.01) onto the 16 least likely states, the error of a
    chain that under-visits the tails: 2n·KL(p‖p') ≈ 2n·0.01 ≈ 650 ≫ 30.
    """
    hamiltonian, model, probabilities = tfim_3x3
    assert float(probabilities.max() / probabilities.min()) > 100
    pilot = MetropolisSampler(
        hamiltonian=hamiltonian, n_chains=512, sweeps_between_samples=1, burn_in=20, seed=3
    )
    batch = pilot.sample(model, 512 * 32)
    log_p = (2.0 * batch.log_psi.real).numpy()
    m = (2.0 * batch.x.double() - 1.0).mean(dim=1).numpy()
    chains = (log_p.reshape(512, -1), m.reshape(512, -1))
    tau = max(integrated_time(c) for c in chains)  # in sweeps
    k = max(1, math.ceil(5 * tau))
    assert 0.5 <= tau < 5, tau

    sampler = MetropolisSampler(
        hamiltonian=hamiltonian, n_chains=2048, sweeps_between_samples=k, burn_in=20, seed=4
    )
    batch = sampler.sample(model, 2**15)
    assert batch.n_samples == 2**15 and batch.n_chains == 2048
    thinned_tau = integrated_time((2.0 * batch.log_psi.real).numpy().reshape(2048, -1))
    assert thinned_tau < 0.75, thinned_tau  # nearly independent kept samples
    counts = np.bincount(basis_index(batch.x).numpy(), minlength=2**9)
    g, p_value, dof = g_test(counts, probabilities.numpy())
    print(f"tau={tau:.2f} sweeps, k={k}, acceptance={batch.info['acceptance']:.3f}")
    print(f"G={g:.1f}, dof={dof}, p={p_value:.3g}")
    assert p_value > P_MIN

    order = torch.argsort(probabilities)
    q = torch.zeros_like(probabilities)
    q[order[:16]] = 1.0 / 16
    perturbed = 0.99 * probabilities + 0.01 * q
    g_bad, p_bad, dof_bad = g_test(counts, perturbed.numpy())
    print(f"perturbed: G={g_bad:.1f}, dof={dof_bad}, p={p_bad:.3g}")
    assert p_bad < P_MIN


def _transition_matrix(sampler: MetropolisSampler, model: torch.nn.Module) -> torch.Tensor:
    """Return T[x, y], one proposal step of the sampler's move and acceptance rules."""
    basis = enumerate_basis(sampler.n_sites)
    n = basis.shape[0]
    rows = torch.arange(n)
    with torch.no_grad():
        log_psi = model.log_psi(basis)
        matrix = torch.zeros(n, n, dtype=torch.float64)
        for move in range(sampler.n_moves):
            proposal, changed = sampler.apply_moves(basis, torch.full((n,), move))
            accept = sampler.acceptance_probability(log_psi, model.log_psi(proposal))
            matrix[rows, basis_index(proposal)] += changed * accept / sampler.n_moves
    matrix[rows, rows] += 1.0 - matrix.sum(dim=1)
    return matrix


def _proposal_matrix(sampler: MetropolisSampler) -> torch.Tensor:
    basis = enumerate_basis(sampler.n_sites)
    n = basis.shape[0]
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for move in range(sampler.n_moves):
        proposal, _ = sampler.apply_moves(basis, torch.full((n,), move))
        matrix[torch.arange(n), basis_index(proposal)] += 1.0 / sampler.n_moves
    return matrix


@pytest.mark.parametrize("kind", ["exchange", "flip"])
def test_detailed_balance_on_2x2(kind):
    lattice = SquareLattice(2, 2)
    if kind == "exchange":
        hamiltonian = Heisenberg(lattice=lattice, J=1.0)
    else:
        hamiltonian = TransverseFieldIsing(lattice=lattice, J=1.0, gamma=1.0)
    torch.manual_seed(1)
    model = _sharpened(DenseNAQS(lattice=lattice, layers=1, hidden=8, phase=True).double())
    sampler = MetropolisSampler(hamiltonian=hamiltonian, seed=0)
    assert sampler.move == kind
    p = _probabilities(model)
    proposal = _proposal_matrix(sampler)
    torch.testing.assert_close(proposal, proposal.T)  # symmetric proposals
    transition = _transition_matrix(sampler, model)
    assert bool((transition >= 0).all())
    torch.testing.assert_close(transition.sum(dim=1), torch.ones(16, dtype=torch.float64))
    flow = p[:, None] * transition
    torch.testing.assert_close(flow, flow.T, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(p @ transition, p, rtol=1e-10, atol=1e-14)
    basis = enumerate_basis(4)
    sz = basis.long().sum(dim=1)
    if kind == "exchange":
        assert bool((transition[sz[:, None] != sz[None, :]] == 0).all())  # keeps Σσᶻ
    # The implemented chain does what T says: one sweep (N steps) from a fixed state.
    start = 0b0110 if kind == "exchange" else 0b0000
    chains = MetropolisSampler(
        hamiltonian=hamiltonian, n_chains=20000, sweeps_between_samples=1, burn_in=0, seed=5
    )
    chains.set_chains(basis[start].expand(20000, -1), burn_in=False)
    batch = chains.sample(model, 20000)
    counts = np.bincount(basis_index(batch.x).numpy(), minlength=16)
    after_sweep = torch.linalg.matrix_power(transition, 4)[start]
    support = after_sweep.numpy() > 0
    assert counts[~support].sum() == 0
    _, p_value, _ = g_test(counts[support], after_sweep.numpy()[support])
    assert p_value > P_MIN


def test_state_dict_round_trip_continues_identically(tfim_3x3):
    hamiltonian, model, _ = tfim_3x3
    first = MetropolisSampler(
        hamiltonian=hamiltonian, n_chains=8, sweeps_between_samples=2, burn_in=3, seed=11
    )
    assert first.state_dict()["x"] is None
    first.sample(model, 16)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"x", "needs_burn_in", "generator"}
    second = MetropolisSampler(
        hamiltonian=hamiltonian, n_chains=8, sweeps_between_samples=2, burn_in=3, seed=99
    )
    second.load_state_dict(state)
    a, b = first.sample(model, 16), second.sample(model, 16)
    assert torch.equal(a.x, b.x)
    torch.testing.assert_close(a.log_psi, b.log_psi)
    assert a.info == b.info
    fresh = MetropolisSampler(
        hamiltonian=hamiltonian, n_chains=4, sweeps_between_samples=2, burn_in=3, seed=11
    )
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict(state)


def test_samples_are_chain_major_and_rounded_up(tfim_3x3):
    hamiltonian, model, _ = tfim_3x3
    sampler = MetropolisSampler(
        hamiltonian=hamiltonian, n_chains=16, sweeps_between_samples=1, burn_in=1, seed=0
    )
    batch = sampler.sample(model, 100)  # rounded up to 7 per chain
    assert batch.x.shape == (112, 9) and batch.x.dtype == torch.int8
    assert batch.n_chains == 16 and batch.weights is None
    assert 0.0 < batch.info["acceptance"] < 1.0
    with torch.no_grad():
        torch.testing.assert_close(batch.log_psi, model.log_psi(batch.x))
    # The last sample of each chain is where the chain now stands.
    assert torch.equal(batch.x.view(16, 7, 9)[:, -1], sampler.x)


def test_chunked_draws_concatenate_to_the_unchunked_chains(tfim_3x3):
    """Drawing 3 + 5 + 2 samples per chain in three calls and joining them with `cat_samples`
    gives the chains of one 10-sample call (same seed): chain-major over all chunks."""
    hamiltonian, model, _ = tfim_3x3

    def sampler() -> MetropolisSampler:
        return MetropolisSampler(
            hamiltonian=hamiltonian, n_chains=8, sweeps_between_samples=1, burn_in=2, seed=5
        )

    whole = sampler().sample(model, 80)
    chunked = sampler()
    parts = [chunked.sample(model, 8 * m) for m in (3, 5, 2)]
    merged = cat_samples(parts)
    assert merged.n_chains == 8
    assert torch.equal(merged.x, whole.x)
    torch.testing.assert_close(merged.log_psi, whole.log_psi, rtol=1e-12, atol=1e-12)
    assert merged.info["acceptance"] == pytest.approx(whole.info["acceptance"], rel=1e-12)
    assert not torch.equal(torch.cat([p.x for p in parts]), whole.x)


def test_polarized_start_with_exchange_moves_is_refused():
    heisenberg = Heisenberg(lattice=SquareLattice(2, 2), J=1.0)
    with pytest.raises(ValueError, match="polarized"):
        MetropolisSampler(hamiltonian=heisenberg, init="up")
    tfim = TransverseFieldIsing(lattice=SquareLattice(2, 2), J=1.0, gamma=1.0)
    with pytest.raises(ValueError, match="polarized"):
        MetropolisSampler(hamiltonian=tfim, init="down", move="exchange")
    with pytest.raises(ValueError, match="sampler.move"):
        MetropolisSampler(hamiltonian=tfim, move="swap")


@pytest.mark.parametrize("total_sz", [None, 1])
def test_random_exchange_start_is_in_the_model_sector(total_sz):
    lattice = SquareLattice(4, 4)
    hamiltonian = Heisenberg(lattice=lattice, J=1.0)
    torch.manual_seed(0)
    model = DenseNAQS(lattice=lattice, layers=1, hidden=16, total_sz=total_sz).double()
    sampler = MetropolisSampler(
        hamiltonian=hamiltonian, n_chains=32, sweeps_between_samples=1, burn_in=1, seed=2
    )
    n_up = 8 if total_sz is None else 9
    start = sampler.initial_states(model)
    assert bool((start.long().sum(dim=1) == n_up).all())
    assert len({tuple(row.tolist()) for row in start}) > 16  # random arrangements
    batch = sampler.sample(model, 64)
    assert bool((batch.x.long().sum(dim=1) == n_up).all())
    flips = MetropolisSampler(hamiltonian=hamiltonian, move="flip")
    if total_sz is not None:
        with pytest.raises(ValueError, match="up spins"):
            flips.sample(model, 16)
