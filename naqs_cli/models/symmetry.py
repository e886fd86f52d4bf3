"""Symmetrized wave functions: a normalized NAQS averaged over a symmetry group in |Ψ|²."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from naqs_cli.lattice import SquareLattice

#: Accepted values of `model.symmetry`.
SYMMETRIES = ("none", "spin_flip", "lattice", "lattice_spin_flip")


def _point_group_maps(lattice: SquareLattice) -> list:
    """Coordinate maps (r, c) → (r', c') of the lattice's point group."""
    n_rows, n_cols = lattice.shape
    top, right = n_rows - 1, n_cols - 1
    maps = [
        lambda r, c: (r, c),
        lambda r, c: (r, right - c),  # x-reflection
        lambda r, c: (top - r, c),  # y-reflection
        lambda r, c: (top - r, right - c),  # 180° rotation
    ]
    if n_rows == n_cols:  # the rest of D4
        maps += [
            lambda r, c: (c, r),  # transpose
            lambda r, c: (right - c, top - r),  # anti-transpose
            lambda r, c: (c, top - r),  # 90° rotation
            lambda r, c: (right - c, r),  # 270° rotation
        ]
    return maps


def symmetry_group(lattice: SquareLattice, symmetry: str) -> list[tuple[Tensor, bool]]:
    """Return the elements g of a symmetry group as (perm, flip), identity first.

    g acts on configurations as (g·x)_i = x_{perm[i]}, followed by x → 1 − x when `flip`.
    `lattice` is the point group: D4 for a square (Lx = Ly), {identity, x-reflection,
    y-reflection, 180° rotation} for a rectangle, {identity, reversal} for a chain (duplicate
    permutations are dropped). `spin_flip` is Z2, `lattice_spin_flip` the direct product.

    Args:
        lattice: the lattice.
        symmetry: one of none|spin_flip|lattice|lattice_spin_flip.

    Returns:
        list of (perm (N,) int64, flip bool), closed under composition and inverse.

    Raises:
        ValueError: an unknown symmetry.
    """
    if symmetry not in SYMMETRIES:
        raise ValueError(f"model.symmetry must be one of {'|'.join(SYMMETRIES)}, got {symmetry!r}")
    n_rows, n_cols = lattice.shape
    maps = _point_group_maps(lattice) if symmetry.startswith("lattice") else [lambda r, c: (r, c)]
    perms: list[tuple[int, ...]] = []
    for g in maps:
        perm = [0] * lattice.n_sites
        for r in range(n_rows):
            for c in range(n_cols):
                r_image, c_image = g(r, c)
                perm[lattice.site(r_image, c_image)] = lattice.site(r, c)
        if tuple(perm) not in perms:
            perms.append(tuple(perm))
    flips = (False, True) if symmetry.endswith("spin_flip") else (False,)
    return [(torch.tensor(perm, dtype=torch.long), flip) for flip in flips for perm in perms]


@dataclass(frozen=True)
class SymmetrizedRatioCache:
    """What `SymmetrizedWaveFunction.log_psi_ratios` reuses: the wrapped model's cache of
    every image g·x (sample-major, B·|G| references) and ln Ψ_G(x).

    Attributes:
        x: (B, N) int8 reference configurations.
        log_psi: (B,) complex128 ln Ψ_G(x).
        base: the wrapped model's `ratio_cache` of the (B·|G|, N) images.
    """

    x: Tensor
    log_psi: Tensor
    base: Any

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the cache."""
        own = self.x.numel() * self.x.element_size() + self.log_psi.numel() * 16
        return own + self.base.nbytes


class SymmetrizedWaveFunction(nn.Module):
    """Ψ_G: a wave function averaged over a symmetry group G in probability.

        |Ψ_G(x)|² = (1/|G|) Σ_g |Ψ(g·x)|²,
        arg Ψ_G(x) = Σ_g w_g(x) θ(g·x),   w_g(x) = |Ψ(g·x)|² / Σ_g' |Ψ(g'·x)|²,

    with θ = Im ln Ψ. Σ_x |Ψ_G(x)|² = 1 because each g permutes the basis, and |Ψ_G| and the
    phase are G-invariant because x → h·x only permutes the set {g·x}. The phase is the
    |Ψ|²-weighted mean of the phases rather than arg Σ_g Ψ(g·x): that sum can cancel (for a
    state odd under some g it vanishes identically), making ln Ψ_G −∞ and its gradient
    undefined, while the weighted mean of θ is finite and differentiable everywhere.

    Exact sampling: draw x ~ |Ψ|² and apply a uniformly random g; then
    P(y) = (1/|G|) Σ_g |Ψ(g⁻¹·y)|² = |Ψ_G(y)|². Costs |G| evaluations of Ψ per configuration.

    Local energies: when the wrapped model has the ratio API (`ratio_cache`,
    `log_psi_ratios`: the PixelCNN's partial recomputation), so does Ψ_G: ln Ψ(g·x') comes
    from ln Ψ(g·x) and the wrapped model's ratio for the image pair (g·x, g·x'), whose first
    changed site is found from the images themselves (measured on the 4×4 Heisenberg model
    with D4 × Z2, 4 × 8 PixelCNN: see README, Heisenberg).

    Args:
        model: the wrapped wave function (its state_dict is what checkpoints save).
        symmetry: none|spin_flip|lattice|lattice_spin_flip (see `symmetry_group`).

    Raises:
        ValueError: an unknown symmetry.
    """

    def __init__(self, model: nn.Module, *, symmetry: str) -> None:
        super().__init__()
        group = symmetry_group(model.lattice, symmetry)
        self.base = model
        self.symmetry = symmetry
        self.register_buffer("perms", torch.stack([perm for perm, _ in group]), persistent=False)
        self.register_buffer(
            "flips", torch.tensor([flip for _, flip in group], dtype=torch.bool), persistent=False
        )

    @property
    def n_sites(self) -> int:
        """Number of sites N."""
        return self.base.n_sites

    @property
    def lattice(self) -> SquareLattice:
        """The lattice."""
        return self.base.lattice

    @property
    def has_phase(self) -> bool:
        """Whether Ψ_G is complex (as the wrapped model)."""
        return self.base.has_phase

    @property
    def group_size(self) -> int:
        """|G|."""
        return int(self.perms.shape[0])

    def transformed(self, x: Tensor) -> Tensor:
        """Return g·x for every group element.

        Args:
            x: (B, N) int8 configurations.

        Returns:
            (B, |G|, N) int8.
        """
        perms = self.perms.to(x.device)
        flips = self.flips.to(x.device)
        images = x[:, perms]  # (B, |G|, N)
        return torch.where(flips[None, :, None], 1 - images, images)

    def log_psi(self, x: Tensor) -> Tensor:
        """Return ln Ψ_G(x) (keeps the graph).

        Args:
            x: (B, N) int8 configurations.

        Returns:
            (B,) complex128.
        """
        n_batch = x.shape[0]
        images = self.transformed(x).reshape(n_batch * self.group_size, self.n_sites)
        return self._combine(self.base.log_psi(images).view(n_batch, self.group_size))

    def _combine(self, log_psi: Tensor) -> Tensor:
        """ln Ψ_G from the (B, |G|) values ln Ψ(g·x)."""
        log_weight = 2 * log_psi.real  # ln |Ψ(g·x)|²
        log_abs = 0.5 * (torch.logsumexp(log_weight, dim=1) - math.log(self.group_size))
        phase = (torch.softmax(log_weight, dim=1) * log_psi.imag).sum(dim=1)
        return torch.complex(log_abs, phase)

    @torch.no_grad()
    def ratio_cache(self, x: Tensor) -> SymmetrizedRatioCache:
        """Run the wrapped model on every image of x, keeping what `log_psi_ratios` reuses.

        Args:
            x: (B, N) int8 reference configurations.
        """
        n_batch = x.shape[0]
        images = self.transformed(x).reshape(n_batch * self.group_size, self.n_sites)
        base = self.base.ratio_cache(images)
        log_psi = self._combine(base.log_psi.to(torch.complex128).view(n_batch, -1))
        return SymmetrizedRatioCache(x=x, log_psi=log_psi, base=base)

    @torch.no_grad()
    def log_psi_ratios(
        self,
        cache: SymmetrizedRatioCache,
        index: Tensor,
        x_conn: Tensor,
        first_site: Tensor | None = None,
        chunk_size: int = 4096,
    ) -> Tensor:
        """Return ln Ψ_G(x') − ln Ψ_G(x) from the wrapped model's ratios of the images.

        Args:
            cache: from `ratio_cache`.
            index: (M,) int64, the reference configuration cache.x[index] of each x'.
            x_conn: (M, N) int8 configurations x'.
            first_site: unused (a changed site of x' moves under g; the wrapped model finds
                each image's first changed site itself).
            chunk_size: configurations per full-network-pass equivalent.

        Returns:
            (M,) complex128.
        """
        n_conn, size = x_conn.shape[0], self.group_size
        if n_conn == 0:
            return torch.zeros(0, dtype=torch.complex128, device=cache.log_psi.device)
        x_conn = x_conn.to(cache.x.device)
        index = index.to(cache.x.device)
        images = self.transformed(x_conn).reshape(n_conn * size, self.n_sites)
        group = torch.arange(size, device=index.device)
        references = (index[:, None] * size + group).reshape(-1)
        ratio = self.base.log_psi_ratios(cache.base, references, images, None, chunk_size)
        log_images = cache.base.log_psi[references].to(torch.complex128) + ratio
        return self._combine(log_images.view(n_conn, size)) - cache.log_psi[index]

    def forward(self, x: Tensor) -> Tensor:
        """Alias of `log_psi`."""
        return self.log_psi(x)

    @torch.no_grad()
    def sample(
        self,
        n_samples: int,
        generator: torch.Generator | None = None,
        *,
        method: str = "cached",
    ) -> tuple[Tensor, Tensor]:
        """Draw exact samples from |Ψ_G|²: sample Ψ, then apply a uniformly random g.

        Args:
            n_samples: number of configurations B.
            generator: random source on the model's device (None: torch's default one).
            method: the wrapped model's sampling path ("cached" or "reference").

        Returns:
            x (B, N) int8 and ln Ψ_G(x) (B,) complex128, detached.
        """
        x, _ = self.base.sample(n_samples, generator, method=method)
        g = torch.randint(self.group_size, (n_samples,), generator=generator, device=x.device)
        images = self.transformed(x)  # (B, |G|, N)
        y = images[torch.arange(n_samples, device=x.device), g]
        return y, self.log_psi(y)
