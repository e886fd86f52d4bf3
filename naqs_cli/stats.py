"""Statistics of Monte Carlo estimators: one `Stats` type for every sampler.

`Stats.iid` (i.i.d. samples), `Stats.markov` (Markov chains: τ-corrected error and split
R-hat), `Stats.full_sum` (exact weighted sums, error 0) work on the host in float64;
`Stats.rows` computes the i.i.d. or full-sum statistics of several estimators at once on the
samples' device, summed over ranks, without reading the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

#: Fewest samples per chain from which τ and R-hat are estimated.
MIN_CHAIN_LENGTH = 4


def _on_host(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """Return `values` as a float64 numpy array."""
    if torch.is_tensor(values):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _chain_array(chains: torch.Tensor | np.ndarray) -> np.ndarray:
    """Return (n_chains, L) float64 values, refusing any other shape."""
    array = _on_host(chains)
    if array.ndim != 2:
        raise ValueError(f"chains must be a (n_chains, length) array, got shape {array.shape}")
    return array


def integrated_time(chains: torch.Tensor | np.ndarray) -> float:
    """Return the integrated autocorrelation time τ of Markov chains, in samples.

    τ = 1/2 + Σ_t ρ(t), summed with Sokal's automatic window (stop at the first t ≥ 5τ), ρ the
    normalized autocovariance of each chain (FFT, about the chain's own mean) averaged over
    chains. τ = 0.5 means uncorrelated samples; chains shorter than `MIN_CHAIN_LENGTH` or
    without variance give 0.5.

    Args:
        chains: (n_chains, L) real values, one row per chain in sampling order.
    """
    chains = _chain_array(chains)
    length = chains.shape[1]
    if length < MIN_CHAIN_LENGTH:
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


def split_r_hat(chains: torch.Tensor | np.ndarray) -> float:
    """Return the split R-hat (Gelman–Rubin on half-chains), as NetKet reports it.

    NaN for chains shorter than `MIN_CHAIN_LENGTH` or without variance within half-chains.

    Args:
        chains: (n_chains, L) real values, one row per chain in sampling order.
    """
    chains = _chain_array(chains)
    half = chains.shape[1] // 2
    if half < MIN_CHAIN_LENGTH // 2:
        return math.nan
    halves = np.concatenate([chains[:, :half], chains[:, half : 2 * half]], axis=0)
    n = halves.shape[1]
    within = halves.var(axis=1, ddof=1).mean()
    between = n * halves.mean(axis=1).var(ddof=1)
    if within <= 0:
        return math.nan
    var_plus = (n - 1) / n * within + between / n
    return float(math.sqrt(var_plus / within))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Stats:
    """Mean, standard error and variance of an estimator, with its chain diagnostics.

    The host constructors (`iid`, `markov`, `full_sum`) give floats; `rows` gives (k,) float64
    tensors on the samples' device, one entry per estimator.

    Attributes:
        mean: (weighted) mean of the values.
        error: standard error of the mean: sqrt(Var/(n − 1)) for i.i.d. samples,
            sqrt(Var·2τ/n) for Markov chains, 0 for exact full sums.
        variance: (weighted) population variance of the values.
        tau: integrated autocorrelation time in samples (0.5: uncorrelated) for Markov chains;
            0 where it is not estimated (i.i.d. samples, full sums, chains shorter than
            `MIN_CHAIN_LENGTH`).
        r_hat: split R-hat of Markov chains; NaN where it is not estimated.
        n: number of samples (over every rank for `rows`; 0 for full sums).
    """

    mean: float | torch.Tensor
    error: float | torch.Tensor
    variance: float | torch.Tensor
    tau: float = 0.0
    r_hat: float = math.nan
    n: int | torch.Tensor = 0

    def __str__(self) -> str:
        return f"{self.mean:.6f} ± {self.error:.1e}"

    @classmethod
    def iid(cls, values: torch.Tensor | np.ndarray) -> Stats:
        """Return the statistics of i.i.d. samples (error sqrt(Var/(n − 1))).

        Args:
            values: (n,) real values.
        """
        v = _on_host(values).reshape(-1)
        n = v.size
        mean = float(v.mean())
        variance = float(v.var())
        return cls(mean, math.sqrt(variance / max(n - 1, 1)), variance, n=n)

    @classmethod
    def markov(cls, chains: torch.Tensor | np.ndarray) -> Stats:
        """Return the statistics of Markov chains: τ-corrected error and split R-hat.

        error = sqrt(Var·2τ/n) with the pooled variance and τ from `integrated_time`; chains
        shorter than `MIN_CHAIN_LENGTH` get the i.i.d. error (τ cannot be estimated).

        Args:
            chains: (n_chains, L) real values, one row per chain in sampling order. A flat
                chain-major batch `x` of `Samples` with `n_chains` chains is
                `values.reshape(n_chains, -1)`.
        """
        chains = _chain_array(chains)
        if chains.shape[1] < MIN_CHAIN_LENGTH:
            return cls.iid(chains)
        v = chains.reshape(-1)
        n = v.size
        mean = float(v.mean())
        variance = float(v.var())
        tau = integrated_time(chains)
        error = math.sqrt(variance * 2.0 * tau / n)
        return cls(mean, error, variance, tau, split_r_hat(chains), n)

    @classmethod
    def full_sum(
        cls, values: torch.Tensor | np.ndarray, weights: torch.Tensor | np.ndarray
    ) -> Stats:
        """Return the exact statistics of a weighted sum over a whole basis (error 0).

        Args:
            values: (B,) real values.
            weights: (B,) normalized weights (|Ψ|²).
        """
        v, w = _on_host(values), _on_host(weights)
        mean = float(np.sum(w * v))
        variance = float(np.sum(w * (v - mean) ** 2))
        return cls(mean, 0.0, variance)

    @classmethod
    def rows(
        cls,
        values: torch.Tensor,
        weights: torch.Tensor | None = None,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity,
        derived: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Stats:
        """Return the statistics of k estimators on the values' device, summed over ranks.

        Two passes as numpy's var (the means, then the centred second moments), each one
        `reduce_sum` of a few numbers; nothing is read from the device. `derived` rows, which
        depend on the first means (such as |E − ⟨E⟩|², whose mean is the variance of E), get
        their means in the second pass and their variances in a third. Fields are (k + j,)
        float64 tensors, the derived rows last (`n`: a 0-dim tensor, 0 for full sums); tau
        and r_hat are not estimated.

        Args:
            values: (k, B) float64 values of this rank's samples, one row per estimator.
            weights: (B,) float64 weights normalized over all ranks (exact full sums: error
                0), or None for i.i.d. samples (uniform weights, error sqrt(Var/(n − 1))).
            reduce_sum: sums a tensor over ranks and returns it (may work in place);
                `distributed.all_reduce_sum` on several ranks.
            derived: maps the (k,) means to (j, B) further values of the same samples.
        """

        def total(rows: torch.Tensor) -> torch.Tensor:  # Σ_x w(x)·rows[:, x] (or plain sums)
            return reduce_sum(rows.sum(dim=1) if weights is None else rows @ weights)

        k = values.shape[0]
        if weights is None:  # the sample count is all-reduced with the first sums
            count = torch.full((1,), values.shape[1], dtype=torch.float64, device=values.device)
            first = reduce_sum(torch.cat([values.sum(dim=1), count]))
            n = first[-1]
            means = first[:-1] / n
        else:
            n = torch.zeros((), dtype=torch.float64, device=values.device)
            means = total(values)
        centred = values - means[:, None]
        extra = None if derived is None else derived(means)
        second = total(centred**2 if extra is None else torch.cat([centred**2, extra]))
        if weights is None:
            second = second / n
        variances, extra_means = second[:k], second[k:]
        if extra is not None:
            extra_variances = total((extra - extra_means[:, None]) ** 2)
            if weights is None:
                extra_variances = extra_variances / n
            means = torch.cat([means, extra_means])
            variances = torch.cat([variances, extra_variances])
        if weights is None:
            errors = torch.sqrt(variances * (1.0 / torch.clamp(n - 1, min=1)))
        else:
            errors = torch.zeros_like(variances)
        return cls(means, errors, variances, n=n)
