"""Fixed total magnetization Σσᶻ/2 = total_sz, imposed site by site on the conditionals.

With n_up = N/2 + total_sz, the choice s at site i (0-based), after u ups among the sites before
it, keeps the sector reachable iff u + s ≤ n_up and n_up − (u + s) ≤ N − i − 1 (enough sites
left). Unreachable choices get their unnormalized log-magnitude lowered by
`MASK_LOG_MAGNITUDE` (finite, so no NaN/inf reaches gradients) before the per-site
normalization; their |ψ_i|² is then exp(−2·10⁴) = 0 in float64 and float32, so every
configuration outside the sector has |Ψ|² = 0 exactly and the sector alone carries the norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Amount subtracted from the log-magnitude of a choice that leaves the Σσᶻ sector.
MASK_LOG_MAGNITUDE = 1.0e4


def n_up_for_total_sz(n_sites: int, total_sz: float | None) -> int | None:
    """Return the number of up spins N/2 + total_sz of the sector, or None without a constraint.

    Args:
        n_sites: N.
        total_sz: fixed Σσᶻ/2, or None.

    Raises:
        ValueError: N/2 + total_sz is not an integer in [0, N].
    """
    if total_sz is None:
        return None
    n_up = n_sites / 2 + float(total_sz)
    if not (math.isfinite(n_up) and n_up.is_integer() and 0 <= n_up <= n_sites):
        raise ValueError(
            f"model.total_sz={total_sz!r} gives n_up = N/2 + total_sz = {n_up:g} on N={n_sites}"
            f" sites; it must be an integer in [0, {n_sites}] (total_sz in"
            f" {{-N/2, -N/2 + 1, ..., N/2}})"
        )
    return int(n_up)


def count_up_before(x: Tensor) -> Tensor:
    """Return the number of up spins strictly before each site.

    Args:
        x: (B, N) int8 configurations, 1 = up.

    Returns:
        (B, N) int64, entry i = Σ_{j<i} x_j.
    """
    x = x.long()
    return torch.cumsum(x, dim=-1) - x


def allowed_states(n_up_before: Tensor, site: Tensor | int, n_sites: int, n_up: int) -> Tensor:
    """Return which local states keep the fixed-n_up sector reachable.

    Args:
        n_up_before: (...) int64 number of ups before the site.
        site: (...) int64 or int, site index i (broadcast against `n_up_before`).
        n_sites: N.
        n_up: target number of up spins.

    Returns:
        (..., 2) bool, [..., s] True iff choosing s (0 = down, 1 = up) keeps the sector reachable.
    """
    n_after = n_sites - 1 - site  # sites left after this one
    states = torch.arange(2, device=n_up_before.device)
    n_up_after = n_up_before.unsqueeze(-1) + states  # (..., 2)
    n_after = torch.as_tensor(n_after, device=n_up_before.device).unsqueeze(-1)
    return (n_up_after <= n_up) & (n_up - n_up_after <= n_after)


def constrain_log_magnitudes(
    log_magnitude: Tensor, n_up_before: Tensor, site: Tensor | int, n_sites: int, n_up: int | None
) -> Tensor:
    """Lower the unnormalized log-magnitudes of choices that leave the Σσᶻ sector.

    Used identically by `conditionals()` (all sites at once) and by both sampling paths (one
    site at a time), before the per-site normalization.

    Args:
        log_magnitude: (..., 2) float unnormalized log-magnitudes a_{i,s}.
        n_up_before: (...) int64 number of ups before the site.
        site: (...) int64 or int, site index i.
        n_sites: N.
        n_up: target number of up spins, or None (returned unchanged).

    Returns:
        (..., 2) tensor like `log_magnitude`, a_{i,s} − MASK_LOG_MAGNITUDE where s is forbidden.
    """
    if n_up is None:
        return log_magnitude
    allowed = allowed_states(n_up_before, site, n_sites, n_up)
    return torch.where(allowed, log_magnitude, log_magnitude - MASK_LOG_MAGNITUDE)
