"""Local energies, the Eq. 4 gradient estimator and the observables of a batch (pure functions).

One optimization step combines them in `naqs_cli.optim` (`FirstOrderRule.step`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from naqs_cli import distributed, parallel
from naqs_cli.observables import magnetization, staggered_magnetization
from naqs_cli.samplers import Samples
from naqs_cli.stats import Stats

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
    configurations whose cache fits `RATIO_CACHE_BYTES`; repeated configurations are evaluated
    once. Other models (the symmetrized
    wrapper) evaluate ln Ψ(x') in full. A full-basis batch (fullsum) uses (HΨ)(x)/Ψ(x) with
    the sparse matrix; states with Ψ = 0 (below `FULL_BASIS_ZERO` of the largest amplitude)
    get E_loc = 0.

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
    # Exact samples repeat where |Ψ|² is peaked (Heisenberg: Néel-like configurations):
    # each orbit (`batch.orbits`) or else each distinct configuration once.
    if batch.orbits is not None:
        x, inverse = x[batch.orbits.first], batch.orbits.inverse
    else:
        x, inverse = torch.unique(x, dim=0, return_inverse=True)
    workers = parallel.n_workers(x.shape[0], MIN_REFERENCES_PER_THREAD, x.device)
    parts = parallel.run_split(
        lambda part: _local_energy_by_ratios(model, hamiltonian, x[part], chunk_size),
        x.shape[0],
        workers,
    )
    total = torch.cat([p.total for p in parts])
    off_diagonal = torch.cat([p.off_diagonal for p in parts])
    return LocalEnergy(total[inverse], off_diagonal[inverse])


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


#: Full sums: amplitudes below this fraction of the largest count as Ψ = 0. Below it
#: (HΨ)(x)/Ψ(x) next to a large neighbour overflows float64 when squared, and weight × E_loc²
#: became NaN for a state collapsed onto a few configurations; above it every sum is as exact
#: as before (weights ≥ 1e-300, |E_loc|² < 1e306).
FULL_BASIS_ZERO = 1e-150


def _local_energy_full_basis(hamiltonian, log_psi: torch.Tensor) -> LocalEnergy:
    matrix = _sparse(hamiltonian)
    lp = log_psi.detach().cpu().numpy()
    psi = np.exp(lp - lp.real.max())
    h_psi = matrix @ psi
    diag = matrix.diagonal()
    nonzero = np.abs(psi) > FULL_BASIS_ZERO
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
        e_loc: local energies of this rank's batch (totals).
        grad_norm: norm of the (all-reduced) gradient before clipping (NaN when a local energy
            was not finite).
        is_finite: False when a local energy (on any rank), the gradient or `pending_check`
            was not finite (no update made).
        energy_finite: False when a local energy on some rank was not finite.
        pending_ok: the value of the step's `pending_check` (True when none was given).
        info: the rule's diagnostics, numbers the loop adds to the history row (the same keys
            at every step of a rule; NaN where a step has none).
    """

    e_loc: LocalEnergy
    grad_norm: float
    is_finite: bool
    energy_finite: bool = True
    pending_ok: bool = True
    info: dict[str, float] = field(default_factory=dict)


def batch_local_energy(
    model: torch.nn.Module, hamiltonian, batch: Samples, chunk_size: int = 4096
) -> LocalEnergy:
    """Return the local energies of a batch, also of one rank's share of a full basis.

    A share (`batch.basis_part`, fullsum on several ranks) gets the rows of the whole basis'
    (HΨ)(x)/Ψ(x), computed from the gathered log-amplitudes without another network pass.
    """
    part = batch.basis_part
    if part is None:
        return local_energy(model, hamiltonian, batch, chunk_size=chunk_size)
    full = local_energy(model, hamiltonian, batch.full_batch(), chunk_size=chunk_size)
    rows = slice(part.start, part.start + batch.n_samples)
    return LocalEnergy(full.total[rows], full.off_diagonal[rows])


#: Memory the autograd graph of one backward chunk may take (the chunk shrinks to fit).
BACKWARD_BYTES = 2 * 2**30


def backward_chunk(model: torch.nn.Module, chunk_size: int, budget: int = BACKWARD_BYTES) -> int:
    """Return `chunk_size`, lowered so one chunk's autograd graph fits `budget` bytes.

    Uses the network's `activation_bytes_per_sample` estimate where it has one (the PixelCNN:
    about 3 MB per sample for 4 × 16 at L = 21, 14 MB for the paper's 18 × 32). A symmetrized
    model (`group_size` |G|, network `base`) runs the network on |G| images of every sample,
    so its budget per sample is |G| times smaller.
    """
    network = getattr(model, "base", model)
    estimate = getattr(network, "activation_bytes_per_sample", None)
    if estimate is None:
        return chunk_size
    group_size = int(getattr(model, "group_size", 1))
    per_sample = max(1, int(estimate())) * max(1, group_size)
    return max(1, min(chunk_size, budget // per_sample))


def vmc_gradient(
    model: torch.nn.Module,
    batch: Samples,
    e_loc: torch.Tensor,
    chunk_size: int,
    n_total: int | None = None,
    e_mean: torch.Tensor | None = None,
) -> None:
    """Accumulate the Eq. 4 gradient of ⟨H⟩ into the parameters' `.grad`.

    loss = 2·Re Σ_x w(x)·(E_loc(x) − Ē)*·log Ψ(x), with Ē the weighted batch mean (the
    baseline) and w = |Ψ|² weights (fullsum) or 1/B. Its gradient is 2·Re⟨(E_loc − Ē)* ∂log Ψ⟩:
    the exact gradient for full sums, and (1 − 1/B) times it in expectation for i.i.d. batches.
    The backward pass runs chunk by chunk so memory stays bounded. On several ranks B and Ē are
    those of the whole batch (Ē all-reduced): summing the ranks' gradients gives the gradient
    of the concatenated batch.

    Args:
        model: the wave function (gradients accumulate; zero them before).
        batch: samples (weights for fullsum).
        e_loc: (B,) complex128 local energies (no graph).
        chunk_size: samples per backward pass (lowered to fit `BACKWARD_BYTES`).
        n_total: total samples over all ranks (defaults to this batch's size × world size).
        e_mean: the all-reduced baseline Ē when already computed (`weighted_mean`).
    """
    n_total = n_total or batch.n_samples * distributed.world_size()
    if e_mean is None:
        e_mean = weighted_mean(e_loc, batch, n_total)
    centred = (e_loc - e_mean).conj()
    chunk_size = backward_chunk(model, chunk_size)
    for start in range(0, batch.n_samples, chunk_size):
        stop = min(start + chunk_size, batch.n_samples)
        if batch.weights is not None:
            w = batch.weights[start:stop].to(torch.float64)
        else:
            w = torch.full((stop - start,), 1.0 / n_total, dtype=torch.float64, device=e_loc.device)
        log_psi = model.log_psi(batch.x[start:stop])
        loss = 2.0 * (w * centred[start:stop] * log_psi).real.sum()
        loss.backward()


def _observable_rows(
    batch: Samples, e_loc: LocalEnergy, hamiltonian
) -> tuple[list[str], torch.Tensor]:
    """Return the names and (k, B) float64 per-sample values of the observables' estimators.

    Rows: energy per site, Re and Im of the total local energy (for the variance), the
    magnetizations, and sigma_x (TFIM with Γ ≠ 0) or the staggered magnetization (Heisenberg).
    """
    n_sites = hamiltonian.n_sites
    total = e_loc.total
    m = magnetization(batch.x)
    names = ["energy", "_re", "_im", "abs_magnetization", "magnetization", "magnetization_sq"]
    rows = [total.real / n_sites, total.real, total.imag, m.abs(), m, m**2]
    if hamiltonian.name == "tfim":
        gamma = float(hamiltonian.gamma)
        if gamma != 0:
            names.append("sigma_x")
            rows.append(-e_loc.off_diagonal.real / (gamma * n_sites))
    else:
        names.append("staggered_magnetization")
        rows.append(staggered_magnetization(batch.x, _sublattice_sign(hamiltonian, m.device)))
    return names, torch.stack([r.to(torch.float64) for r in rows])


_SIGN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sublattice_sign(hamiltonian, device: torch.device) -> torch.Tensor:
    """Return the lattice's (N,) ±1 signs on `device`, copied there once (a copy syncs)."""
    signs = _SIGN_CACHE.setdefault(hamiltonian, {})
    if device not in signs:
        signs[device] = hamiltonian.lattice.sublattice_sign().to(device)
    return signs[device]


def observable_estimates(
    batch: Samples, e_loc: LocalEnergy, hamiltonian, n_chains: int | None = None
) -> dict[str, float | torch.Tensor]:
    """Return the per-site observables (README, Architecture) with errors, over all ranks.

    Same keys as `estimate_observables`, but i.i.d. and full-sum batches give 0-dim float64
    tensors on the batch's device, computed without reading the device (`Stats.rows`: the
    moments are all-reduced over ranks); `to_floats` turns them into numbers. Markov-chain
    batches need each chain's series (τ, R-hat): the ranks' values are gathered and reduced
    on the host.

    Args:
        batch: this rank's samples.
        e_loc: their local energies.
        hamiltonian: the Hamiltonian (N, name, Γ, lattice).
        n_chains: Markov chains over all ranks; default `batch.n_chains` × world size when
            `batch.n_chains` > 1, else 1 (i.i.d. samples or full sums).
    """
    if n_chains is None:
        n_chains = batch.n_chains * distributed.world_size() if batch.n_chains > 1 else 1
    names, values = _observable_rows(batch, e_loc, hamiltonian)
    if n_chains > 1 and batch.weights is None:
        return _chain_estimates(names, values, hamiltonian, n_chains)
    n_sites = hamiltonian.n_sites
    weights = None if batch.weights is None else batch.weights.to(torch.float64)

    def deviation(means: torch.Tensor) -> torch.Tensor:  # |E_loc − ⟨E_loc⟩|²/N²: mean Var(H)/N²
        re, im = values[1:3] - means[1:3, None]
        return ((re**2 + im**2) / n_sites**2)[None]

    stats = Stats.rows(values, weights, distributed.all_reduce_sum, derived=deviation)
    out: dict[str, float | torch.Tensor] = {}
    for i, name in enumerate(names):
        if not name.startswith("_"):
            out[name], out[f"{name}_err"] = stats.mean[i], stats.error[i]
    _variance_estimates(out, stats.mean[-1], stats.error[-1], n_sites)
    _fill_missing(out, hamiltonian)
    return {key: out[key] for key in _ordered_keys(out)}


def _variance_estimates(
    out: dict, var_mean: torch.Tensor, var_err: torch.Tensor, n_sites: int
) -> None:
    """Add energy_variance and v_score (N·Var(H)/E²) with their errors to `out`."""
    e_total = out["energy"] * n_sites
    v_score = torch.where(e_total != 0, n_sites * var_mean * n_sites**2 / e_total**2, torch.nan)
    out["energy_variance"], out["energy_variance_err"] = var_mean, var_err
    out["v_score"] = v_score
    out["v_score_err"] = torch.where(
        var_mean > 0, v_score * var_err / torch.where(var_mean > 0, var_mean, 1.0), 0.0
    )


def _fill_missing(out: dict, hamiltonian) -> None:
    """sigma_x is NaN for the TFIM at Γ = 0."""
    if hamiltonian.name == "tfim" and "sigma_x" not in out:
        out["sigma_x"], out["sigma_x_err"] = math.nan, math.nan


def _ordered_keys(out: dict) -> list[str]:
    order = ["energy", "energy_variance", "v_score", "abs_magnetization", "magnetization"]
    order += ["magnetization_sq", "sigma_x", "staggered_magnetization", "tau", "r_hat"]
    keys = []
    for name in order:
        for key in (name, f"{name}_err"):
            if key in out:
                keys.append(key)
    return keys + [k for k in out if k not in keys]


def _chain_estimates(
    names: list[str], values: torch.Tensor, hamiltonian, n_chains: int
) -> dict[str, float | torch.Tensor]:
    """Markov-chain statistics (τ-corrected errors, R-hat) of the ranks' gathered values."""
    n_sites = hamiltonian.n_sites
    gathered = distributed.all_gather_cat(values.T.contiguous()).T  # rank-major = chain-major
    v = gathered.detach().cpu().numpy()
    out: dict[str, float | torch.Tensor] = {}
    stats = {}
    for i, name in enumerate(names):
        if not name.startswith("_"):
            stats[name] = Stats.markov(v[i].reshape(n_chains, -1))
            out[name], out[f"{name}_err"] = stats[name].mean, stats[name].error
    total = v[1] + 1j * v[2]
    dev2 = np.abs(total - total.mean()) ** 2 / n_sites**2
    var = Stats.markov(dev2.reshape(n_chains, -1))
    out["energy_variance"], out["energy_variance_err"] = var.mean, var.error
    e_total = stats["energy"].mean * n_sites
    v_score = n_sites * var.mean * n_sites**2 / e_total**2 if e_total != 0 else math.nan
    out["v_score"] = v_score
    out["v_score_err"] = v_score * var.error / var.mean if var.mean > 0 else 0.0
    _fill_missing(out, hamiltonian)
    out["tau"], out["r_hat"] = stats["energy"].tau, stats["energy"].r_hat
    return {key: out[key] for key in _ordered_keys(out)}


def to_floats(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Return `values` with every tensor read as a float (one device read for all)."""
    keys = [k for k, v in values.items() if torch.is_tensor(v)]
    out = {k: float(v) for k, v in values.items() if not torch.is_tensor(v)}
    if keys:
        numbers = torch.stack([values[k].to(torch.float64) for k in keys]).tolist()
        out.update(zip(keys, numbers, strict=True))
    return {k: out[k] for k in values}


def estimate_observables(
    batch: Samples, e_loc: LocalEnergy, hamiltonian, n_chains: int | None = None
) -> dict[str, float]:
    """Return the per-site observables (README, Architecture) with errors, over all ranks.

    Keys: energy, energy_variance (Var(H)/N², the variance of the per-site local energy),
    v_score (N·Var(H)/E²), abs_magnetization, magnetization, magnetization_sq, sigma_x (TFIM;
    NaN at Γ = 0) or staggered_magnetization (Heisenberg), each with `<name>_err`; plus tau and
    r_hat of the energy for Markov chains. On several ranks every value is the global one (a
    collective: every rank must call it).

    Args:
        n_chains: Markov chains over all ranks (see `observable_estimates`).
    """
    return to_floats(observable_estimates(batch, e_loc, hamiltonian, n_chains))
