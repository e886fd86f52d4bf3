"""Weighted statistics of local estimators and magnetizations; all accumulated in float64."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Stats:
    """Mean, standard error and variance of a local estimator.

    Attributes:
        mean: weighted mean.
        error: standard error of the mean (0 for exact full sums; corrected by τ for MCMC).
        variance: weighted variance of the local values.
        tau: integrated autocorrelation time (0 for i.i.d. samples).
        r_hat: split R-hat over chains (NaN for a single chain or i.i.d. samples).
    """

    mean: float
    error: float
    variance: float
    tau: float = 0.0
    r_hat: float = math.nan

    def __str__(self) -> str:
        return f"{self.mean:.6f} ± {self.error:.1e}"


def _chain_view(values: np.ndarray, n_chains: int) -> np.ndarray:
    return values.reshape(n_chains, -1)


def integrated_time(values: np.ndarray, n_chains: int) -> float:
    """Return the integrated autocorrelation time τ of chain-major samples.

    τ = 1/2 + Σ_t ρ(t), summed with Sokal's automatic window (t < 5τ), the chains' FFT
    autocorrelations averaged. τ = 0.5 means uncorrelated samples.

    Args:
        values: (n_chains·L,) real values ordered chain-major.
        n_chains: number of chains.
    """
    chains = _chain_view(values, n_chains)
    length = chains.shape[1]
    if length < 4:
        return 0.5
    centred = chains - chains.mean(axis=1, keepdims=True)
    n_fft = 1 << (2 * length - 1).bit_length()
    spectrum = np.fft.rfft(centred, n=n_fft, axis=1)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), n=n_fft, axis=1)[:, :length].mean(axis=0)
    if acov[0] <= 0:
        return 0.5
    rho = acov / acov[0]
    tau = 0.5
    for t in range(1, length):
        tau += rho[t]
        if t >= 5 * tau:
            break
    return float(max(tau, 0.5))


def split_r_hat(values: np.ndarray, n_chains: int) -> float:
    """Return the split R-hat (Gelman–Rubin on half-chains), as NetKet reports it.

    Args:
        values: (n_chains·L,) real values ordered chain-major.
        n_chains: number of chains (≥ 1).
    """
    chains = _chain_view(values, n_chains)
    half = chains.shape[1] // 2
    if half < 2:
        return math.nan
    halves = np.concatenate([chains[:, :half], chains[:, half : 2 * half]], axis=0)
    m, n = halves.shape
    within = halves.var(axis=1, ddof=1).mean()
    between = n * halves.mean(axis=1).var(ddof=1)
    if within <= 0:
        return math.nan
    var_plus = (n - 1) / n * within + between / n
    return float(math.sqrt(var_plus / within))


def weighted_stats(
    values: torch.Tensor | np.ndarray, weights: torch.Tensor | None = None, n_chains: int = 1
) -> Stats:
    """Return the statistics of local values.

    Args:
        values: (B,) real local values.
        weights: (B,) normalized weights (exact full sums: error 0), or None for uniform
            weights over i.i.d. samples (n_chains = 1) or Markov chains (chain-major).
        n_chains: number of chains; with more than one, the error is corrected by τ and
            R-hat is reported.
    """
    v = values.detach().cpu().double().numpy() if torch.is_tensor(values) else values
    v = np.asarray(v, dtype=np.float64)
    if weights is not None:
        w = weights.detach().cpu().double().numpy()
        mean = float(np.sum(w * v))
        variance = float(np.sum(w * (v - mean) ** 2))
        return Stats(mean, 0.0, variance)
    mean = float(v.mean())
    variance = float(v.var())
    n = v.size
    if n_chains > 1 and n >= 4 * n_chains:
        tau = integrated_time(v, n_chains)
        error = math.sqrt(variance * 2.0 * tau / n)
        return Stats(mean, error, variance, tau, split_r_hat(v, n_chains))
    error = math.sqrt(variance / max(n - 1, 1))
    return Stats(mean, error, variance)


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
