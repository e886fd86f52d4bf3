"""Local energies, the Eq. 4 gradient estimator and one optimization step (pure functions)."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from naqs_cli import distributed, parallel
from naqs_cli.observables import magnetization, staggered_magnetization, weighted_stats
from naqs_cli.samplers import Samples

_SPARSE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LocalEnergy:
    """Local energies (totals, not per site) split into diagonal and off-diagonal parts.

    Attributes:
        total: (B,) complex128 E_loc(x) = Σ_x' H_xx' Ψ(x')/Ψ(x).
        off_diagonal: (B,) complex128 the x' ≠ x part of the sum.
    """

    total: torch.Tensor
    off_diagonal: torch.Tensor


def _sparse(hamiltonian):
    matrix = _SPARSE_CACHE.get(hamiltonian)
    if matrix is None:
        matrix = hamiltonian.to_sparse().tocsr()
        _SPARSE_CACHE[hamiltonian] = matrix
    return matrix


def _log_psi_chunked(model: torch.nn.Module, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.complex128, device=x.device)
    return torch.cat([model.log_psi(chunk) for chunk in x.split(chunk_size)])


#: Memory for the activations `ratio_cache` keeps per chunk of reference configurations.
RATIO_CACHE_BYTES = 256 * 2**20
#: Fewest sampled configurations worth a CPU thread of their own in `local_energy`.
MIN_REFERENCES_PER_THREAD = 16


@torch.no_grad()
def local_energy(
    model: torch.nn.Module,
    hamiltonian,
    batch: Samples,
    chunk_size: int = 4096,
) -> LocalEnergy:
    """Return E_loc(x) = Σ_x' H_xx' Ψ(x')/Ψ(x) for every configuration of a batch.

    Sampled batches use `get_conn`; the diagonal slot and zero matrix elements are skipped.
    Models with `ratio_cache` / `log_psi_ratios` (every autoregressive model) get the ratios
    Ψ(x')/Ψ(x) from them: the PixelCNN recomputes only the rows from each x's first changed
    row on, reusing the activations of x's own forward pass, in chunks of reference
    configurations whose cache fits `RATIO_CACHE_BYTES`. Other models (the symmetrized
    wrapper) evaluate ln Ψ(x') in full. A full-basis batch (fullsum) uses (HΨ)(x)/Ψ(x) with
    the sparse matrix; states with Ψ = 0 get E_loc = 0 (their weight is 0).

    Args:
        model: the wave function.
        hamiltonian: gives `get_conn` / `to_sparse` (and optionally `first_changed_site`).
        batch: samples with their `log_psi` (computed here if missing and needed).
        chunk_size: configurations per network pass.
    """
    x = batch.x
    if batch.full_basis:
        log_psi = batch.log_psi
        if log_psi is None:
            log_psi = _log_psi_chunked(model, x, chunk_size)
        return _local_energy_full_basis(hamiltonian, log_psi)
    if not hasattr(model, "log_psi_ratios"):
        return _local_energy_full_passes(model, hamiltonian, batch, chunk_size)
    workers = parallel.n_workers(x.shape[0], MIN_REFERENCES_PER_THREAD, x.device)
    parts = parallel.run_split(
        lambda part: _local_energy_by_ratios(model, hamiltonian, x[part], chunk_size),
        x.shape[0],
        workers,
    )
    return LocalEnergy(
        torch.cat([p.total for p in parts]), torch.cat([p.off_diagonal for p in parts])
    )


@torch.no_grad()
def _local_energy_by_ratios(
    model: torch.nn.Module, hamiltonian, x: torch.Tensor, chunk_size: int
) -> LocalEnergy:
    """E_loc of configurations x via `ratio_cache` / `log_psi_ratios`, chunk by chunk."""
    total = torch.empty(x.shape[0], dtype=torch.complex128, device=x.device)
    off_diagonal = torch.empty_like(total)
    first_changed = getattr(hamiltonian, "first_changed_site", None)
    start, n_refs = 0, min(x.shape[0], 64)
    while start < x.shape[0]:
        stop = min(start + n_refs, x.shape[0])
        cache = model.ratio_cache(x[start:stop])
        x_conn, mels = hamiltonian.get_conn(x[start:stop])  # (b, K, N), (b, K)
        off = mels[:, 1:]
        rows, slots = torch.nonzero(off != 0, as_tuple=True)
        first = None if first_changed is None else first_changed[1:].to(slots.device)[slots]
        log_ratio = model.log_psi_ratios(
            cache, rows, x_conn[:, 1:][rows, slots], first, chunk_size=chunk_size
        )
        part = torch.zeros(stop - start, dtype=torch.complex128, device=x.device)
        part.index_add_(0, rows, off[rows, slots].to(torch.complex128) * torch.exp(log_ratio))
        off_diagonal[start:stop] = part
        total[start:stop] = mels[:, 0].to(torch.complex128) + part
        per_ref = max(1, cache.nbytes // (stop - start))
        start, n_refs = stop, max(1, RATIO_CACHE_BYTES // per_ref)
    return LocalEnergy(total, off_diagonal)


def _local_energy_full_passes(
    model: torch.nn.Module, hamiltonian, batch: Samples, chunk_size: int
) -> LocalEnergy:
    """E_loc with one full network pass per connected configuration (any model)."""
    x = batch.x
    log_psi = batch.log_psi
    if log_psi is None:
        log_psi = _log_psi_chunked(model, x, chunk_size)
    x_conn, mels = hamiltonian.get_conn(x)  # (B, K, N), (B, K)
    diagonal = mels[:, 0].to(torch.complex128)
    off = mels[:, 1:]
    rows, slots = torch.nonzero(off != 0, as_tuple=True)
    connected = x_conn[:, 1:][rows, slots]  # (M, N)
    log_conn = _log_psi_chunked(model, connected, chunk_size)
    ratio = torch.exp(log_conn - log_psi[rows])
    off_diagonal = torch.zeros(x.shape[0], dtype=torch.complex128, device=x.device)
    off_diagonal.index_add_(0, rows, off[rows, slots].to(torch.complex128) * ratio)
    return LocalEnergy(diagonal + off_diagonal, off_diagonal)


def _local_energy_full_basis(hamiltonian, log_psi: torch.Tensor) -> LocalEnergy:
    matrix = _sparse(hamiltonian)
    lp = log_psi.detach().cpu().numpy()
    psi = np.exp(lp - lp.real.max())
    h_psi = matrix @ psi
    diag = matrix.diagonal()
    nonzero = np.abs(psi) > 0
    total = np.zeros_like(psi)
    total[nonzero] = h_psi[nonzero] / psi[nonzero]
    off = np.where(nonzero, total - diag, 0.0)
    device = log_psi.device
    return LocalEnergy(
        torch.from_numpy(total).to(device), torch.from_numpy(off.astype(np.complex128)).to(device)
    )


def weighted_mean(values: torch.Tensor, batch: Samples, n_total: int) -> torch.Tensor:
    """Return the weighted mean over all ranks (uniform weights 1/n_total for samples)."""
    if batch.weights is not None:
        total = (batch.weights.to(values.dtype) * values).sum()
    else:
        total = values.sum() / n_total
    return distributed.all_reduce_sum(total.reshape(1)).reshape(())


@dataclass(frozen=True)
class StepResult:
    """What one optimization step reports.

    Attributes:
        e_loc: local energies of the batch (totals).
        grad_norm: gradient norm before clipping (NaN when skipped).
        is_finite: False when local energies or gradients were not finite (no update made).
    """

    e_loc: LocalEnergy
    grad_norm: float
    is_finite: bool


def vmc_gradient(
    model: torch.nn.Module,
    batch: Samples,
    e_loc: torch.Tensor,
    chunk_size: int,
    n_total: int | None = None,
) -> None:
    """Accumulate the Eq. 4 gradient of ⟨H⟩ into the parameters' `.grad`.

    loss = 2·Re Σ_x w(x)·(E_loc(x) − Ē)*·log Ψ(x), with Ē the weighted batch mean (the
    baseline) and w = |Ψ|² weights (fullsum) or 1/B. Its gradient is 2·Re⟨(E_loc − Ē)* ∂log Ψ⟩:
    the exact gradient for full sums, and (1 − 1/B) times it in expectation for i.i.d. batches.
    The backward pass runs chunk by chunk so memory stays bounded.

    Args:
        model: the wave function (gradients accumulate; zero them before).
        batch: samples (weights for fullsum).
        e_loc: (B,) complex128 local energies (no graph).
        chunk_size: samples per backward pass.
        n_total: total samples over all ranks (defaults to this batch's size × world size).
    """
    n_total = n_total or batch.n_samples * distributed.world_size()
    e_mean = weighted_mean(e_loc, batch, n_total)
    centred = (e_loc - e_mean).conj()
    for start in range(0, batch.n_samples, chunk_size):
        stop = min(start + chunk_size, batch.n_samples)
        if batch.weights is not None:
            w = batch.weights[start:stop].to(torch.float64)
        else:
            w = torch.full((stop - start,), 1.0 / n_total, dtype=torch.float64, device=e_loc.device)
        log_psi = model.log_psi(batch.x[start:stop])
        loss = 2.0 * (w * centred[start:stop] * log_psi).real.sum()
        loss.backward()


def train_step(
    model: torch.nn.Module,
    hamiltonian,
    batch: Samples,
    optimizer: torch.optim.Optimizer,
    *,
    chunk_size: int = 1024,
    grad_clip: float | None = None,
) -> StepResult:
    """Run one VMC step: local energies, Eq. 4 gradient, all-reduce, clip, optimizer step.

    A non-finite local energy or gradient skips the update (gradients are discarded).
    """
    e_loc = local_energy(model, hamiltonian, batch, chunk_size=max(chunk_size, 1024))
    optimizer.zero_grad(set_to_none=True)
    if not bool(torch.isfinite(e_loc.total).all()):
        return StepResult(e_loc, math.nan, False)
    vmc_gradient(model, batch, e_loc.total, chunk_size)
    distributed.all_reduce_grads(model)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(e_loc, grad_norm, False)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(e_loc, grad_norm, True)


def estimate_observables(batch: Samples, e_loc: LocalEnergy, hamiltonian) -> dict[str, float]:
    """Return the per-site observables of DESIGN.md with their errors from one batch.

    Keys: energy, energy_variance (Var(H)/N², the variance of the per-site local energy),
    v_score (N·Var(H)/E²), abs_magnetization, magnetization, magnetization_sq, sigma_x (TFIM
    with Γ ≠ 0) or staggered_magnetization (Heisenberg), each with `<name>_err`; plus tau and
    r_hat of the energy for Markov chains.
    """
    n_sites = hamiltonian.n_sites
    weights, n_chains = batch.weights, batch.n_chains
    total = e_loc.total
    energy = weighted_stats(total.real / n_sites, weights, n_chains)
    out: dict[str, float] = {"energy": energy.mean, "energy_err": energy.error}
    # Var(H) = ⟨|E_loc|²⟩ − |⟨E_loc⟩|² (exact for full sums); error of the variance from m4.
    mean_c = total.mean() if weights is None else (weights.to(total.dtype) * total).sum()
    dev2 = (total - mean_c).abs() ** 2 / n_sites**2
    var = weighted_stats(dev2, weights, n_chains)
    out["energy_variance"], out["energy_variance_err"] = var.mean, var.error
    e_total = energy.mean * n_sites
    v_score = n_sites * var.mean * n_sites**2 / e_total**2 if e_total != 0 else math.nan
    out["v_score"] = v_score
    out["v_score_err"] = v_score * var.error / var.mean if var.mean > 0 else 0.0
    m = magnetization(batch.x)
    for name, values in (
        ("abs_magnetization", m.abs()),
        ("magnetization", m),
        ("magnetization_sq", m**2),
    ):
        s = weighted_stats(values, weights, n_chains)
        out[name], out[f"{name}_err"] = s.mean, s.error
    if hamiltonian.name == "tfim":
        gamma = float(hamiltonian.gamma)
        if gamma != 0:
            s = weighted_stats(-e_loc.off_diagonal.real / (gamma * n_sites), weights, n_chains)
            out["sigma_x"], out["sigma_x_err"] = s.mean, s.error
        else:
            out["sigma_x"], out["sigma_x_err"] = math.nan, math.nan
    else:
        sign = hamiltonian.lattice.sublattice_sign()
        s = weighted_stats(staggered_magnetization(batch.x, sign), weights, n_chains)
        out["staggered_magnetization"], out["staggered_magnetization_err"] = s.mean, s.error
    if n_chains > 1:
        out["tau"], out["r_hat"] = energy.tau, energy.r_hat
    return out
