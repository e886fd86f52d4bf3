"""Square lattices and chains with open or periodic boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SquareLattice:
    """An Lx × Ly square lattice; a chain is Ly = 1.

    Sites are numbered row-major, i = r·Lx + c (row r < Ly, column c < Lx). With `pbc`, a
    dimension wraps only when its length is ≥ 3: length 1 has no bonds along it, and length 2
    with pbc is refused because the wrap bond would double the open one.

    Args:
        Lx: columns (≥ 1).
        Ly: rows (≥ 1).
        pbc: periodic boundaries.

    Raises:
        ValueError: a non-positive size, or pbc with a dimension of length 2.
    """

    Lx: int
    Ly: int = 1
    pbc: bool = False
    bonds: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, length in (("Lx", self.Lx), ("Ly", self.Ly)):
            if not isinstance(length, int) or isinstance(length, bool) or length < 1:
                raise ValueError(f"lattice.{name} must be an integer >= 1, got {length!r}")
            if self.pbc and length == 2:
                raise ValueError(
                    f"lattice.{name}=2 with lattice.pbc=true would double every bond along that"
                    f" dimension; use lattice.pbc=false or a length >= 3"
                )
        object.__setattr__(self, "bonds", self._make_bonds())

    @property
    def n_sites(self) -> int:
        """Number of sites N = Lx·Ly."""
        return self.Lx * self.Ly

    @property
    def shape(self) -> tuple[int, int]:
        """(Ly, Lx), the image shape the networks see."""
        return (self.Ly, self.Lx)

    @property
    def wraps_x(self) -> bool:
        """Whether bonds wrap around along x."""
        return self.pbc and self.Lx >= 3

    @property
    def wraps_y(self) -> bool:
        """Whether bonds wrap around along y."""
        return self.pbc and self.Ly >= 3

    @property
    def is_bipartite(self) -> bool:
        """Whether the bond graph is two-colourable by the (−1)^(r+c) sublattices."""
        odd_x = self.wraps_x and self.Lx % 2 == 1
        odd_y = self.wraps_y and self.Ly % 2 == 1
        return not (odd_x or odd_y)

    def site(self, r: int, c: int) -> int:
        """Return the index of the site in row r, column c."""
        return r * self.Lx + c

    def _make_bonds(self) -> tuple[tuple[int, int], ...]:
        bonds: set[tuple[int, int]] = set()
        for r in range(self.Ly):
            for c in range(self.Lx):
                i = self.site(r, c)
                if c + 1 < self.Lx or self.wraps_x:
                    j = self.site(r, (c + 1) % self.Lx)
                    bonds.add((min(i, j), max(i, j)))
                if r + 1 < self.Ly or self.wraps_y:
                    j = self.site((r + 1) % self.Ly, c)
                    bonds.add((min(i, j), max(i, j)))
        return tuple(sorted(bonds))

    def bond_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Return the bonds as a (n_bonds, 2) int64 tensor."""
        return torch.tensor(self.bonds, dtype=torch.long, device=device).reshape(-1, 2)

    def sublattice_sign(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Return (−1)^(r+c) per site as an (N,) int8 tensor."""
        r = torch.arange(self.Ly).repeat_interleave(self.Lx)
        c = torch.arange(self.Lx).repeat(self.Ly)
        return (1 - 2 * ((r + c) % 2)).to(dtype=torch.int8, device=device)

    def describe(self) -> str:
        """Return a short human-readable description, e.g. '4x4 obc'."""
        kind = "chain" if self.Ly == 1 else f"{self.Lx}x{self.Ly}"
        size = f"L={self.Lx}" if self.Ly == 1 else kind
        return f"{size} {'pbc' if self.pbc else 'obc'}"
