"""SquareLattice: bond counts, boundaries, sublattices, bipartiteness."""

from __future__ import annotations

import pytest
import torch

from naqs_cli.lattice import SquareLattice


@pytest.mark.parametrize(
    ("Lx", "Ly", "pbc", "n_bonds"),
    [
        (1, 1, False, 0),
        (1, 1, True, 0),  # a single site never wraps
        (2, 1, False, 1),
        (5, 1, False, 4),
        (3, 1, True, 3),
        (5, 1, True, 5),
        (8, 1, True, 8),
        (1, 6, True, 6),  # a chain along y
        (2, 2, False, 4),
        (3, 2, False, 7),
        (3, 3, False, 12),
        (4, 4, False, 24),
        (3, 3, True, 18),
        (4, 4, True, 32),
        (4, 3, True, 24),
        (5, 4, True, 40),
    ],
)
def test_bond_count(Lx: int, Ly: int, pbc: bool, n_bonds: int) -> None:
    lattice = SquareLattice(Lx, Ly, pbc)
    assert lattice.n_sites == Lx * Ly
    assert len(lattice.bonds) == n_bonds


@pytest.mark.parametrize(
    "lattice",
    [
        SquareLattice(3, 1, True),
        SquareLattice(4, 1, True),
        SquareLattice(3, 3, True),
        SquareLattice(4, 3, True),
        SquareLattice(3, 4, False),
        SquareLattice(1, 5, True),
    ],
    ids=lambda lattice: lattice.describe(),
)
def test_bonds_are_unique_ordered_nearest_neighbours(lattice: SquareLattice) -> None:
    bonds = lattice.bonds
    assert len(set(bonds)) == len(bonds)
    assert all(0 <= i < j < lattice.n_sites for i, j in bonds)
    for i, j in bonds:
        (ri, ci), (rj, cj) = divmod(i, lattice.Lx), divmod(j, lattice.Lx)
        dr, dc = abs(ri - rj), abs(ci - cj)
        dr, dc = min(dr, lattice.Ly - dr), min(dc, lattice.Lx - dc)  # wrap distance
        assert dr + dc == 1
    tensor = lattice.bond_tensor()
    assert tensor.dtype == torch.long and tensor.shape == (len(bonds), 2)
    assert tensor.tolist() == [list(bond) for bond in bonds]


def test_periodic_chain_of_three_is_a_triangle() -> None:
    assert SquareLattice(3, 1, True).bonds == ((0, 1), (0, 2), (1, 2))


def test_bond_tensor_of_bondless_lattice_has_shape_0_by_2() -> None:
    assert SquareLattice(1, 1).bond_tensor().shape == (0, 2)


@pytest.mark.parametrize(("Lx", "Ly"), [(2, 3), (3, 2), (2, 2), (2, 1), (1, 2)])
def test_pbc_with_length_two_raises(Lx: int, Ly: int) -> None:
    with pytest.raises(ValueError, match="lattice.pbc"):
        SquareLattice(Lx, Ly, True)


@pytest.mark.parametrize(("Lx", "Ly"), [(0, 1), (3, 0), (-2, 2), (2.5, 1), (True, 2)])
def test_bad_sizes_raise(Lx: object, Ly: object) -> None:
    with pytest.raises(ValueError, match=r"lattice\.L[xy]"):
        SquareLattice(Lx, Ly)  # type: ignore[arg-type]


def test_sublattice_sign() -> None:
    lattice = SquareLattice(3, 2)
    signs = lattice.sublattice_sign()
    assert signs.dtype == torch.int8 and signs.shape == (6,)
    # rows r = 0, 1; columns c = 0, 1, 2; sign (−1)^(r+c).
    assert signs.tolist() == [1, -1, 1, -1, 1, -1]
    assert SquareLattice(4).sublattice_sign().tolist() == [1, -1, 1, -1]


@pytest.mark.parametrize(
    ("lattice", "is_bipartite"),
    [
        (SquareLattice(3, 3, True), False),
        (SquareLattice(4, 4, True), True),
        (SquareLattice(3, 3, False), True),
        (SquareLattice(5, 1, True), False),
        (SquareLattice(6, 1, True), True),
        (SquareLattice(4, 3, True), False),
        (SquareLattice(4, 2, False), True),
    ],
    ids=lambda value: value.describe() if isinstance(value, SquareLattice) else str(value),
)
def test_is_bipartite(lattice: SquareLattice, is_bipartite: bool) -> None:
    assert lattice.is_bipartite is is_bipartite
    signs = lattice.sublattice_sign().tolist()
    crossing = all(signs[i] != signs[j] for i, j in lattice.bonds)
    assert crossing is is_bipartite


def test_wrapping_and_shape() -> None:
    lattice = SquareLattice(4, 3, True)
    assert lattice.wraps_x and lattice.wraps_y
    assert lattice.shape == (3, 4)
    assert not SquareLattice(4, 1, True).wraps_y
    assert not SquareLattice(4, 3, False).wraps_x
    assert lattice.site(2, 1) == 9


def test_describe() -> None:
    assert SquareLattice(4, 4, True).describe() == "4x4 pbc"
    assert SquareLattice(8).describe() == "L=8 obc"
