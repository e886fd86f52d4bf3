"""Hamiltonians: get_conn and to_sparse against Kronecker products of Pauli matrices."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from naqs_cli.basis import basis_index, enumerate_basis
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.lattice import SquareLattice

# Local basis index 0 = down (σᶻ = −1), 1 = up (σᶻ = +1); site 0 is the leftmost factor,
# matching b = Σ_i x_i·2^(N−1−i).
IDENTITY = np.eye(2)
SIGMA_X = np.array([[0.0, 1.0], [1.0, 0.0]])
SIGMA_Y = np.array([[0.0, 1.0j], [-1.0j, 0.0]])
SIGMA_Z = np.diag([-1.0, 1.0])

LATTICES = [
    SquareLattice(2, 2),
    SquareLattice(3, 3),
    SquareLattice(3, 3, True),
    SquareLattice(2, 3),
    SquareLattice(3, 2),
    SquareLattice(4, 2),
    SquareLattice(5),
    SquareLattice(5, 1, True),
    SquareLattice(6, 1, True),
    SquareLattice(3, 1, True),
    SquareLattice(1, 4, True),
    SquareLattice(1),
]
LATTICE_IDS = [lattice.describe() + f"-{lattice.Lx}x{lattice.Ly}" for lattice in LATTICES]


def site_operator(n_sites: int, factors: dict[int, np.ndarray]) -> np.ndarray:
    """Return ⊗_i factors.get(i, 1) as a dense (2^N, 2^N) matrix."""
    return functools.reduce(np.kron, [factors.get(i, IDENTITY) for i in range(n_sites)])


def kron_tfim(lattice: SquareLattice, J: float, gamma: float) -> np.ndarray:
    n = lattice.n_sites
    h = np.zeros((2**n, 2**n))
    for i, j in lattice.bonds:
        h -= J * site_operator(n, {i: SIGMA_Z, j: SIGMA_Z})
    for i in range(n):
        h -= gamma * site_operator(n, {i: SIGMA_X})
    return h


def kron_heisenberg(lattice: SquareLattice, J: float, sign_rule: bool) -> np.ndarray:
    n = lattice.n_sites
    h = np.zeros((2**n, 2**n), dtype=complex)
    for i, j in lattice.bonds:
        for pauli in (SIGMA_X, SIGMA_Y, SIGMA_Z):
            h += (J / 4) * site_operator(n, {i: pauli, j: pauli})
    assert np.abs(h.imag).max() < 1e-14
    h = h.real
    if sign_rule:  # the Marshall rotation U = Π_{i: (−1)^(r+c) = −1} σᶻᵢ, H → U H U
        signs = lattice.sublattice_sign().tolist()
        u = site_operator(n, {i: SIGMA_Z for i in range(n) if signs[i] < 0})
        h = u @ h @ u
    return h


def matrix_from_get_conn(hamiltonian) -> np.ndarray:
    n = hamiltonian.n_sites
    x = enumerate_basis(n)
    x_conn, mels = hamiltonian.get_conn(x)
    assert x_conn.dtype == torch.int8 and x_conn.shape == (2**n, hamiltonian.n_conn_max, n)
    assert mels.dtype == torch.float64 and mels.shape == (2**n, hamiltonian.n_conn_max)
    rows = torch.arange(2**n).repeat_interleave(hamiltonian.n_conn_max)
    cols = basis_index(x_conn.reshape(-1, n))
    h = torch.zeros(2**n, 2**n, dtype=torch.float64)
    h.index_put_((rows, cols), mels.reshape(-1), accumulate=True)
    return h.numpy()


@functools.cache
def kron_matrix(lattice: SquareLattice, name: str, J: float, extra: float | bool) -> np.ndarray:
    """Return (and cache) the Kronecker-product matrix of one test case."""
    if name == "tfim":
        return kron_tfim(lattice, J, extra)
    return kron_heisenberg(lattice, J, extra)


def build(lattice: SquareLattice, name: str, J: float, extra: float | bool):
    if name == "tfim":
        return TransverseFieldIsing(lattice=lattice, J=J, gamma=extra)
    return Heisenberg(lattice=lattice, J=J, sign_rule=extra)


def cases() -> list:
    """Return (lattice, model name, J, gamma or sign_rule) for every matrix comparison."""
    params = []
    for lattice, lattice_id in zip(LATTICES, LATTICE_IDS, strict=True):
        params.append(pytest.param(lattice, "tfim", 1.3, 0.7, id=f"tfim-{lattice_id}"))
        for rule in [False, True] if lattice.is_bipartite else [False]:
            params.append(
                pytest.param(
                    lattice, "heisenberg", 0.9, rule, id=f"heisenberg-{lattice_id}-rule{int(rule)}"
                )
            )
    params.append(pytest.param(SquareLattice(3, 2), "tfim", -0.8, 0.0, id="tfim-gamma0-afm"))
    params.append(pytest.param(SquareLattice(4, 2), "heisenberg", -1.1, False, id="heis-ferro"))
    return params


CASE_ARGS = ("lattice", "name", "J", "extra")


@pytest.mark.parametrize(CASE_ARGS, cases())
def test_get_conn_rebuilds_kronecker_matrix(lattice, name, J, extra) -> None:
    expected = kron_matrix(lattice, name, J, extra)
    actual = matrix_from_get_conn(build(lattice, name, J, extra))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(CASE_ARGS, cases())
def test_to_sparse_equals_kronecker_matrix(lattice, name, J, extra) -> None:
    hamiltonian = build(lattice, name, J, extra)
    matrix = hamiltonian.to_sparse()
    assert matrix.format == "csr" and matrix.dtype == np.float64
    assert matrix.shape == (2**hamiltonian.n_sites,) * 2
    np.testing.assert_allclose(
        matrix.toarray(), kron_matrix(lattice, name, J, extra), rtol=0, atol=1e-12
    )
    assert abs(matrix - matrix.T).max() < 1e-15  # Hermitian (real symmetric)


@pytest.mark.parametrize(
    "hamiltonian",
    [
        TransverseFieldIsing(lattice=SquareLattice(3, 2), gamma=0.0),
        Heisenberg(lattice=SquareLattice(3, 3, True)),
        Heisenberg(lattice=SquareLattice(2, 2), sign_rule=True),
    ],
    ids=["tfim-gamma0", "heisenberg-3x3pbc", "heisenberg-rule"],
)
def test_unused_slots_hold_x_with_zero_mel(hamiltonian) -> None:
    x = enumerate_basis(hamiltonian.n_sites)
    x_conn, mels = hamiltonian.get_conn(x)
    unused = mels == 0
    unused[:, 0] = False  # the diagonal may vanish legitimately
    assert unused.any()
    copies = x[:, None, :].expand_as(x_conn)
    assert torch.equal(x_conn[unused], copies[unused])
    # Used off-diagonal slots always change x.
    used = ~unused
    used[:, 0] = False
    assert (x_conn[used] != copies[used]).any(dim=-1).all()


def test_tfim_slot_layout() -> None:
    ham = TransverseFieldIsing(lattice=SquareLattice(4), J=1.0, gamma=0.5)
    assert ham.n_conn_max == 5
    x = torch.tensor([[1, 0, 0, 1]], dtype=torch.int8)
    x_conn, mels = ham.get_conn(x)
    assert x_conn[0].tolist() == [
        [1, 0, 0, 1],
        [0, 0, 0, 1],
        [1, 1, 0, 1],
        [1, 0, 1, 1],
        [1, 0, 0, 0],
    ]
    assert mels[0].tolist() == [1.0, -0.5, -0.5, -0.5, -0.5]  # −J(−1 + 1 − 1)


def test_heisenberg_slot_layout() -> None:
    ham = Heisenberg(lattice=SquareLattice(3), J=2.0, sign_rule=False)
    assert ham.lattice.bonds == ((0, 1), (1, 2))
    x = torch.tensor([[1, 0, 0]], dtype=torch.int8)
    x_conn, mels = ham.get_conn(x)
    assert x_conn[0].tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert mels[0].tolist() == [0.0, 1.0, 0.0]  # (J/4)(−1 + 1); J/2; parallel → 0
    with_rule = Heisenberg(lattice=SquareLattice(3), J=2.0, sign_rule="auto")
    assert with_rule.uses_sign_rule
    assert with_rule.get_conn(x)[1][0].tolist() == [0.0, -1.0, 0.0]


@pytest.mark.parametrize("lattice", [SquareLattice(2, 2), SquareLattice(2, 3), SquareLattice(4, 2)])
def test_sign_rule_keeps_spectrum_and_makes_ground_state_non_negative(
    lattice: SquareLattice,
) -> None:
    plain = Heisenberg(lattice=lattice, sign_rule=False).to_sparse().toarray()
    rotated = Heisenberg(lattice=lattice, sign_rule=True).to_sparse().toarray()
    np.testing.assert_allclose(
        np.linalg.eigvalsh(plain), np.linalg.eigvalsh(rotated), rtol=0, atol=1e-12
    )
    off_diagonal = rotated - np.diag(np.diag(rotated))
    assert off_diagonal.max() <= 0  # stoquastic
    n = lattice.n_sites
    in_sector = np.flatnonzero(enumerate_basis(n).sum(dim=1).numpy() == n // 2)
    for matrix, non_negative in ((rotated, True), (plain, False)):
        values, vectors = np.linalg.eigh(matrix[np.ix_(in_sector, in_sector)])
        assert values[1] - values[0] > 1e-6  # unique ground state in Σσᶻ = 0
        ground = vectors[:, 0] * np.sign(vectors[:, 0].sum())
        assert bool(ground.min() >= -1e-12) is non_negative


def test_heisenberg_energy_scales_with_J() -> None:
    lattice = SquareLattice(3, 2)
    base = Heisenberg(lattice=lattice, J=1.0).to_sparse()
    scaled = Heisenberg(lattice=lattice, J=2.5).to_sparse()
    assert abs(scaled - 2.5 * base).max() < 1e-14
    values = np.linalg.eigvalsh(base.toarray())
    np.testing.assert_allclose(np.linalg.eigvalsh(scaled.toarray()), 2.5 * values, atol=1e-12)


def test_tfim_is_linear_in_J_and_gamma() -> None:
    lattice = SquareLattice(3, 2)
    zz = TransverseFieldIsing(lattice=lattice, J=1.0, gamma=0.0).to_sparse()
    x = TransverseFieldIsing(lattice=lattice, J=0.0, gamma=1.0).to_sparse()
    both = TransverseFieldIsing(lattice=lattice, J=2.0, gamma=3.0).to_sparse()
    assert abs(both - (2.0 * zz + 3.0 * x)).max() < 1e-14


@pytest.mark.parametrize(
    "hamiltonian",
    [
        TransverseFieldIsing(lattice=SquareLattice(3, 3, True), J=0.7, gamma=1.2),
        Heisenberg(lattice=SquareLattice(4, 2)),
    ],
    ids=["tfim", "heisenberg"],
)
def test_get_conn_batch_equals_row_by_row(hamiltonian) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (17, hamiltonian.n_sites), generator=generator, dtype=torch.int8)
    x_conn, mels = hamiltonian.get_conn(x)
    for row in range(x.shape[0]):
        row_conn, row_mels = hamiltonian.get_conn(x[row : row + 1])
        assert torch.equal(row_conn[0], x_conn[row])
        assert torch.equal(row_mels[0], mels[row])
    empty_conn, empty_mels = hamiltonian.get_conn(x[:0])
    assert empty_conn.shape == (0, hamiltonian.n_conn_max, hamiltonian.n_sites)
    assert empty_mels.shape == (0, hamiltonian.n_conn_max)


@pytest.mark.parametrize(
    ("hamiltonian", "expected"),
    [
        (TransverseFieldIsing(lattice=SquareLattice(2, 2)), [4, 0, 1, 2, 3]),
        (TransverseFieldIsing(lattice=SquareLattice(2, 2), gamma=0.0), [4, 4, 4, 4, 4]),
        (
            Heisenberg(lattice=SquareLattice(3, 3, True)),
            [9] + [i for i, _ in SquareLattice(3, 3, True).bonds],
        ),
    ],
    ids=["tfim", "tfim-gamma0", "heisenberg"],
)
def test_first_changed_site(hamiltonian, expected: list[int]) -> None:
    first = hamiltonian.first_changed_site
    assert first.dtype == torch.long and first.tolist() == expected
    x = enumerate_basis(hamiltonian.n_sites)
    x_conn, _ = hamiltonian.get_conn(x)
    changed = x_conn != x[:, None, :]  # (B, K, N)
    for k, site in enumerate(expected):
        assert not changed[:, k, :site].any()
        if site < hamiltonian.n_sites:
            assert changed[:, k, site].any()


@pytest.mark.parametrize(
    ("lattice", "sign_rule", "J", "expected"),
    [
        (SquareLattice(4, 4, True), "auto", 1.0, True),
        (SquareLattice(3, 3, True), "auto", 1.0, False),
        (SquareLattice(3, 3, False), "auto", 1.0, True),
        (SquareLattice(5, 1, True), "auto", 1.0, False),
        (SquareLattice(6, 1, True), "AUTO", 1.0, True),
        (SquareLattice(4, 4, True), "auto", -1.0, False),
        (SquareLattice(4, 4, True), "false", 1.0, False),
        (SquareLattice(4, 4, True), False, 1.0, False),
        (SquareLattice(4, 4, True), "True", -1.0, True),
        (SquareLattice(4, 4, True), True, 1.0, True),
    ],
)
def test_sign_rule_resolution(lattice, sign_rule, J, expected) -> None:
    assert Heisenberg(lattice=lattice, J=J, sign_rule=sign_rule).uses_sign_rule is expected


def test_sign_rule_on_non_bipartite_lattice_raises() -> None:
    with pytest.raises(ValueError, match=r"ham\.sign_rule.*3x3 pbc"):
        Heisenberg(lattice=SquareLattice(3, 3, True), sign_rule="true")
    with pytest.raises(ValueError, match=r"ham\.sign_rule.*L=5 pbc"):
        Heisenberg(lattice=SquareLattice(5, 1, True), sign_rule=True)
    with pytest.raises(ValueError, match=r"ham\.sign_rule.*auto\|true\|false"):
        Heisenberg(lattice=SquareLattice(4), sign_rule="maybe")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"J": float("nan")}, "ham.J"),
        ({"J": float("inf")}, "ham.J"),
        ({"J": "1.0"}, "ham.J"),
        ({"J": True}, "ham.J"),
        ({"gamma": float("-inf")}, "ham.gamma"),
        ({"gamma": None}, "ham.gamma"),
    ],
)
def test_tfim_validates_couplings(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TransverseFieldIsing(lattice=SquareLattice(4), **kwargs)


def test_constructors_are_keyword_only_and_check_lattice() -> None:
    with pytest.raises(TypeError):
        TransverseFieldIsing(SquareLattice(4), 1.0, 1.0)  # type: ignore[misc]
    with pytest.raises(TypeError, match="SquareLattice"):
        Heisenberg(lattice=(4, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ham\.J"):
        Heisenberg(lattice=SquareLattice(4), J=float("nan"))


def test_get_conn_checks_input() -> None:
    ham = TransverseFieldIsing(lattice=SquareLattice(4))
    with pytest.raises(TypeError, match="int8"):
        ham.get_conn(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        ham.get_conn(torch.zeros(2, 5, dtype=torch.int8))


def test_to_sparse_refuses_large_lattices() -> None:
    with pytest.raises(ValueError, match="ED_SPARSE_MAX_SITES"):
        TransverseFieldIsing(lattice=SquareLattice(21)).to_sparse()


def test_attributes_and_describe() -> None:
    tfim = TransverseFieldIsing(lattice=SquareLattice(4, 4), J=1, gamma=3)
    assert (tfim.name, tfim.n_sites, tfim.n_conn_max, tfim.conserves_sz) == ("tfim", 16, 17, False)
    assert isinstance(tfim.J, float) and tfim.describe() == "tfim J=1 gamma=3 on 4x4 obc"
    assert TransverseFieldIsing(lattice=SquareLattice(4), gamma=0).conserves_sz
    heis = Heisenberg(lattice=SquareLattice(4, 4, True))
    assert (heis.name, heis.n_conn_max, heis.conserves_sz) == ("heisenberg", 33, True)
    assert heis.describe() == "heisenberg J=1 sign_rule=on on 4x4 pbc"
    assert heis.exchange_mels == (-0.5,) * 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "hamiltonian",
    [
        TransverseFieldIsing(lattice=SquareLattice(3, 3, True), gamma=0.5),
        Heisenberg(lattice=SquareLattice(4, 2)),
    ],
    ids=["tfim", "heisenberg"],
)
def test_get_conn_on_cuda_matches_cpu(hamiltonian) -> None:
    x = enumerate_basis(hamiltonian.n_sites)
    x_conn, mels = hamiltonian.get_conn(x.cuda())
    assert x_conn.device.type == "cuda" and mels.device.type == "cuda"
    cpu_conn, cpu_mels = hamiltonian.get_conn(x)
    assert torch.equal(x_conn.cpu(), cpu_conn)
    assert torch.equal(mels.cpu(), cpu_mels)
