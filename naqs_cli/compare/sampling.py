"""`naqs compare sampling` (paper Fig. 2): direct sampling versus Markov chains from a checkpoint.

The checkpoint becomes a model the way `naqs evaluate` makes it one
(`compose.checkpoint_config`, `build.build_training`, `evaluate.load_trained`), so a bad
stored config, weights that do not fit or a stored device this machine lacks are one line.
Direct (i.i.d.) samples and Markov chains started in one mode are summarized side by side,
per chain, projected on the principal components of the direct samples and judged by
`sampling_verdict`; `compare_sampling.h5` and `compare_sampling.png` hold the result.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from naqs_cli import build, store, validation
from naqs_cli.compose import checkpoint_config
from naqs_cli.evaluate import Trained, load_trained
from naqs_cli.limits import FULLSUM_MAX_SITES
from naqs_cli.observables import magnetization
from naqs_cli.results import TaskResult
from naqs_cli.samplers import Samples
from naqs_cli.samplers.direct import DirectSampler
from naqs_cli.samplers.metropolis import MetropolisSampler, fixed_n_up
from naqs_cli.stats import Stats
from naqs_cli.vmc import local_energy

log = logging.getLogger(__name__)

#: Relative agreement threshold of the verdict, in combined standard errors.
AGREEMENT_SIGMAS = 3.0


# --- statistics ---------------------------------------------------------------------------
def _observable_values(x: torch.Tensor, e_loc: torch.Tensor, hamiltonian) -> dict[str, Any]:
    """Return per-sample observables as float64 arrays.

    Keys: magnetization m = Σσᶻ/N, abs_magnetization, energy (per site), and for a
    Hamiltonian that conserves Σσᶻ the signed_staggered_magnetization Σ(−1)^(r+c)σᶻ/N (its
    sign tells the two Néel modes apart) and staggered_magnetization, its absolute value.
    """
    m = magnetization(x).cpu().numpy()
    values = {
        "magnetization": m,
        "abs_magnetization": np.abs(m),
        "energy": e_loc.real.double().cpu().numpy() / hamiltonian.n_sites,
    }
    if getattr(hamiltonian, "conserves_sz", False):
        sign = hamiltonian.lattice.sublattice_sign(x.device).double()
        staggered = ((2.0 * x.double() - 1.0) * sign).mean(dim=-1).cpu().numpy()
        values["signed_staggered_magnetization"] = staggered
        values["staggered_magnetization"] = np.abs(staggered)
    return values


def _summarize(values: dict[str, np.ndarray], n_chains: int | None) -> dict[str, float]:
    """Return `<name>`, `<name>_err` (and `_tau`, `_r_hat` for chains) per observable.

    Args:
        values: observable name → (S,) values (chain-major when `n_chains` is given).
        n_chains: number of chains, or None for i.i.d. samples.
    """
    out: dict[str, float] = {}
    for name, v in values.items():
        if n_chains is None:
            s = Stats.iid(v)
        else:
            s = Stats.markov(v.reshape(n_chains, -1))
            out[f"{name}_tau"], out[f"{name}_r_hat"] = s.tau, s.r_hat
        out[name], out[f"{name}_err"] = s.mean, s.error
    energy = values["energy"]
    out["energy_variance"] = float(energy.var())
    out["n_samples"] = int(energy.size)
    return out


def _draw_direct(
    model: torch.nn.Module, n_samples: int, chunk_size: int, seed: int, device: torch.device
) -> Samples:
    sampler = DirectSampler(seed=seed, device=device)
    parts = [
        sampler.sample(model, min(chunk_size, n_samples - start))
        for start in range(0, n_samples, chunk_size)
    ]
    return Samples(x=torch.cat([p.x for p in parts]), log_psi=torch.cat([p.log_psi for p in parts]))


def _neel(lattice, n_chains: int, flipped: bool, device: torch.device) -> torch.Tensor:
    """Return (n_chains, N) int8 Néel states (sublattice A up; B up when `flipped`)."""
    up = lattice.sublattice_sign(device) > 0
    if flipped:
        up = ~up
    return up.to(torch.int8).expand(n_chains, -1).clone()


def _mcmc_sampler(
    cfg: DictConfig, hamiltonian, model: torch.nn.Module, device: torch.device
) -> tuple[MetropolisSampler, str]:
    """Return the comparison's chains and a description of their start."""
    common = {
        "hamiltonian": hamiltonian,
        "n_samples": int(cfg.n_chains) * int(cfg.samples_per_chain),
        "n_chains": int(cfg.n_chains),
        "sweeps_between_samples": int(cfg.sweeps_between_samples),
        "burn_in": int(cfg.burn_in),
        "move": "auto",
        "seed": int(cfg.seed) + 1,
        "device": device,
    }
    if not getattr(hamiltonian, "conserves_sz", False):
        sampler = MetropolisSampler(init=str(cfg.init), **common)
        start = {"up": "all up", "down": "all down", "random": "random"}[str(cfg.init)]
        return sampler, f"single-spin flips from {start} states"
    # Exchange moves cannot leave a polarized state: start from a Néel state instead.
    sampler = MetropolisSampler(init="random", **common)
    n_up_neel = int((hamiltonian.lattice.sublattice_sign() > 0).sum())
    n_up_model = fixed_n_up(model)
    if cfg.init == "random" or (n_up_model is not None and n_up_model != n_up_neel):
        return sampler, "bond exchanges from random states in the model's Σσᶻ sector"
    flipped = cfg.init == "down"
    sampler.set_chains(_neel(hamiltonian.lattice, int(cfg.n_chains), flipped, device))
    which = "B" if flipped else "A"
    return sampler, f"bond exchanges from the Néel state (sublattice {which} up; init={cfg.init})"


def principal_components(spins: np.ndarray, n_components: int = 2) -> dict[str, np.ndarray]:
    """Return the leading principal axes of ±1 spin configurations (numpy SVD).

    Each axis is signed so that its entries sum to ≥ 0 (the all-up direction counts positive).

    Args:
        spins: (S, N) float64 ±1 values.
        n_components: number of axes kept.

    Returns:
        `mean` (N,), `components` (n_components, N) and `explained_variance_ratio`
        (n_components,).
    """
    mean = spins.mean(axis=0)
    _, singular, vt = np.linalg.svd(spins - mean, full_matrices=False)
    components = vt[:n_components].copy()
    for row in components:
        if row.sum() < 0:
            row *= -1
    explained = singular**2 / max(float(np.sum(singular**2)), 1e-300)
    return {
        "mean": mean,
        "components": components,
        "explained_variance_ratio": explained[:n_components],
    }


def _project(x: torch.Tensor, pca: dict[str, np.ndarray]) -> np.ndarray:
    spins = 2.0 * x.double().cpu().numpy() - 1.0
    return (spins - pca["mean"]) @ pca["components"].T


def _agreement(a: float, a_err: float, b: float, b_err: float) -> float:
    """Return |a − b| in units of the combined error (inf for a nonzero gap with no error)."""
    sigma = math.hypot(a_err, b_err)
    gap = abs(a - b)
    if sigma == 0:
        return 0.0 if gap == 0 else math.inf
    return gap / sigma


#: Order parameters whose sign tells the two modes apart: (signed key, absolute key, symbol).
ORDER_PARAMETERS = {
    "magnetization": ("magnetization", "abs_magnetization", "m"),
    "staggered": ("signed_staggered_magnetization", "staggered_magnetization", "m_s"),
}


def sampling_verdict(
    direct: dict[str, float],
    mcmc: dict[str, float],
    chain_samples: list[np.ndarray],
    order: str = "magnetization",
) -> str:
    """Return a one-line verdict on whether the chains reproduce direct sampling.

    The modes are the signs of the order parameter (m for the TFIM; the staggered m_s for a
    Hamiltonian that conserves Σσᶻ). A chain "crossed" when more than 2 % of its samples
    (order parameter ≠ 0) have the sign opposite to its majority sign.

    Args:
        direct: direct-sampling summary (the order parameter's signed and absolute keys of
            `ORDER_PARAMETERS` and their `_err`).
        mcmc: pooled chain summary (same keys).
        chain_samples: (L,) signed order parameter of each chain's samples.
        order: a key of `ORDER_PARAMETERS`.
    """
    signed_key, abs_key, symbol = ORDER_PARAMETERS[order]
    n_chains = len(chain_samples)
    majority, crossed, zero = [], 0, 0
    for values in chain_samples:
        n_pos, n_neg = int(np.sum(values > 0)), int(np.sum(values < 0))
        zero += n_pos + n_neg == 0
        majority.append(1 if n_pos >= n_neg else -1)
        crossed += min(n_pos, n_neg) > 0.02 * max(n_pos + n_neg, 1)
    if zero:
        head = f"{zero} of {n_chains} MCMC chains only visited {symbol} = 0"
    elif crossed:
        head = f"{crossed} of {n_chains} MCMC chains crossed between the modes"
    elif len(set(majority)) == 1:
        side = f"{symbol} > 0" if majority[0] > 0 else f"{symbol} < 0"
        head = f"MCMC chains stayed in one mode (all {n_chains} at {side})"
    else:
        head = "each MCMC chain stayed in one mode (both modes occupied by different chains)"

    def compare(key: str) -> tuple[str, float]:
        z = _agreement(mcmc[key], mcmc[f"{key}_err"], direct[key], direct[f"{key}_err"])
        text = (
            f"{mcmc[key]:.3f} ± {mcmc[f'{key}_err']:.3f} vs direct"
            f" {direct[key]:.3f} ± {direct[f'{key}_err']:.3f}"
        )
        return text, z

    def word(z: float) -> str:
        return "agrees" if z <= AGREEMENT_SIGMAS else "does not"

    signed, z_signed = compare(signed_key)
    absolute, z_abs = compare(abs_key)
    return (
        f"{head}: ⟨{symbol}⟩ = {signed}; ⟨|{symbol}|⟩ = {absolute}"
        f" — |{symbol}| {word(z_abs)} ({z_abs:.1f}σ), {symbol} {word(z_signed)}"
        f" ({z_signed:.1f}σ)"
    )


# --- the command --------------------------------------------------------------------------
def load_checkpoint_model(cfg: DictConfig) -> tuple[DictConfig, Trained]:
    """Rebuild the checkpoint's run with `device`, `dtype` and `symmetry`; load its weights.

    The CLI calls this before Hydra creates anything, and `compare_sampling` again.

    Args:
        cfg: the composed `compare_sampling` config (validated).

    Returns:
        (the run config, the trained model with its run's objects, in eval mode).

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, its stored config unusable or
            its weights do not fit the model of that config.
        ConfigError: the stored config with these overrides is invalid here (e.g. a stored
            `device=cuda` without CUDA); the message names the file.
    """
    run_cfg, path, state = checkpoint_config(
        cfg.checkpoint,
        cfg.device,
        cfg.dtype,
        cfg.get("symmetry"),
        verb="comparing samplers on",
        allow_unverified=bool(cfg.get("allow_unverified_checkpoint", False)),
    )
    return run_cfg, load_trained(build.build_training(run_cfg), path, state)


def compare_sampling(cfg: DictConfig, out_dir: Path | str) -> TaskResult:
    """Compare direct sampling with Markov chains started in one mode (paper Fig. 2).

    Rebuilds the model from the checkpoint, draws `n_samples` i.i.d. samples and `n_chains`
    chains × `samples_per_chain` samples (`sweeps_between_samples` sweeps apart, after
    `burn_in` sweeps) started all-up (`init=up`; TFIM: single-spin flips). For a Hamiltonian
    that conserves Σσᶻ (Heisenberg) the chains use bond exchanges from a Néel state instead,
    since exchanges cannot leave a polarized state. Reports ⟨m⟩, ⟨|m|⟩ (m = Σσᶻ/N) and the
    energy per site with errors (τ-corrected for chains) per method and per chain, τ and split
    R-hat; writes `compare_sampling.h5` and the PCA scatter `compare_sampling.png`.

    Args:
        cfg: the composed `compare_sampling` config.
        out_dir: the run directory.

    Returns:
        The summary and the pooled numbers (`direct`, `mcmc`, `chains`, `model_exact` when
        enumerated, `verdict`).

    Raises:
        CheckpointError, ConfigError: see `load_checkpoint_model`.
    """
    out_dir = Path(out_dir)
    validation.validate(cfg, "compare_sampling")
    run_cfg, trained = load_checkpoint_model(cfg)
    model, hamiltonian = trained.model, trained.setup.hamiltonian
    device = trained.setup.runtime.device
    chunk = int(cfg.chunk_size)
    n_chains = int(cfg.n_chains)

    started = time.perf_counter()
    direct = _draw_direct(model, int(cfg.n_samples), chunk, int(cfg.seed), device)
    direct_seconds = time.perf_counter() - started
    sampler, start_text = _mcmc_sampler(cfg, hamiltonian, model, device)
    started = time.perf_counter()
    chains = sampler.sample(model, n_chains * int(cfg.samples_per_chain))
    mcmc_seconds = time.perf_counter() - started
    log.info("direct: %.1f s, chains: %.1f s (%s)", direct_seconds, mcmc_seconds, start_text)

    e_direct = local_energy(model, hamiltonian, direct, chunk_size=chunk).total
    e_chains = local_energy(model, hamiltonian, chains, chunk_size=chunk).total
    v_direct = _observable_values(direct.x, e_direct, hamiltonian)
    v_chains = _observable_values(chains.x, e_chains, hamiltonian)
    order = "staggered" if "staggered_magnetization" in v_direct else "magnetization"
    direct_summary = _summarize(v_direct, None)
    direct_summary["seconds"] = direct_seconds
    mcmc_summary = _summarize(v_chains, n_chains)
    mcmc_summary.update(acceptance=chains.info["acceptance"], seconds=mcmc_seconds)
    per_chain = [
        _summarize({name: v.reshape(n_chains, -1)[k] for name, v in v_chains.items()}, 1)
        for k in range(n_chains)
    ]
    signed_key, _, symbol = ORDER_PARAMETERS[order]
    chain_samples = list(v_chains[signed_key].reshape(n_chains, -1))
    verdict = sampling_verdict(direct_summary, mcmc_summary, chain_samples, order)
    exact_values = _enumerated(model, hamiltonian, chunk, device)

    h5 = out_dir / "compare_sampling.h5"
    out_dir.mkdir(parents=True, exist_ok=True)
    h5.unlink(missing_ok=True)
    pca = principal_components(2.0 * direct.x.double().cpu().numpy() - 1.0)
    store.write_group(
        h5,
        "direct",
        {
            **direct_summary,
            "samples_magnetization": v_direct["magnetization"],
            "samples_order_parameter": v_direct[signed_key],
            "pca": _project(direct.x, pca),
        },
        {"method": "direct (exact i.i.d.)"},
    )
    store.write_group(
        h5,
        "pca",
        pca,
        {"note": "axes of the centred ±1 spins of the direct samples (numpy SVD)"},
    )
    store.write_group(
        h5,
        "mcmc",
        mcmc_summary,
        {"start": start_text, "n_chains": n_chains, "move": sampler.move},
    )
    x_chains = chains.x.view(n_chains, -1, hamiltonian.n_sites)
    for k, summary in enumerate(per_chain):
        store.write_group(
            h5,
            f"mcmc/chain_{k}",
            {
                **summary,
                "samples_magnetization": v_chains["magnetization"].reshape(n_chains, -1)[k],
                "samples_order_parameter": chain_samples[k],
                "pca": _project(x_chains[k], pca),
            },
        )
    if exact_values:
        store.write_group(h5, "model_exact", exact_values, {"note": "enumerated over 2^N states"})
    attrs = build.run_attrs(build.config_yaml(cfg), int(cfg.seed), device)
    attrs.update(
        checkpoint=str(trained.path),
        step=trained.step,
        model_config=OmegaConf.to_yaml(run_cfg.model),
        hamiltonian=hamiltonian.describe(),
        n_sites=hamiltonian.n_sites,
        order_parameter=signed_key,
        order_symbol=symbol,
        verdict=verdict,
    )
    store.write_attrs(h5, attrs)
    png = out_dir / "compare_sampling.png"
    try:
        from naqs_cli import plots

        plots.compare_sampling_plot(h5, png)
    except Exception as err:  # a plot must never lose the numbers
        log.warning("could not draw %s: %s", png.name, err)

    lines = [
        f"naqs compare sampling: {trained.path} (step {trained.step}),"
        f" {hamiltonian.describe()}, symmetry={run_cfg.model.symmetry}",
        f"  direct: {direct.n_samples} i.i.d. samples ({direct_seconds:.1f} s)",
        f"  mcmc:   {n_chains} chains × {cfg.samples_per_chain} samples,"
        f" {cfg.sweeps_between_samples} sweep(s) apart after {cfg.burn_in} burn-in sweeps,"
        f" {start_text}; acceptance {chains.info['acceptance']:.3f} ({mcmc_seconds:.1f} s)",
        *_table(order, direct_summary, mcmc_summary, per_chain, exact_values),
        f"  verdict: {verdict}",
        f"  outputs: {h5}, {png}",
    ]
    summary = "\n".join(lines)
    log.info("\n%s", summary)
    values: dict[str, Any] = {"direct": direct_summary, "mcmc": mcmc_summary, "chains": per_chain}
    if exact_values:
        values["model_exact"] = exact_values
    values["verdict"] = verdict
    return TaskResult(summary, out_dir, values)


def _enumerated(
    model: torch.nn.Module, hamiltonian, chunk: int, device: torch.device
) -> dict[str, float]:
    """Return the model's exact expectations over all 2^N states (empty beyond FULLSUM sizes)."""
    from naqs_cli import exact
    from naqs_cli.basis import enumerate_basis

    n_sites = hamiltonian.n_sites
    if n_sites > FULLSUM_MAX_SITES:
        return {}
    basis = enumerate_basis(n_sites, device=device)
    with torch.no_grad():
        log_psi = torch.cat([model.log_psi(part) for part in basis.split(chunk)])
    return exact.model_expectations(log_psi, hamiltonian)


#: Column titles of the summary table.
_TITLES = {
    "magnetization": "⟨m⟩",
    "abs_magnetization": "⟨|m|⟩",
    "signed_staggered_magnetization": "⟨m_s⟩",
    "staggered_magnetization": "⟨|m_s|⟩",
    "energy": "E/N",
}


def _table(
    order: str,
    direct: dict[str, Any],
    mcmc: dict[str, Any],
    per_chain: list[dict[str, Any]],
    exact_values: dict[str, float],
) -> list[str]:
    """Return the summary's table: a row per method and per chain, and the enumerated model."""
    signed_key, abs_key, symbol = ORDER_PARAMETERS[order]
    keys = ["magnetization", "abs_magnetization"]
    if order != "magnetization":
        keys += [signed_key, abs_key]
    keys.append("energy")
    header = "".join(f"{_TITLES[key]:>24}" for key in keys)
    lines = [f"  {'':<10}{header}{'τ(' + symbol + ')':>9}{'R̂(' + symbol + ')':>9}"]

    def row(name: str, s: dict[str, Any]) -> str:
        cells = "".join(f"{s[key]:>13.5f} ± {s[f'{key}_err']:<8.1e}" for key in keys)
        tau, r_hat = s.get(f"{signed_key}_tau", math.nan), s.get(f"{signed_key}_r_hat", math.nan)
        return f"  {name:<10}{cells}{tau:>9.2f}{r_hat:>9.3f}"

    lines.append(row("direct", direct))
    lines.append(row("mcmc", mcmc))
    lines += [row(f"chain {k}", s) for k, s in enumerate(per_chain)]
    if exact_values:
        cells = "".join(f"{exact_values.get(key, math.nan):>13.5f}{'':11}" for key in keys)
        lines.append(f"  {'model':<10}{cells}  (enumerated)")
    return lines
