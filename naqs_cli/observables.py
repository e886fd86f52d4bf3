"""Spin observables of configurations (float64); their statistics are in `naqs_cli.stats`."""

from __future__ import annotations

import torch


def spins(x: torch.Tensor) -> torch.Tensor:
    """Return σᶻ = ±1 as float64.

    Args:
        x: (B, N) int8 configurations, 1 = up.
    """
    return 2.0 * x.double() - 1.0


def magnetization(x: torch.Tensor) -> torch.Tensor:
    """Return Σσᶻ/N of each sample as (B,) float64.

    Args:
        x: (B, N) int8 configurations, 1 = up.
    """
    return spins(x).mean(dim=-1)


def staggered_magnetization(x: torch.Tensor, sublattice_sign: torch.Tensor) -> torch.Tensor:
    """Return |Σ(−1)^(r+c) σᶻ|/N of each sample as (B,) float64.

    Args:
        x: (B, N) int8 configurations.
        sublattice_sign: (N,) ±1 signs.
    """
    return (spins(x) * sublattice_sign.to(x.device).double()).mean(dim=-1).abs()
