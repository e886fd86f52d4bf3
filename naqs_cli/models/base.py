"""Shared machinery of autoregressive wave functions: normalization, constraints, sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from naqs_cli import parallel
from naqs_cli.lattice import SquareLattice
from naqs_cli.models.constraints import (
    constrain_log_magnitudes,
    count_up_before,
    n_up_for_total_sz,
)

#: Sampling paths accepted by `AutoregressiveWaveFunction.sample`.
SAMPLING_METHODS = ("cached", "reference")
#: Fewest samples worth a CPU thread of their own in cached sampling (`naqs_cli.parallel`).
MIN_SAMPLES_PER_THREAD = 256


@dataclass(frozen=True)
class RatioCache:
    """What `log_psi_ratios` reuses from the forward pass of the reference configurations.

    Attributes:
        x: (B, N) int8 reference configurations.
        log_psi: (B,) complex128 ln Ψ(x).
        site_log_psi: (B, N) complex128 ln ψ_i(x_i | x_<i), or None (generic path).
        layers: model-specific per-layer activations (PixelCNN: one `LayerHalo` per layer),
            or None.
    """

    x: Tensor
    log_psi: Tensor
    site_log_psi: Tensor | None = None
    layers: Any = None

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the cache."""
        tensors = [self.x, self.log_psi, self.site_log_psi]
        for layer in self.layers or []:
            tensors.extend(vars(layer).values())
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class Proposal:
    """Candidate configurations evaluated against a `RatioCache` (one per reference).

    Attributes:
        index: (M,) int64 distinct reference configurations.
        x: (M, N) int8 candidates.
        log_ratio: (M,) complex128 ln Ψ(x') − ln Ψ(x).
        parts: model-specific recomputed activations for `accept`.
    """

    index: Tensor
    x: Tensor
    log_ratio: Tensor
    parts: Any = None


def generic_log_psi_ratios(
    model: nn.Module, cache: RatioCache, index: Tensor, x_conn: Tensor, chunk_size: int = 4096
) -> Tensor:
    """Return ln Ψ(x') − ln Ψ(x) with one full network pass per x' (any wave function).

    Args:
        model: anything with `log_psi`.
        cache: from `RatioCache(x, log_psi)`.
        index: (M,) int64 reference configuration of each x'.
        x_conn: (M, N) int8 configurations x'.
        chunk_size: configurations per network pass.

    Returns:
        (M,) complex128.
    """
    if x_conn.shape[0] == 0:
        return torch.zeros(0, dtype=torch.complex128, device=cache.log_psi.device)
    log_conn = torch.cat([model.log_psi(chunk) for chunk in x_conn.split(chunk_size)])
    return log_conn.to(torch.complex128) - cache.log_psi[index]


class AutoregressiveWaveFunction(nn.Module):
    """A normalized autoregressive wave function (paper Eqs. 2–3).

        Ψ(x) = Π_i ψ_i(x_i | x_<i),
        ψ_i(s) = exp(a_{i,s} + iφ_{i,s}) / sqrt(Σ_s' exp(2 a_{i,s'})),
        ln Ψ(x) = Σ_i [a_{i,x_i} + iφ_{i,x_i} − ½ ln Σ_s' exp(2 a_{i,s'})],

    so Σ_s |ψ_i(s)|² = 1 at every site and Σ_x |Ψ(x)|² = 1 (Claim 1). Subclasses only produce
    the raw per-site outputs a_{i,s} (log-magnitudes) and φ_{i,s} (phases) from x_<i, in
    `raw_outputs`; this class normalizes them in float64, applies the fixed-Σσᶻ constraint, sums
    log-conditionals and samples exactly, site by site. Local state index 0 = down, 1 = up.

    Args:
        lattice: the lattice; sites in row-major order are the autoregressive order.
        phase: whether the amplitudes carry a phase (False: real positive Ψ).
        total_sz: fixed Σσᶻ/2 (N/2 + total_sz ups), or None for no constraint.
        count_feature: add w_s·ℓ_i to a_{i,s}, ℓ_i the log-ratio of the ups to the downs the
            sector still needs from site i on (`_constrained`; needs total_sz).

    Raises:
        TypeError: `lattice` is not a SquareLattice.
        ValueError: N/2 + total_sz is not an integer in [0, N], or count_feature without it.
    """

    def __init__(
        self,
        *,
        lattice: SquareLattice,
        phase: bool,
        total_sz: float | None,
        count_feature: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(lattice, SquareLattice):
            raise TypeError(f"lattice must be a SquareLattice, got {type(lattice).__name__}")
        self.lattice = lattice
        self.n_sites = lattice.n_sites
        self.phase = bool(phase)
        self.total_sz = total_sz
        self.n_up = n_up_for_total_sz(self.n_sites, total_sz)
        self.count_weight: nn.Parameter | None = None
        if count_feature:
            if self.n_up is None:
                raise ValueError(
                    "model.count_feature=true needs a fixed sector: set model.total_sz"
                    " (e.g. 0 for Heisenberg) or model.count_feature=false"
                )
            self.count_weight = nn.Parameter(torch.tensor([[-0.25], [0.25]]))

    @property
    def has_phase(self) -> bool:
        """Whether Ψ is complex (False: real positive amplitudes, Im ln Ψ = 0)."""
        return self.phase

    def _parameter_like(self) -> Tensor:
        return next(self.parameters())

    def spins(self, x: Tensor) -> Tensor:
        """Return x as ±1 values in the parameters' dtype and device.

        Args:
            x: (B, N) int8 configurations, 1 = up.

        Returns:
            (B, N) float tensor, +1 = up, −1 = down.
        """
        if x.shape[-1] != self.n_sites:
            raise ValueError(f"expected configurations with {self.n_sites} sites, got {x.shape}")
        like = self._parameter_like()
        return 2 * x.to(device=like.device, dtype=like.dtype) - 1

    def raw_outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Return the unnormalized per-site outputs, entry i depending on x[:, :i] only.

        Args:
            x: (B, N) int8 configurations.

        Returns:
            log-magnitudes a (B, N, 2) and phases φ (B, N, 2) or None without phase, in the
            parameters' dtype.
        """
        raise NotImplementedError

    def log_conditionals(
        self, log_magnitude: Tensor, phase: Tensor | None, n_up_before: Tensor, site: Tensor | int
    ) -> Tensor:
        """Turn raw outputs into normalized complex log-conditionals (Eq. 3), in float64.

        Args:
            log_magnitude: (..., 2) raw log-magnitudes a_{i,s}.
            phase: (..., 2) raw phases φ_{i,s}, or None.
            n_up_before: (...) int64 ups before the site (used only with total_sz).
            site: (...) int64 or int site index (used only with total_sz).

        Returns:
            (..., 2) complex128 ln ψ_i(s).
        """
        log_magnitude = self._constrained(log_magnitude, n_up_before, site)
        real = log_magnitude - 0.5 * torch.logsumexp(2 * log_magnitude, dim=-1, keepdim=True)
        imag = torch.zeros_like(real) if phase is None else phase.double()
        return torch.complex(real, imag)

    def _constrained(
        self, log_magnitude: Tensor, n_up_before: Tensor | None, site: Tensor | int
    ) -> Tensor:
        """Return the raw log-magnitudes in float64 as the sector shapes them: the count
        feature's term if enabled, then the Σσᶻ mask (`constrain_log_magnitudes`).

        With `count_feature`, site i also sees how many ups the sector still needs:
        ℓ_i = ln[n↑/n↓] with n↑ = n_up − u_i (u_i ups before i) and n↓ = N − i − n↑ the ups
        and downs still to place (each at least ½: a count of 0 is a forced site, which the
        constraint masks anyway), and a_{i,s} gains w_s·ℓ_i. ℓ_i depends on x_<i only, so the
        model stays autoregressive; it is the global count that a convolution's finite
        receptive field cannot see. w starts at (−¼, ¼), so 2(a_up − a_down) = ℓ_i: with the
        rest of the head at zero, the conditionals of filling the sector uniformly at random.
        """
        log_magnitude = log_magnitude.double()
        weight = self.count_weight
        if weight is not None:
            need_up = (self.n_up - n_up_before).to(device=weight.device, dtype=weight.dtype)
            left = self.n_sites - torch.as_tensor(site, device=weight.device)
            ell = torch.log(need_up.clamp(min=0.5) / (left - need_up).clamp(min=0.5))
            log_magnitude = log_magnitude + F.linear(ell.unsqueeze(-1), weight).double()
        return constrain_log_magnitudes(log_magnitude, n_up_before, site, self.n_sites, self.n_up)

    def conditionals(self, x: Tensor) -> Tensor:
        """Return the normalized conditional log-amplitudes ln ψ_i(s | x_<i).

        Args:
            x: (B, N) int8 configurations, 1 = up.

        Returns:
            (B, N, 2) complex128; index 0 = down, 1 = up; Σ_s |ψ_i(s)|² = 1.
        """
        log_magnitude, phase = self.raw_outputs(x)
        x = x.to(log_magnitude.device)
        site = torch.arange(self.n_sites, device=x.device)
        return self.log_conditionals(log_magnitude, phase, count_up_before(x), site)

    def log_psi(self, x: Tensor) -> Tensor:
        """Return ln Ψ(x) = Σ_i ln ψ_i(x_i | x_<i), summed in float64 (keeps the graph).

        Args:
            x: (B, N) int8 configurations, 1 = up.

        Returns:
            (B,) complex128.
        """
        log_magnitude, phase = self.raw_outputs(x)
        return self.log_psi_from_raw(log_magnitude, phase, x)

    def log_psi_from_raw(self, log_magnitude: Tensor, phase: Tensor | None, x: Tensor) -> Tensor:
        """Return ln Ψ(x) from raw outputs computed on x (what `log_psi` and `sample` share).

        Args:
            log_magnitude: (B, N, 2) raw log-magnitudes a_{i,s}.
            phase: (B, N, 2) raw phases φ_{i,s}, or None.
            x: (B, N) int8 configurations the outputs belong to.

        Returns:
            (B,) complex128.
        """
        return self.site_log_psi(log_magnitude, phase, x).sum(dim=-1)

    @torch.no_grad()
    def propose(
        self,
        cache: RatioCache,
        index: Tensor,
        x_new: Tensor,
        first_site: Tensor | None = None,
        chunk_size: int = 4096,
    ) -> Proposal:
        """Evaluate one candidate x' per distinct cached configuration (a Metropolis move).

        Args:
            cache: from `ratio_cache` on the current configurations.
            index: (M,) int64 distinct references.
            x_new: (M, N) int8 candidates.
            first_site: as in `log_psi_ratios`.
            chunk_size: as in `log_psi_ratios`.
        """
        log_ratio = self.log_psi_ratios(cache, index, x_new, first_site, chunk_size)
        return Proposal(index=index, x=x_new, log_ratio=log_ratio)

    @torch.no_grad()
    def accept(self, cache: RatioCache, proposal: Proposal, accepted: Tensor) -> None:
        """Move the accepted references of `cache` to their candidates (in place).

        Args:
            cache: the cache `proposal` was made from.
            proposal: from `propose`.
            accepted: (M,) bool.
        """
        ref = proposal.index[accepted]
        cache.x[ref] = proposal.x[accepted]
        cache.log_psi[ref] += proposal.log_ratio[accepted]

    def site_log_psi(
        self, log_magnitude: Tensor, phase: Tensor | None, x: Tensor, start: int = 0
    ) -> Tensor:
        """Return ln ψ_i(x_i | x_<i) for sites i ≥ start from their raw outputs, in float64.

        Args:
            log_magnitude: (B, N − start, 2) raw log-magnitudes of sites start … N − 1.
            phase: (B, N − start, 2) raw phases, or None.
            x: (B, N) int8 configurations the outputs belong to (all sites: the Σσᶻ
                constraint counts the ups before each site).
            start: first site.

        Returns:
            (B, N − start) complex128.
        """
        x = x.to(log_magnitude.device)
        site = torch.arange(start, self.n_sites, device=x.device)
        n_up_before = count_up_before(x)[:, start:]
        cond = self.log_conditionals(log_magnitude, phase, n_up_before, site)
        return cond.gather(-1, x[:, start:].long().unsqueeze(-1)).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        """Alias of `log_psi`."""
        return self.log_psi(x)

    @torch.no_grad()
    def ratio_cache(self, x: Tensor) -> RatioCache:
        """Run the network on reference configurations, keeping what `log_psi_ratios` reuses.

        This generic version keeps ln Ψ(x) only; models with partial recomputation keep more.

        Args:
            x: (B, N) int8 configurations.
        """
        return RatioCache(x=x, log_psi=self.log_psi(x))

    @torch.no_grad()
    def log_psi_ratios(
        self,
        cache: RatioCache,
        index: Tensor,
        x_conn: Tensor,
        first_site: Tensor | None = None,
        chunk_size: int = 4096,
    ) -> Tensor:
        """Return ln Ψ(x') − ln Ψ(x) for configurations x' close to cached references x.

        The generic version runs the whole network on every x'; `PixelCNN` recomputes only
        the sites from the first changed one on.

        Args:
            cache: from `ratio_cache` on the reference configurations.
            index: (M,) int64, the reference configuration x = cache.x[index] of each x'.
            x_conn: (M, N) int8 configurations x'.
            first_site: (M,) int64 lower bounds of the first site where x' differs from x
                (x'[:f] = x[:f]), or None to compute them.
            chunk_size: configurations per full network pass (bounds memory).

        Returns:
            (M,) complex128.
        """
        return generic_log_psi_ratios(self, cache, index, x_conn, chunk_size)

    @torch.no_grad()
    def sample(
        self,
        n_samples: int,
        generator: torch.Generator | None = None,
        *,
        method: str = "cached",
    ) -> tuple[Tensor, Tensor]:
        """Draw exact i.i.d. samples from |Ψ|² by ancestral sampling.

        All uniforms u (n_samples, N) float64 are drawn up front with one `torch.rand`; site i
        is up iff u_i < |ψ_i(up | x_<i)|². Both methods therefore give identical
        configurations for the same generator state.

        Args:
            n_samples: number of configurations B.
            generator: random source on the model's device (None: torch's default one).
            method: "cached" (fast path, Fig. 1b; falls back to "reference" for models
                without one) or "reference" (one full forward pass per site).

        Returns:
            x (B, N) int8 and its ln Ψ (B,) complex128, detached.

        Raises:
            ValueError: an unknown method.
        """
        if method not in SAMPLING_METHODS:
            raise ValueError(f"sampling method must be one of {SAMPLING_METHODS}, got {method!r}")
        device = self._parameter_like().device
        uniforms = torch.rand(
            n_samples, self.n_sites, generator=generator, dtype=torch.float64, device=device
        )
        if method == "reference":
            return self._sample_reference(uniforms)
        # Rows are independent given their uniforms: threads share the batch (same result).
        workers = parallel.n_workers(n_samples, MIN_SAMPLES_PER_THREAD, device)
        parts = parallel.run_split(
            lambda part: self._sample_cached(uniforms[part]), n_samples, workers
        )
        if len(parts) == 1:
            return parts[0]
        return torch.cat([x for x, _ in parts]), torch.cat([lp for _, lp in parts])

    def sample_site(
        self, log_magnitude: Tensor, n_up_before: Tensor | None, site: int, uniforms: Tensor
    ) -> Tensor:
        """Draw site `site` of every sample from its conditional.

        Both sampling paths call this, so they take the same decisions from the same uniforms.

        Args:
            log_magnitude: (B, 2) raw log-magnitudes of the site.
            n_up_before: (B,) int64 ups among the sites already drawn (None without total_sz).
            site: the site index i.
            uniforms: (B,) float64 uniforms u_i.

        Returns:
            (B,) bool, up iff u_i < |ψ_i(up)|² = sigmoid(2(a_up − a_down)) (after the constraint).
        """
        log_magnitude = self._constrained(log_magnitude, n_up_before, site)
        return uniforms < torch.sigmoid(2 * (log_magnitude[:, 1] - log_magnitude[:, 0]))

    def _sample_reference(self, uniforms: Tensor) -> tuple[Tensor, Tensor]:
        n_samples = uniforms.shape[0]
        x = torch.zeros(n_samples, self.n_sites, dtype=torch.int8, device=uniforms.device)
        n_up = torch.zeros(n_samples, dtype=torch.long, device=uniforms.device)
        for i in range(self.n_sites):
            # Sites ≥ i still hold 0 (down); the network cannot see them.
            log_magnitude, phase = self.raw_outputs(x)
            is_up = self.sample_site(log_magnitude[:, i], n_up, i, uniforms[:, i])
            x[:, i] = is_up
            n_up += is_up
        # Output i of the last pass saw the final x_<i: it is the conditional of every site.
        return x, self.log_psi_from_raw(log_magnitude, phase, x)

    def _sample_cached(self, uniforms: Tensor) -> tuple[Tensor, Tensor]:
        """Fast sampling path; models without cached activations use the reference path."""
        return self._sample_reference(uniforms)
