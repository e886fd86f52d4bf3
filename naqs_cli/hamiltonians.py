"""Spin-1/2 lattice Hamiltonians: transverse-field Ising and Heisenberg.

Both share one interface (README, "Architecture"): configurations `x` are (B, N) int8 with
1 = up (σᶻ = +1) and 0 = down; `get_conn(x)` returns every configuration connected to each
`x` by a non-zero matrix element, vectorized over the batch on x's device; `to_sparse()`
builds the same matrix over the basis b = Σ_i x_i·2^(N−1−i). Matrix elements are in the
reporting units of the README's architecture section: Pauli matrices for the TFIM,
S = σ/2 for the Heisenberg model.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import numpy as np
import torch

from naqs_cli.lattice import SquareLattice
from naqs_cli.limits import ED_MAX_SITES, ED_SPARSE_MAX_SITES

if TYPE_CHECKING:
    import scipy.sparse

__all__ = ["SIGN_RULE_CHOICES", "Heisenberg", "TransverseFieldIsing", "normalize_sign_rule"]

#: Accepted spellings of `ham.sign_rule` (case-insensitive strings, or a bool).
SIGN_RULE_CHOICES = ("auto", "true", "false")


def _check_real(key: str, value: object) -> float:
    """Return `value` as a float, or raise naming the config key."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value!r}")
    return value


def _check_lattice(lattice: object) -> SquareLattice:
    if not isinstance(lattice, SquareLattice):
        raise TypeError(f"lattice must be a SquareLattice, got {type(lattice).__name__}")
    return lattice


def _check_x(x: torch.Tensor, n_sites: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int8:
        raise TypeError(f"x must be int8 (1 = up, 0 = down), got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != n_sites:
        raise ValueError(f"x must have shape (B, {n_sites}), got {tuple(x.shape)}")


def _format_number(value: float) -> str:
    return f"{value:g}"


def _diagonal_zz(b: np.ndarray, n_sites: int, bonds: tuple, coef: float) -> np.ndarray:
    """Return coef·Σ_bonds s_i s_j for basis indices b (s = ±1), as float64."""
    zz = np.zeros(b.shape, dtype=np.int64)
    for i, j in bonds:
        # s_i s_j = +1 when bits agree, −1 when they differ.
        differ = ((b >> (n_sites - 1 - i)) ^ (b >> (n_sites - 1 - j))) & 1
        zz += 1 - 2 * differ
    return coef * zz.astype(np.float64)


def _check_sparse_size(n_sites: int, lattice: SquareLattice) -> None:
    if n_sites > ED_SPARSE_MAX_SITES:
        raise ValueError(
            f"to_sparse() builds at most {ED_SPARSE_MAX_SITES} sites (ED_SPARSE_MAX_SITES);"
            f" lattice {lattice.describe()} has {n_sites}: exact.ground_state goes matrix-free"
            f" up to {ED_MAX_SITES} sites (ED_MAX_SITES)"
        )


def _csr_from_rows(cols: np.ndarray, data: np.ndarray) -> scipy.sparse.csr_matrix:
    """Build a CSR matrix with row r holding entries (cols[r, k], data[r, k]).

    Duplicate columns within a row are summed and explicit zeros dropped.
    """
    import scipy.sparse

    dim, n_per_row = cols.shape
    indptr = np.arange(0, dim * n_per_row + 1, n_per_row, dtype=np.int64)
    matrix = scipy.sparse.csr_matrix(
        (data.ravel(), cols.ravel(), indptr), shape=(dim, dim), dtype=np.float64
    )
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return matrix


class TransverseFieldIsing:
    """Transverse-field Ising model on a square lattice or chain.

    H = −J Σ⟨ij⟩ σᶻᵢσᶻⱼ − gamma Σᵢ σˣᵢ  (Pauli matrices; J > 0 is ferromagnetic).

    Connected configurations (K = n_conn_max = N + 1): slot 0 is the diagonal, slot 1 + i
    flips site i with matrix element −gamma. With gamma = 0 the slots 1… hold copies of x
    with mels 0 (the contract for unused slots), so K stays N + 1.

    `conserves_sz` is True only for gamma = 0, where σˣ drops out and Σσᶻ is conserved.

    Args:
        lattice: the lattice; bonds ⟨ij⟩ are `lattice.bonds`, each counted once.
        J: Ising coupling (`ham.J`).
        gamma: transverse field Γ (`ham.gamma`).

    Raises:
        ValueError: J or gamma not a finite real number.
        TypeError: lattice is not a SquareLattice.
    """

    name = "tfim"

    def __init__(self, *, lattice: SquareLattice, J: float = 1.0, gamma: float = 1.0) -> None:
        self.lattice = _check_lattice(lattice)
        self.J = _check_real("ham.J", J)
        self.gamma = _check_real("ham.gamma", gamma)
        self.n_sites = lattice.n_sites
        self.n_conn_max = self.n_sites + 1
        self.conserves_sz = self.gamma == 0.0
        n = self.n_sites
        flips = self.gamma != 0.0
        first = torch.arange(-1, n, dtype=torch.long) if flips else torch.full((n + 1,), n)
        first[0] = n
        #: (K,) int64: smallest site slot k changes (N for slot 0, and for every slot when
        #: gamma = 0); x_conn[:, k, :f] always equals x[:, :f] for f = first_changed_site[k].
        self.first_changed_site = first
        self._tables: dict[str, tuple[torch.Tensor, ...]] = {}

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = str(device)
        if key not in self._tables:
            bonds = self.lattice.bond_tensor(device)
            sites = torch.arange(self.n_sites, device=device)
            self._tables[key] = (bonds[:, 0], bonds[:, 1], sites)
        return self._tables[key]

    def get_conn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the configurations connected to each x and their matrix elements.

        Args:
            x: (B, N) int8 configurations (1 = up, 0 = down), on any device.

        Returns:
            x_conn: (B, K, N) int8, K = N + 1; slot 0 is x, slot 1 + i has site i flipped.
            mels: (B, K) float64 ⟨x|H|x_conn⟩ on x's device; slot 0 the diagonal.
        """
        _check_x(x, self.n_sites)
        bond_i, bond_j, sites = self._device_tables(x.device)
        spins = 2.0 * x.to(torch.float64) - 1.0  # (B, N)
        mels = torch.empty(x.shape[0], self.n_conn_max, dtype=torch.float64, device=x.device)
        mels[:, 0] = -self.J * (spins[:, bond_i] * spins[:, bond_j]).sum(dim=-1)
        mels[:, 1:] = 0.0 - self.gamma  # no −0.0 when gamma = 0
        x_conn = x[:, None, :].repeat(1, self.n_conn_max, 1)  # (B, K, N)
        if self.gamma != 0.0:
            x_conn[:, sites + 1, sites] = 1 - x
        return x_conn, mels

    def diagonal(self, b: np.ndarray) -> np.ndarray:
        """Return the diagonal elements ⟨b|H|b⟩ = −J Σ⟨ij⟩ sᵢsⱼ.

        Args:
            b: (M,) int64 basis indices.

        Returns:
            (M,) float64.
        """
        return _diagonal_zz(
            np.asarray(b, dtype=np.int64), self.n_sites, self.lattice.bonds, -self.J
        )

    def to_sparse(self) -> scipy.sparse.csr_matrix:
        """Return H as a (2^N, 2^N) float64 CSR matrix in basis order (`naqs_cli.basis`).

        Raises:
            ValueError: N > ED_SPARSE_MAX_SITES (the matrix would not fit comfortably).
        """
        n = self.n_sites
        _check_sparse_size(n, self.lattice)
        b = np.arange(2**n, dtype=np.int64)
        masks = np.concatenate([[0], 1 << np.arange(n - 1, -1, -1, dtype=np.int64)])
        cols = b[:, None] ^ masks[None, :]  # (2^N, N + 1)
        data = np.full(cols.shape, -self.gamma)
        data[:, 0] = self.diagonal(b)
        return _csr_from_rows(cols, data)

    def describe(self) -> str:
        """Return a one-line description, e.g. 'tfim J=1 gamma=3 on 4x4 obc'."""
        return (
            f"tfim J={_format_number(self.J)} gamma={_format_number(self.gamma)}"
            f" on {self.lattice.describe()}"
        )

    def __repr__(self) -> str:
        return f"TransverseFieldIsing(lattice={self.lattice!r}, J={self.J!r}, gamma={self.gamma!r})"


def normalize_sign_rule(value: object) -> str:
    """Map a `ham.sign_rule` value (a bool or a spelling: yes/no/1/0/true/false/auto) to
    'auto' | 'true' | 'false'; other text comes back lowered, for the caller to refuse."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    return {"1": "true", "0": "false", "yes": "true", "no": "false"}.get(text, text)


def _resolve_sign_rule(sign_rule: str | bool, lattice: SquareLattice, J: float) -> bool:
    choice = normalize_sign_rule(sign_rule)
    if choice not in SIGN_RULE_CHOICES:
        raise ValueError(f"ham.sign_rule must be one of auto|true|false, got {sign_rule!r}")
    if choice == "auto":
        return lattice.is_bipartite and J > 0
    if choice == "true" and not lattice.is_bipartite:
        raise ValueError(
            f"ham.sign_rule=true needs a bipartite lattice, but lattice {lattice.describe()}"
            f" wraps an odd length; use ham.sign_rule=auto or false"
        )
    return choice == "true"


class Heisenberg:
    """Spin-1/2 Heisenberg model on a square lattice or chain.

    H = J Σ⟨ij⟩ Sᵢ·Sⱼ = J Σ⟨ij⟩ [SᶻᵢSᶻⱼ + ½(S⁺ᵢS⁻ⱼ + S⁻ᵢS⁺ⱼ)],  S = σ/2  (J > 0 antiferro).

    Diagonal ⟨x|H|x⟩ = (J/4) Σ⟨ij⟩ sᵢsⱼ; a bond with antiparallel spins connects x to the
    configuration with the two spins exchanged, with matrix element J/2. With the Marshall
    sign rule (the unitary Π_{i∈A} σᶻᵢ on one sublattice of the (−1)^(r+c) colouring), the
    exchange elements of bonds joining the two sublattices become −J/2: for J > 0 on a
    bipartite lattice the matrix is then stoquastic and its ground state non-negative. The
    spectrum is unchanged.

    Connected configurations (K = n_conn_max = n_bonds + 1): slot 0 is the diagonal; slot
    1 + b exchanges the spins of bond b when they are antiparallel, and otherwise holds a
    copy of x with mel 0.

    Args:
        lattice: the lattice; bonds ⟨ij⟩ are `lattice.bonds`, each counted once.
        J: exchange coupling (`ham.J`).
        sign_rule: `ham.sign_rule`, auto|true|false or a bool; auto = on for a bipartite
            lattice with J > 0.

    Raises:
        ValueError: J not finite, an unknown sign_rule, or sign_rule=true on a lattice that
            is not bipartite.
        TypeError: lattice is not a SquareLattice.
    """

    name = "heisenberg"
    conserves_sz = True

    def __init__(
        self, *, lattice: SquareLattice, J: float = 1.0, sign_rule: str | bool = "auto"
    ) -> None:
        self.lattice = _check_lattice(lattice)
        self.J = _check_real("ham.J", J)
        self.uses_sign_rule = _resolve_sign_rule(sign_rule, lattice, self.J)
        self.n_sites = lattice.n_sites
        n, bonds = self.n_sites, lattice.bonds
        self.n_conn_max = len(bonds) + 1
        sublattice = lattice.sublattice_sign().tolist()
        #: Spin-exchange matrix element of each bond: J/2, or −J/2 across sublattices
        #: with the sign rule.
        self.exchange_mels = tuple(
            -self.J / 2 if self.uses_sign_rule and sublattice[i] != sublattice[j] else self.J / 2
            for i, j in bonds
        )
        #: (K,) int64: smallest site slot k may change (N for slot 0);
        #: x_conn[:, k, :f] always equals x[:, :f] for f = first_changed_site[k].
        self.first_changed_site = torch.tensor([n] + [i for i, _ in bonds], dtype=torch.long)
        self._tables: dict[str, tuple[torch.Tensor, ...]] = {}

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = str(device)
        if key not in self._tables:
            bonds = self.lattice.bond_tensor(device)
            self._tables[key] = (
                bonds[:, 0],
                bonds[:, 1],
                torch.arange(1, self.n_conn_max, device=device),
                torch.tensor(self.exchange_mels, dtype=torch.float64, device=device),
            )
        return self._tables[key]

    def get_conn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the configurations connected to each x and their matrix elements.

        Args:
            x: (B, N) int8 configurations (1 = up, 0 = down), on any device.

        Returns:
            x_conn: (B, K, N) int8, K = n_bonds + 1; slot 0 is x, slot 1 + b has the spins
                of bond b exchanged (or is a copy of x when they are parallel).
            mels: (B, K) float64 ⟨x|H|x_conn⟩ on x's device; slot 0 the diagonal, 0 in
                unused slots.
        """
        _check_x(x, self.n_sites)
        bond_i, bond_j, slots, exchange = self._device_tables(x.device)
        spins = 2.0 * x.to(torch.float64) - 1.0  # (B, N)
        x_i, x_j = x[:, bond_i], x[:, bond_j]  # (B, n_bonds)
        mels = torch.empty(x.shape[0], self.n_conn_max, dtype=torch.float64, device=x.device)
        mels[:, 0] = (self.J / 4) * (spins[:, bond_i] * spins[:, bond_j]).sum(dim=-1)
        mels[:, 1:] = exchange * (x_i ^ x_j).to(torch.float64)
        # Swapping the two spins of a bond exchanges antiparallel ones and leaves parallel
        # ones (the unused slots) a copy of x.
        x_conn = x[:, None, :].repeat(1, self.n_conn_max, 1)  # (B, K, N)
        x_conn[:, slots, bond_i] = x_j
        x_conn[:, slots, bond_j] = x_i
        return x_conn, mels

    def diagonal(self, b: np.ndarray) -> np.ndarray:
        """Return the diagonal elements ⟨b|H|b⟩ = (J/4) Σ⟨ij⟩ sᵢsⱼ.

        Args:
            b: (M,) int64 basis indices.

        Returns:
            (M,) float64.
        """
        b = np.asarray(b, dtype=np.int64)
        return _diagonal_zz(b, self.n_sites, self.lattice.bonds, self.J / 4)

    def to_sparse(self) -> scipy.sparse.csr_matrix:
        """Return H as a (2^N, 2^N) float64 CSR matrix in basis order (`naqs_cli.basis`).

        Raises:
            ValueError: N > ED_SPARSE_MAX_SITES (the matrix would not fit comfortably).
        """
        n = self.n_sites
        _check_sparse_size(n, self.lattice)
        b = np.arange(2**n, dtype=np.int64)
        bonds = np.array(self.lattice.bonds, dtype=np.int64).reshape(-1, 2)
        shift_i, shift_j = n - 1 - bonds[:, 0], n - 1 - bonds[:, 1]
        antiparallel = ((b[:, None] >> shift_i) ^ (b[:, None] >> shift_j)) & 1  # (2^N, nb)
        swap = (1 << shift_i) | (1 << shift_j)
        cols = np.concatenate([b[:, None], b[:, None] ^ (swap * antiparallel)], axis=1)
        data = np.concatenate(
            [self.diagonal(b)[:, None], np.array(self.exchange_mels) * antiparallel], axis=1
        )
        return _csr_from_rows(cols, data)

    def describe(self) -> str:
        """Return a one-line description, e.g. 'heisenberg J=1 sign_rule=on on 4x4 pbc'."""
        rule = "on" if self.uses_sign_rule else "off"
        return (
            f"heisenberg J={_format_number(self.J)} sign_rule={rule} on {self.lattice.describe()}"
        )

    def __repr__(self) -> str:
        return (
            f"Heisenberg(lattice={self.lattice!r}, J={self.J!r}, sign_rule={self.uses_sign_rule!r})"
        )
