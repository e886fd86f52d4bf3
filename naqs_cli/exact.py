"""Exact references: exact diagonalization and the 1D TFIM free-fermion solution.

Energies in `ExactResult` are totals (`energy`) and per site (`energy_per_site`); observables
use the names and normalizations of the README's architecture section ("Contracts"). Exact
diagonalization works in a symmetry sector that holds the global ground state:

* TFIM: the spin-flip (Z2) sector containing the ground state — even for gamma ≥ 0. Its
  states are (|b⟩ + |b̄⟩)/√2 with site 0 down in b, so the nearly degenerate ordered-phase
  doublet never mixes. For gamma > 0 the ground state is unique and lies there
  (Perron–Frobenius: all off-diagonal elements −gamma < 0 connect the whole basis); for
  gamma < 0 the unitary Πᵢσᶻᵢ maps the problem to |gamma| (σˣ → −σˣ), whose ground state has
  parity (−1)^N. At gamma = 0 the Hamiltonian is diagonal: the energy is its minimum and the
  observables average over the classical ground states of the sector (the T → 0 mixture).
* Heisenberg: the lowest |Σσᶻ| sector, Σσᶻ = 0 (N even) or +1 (N odd, "Sz=1/2"). Every
  SU(2) multiplet has a member there, so it holds the global ground energy.

Up to ED_SPARSE_MAX_SITES the sector matrix is a scipy CSR matrix; past it, up to
ED_MAX_SITES, `eigsh` runs on a matrix-free `LinearOperator`.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.limits import ED_MAX_SITES, ED_SPARSE_MAX_SITES

if TYPE_CHECKING:
    import scipy.sparse
    import scipy.sparse.linalg

__all__ = [
    "METHODS",
    "ExactResult",
    "free_fermion",
    "ground_state",
    "model_expectations",
]

logger = logging.getLogger(__name__)

#: Accepted values of the `method` key of `naqs exact`.
METHODS = ("auto", "ed", "free_fermion")
#: `method=auto` uses free fermions for a TFIM chain with more sites than this.
AUTO_FREE_FERMION_ABOVE = 16
#: Sectors up to this dimension are diagonalized densely (ARPACK needs dim > k + 1).
_DENSE_MAX_DIM = 128
#: ARPACK residual tolerance; eigenvalue errors are quadratic in it.
_EIGSH_TOL = 1e-12


@dataclass(frozen=True)
class ExactResult:
    """An exact ground-state reference.

    Attributes:
        energy: total ground-state energy E0.
        energy_per_site: E0 / N.
        observables: ground-state expectation values by observable name (README, Architecture)
            (`abs_magnetization`, `magnetization`, `magnetization_sq`, and `sigma_x` for the
            TFIM or `staggered_magnetization` for the Heisenberg model).
        method: "ed" or "free_fermion".
        sector: the symmetry sector the observables refer to ("Z2-even", "Sz=0", …).
        missing: observable name → why this method does not give it.
    """

    energy: float
    energy_per_site: float
    observables: dict[str, float]
    method: str
    sector: str
    missing: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Symmetry sectors


class _TfimParitySector:
    """TFIM in the spin-flip sector of its ground state, solved at field |gamma|.

    Sector state r (0 ≤ r < 2^(N−1)) is (|r⟩ + |r̄⟩)/√2, where r is a full-basis index with
    site 0 down. Flipping site i ≥ 1 maps r to r ^ 2^(N−1−i); flipping site 0 maps r to the
    complement of r, i.e. the representative 2^(N−1) − 1 − r. No orbit has length 1, so every
    matrix element is that of the full basis.
    """

    def __init__(self, hamiltonian: TransverseFieldIsing) -> None:
        n = hamiltonian.n_sites
        self.n_sites = n
        self.field = abs(hamiltonian.gamma)
        self.field_sign = -1.0 if hamiltonian.gamma < 0 else 1.0
        self.dim = 2 ** (n - 1)
        self.states = np.arange(self.dim, dtype=np.int64)
        self.diag = hamiltonian.diagonal(self.states)
        odd = hamiltonian.gamma < 0 and n % 2 == 1
        self.name = "Z2-odd" if odd else "Z2-even"

    def x_matvec(self, v: np.ndarray) -> np.ndarray:
        """Return (Σᵢ σˣᵢ) v in the sector, v (dim,) float64."""
        out = v[::-1].copy()  # site 0
        for bit in range(self.n_sites - 1):  # sites N−1−bit ≥ 1
            pairs = out.reshape(-1, 2, 2**bit)
            pairs += v.reshape(-1, 2, 2**bit)[:, ::-1, :]
        return out

    def matvec(self, v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        return self.diag * v - self.field * self.x_matvec(v)

    def to_sparse(self) -> scipy.sparse.csr_matrix:
        import scipy.sparse

        n = self.n_sites
        # Slot 1 flips site 0 (complement: r ^ (2^(N−1) − 1)), slot 2 + bit a site ≥ 1.
        masks = np.array([0, self.dim - 1] + [1 << bit for bit in range(n - 1)], np.int64)
        cols = self.states[:, None] ^ masks[None, :]
        data = np.full(cols.shape, -self.field)
        data[:, 0] = self.diag
        indptr = np.arange(0, cols.size + 1, cols.shape[1], dtype=np.int64)
        matrix = scipy.sparse.csr_matrix(
            (data.ravel(), cols.ravel(), indptr), shape=(self.dim, self.dim)
        )
        matrix.sum_duplicates()  # N = 1: the flip of site 0 is diagonal
        return matrix

    def observables(self, vector: np.ndarray) -> dict[str, float]:
        """Return the observables of the sector state `vector` (dim,), normalized."""
        weights = vector * vector
        x_expectation = float(vector @ self.x_matvec(vector))
        return self._observables(weights, x_expectation)

    def classical_observables(self) -> tuple[float, dict[str, float]]:
        """Return (E0, observables) at gamma = 0: the mixture of the sector's ground states."""
        energy = float(self.diag.min())
        ground = self.diag <= energy + 1e-12 * max(1.0, abs(energy))
        weights = ground / ground.sum()
        # σˣ has diagonal elements in this sector only for N = 1 (flip = complement).
        x_expectation = float(self.n_sites == 1)
        return energy, self._observables(weights, x_expectation)

    def _observables(self, weights: np.ndarray, x_expectation: float) -> dict[str, float]:
        n = self.n_sites
        total_sz = 2 * np.bitwise_count(self.states).astype(np.int64) - n  # Σσᶻ, flip-odd
        return {
            "abs_magnetization": float(weights @ np.abs(total_sz)) / n,
            "magnetization": 0.0,  # ⟨Σσᶻ⟩ vanishes in a spin-flip eigenstate
            "magnetization_sq": float(weights @ total_sz**2) / n**2,
            "sigma_x": self.field_sign * x_expectation / n,
        }


class _HeisenbergSzSector:
    """Heisenberg model in the Σσᶻ = 0 (N even) or +1 (N odd) sector."""

    def __init__(self, hamiltonian: Heisenberg) -> None:
        n = hamiltonian.n_sites
        self.n_sites = n
        self.n_up = (n + 1) // 2
        self.name = "Sz=0" if n % 2 == 0 else "Sz=1/2"
        full = np.arange(2**n, dtype=np.int64)
        self.states = np.flatnonzero(np.bitwise_count(full) == self.n_up).astype(np.int64)
        del full
        self.dim = len(self.states)
        # N ≤ ED_MAX_SITES < 31, so int32 holds every basis and sector index; the lookup
        # maps a full-basis index to its sector index, or to the sentinel `dim` outside.
        self._states32 = self.states.astype(np.int32)
        self._lookup = np.full(2**n, self.dim, dtype=np.int32)
        self._lookup[self.states] = np.arange(self.dim, dtype=np.int32)
        self.diag = hamiltonian.diagonal(self.states)
        self._bonds = [
            (np.int32((1 << (n - 1 - i)) | (1 << (n - 1 - j))), mel)
            for (i, j), mel in zip(
                hamiltonian.lattice.bonds, hamiltonian.exchange_mels, strict=True
            )
        ]
        self._sublattice = hamiltonian.lattice.sublattice_sign().numpy().astype(np.int64)

    def _bond_targets(self, swap: np.int32) -> np.ndarray:
        """Return (dim,) int32: the sector index each state's exchange on a bond reaches.

        Flipping both spins of a parallel pair leaves the sector, so those states get the
        sentinel `dim`.
        """
        return self._lookup[self._states32 ^ swap]

    def matvec(self, v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        padded = np.append(v, 0.0)  # padded[dim] = 0 absorbs the sentinel
        out = self.diag * v
        for swap, mel in self._bonds:
            out += mel * padded[self._bond_targets(swap)]
        return out

    def to_sparse(self) -> scipy.sparse.csr_matrix:
        import scipy.sparse

        rows, cols, data = [np.arange(self.dim)], [np.arange(self.dim)], [self.diag]
        for swap, mel in self._bonds:
            targets = self._bond_targets(swap)
            connected = np.flatnonzero(targets < self.dim)
            rows.append(connected)
            cols.append(targets[connected])
            data.append(np.full(len(connected), mel))
        matrix = scipy.sparse.coo_matrix(
            (np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))),
            shape=(self.dim, self.dim),
        )
        return matrix.tocsr()

    def observables(self, vector: np.ndarray) -> dict[str, float]:
        """Return the observables of the sector state `vector` (dim,), normalized."""
        n = self.n_sites
        weights = vector * vector
        staggered = np.zeros(self.dim, dtype=np.int64)
        for i in range(n):
            spin = 2 * ((self.states >> (n - 1 - i)) & 1) - 1
            staggered += self._sublattice[i] * spin
        total_sz = 2 * self.n_up - n
        return {
            "abs_magnetization": abs(total_sz) / n,
            "magnetization": total_sz / n,
            "magnetization_sq": total_sz**2 / n**2,
            "staggered_magnetization": float(weights @ np.abs(staggered)) / n,
        }


def _sector_operator(
    sector: _TfimParitySector | _HeisenbergSzSector,
) -> scipy.sparse.linalg.LinearOperator:
    """Return the sector Hamiltonian as a matrix-free float64 `LinearOperator`."""
    from scipy.sparse.linalg import LinearOperator

    return LinearOperator(
        (sector.dim, sector.dim), matvec=sector.matvec, rmatvec=sector.matvec, dtype=np.float64
    )


def _lowest_eigenpair(
    sector: _TfimParitySector | _HeisenbergSzSector, matrix_free: bool
) -> tuple[float, np.ndarray]:
    """Return (E0, normalized ground vector) of a sector, deterministically."""
    if sector.dim <= _DENSE_MAX_DIM:
        values, vectors = np.linalg.eigh(sector.to_sparse().toarray())
        energy, vector = float(values[0]), vectors[:, 0]
    else:
        from scipy.sparse.linalg import eigsh

        operator = _sector_operator(sector) if matrix_free else sector.to_sparse()
        # A fixed, generic start vector with a large overlap with non-negative ground states.
        start = 1.0 + np.random.default_rng(0).random(sector.dim)
        values, vectors = eigsh(operator, k=1, which="SA", v0=start, tol=_EIGSH_TOL)
        energy, vector = float(values[0]), vectors[:, 0]
    vector = vector / np.linalg.norm(vector)
    # Fix the global sign: a positive sum (non-negative ground states), else a positive
    # first clearly non-zero component (states whose components cancel in the sum).
    total = vector.sum()
    if abs(total) > 1e-6:
        sign = np.sign(total)
    else:
        sign = np.sign(vector[np.argmax(np.abs(vector) > 1e-3 * np.abs(vector).max())])
    return energy, sign * vector


def _check_ed_size(hamiltonian: TransverseFieldIsing | Heisenberg) -> None:
    n = hamiltonian.n_sites
    if n > ED_MAX_SITES:
        raise ValueError(
            f"exact diagonalization handles at most {ED_MAX_SITES} sites (ED_MAX_SITES);"
            f" lattice {hamiltonian.lattice.describe()} has {n}: use method=free_fermion for a"
            f" 1D TFIM chain with J > 0, or train a model"
        )


def _exact_diagonalization(
    hamiltonian: TransverseFieldIsing | Heisenberg, *, matrix_free: bool | None = None
) -> ExactResult:
    """Return the ED ground state; `matrix_free` defaults to N > ED_SPARSE_MAX_SITES."""
    _check_ed_size(hamiltonian)
    n = hamiltonian.n_sites
    if matrix_free is None:
        matrix_free = n > ED_SPARSE_MAX_SITES
    start = time.perf_counter()
    if isinstance(hamiltonian, TransverseFieldIsing):
        sector = _TfimParitySector(hamiltonian)
        if sector.field == 0.0:
            energy, observables = sector.classical_observables()
        else:
            energy, vector = _lowest_eigenpair(sector, matrix_free)
            observables = sector.observables(vector)
    else:
        sector = _HeisenbergSzSector(hamiltonian)
        energy, vector = _lowest_eigenpair(sector, matrix_free)
        observables = sector.observables(vector)
    logger.info(
        "ED of %s in sector %s (dim %d, %s): E0 = %.12f in %.2f s",
        hamiltonian.describe(),
        sector.name,
        sector.dim,
        "matrix-free" if matrix_free else "sparse",
        energy,
        time.perf_counter() - start,
    )
    return ExactResult(
        energy=energy,
        energy_per_site=energy / n,
        observables=observables,
        method="ed",
        sector=sector.name,
    )


# --------------------------------------------------------------------------------------
# Free fermions


def free_fermion(L: int, J: float, gamma: float, pbc: bool) -> tuple[float, float]:
    """Return the exact ground state of the TFIM chain H = −J Σ σᶻᵢσᶻᵢ₊₁ − gamma Σ σˣᵢ.

    Jordan–Wigner maps the chain to free Majorana fermions, H = i Σ_ij aᵢ Tᵢⱼ bⱼ with
    T = gamma·1 + J·(shift), so E0 = −Σ_k s_k over the singular values s_k of T.

    * open: T is the L×L lower-bidiagonal matrix (gamma on the diagonal, J below); a dense
      SVD, O(L³): a few seconds at L = 1000.
    * periodic: the spin-flip-even sector (it holds the ground state for J > 0) has
      antiperiodic fermions, E0 = −J Σₙ √(1 + γ² − 2γ cos kₙ), γ = gamma/J,
      kₙ = (2n+1)π/L, n = 0…L−1.

    ⟨Σσˣ⟩/N follows from Hellmann–Feynman, −(1/L) ∂E0/∂gamma, analytically: ∂s_k/∂gamma =
    u_kᵀ v_k for the singular vectors (open) and ∂εₙ/∂gamma = (gamma − J cos kₙ)/εₙ
    (periodic). gamma < 0 is mapped to |gamma| by Πᵢσᶻᵢ (same energy, σˣ → −σˣ).

    Args:
        L: number of sites (≥ 1; ≥ 3 when periodic, as for `SquareLattice`).
        J: Ising coupling, > 0.
        gamma: transverse field.
        pbc: periodic chain (bond L−1 ↔ 0).

    Returns:
        (total ground-state energy E0, ⟨Σσˣ⟩/L).

    Raises:
        ValueError: L, J or gamma out of range.
    """
    if isinstance(L, bool) or not isinstance(L, numbers.Integral) or L < 1:
        raise ValueError(f"free_fermion needs an integer chain length L >= 1, got {L!r}")
    if pbc and L < 3:
        raise ValueError(f"a periodic chain needs L >= 3 (L = 2 would double the bond), got {L}")
    for name, value in (("J", J), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"free_fermion: {name} must be a real number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"free_fermion: {name} must be finite, got {value!r}")
    if J <= 0:
        raise ValueError(f"free_fermion needs J > 0 (ferromagnetic), got J={J!r}")
    field_abs, field_sign = abs(float(gamma)), (-1.0 if gamma < 0 else 1.0)
    J = float(J)
    if pbc:
        k = (2 * np.arange(L) + 1) * np.pi / L
        eps = np.sqrt(J * J + field_abs * field_abs - 2 * J * field_abs * np.cos(k))
        energy = -float(eps.sum())
        # k = (2n+1)π/L never hits k = 0, so eps > 0 even at gamma = J.
        d_energy = -float(((field_abs - J * np.cos(k)) / eps).sum())
    else:
        t = field_abs * np.eye(L) + J * np.eye(L, k=-1)
        u, s, vt = np.linalg.svd(t)
        energy = -float(s.sum())
        # ∂s_k/∂gamma = u_kᵀ (∂T/∂gamma) v_k = u_k·v_k. At gamma = 0 the zero singular value
        # (the degenerate ordered doublet) makes its pair arbitrary: take the even
        # combination of the doublet, whose ⟨σˣ⟩ vanishes for L ≥ 2.
        d_energy = -float(np.trace(u @ vt)) if field_abs > 0 else -float(L == 1)
    return energy, -field_sign * d_energy / L


def _chain_geometry(hamiltonian: object) -> tuple[int, bool] | None:
    """Return (L, periodic) when free fermions apply (a TFIM chain with J > 0), else None."""
    if not isinstance(hamiltonian, TransverseFieldIsing) or hamiltonian.J <= 0:
        return None
    lattice = hamiltonian.lattice
    if lattice.Ly != 1 and lattice.Lx != 1:
        return None
    return lattice.n_sites, lattice.wraps_x or lattice.wraps_y


def _free_fermion_result(hamiltonian: TransverseFieldIsing, L: int, pbc: bool) -> ExactResult:
    energy, sigma_x = free_fermion(L, hamiltonian.J, hamiltonian.gamma, pbc)
    reason = "free fermions give the energy and sigma_x only; {} needs string correlators"
    odd = hamiltonian.gamma < 0 and L % 2 == 1
    return ExactResult(
        energy=energy,
        energy_per_site=energy / L,
        observables={"sigma_x": sigma_x, "magnetization": 0.0},
        method="free_fermion",
        sector="Z2-odd" if odd else "Z2-even",
        missing={
            "abs_magnetization": reason.format("⟨|Σσᶻ|⟩"),
            "magnetization_sq": reason.format("⟨(Σσᶻ)²⟩"),
        },
    )


# --------------------------------------------------------------------------------------
# Public entry points


def ground_state(
    hamiltonian: TransverseFieldIsing | Heisenberg, method: str = "auto"
) -> ExactResult:
    """Return the exact ground state energy and observables of a Hamiltonian.

    Args:
        hamiltonian: a `TransverseFieldIsing` or `Heisenberg` instance.
        method: `method` key: "ed" (exact diagonalization, N ≤ ED_MAX_SITES),
            "free_fermion" (TFIM chain with J > 0, any length) or "auto" (free fermions for
            such a chain longer than AUTO_FREE_FERMION_ABOVE sites, ED otherwise).

    Returns:
        The `ExactResult`; ED observables refer to the sector named in `sector`.

    Raises:
        ValueError: an unknown method, free_fermion on anything but a TFIM chain with J > 0,
            or ED on more than ED_MAX_SITES sites.
        TypeError: an unsupported Hamiltonian.
    """
    if not isinstance(hamiltonian, TransverseFieldIsing | Heisenberg):
        raise TypeError(
            f"ground_state needs a TransverseFieldIsing or Heisenberg, got"
            f" {type(hamiltonian).__name__}"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {'|'.join(METHODS)}, got {method!r}")
    chain = _chain_geometry(hamiltonian)
    if method == "free_fermion" and chain is None:
        raise ValueError(
            f"method=free_fermion needs a 1D TFIM chain (lattice.Ly=1) with ham.J > 0, got"
            f" {hamiltonian.describe()}; use method=ed or method=auto"
        )
    use_free_fermion = method == "free_fermion" or (
        method == "auto" and chain is not None and hamiltonian.n_sites > AUTO_FREE_FERMION_ABOVE
    )
    if use_free_fermion:
        assert chain is not None
        return _free_fermion_result(hamiltonian, *chain)
    return _exact_diagonalization(hamiltonian)


def model_expectations(
    log_psi: torch.Tensor, hamiltonian: TransverseFieldIsing | Heisenberg
) -> dict[str, float]:
    """Return exact expectation values of a wave function given on the whole basis.

    Normalizations (README, Architecture: units): with E = ⟨H⟩ and Var = ⟨H²⟩ − ⟨H⟩² of the total H,
    `energy` = E/N, `energy_variance` = Var/N² (the variance of the per-site local energy),
    `v_score` = N·Var/E² (nan when E = 0); `abs_magnetization` ⟨|Σσᶻ|⟩/N, `magnetization`
    ⟨Σσᶻ⟩/N, `magnetization_sq` ⟨(Σσᶻ)²⟩/N², plus `sigma_x` ⟨Σσˣ⟩/N (TFIM) or
    `staggered_magnetization` ⟨|Σ(−1)^(r+c)σᶻ|⟩/N (Heisenberg).

    Args:
        log_psi: (2^N,) complex (or real) log-amplitudes on `enumerate_basis(N)`; need not be
            normalized; −inf marks a zero amplitude.
        hamiltonian: the Hamiltonian (N ≤ ED_SPARSE_MAX_SITES, it uses `to_sparse()`).

    Returns:
        Observable name → float.

    Raises:
        ValueError: log_psi of the wrong shape or with no finite entry.
    """
    n = hamiltonian.n_sites
    log_psi = torch.as_tensor(log_psi).detach().cpu().to(torch.complex128).numpy()
    if log_psi.shape != (2**n,):
        raise ValueError(f"log_psi must have shape ({2**n},) for N={n}, got {log_psi.shape}")
    finite = np.isfinite(log_psi.real)
    if not finite.any():
        raise ValueError("log_psi has no finite entry: the wave function is zero")
    shift = log_psi.real[finite].max()
    psi = np.where(finite, np.exp(np.where(finite, log_psi, 0) - shift), 0)
    psi = psi / np.linalg.norm(psi)
    h_psi = hamiltonian.to_sparse() @ psi
    energy = float(np.vdot(psi, h_psi).real)
    variance = float(np.linalg.norm(h_psi - energy * psi) ** 2)
    probabilities = np.abs(psi) ** 2
    basis = np.arange(2**n, dtype=np.int64)
    total_sz = 2 * np.bitwise_count(basis).astype(np.int64) - n
    result = {
        "energy": energy / n,
        "energy_variance": variance / n**2,
        "v_score": n * variance / energy**2 if energy != 0 else math.nan,
        "abs_magnetization": float(probabilities @ np.abs(total_sz)) / n,
        "magnetization": float(probabilities @ total_sz) / n,
        "magnetization_sq": float(probabilities @ total_sz**2) / n**2,
    }
    if isinstance(hamiltonian, TransverseFieldIsing):
        x_total = 0.0
        for bit in range(n):
            pairs = psi.reshape(-1, 2, 2**bit)
            x_total += float(np.vdot(pairs, pairs[:, ::-1, :]).real)
        result["sigma_x"] = x_total / n
    else:
        signs = hamiltonian.lattice.sublattice_sign().numpy().astype(np.int64)
        staggered = np.zeros(2**n, dtype=np.int64)
        for i in range(n):
            staggered += signs[i] * (2 * ((basis >> (n - 1 - i)) & 1) - 1)
        result["staggered_magnetization"] = float(probabilities @ np.abs(staggered)) / n
    return result
