"""Exact references: ED against known energies, free fermions, model expectations."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from naqs_cli import exact
from naqs_cli.basis import basis_index, enumerate_basis
from naqs_cli.exact import (
    ExactResult,
    _HeisenbergSzSector,
    _lowest_eigenpair,
    _sector_operator,
    _TfimParitySector,
    free_fermion,
    ground_state,
    model_expectations,
)
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.lattice import SquareLattice


def tfim(Lx: int, Ly: int = 1, pbc: bool = False, J: float = 1.0, gamma: float = 1.0):
    return TransverseFieldIsing(lattice=SquareLattice(Lx, Ly, pbc), J=J, gamma=gamma)


def heisenberg(Lx: int, Ly: int = 1, pbc: bool = False, J: float = 1.0, sign_rule="auto"):
    return Heisenberg(lattice=SquareLattice(Lx, Ly, pbc), J=J, sign_rule=sign_rule)


def test_basis_round_trip() -> None:
    x = enumerate_basis(5)
    assert x.dtype == torch.int8 and x.shape == (32, 5)
    assert x[6].tolist() == [0, 0, 1, 1, 0]
    assert torch.equal(basis_index(x), torch.arange(32))


# --------------------------------------------------------------------------------------
# Reference energies (published exact values and the TFIM 4x4 value)


@pytest.mark.parametrize(
    ("hamiltonian", "energy"),
    [
        (tfim(8, pbc=True), -10.2516617910),
        (tfim(8, pbc=True, gamma=0.5), -8.5090822351),
        (tfim(3, 3, pbc=True, gamma=3.0), -29.2097088874),
        (tfim(3, 3), -13.8207902581),
        (heisenberg(4, 4, pbc=True), -11.2284832084),
    ],
    ids=["tfim-L8-g1", "tfim-L8-g0.5", "tfim-3x3pbc-g3", "tfim-3x3obc-g1", "heis-4x4pbc"],
)
def test_reference_energies(hamiltonian, energy: float) -> None:
    result = ground_state(hamiltonian)
    assert isinstance(result, ExactResult) and result.method == "ed"
    assert result.energy == pytest.approx(energy, abs=1e-8)
    assert result.energy_per_site == pytest.approx(energy / hamiltonian.n_sites, abs=1e-9)


def test_tfim_4x4_obc() -> None:
    result = ground_state(tfim(4, 4, gamma=3.0), method="ed")
    assert result.energy == pytest.approx(-50.18662388277671, abs=1e-9)
    assert result.sector == "Z2-even"
    assert set(result.observables) == {
        "abs_magnetization",
        "magnetization",
        "magnetization_sq",
        "sigma_x",
    }
    assert result.missing == {}


@pytest.mark.parametrize("J", [1.0, 2.0])
def test_heisenberg_2x2_obc(J: float) -> None:
    result = ground_state(heisenberg(2, 2, J=J))
    assert result.energy == pytest.approx(-2.0 * J, abs=1e-12)
    assert result.sector == "Sz=0"
    assert result.observables["magnetization"] == 0.0
    assert "staggered_magnetization" in result.observables and "sigma_x" not in result.observables


# --------------------------------------------------------------------------------------
# Sectors hold the global ground state


@pytest.mark.parametrize(
    "hamiltonian",
    [
        tfim(3, 3, pbc=True, J=-1.0, gamma=0.6),  # frustrated antiferromagnet
        tfim(5, gamma=-0.8),  # odd N, negative field: Z2-odd
        tfim(3, 3, gamma=-1.5),
        tfim(4, 2, gamma=0.0),
        tfim(3, 3, pbc=True, J=-1.0, gamma=0.0),  # classical, massively degenerate
        tfim(1, gamma=0.4),
        heisenberg(3, 3, pbc=True),  # frustrated, odd N
        heisenberg(5, pbc=True),
        heisenberg(6, J=-1.0),  # ferromagnet
        heisenberg(3, 2, sign_rule=False),
        heisenberg(1),
    ],
    ids=lambda ham: ham.describe(),
)
def test_sector_energy_is_global_ground_energy(hamiltonian) -> None:
    global_minimum = np.linalg.eigvalsh(hamiltonian.to_sparse().toarray())[0]
    assert ground_state(hamiltonian).energy == pytest.approx(global_minimum, abs=1e-10)


def test_negative_field_maps_to_positive_field() -> None:
    plus = ground_state(tfim(5, gamma=0.8))
    minus = ground_state(tfim(5, gamma=-0.8))
    assert minus.sector == "Z2-odd" and plus.sector == "Z2-even"
    assert minus.energy == pytest.approx(plus.energy, abs=1e-12)
    assert minus.observables["sigma_x"] == pytest.approx(-plus.observables["sigma_x"], abs=1e-12)
    assert minus.observables["magnetization_sq"] == pytest.approx(
        plus.observables["magnetization_sq"], abs=1e-12
    )


def test_classical_limit() -> None:
    result = ground_state(tfim(3, 3, gamma=0.0))
    assert result.energy == -12.0
    assert result.observables == {
        "abs_magnetization": 1.0,
        "magnetization": 0.0,
        "magnetization_sq": 1.0,
        "sigma_x": 0.0,
    }


# --------------------------------------------------------------------------------------
# Observables


def test_tfim_observables_in_both_phases() -> None:
    paramagnet = ground_state(tfim(10, pbc=True, gamma=20.0)).observables
    assert paramagnet["sigma_x"] > 0.99
    assert paramagnet["magnetization_sq"] == pytest.approx(0.1, abs=0.02)  # ≈ 1/N
    assert paramagnet["abs_magnetization"] < 0.3
    ferromagnet = ground_state(tfim(10, pbc=True, gamma=0.05)).observables
    assert ferromagnet["magnetization_sq"] > 0.99
    assert ferromagnet["abs_magnetization"] > 0.99
    assert ferromagnet["sigma_x"] < 0.05
    assert ferromagnet["magnetization"] == 0.0


def test_heisenberg_observables() -> None:
    result = ground_state(heisenberg(4, 4, pbc=True))
    # Néel correlations: well above the uncorrelated value, below 1.
    assert 0.4 < result.observables["staggered_magnetization"] < 1.0
    odd = ground_state(heisenberg(3, 3))
    assert odd.sector == "Sz=1/2"
    assert odd.observables["magnetization"] == pytest.approx(1 / 9)
    assert odd.observables["abs_magnetization"] == pytest.approx(1 / 9)
    assert odd.observables["magnetization_sq"] == pytest.approx(1 / 81)


def _dense_ground_log_psi(hamiltonian) -> tuple[torch.Tensor, float]:
    values, vectors = np.linalg.eigh(hamiltonian.to_sparse().toarray())
    assert values[1] - values[0] > 1e-6
    vector = vectors[:, 0]
    log_psi = np.log(np.abs(vector) + 1e-300) + 1j * np.pi * (vector < 0)
    return torch.from_numpy(log_psi + 0.7 + 0.3j), values[0]  # unnormalized, global phase


@pytest.mark.parametrize(
    "hamiltonian",
    [tfim(8, pbc=True, gamma=0.9), tfim(3, 2, J=-0.5, gamma=1.1), heisenberg(3, 2), heisenberg(6)],
    ids=lambda ham: ham.describe(),
)
def test_model_expectations_of_ground_state_match_ed(hamiltonian) -> None:
    log_psi, energy = _dense_ground_log_psi(hamiltonian)
    n = hamiltonian.n_sites
    values = model_expectations(log_psi, hamiltonian)
    reference = ground_state(hamiltonian, method="ed")
    assert values["energy"] == pytest.approx(reference.energy_per_site, abs=1e-12)
    assert values["energy"] == pytest.approx(energy / n, abs=1e-12)
    assert values["energy_variance"] == pytest.approx(0.0, abs=1e-12)
    assert values["v_score"] == pytest.approx(0.0, abs=1e-12)
    for name, value in reference.observables.items():
        assert values[name] == pytest.approx(value, abs=1e-9), name


def test_model_expectations_of_product_states() -> None:
    ham = tfim(5, J=1.5, gamma=0.7)  # open chain: 4 bonds
    n = ham.n_sites
    all_up = torch.full((2**n,), -torch.inf, dtype=torch.complex128)
    all_up[-1] = 2.0
    values = model_expectations(all_up, ham)
    assert values["energy"] == pytest.approx(-1.5 * 4 / n, abs=1e-14)
    # H|↑…↑⟩ = −4J|↑…↑⟩ − Γ Σᵢ|flip i⟩: Var = NΓ².
    assert values["energy_variance"] == pytest.approx(n * 0.7**2 / n**2, abs=1e-14)
    assert values["v_score"] == pytest.approx(n * n * 0.7**2 / (1.5 * 4) ** 2, abs=1e-12)
    for name in ("abs_magnetization", "magnetization", "magnetization_sq"):
        assert values[name] == pytest.approx(1.0, abs=1e-14)
    assert values["sigma_x"] == pytest.approx(0.0, abs=1e-14)
    # |+…+⟩ (log ψ constant, unnormalized): ⟨σˣ⟩ = 1, ⟨σᶻσᶻ⟩ = 0, Var = J² · n_bonds.
    plus = model_expectations(torch.full((2**n,), 3.0), ham)
    assert plus["sigma_x"] == pytest.approx(1.0, abs=1e-14)
    assert plus["energy"] == pytest.approx(-0.7, abs=1e-14)
    assert plus["energy_variance"] == pytest.approx(1.5**2 * 4 / n**2, abs=1e-13)
    assert plus["magnetization"] == pytest.approx(0.0, abs=1e-14)
    assert plus["magnetization_sq"] == pytest.approx(1 / n, abs=1e-14)  # ⟨(Σσᶻ)²⟩ = N


def test_model_expectations_checks_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        model_expectations(torch.zeros(15), tfim(4))
    with pytest.raises(ValueError, match="finite"):
        model_expectations(torch.full((16,), -torch.inf), tfim(4))


# --------------------------------------------------------------------------------------
# Free fermions


@pytest.mark.parametrize("L", range(8, 15))
@pytest.mark.parametrize("pbc", [False, True], ids=["obc", "pbc"])
def test_free_fermion_matches_ed(L: int, pbc: bool) -> None:
    for gamma in (0.5, 1.0, 2.0):
        ham = tfim(L, pbc=pbc, J=1.0, gamma=gamma)
        ed = ground_state(ham, method="ed")
        energy, sigma_x = free_fermion(L, 1.0, gamma, pbc)
        assert energy == pytest.approx(ed.energy, abs=1e-9)
        assert sigma_x == pytest.approx(ed.observables["sigma_x"], abs=1e-9)


@pytest.mark.parametrize("pbc", [False, True])
@pytest.mark.parametrize("gamma", [0.0, -0.6, 1.7])
def test_free_fermion_matches_ed_at_other_couplings(pbc: bool, gamma: float) -> None:
    L, J = 7, 1.3
    ed = ground_state(tfim(L, pbc=pbc, J=J, gamma=gamma), method="ed")
    energy, sigma_x = free_fermion(L, J, gamma, pbc)
    assert energy == pytest.approx(ed.energy, abs=1e-10)
    assert sigma_x == pytest.approx(ed.observables["sigma_x"], abs=1e-9)


def test_free_fermion_thermodynamic_limit() -> None:
    energy, sigma_x = free_fermion(2000, 1.0, 1.0, True)
    assert energy / 2000 == pytest.approx(-4 / np.pi, abs=1e-6)
    assert sigma_x == pytest.approx(2 / np.pi, abs=1e-6)


def test_free_fermion_sigma_x_is_minus_energy_derivative() -> None:
    for pbc in (False, True):
        step = 1e-6
        up, _ = free_fermion(9, 0.8, 0.6 + step, pbc)
        down, _ = free_fermion(9, 0.8, 0.6 - step, pbc)
        _, sigma_x = free_fermion(9, 0.8, 0.6, pbc)
        assert sigma_x == pytest.approx(-(up - down) / (2 * step) / 9, abs=1e-7)


def test_auto_picks_free_fermions_for_long_chains() -> None:
    result = ground_state(tfim(40, pbc=True, gamma=1.0))
    assert result.method == "free_fermion"
    assert result.energy == pytest.approx(free_fermion(40, 1.0, 1.0, True)[0], abs=1e-12)
    assert set(result.missing) == {"abs_magnetization", "magnetization_sq"}
    assert "sigma_x" in result.observables
    assert ground_state(tfim(12, pbc=True)).method == "ed"
    assert ground_state(tfim(1, 12, pbc=True), method="free_fermion").energy == pytest.approx(
        ground_state(tfim(12, pbc=True)).energy, abs=1e-9
    )


def test_free_fermion_refuses_other_models() -> None:
    with pytest.raises(ValueError, match="method=free_fermion"):
        ground_state(tfim(3, 3), method="free_fermion")
    with pytest.raises(ValueError, match="method=free_fermion"):
        ground_state(tfim(8, J=-1.0), method="free_fermion")
    with pytest.raises(ValueError, match="method=free_fermion"):
        ground_state(heisenberg(8), method="free_fermion")
    with pytest.raises(ValueError, match="L >= 3"):
        free_fermion(2, 1.0, 1.0, True)
    with pytest.raises(ValueError, match="J > 0"):
        free_fermion(8, 0.0, 1.0, False)
    with pytest.raises(ValueError, match=r"method must be one of auto\|ed\|free_fermion"):
        ground_state(tfim(4), method="lanczos")


@pytest.mark.parametrize(
    ("hamiltonian", "method"),
    [(tfim(5, 5), "auto"), (tfim(8, 8), "ed"), (heisenberg(5, 5), "auto"), (tfim(25), "ed")],
    ids=["tfim-5x5", "tfim-8x8", "heis-5x5", "chain-25-ed"],
)
def test_ed_past_limit_raises(hamiltonian, method: str) -> None:
    with pytest.raises(ValueError, match=r"at most 24 sites \(ED_MAX_SITES\).*method") as info:
        ground_state(hamiltonian, method=method)
    assert hamiltonian.lattice.describe() in str(info.value)


# --------------------------------------------------------------------------------------
# Matrix-free path


@pytest.mark.parametrize(
    "hamiltonian",
    [tfim(4, 3, pbc=True, J=0.9, gamma=2.1), heisenberg(4, 3, pbc=True), heisenberg(4, 3)],
    ids=lambda ham: ham.describe(),
)
def test_matrix_free_matvec_equals_sparse(hamiltonian) -> None:
    sector_type = (
        _TfimParitySector if isinstance(hamiltonian, TransverseFieldIsing) else _HeisenbergSzSector
    )
    sector = sector_type(hamiltonian)
    vectors = np.random.default_rng(1).standard_normal((sector.dim, 3))
    expected = sector.to_sparse() @ vectors
    operator = _sector_operator(sector)
    for column in range(3):
        np.testing.assert_allclose(
            operator.matvec(vectors[:, column]), expected[:, column], rtol=0, atol=1e-12
        )
    sparse_energy, sparse_vector = _lowest_eigenpair(sector, matrix_free=False)
    free_energy, free_vector = _lowest_eigenpair(sector, matrix_free=True)
    assert free_energy == pytest.approx(sparse_energy, abs=1e-11)
    overlap = abs(free_vector @ sparse_vector)  # the ground state is unique here
    assert overlap == pytest.approx(1.0, abs=1e-10)


def test_sector_matrix_is_the_projected_hamiltonian() -> None:
    ham = tfim(3, 2, J=0.7, gamma=1.3)
    full = ham.to_sparse().toarray()
    sector = _TfimParitySector(ham)
    # Embedding of (|r⟩ + |r̄⟩)/√2 into the full basis.
    embedding = np.zeros((2**6, sector.dim))
    embedding[sector.states, np.arange(sector.dim)] = 2**-0.5
    embedding[2**6 - 1 - sector.states, np.arange(sector.dim)] = 2**-0.5
    projected = embedding.T @ full @ embedding
    np.testing.assert_allclose(sector.to_sparse().toarray(), projected, atol=1e-12)


def test_default_path_goes_matrix_free_past_the_sparse_limit(monkeypatch, caplog) -> None:
    # A 21-site chain takes ~8 s on 2 busy cores; lower the threshold instead.
    monkeypatch.setattr(exact, "ED_SPARSE_MAX_SITES", 11)
    ham = tfim(13, J=1.0, gamma=1.5)
    with caplog.at_level(logging.INFO, logger="naqs_cli.exact"):
        result = ground_state(ham, method="ed")
    assert "matrix-free" in caplog.text
    energy, sigma_x = free_fermion(13, 1.0, 1.5, False)
    assert result.energy == pytest.approx(energy, abs=1e-10)
    assert result.observables["sigma_x"] == pytest.approx(sigma_x, abs=1e-9)
