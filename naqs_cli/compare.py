"""Direct sampling versus Markov chains: `naqs compare sampling` (paper Fig. 2) and
`naqs compare training` (paper Fig. 3).

`tasks.compare_sampling` and `tasks.compare_training` delegate here; both are plain functions
`(cfg, out_dir) -> TaskResult` that write an HDF5 file and a PNG into `out_dir`.
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

from naqs_cli import build, store
from naqs_cli.build import target_kind, unwrap
from naqs_cli.limits import FULLSUM_MAX_SITES
from naqs_cli.observables import magnetization
from naqs_cli.samplers import Samples
from naqs_cli.samplers.direct import DirectSampler
from naqs_cli.samplers.metropolis import MetropolisSampler, fixed_n_up
from naqs_cli.stats import Stats
from naqs_cli.vmc import estimate_observables, local_energy, train_step

log = logging.getLogger(__name__)

#: Exact references (ED) for `compare training` up to this many sites; beyond, the lowest
#: energy any run found (paper Fig. 3).
COMPARE_EXACT_MAX_SITES = 20
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


# --- compare sampling ---------------------------------------------------------------------
def load_model_from_checkpoint(
    checkpoint: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    symmetry: str | None = None,
) -> tuple[DictConfig, Any, torch.nn.Module, dict]:
    """Rebuild hamiltonian and model from a checkpoint's stored config and weights.

    Args:
        checkpoint: a checkpoint file or run directory.
        device: overrides the stored `device` when given.
        dtype: overrides the stored `dtype` when given.
        symmetry: overrides the stored `model.symmetry` when given.

    Returns:
        (run config, hamiltonian, model in eval mode, checkpoint state).
    """
    path = store.resolve_checkpoint(checkpoint)
    state = store.load_checkpoint(path)
    run_cfg = OmegaConf.create(state["config"])
    for key, value in (("device", device), ("dtype", dtype)):
        if value is not None:
            run_cfg[key] = value
    if symmetry is not None:
        run_cfg.model.symmetry = symmetry
    lattice = build.build_lattice(run_cfg)
    hamiltonian = build.build_hamiltonian(run_cfg, lattice)
    model = build.build_model(
        run_cfg,
        lattice,
        build.resolve_device(run_cfg.device),
        build.resolve_dtype(run_cfg.dtype),
    )
    unwrap(model).load_state_dict(state["model"])
    model.eval()
    state["path"] = str(path)
    return run_cfg, hamiltonian, model, state


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


def compare_sampling(cfg: DictConfig, out_dir: Path | str):
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
        `tasks.TaskResult` with the summary and the pooled numbers.
    """
    from naqs_cli import exact, plots
    from naqs_cli.tasks import TaskResult, run_attrs

    out_dir = Path(out_dir)
    build.validate(cfg, "compare_sampling")
    run_cfg, hamiltonian, model, state = load_model_from_checkpoint(
        cfg.checkpoint, cfg.device, cfg.dtype, cfg.get("symmetry")
    )
    device = build.resolve_device(run_cfg.device)
    n_sites = hamiltonian.n_sites
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
    signed_key, abs_key, symbol = ORDER_PARAMETERS[order]
    direct_summary = _summarize(v_direct, None)
    direct_summary["seconds"] = direct_seconds
    mcmc_summary = _summarize(v_chains, n_chains)
    mcmc_summary.update(acceptance=chains.info["acceptance"], seconds=mcmc_seconds)

    pca = principal_components(2.0 * direct.x.double().cpu().numpy() - 1.0)
    h5 = out_dir / "compare_sampling.h5"
    out_dir.mkdir(parents=True, exist_ok=True)
    h5.unlink(missing_ok=True)
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
    per_chain: list[dict[str, float]] = []
    x_chains = chains.x.view(n_chains, -1, n_sites)
    for k in range(n_chains):
        values = {name: v.reshape(n_chains, -1)[k] for name, v in v_chains.items()}
        summary = _summarize(values, 1)
        per_chain.append(summary)
        store.write_group(
            h5,
            f"mcmc/chain_{k}",
            {
                **summary,
                "samples_magnetization": values["magnetization"],
                "samples_order_parameter": values[signed_key],
                "pca": _project(x_chains[k], pca),
            },
        )
    exact_values: dict[str, float] = {}
    if n_sites <= FULLSUM_MAX_SITES:
        basis = exact.enumerate_basis(n_sites, device=device)
        with torch.no_grad():
            log_psi = torch.cat([model.log_psi(part) for part in basis.split(chunk)])
        exact_values = exact.model_expectations(log_psi, hamiltonian)
        store.write_group(h5, "model_exact", exact_values, {"note": "enumerated over 2^N states"})
    chain_samples = list(v_chains[signed_key].reshape(n_chains, -1))
    verdict = sampling_verdict(direct_summary, mcmc_summary, chain_samples, order)
    attrs = run_attrs(cfg, device)
    attrs.update(
        checkpoint=state["path"],
        step=int(state["step"]),
        model_config=OmegaConf.to_yaml(run_cfg.model),
        hamiltonian=hamiltonian.describe(),
        n_sites=n_sites,
        order_parameter=signed_key,
        order_symbol=symbol,
        verdict=verdict,
    )
    store.write_attrs(h5, attrs)
    png = out_dir / "compare_sampling.png"
    try:
        plots.compare_sampling_plot(h5, png)
    except Exception as err:  # a plot must never lose the numbers
        log.warning("could not draw %s: %s", png.name, err)

    lines = [
        f"naqs compare sampling: {state['path']} (step {state['step']}),"
        f" {hamiltonian.describe()}, symmetry={run_cfg.model.symmetry}",
        f"  direct: {direct.n_samples} i.i.d. samples ({direct_seconds:.1f} s)",
        f"  mcmc:   {n_chains} chains × {cfg.samples_per_chain} samples,"
        f" {cfg.sweeps_between_samples} sweep(s) apart after {cfg.burn_in} burn-in sweeps,"
        f" {start_text}; acceptance {chains.info['acceptance']:.3f} ({mcmc_seconds:.1f} s)",
    ]
    keys = ["magnetization", "abs_magnetization"]
    if order != "magnetization":
        keys += [signed_key, abs_key]
    keys.append("energy")
    titles = {
        "magnetization": "⟨m⟩",
        "abs_magnetization": "⟨|m|⟩",
        "signed_staggered_magnetization": "⟨m_s⟩",
        "staggered_magnetization": "⟨|m_s|⟩",
        "energy": "E/N",
    }
    header = "".join(f"{titles[key]:>24}" for key in keys)
    lines.append(f"  {'':<10}{header}{'τ(' + symbol + ')':>9}{'R̂(' + symbol + ')':>9}")

    def row(name: str, s: dict[str, Any]) -> str:
        cells = "".join(f"{s[key]:>13.5f} ± {s[f'{key}_err']:<8.1e}" for key in keys)
        tau, r_hat = s.get(f"{signed_key}_tau", math.nan), s.get(f"{signed_key}_r_hat", math.nan)
        return f"  {name:<10}{cells}{tau:>9.2f}{r_hat:>9.3f}"

    lines.append(row("direct", direct_summary))
    lines.append(row("mcmc", mcmc_summary))
    lines += [row(f"chain {k}", s) for k, s in enumerate(per_chain)]
    if exact_values:
        cells = "".join(f"{exact_values.get(key, math.nan):>13.5f}{'':11}" for key in keys)
        lines.append(f"  {'model':<10}{cells}  (enumerated)")
    lines.append(f"  verdict: {verdict}")
    lines.append(f"  outputs: {h5}, {png}")
    summary = "\n".join(lines)
    log.info("\n%s", summary)
    values = {"direct": direct_summary, "mcmc": mcmc_summary, "chains": per_chain}
    if exact_values:
        values["model_exact"] = exact_values
    values["verdict"] = verdict
    return TaskResult(summary, out_dir, values)


# --- compare training ---------------------------------------------------------------------
def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Return the trailing moving average (shorter windows at the start), NaNs ignored."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    for t in range(values.size):
        part = values[max(0, t - window + 1) : t + 1]
        finite = part[np.isfinite(part)]
        out[t] = finite.mean() if finite.size else np.nan
    return out


def smoothing_window(n_steps: int) -> int:
    """Return the moving-average window used for final and lowest energies (≈ 5 % of steps)."""
    return int(min(50, max(1, round(0.05 * n_steps))))


def _train_run(
    cfg: DictConfig,
    hamiltonian,
    lattice,
    initial_state: dict,
    sampler,
    n_samples: int,
    wall_time: float,
    max_steps: int | None,
    label: str,
) -> dict[str, np.ndarray]:
    """Train a fresh copy of the initial model with `sampler` until the budget is spent.

    Returns:
        per-step columns: step, wall_time (s since the run started, sampling included),
        energy, energy_err, energy_variance, energy_variance_err, n_samples, and acceptance,
        tau, r_hat for Markov chains.
    """
    device = build.resolve_device(cfg.device)
    dtype = build.resolve_dtype(cfg.dtype)
    model = build.build_model(cfg, lattice, device, dtype)
    unwrap(model).load_state_dict(initial_state)
    optimizer = build.build_optimizer(cfg, model)
    for group in optimizer.param_groups:
        group["lr"] = float(cfg.optim.lr)
    rows: dict[str, list[float]] = {}
    started = time.perf_counter()
    step = 0
    while True:
        batch = sampler.sample(model, n_samples)
        result = train_step(
            model,
            hamiltonian,
            batch,
            optimizer,
            chunk_size=int(cfg.train.chunk_size),
            grad_clip=cfg.optim.grad_clip,
        )
        values = estimate_observables(batch, result.e_loc, hamiltonian)
        elapsed = time.perf_counter() - started
        row = {
            "step": step,
            "wall_time": elapsed,
            "energy": values["energy"],
            "energy_err": values["energy_err"],
            "energy_variance": values["energy_variance"],
            "energy_variance_err": values["energy_variance_err"],
            "n_samples": batch.n_samples,
        }
        if batch.n_chains > 1 or isinstance(sampler, MetropolisSampler):
            row["acceptance"] = batch.info.get("acceptance", math.nan)
            row["tau"] = values.get("tau", math.nan)
            row["r_hat"] = values.get("r_hat", math.nan)
        for key, value in row.items():
            rows.setdefault(key, []).append(value)
        step += 1
        if step % 50 == 0:
            log.info("%s: step %d, %.1f s, E/N = %.6f", label, step, elapsed, values["energy"])
        if elapsed >= wall_time or (max_steps is not None and step >= max_steps):
            break
    log.info("%s: %d steps in %.1f s", label, step, time.perf_counter() - started)
    return {key: np.asarray(value) for key, value in rows.items()}


def compare_training(cfg: DictConfig, out_dir: Path | str):
    """Train with direct sampling and with MCMC at each k under equal wall time (paper Fig. 3).

    Every run starts from the same initial weights (seeded by `seed`) and trains with
    `optim.lr` (constant; `train.stages` and `optim.schedule` are not used) and
    `sampler.n_samples` samples per step, until `compare.wall_time` seconds (sampling
    included) or `compare.max_steps` steps. MCMC runs use `compare.n_chains` chains with
    k = `compare.ks[i]` sweeps between kept samples, `compare.burn_in` burn-in sweeps on the
    first step and chains that persist across steps (moves: flips, or exchanges when H
    conserves Σσᶻ). The reference energy is exact (ED) up to COMPARE_EXACT_MAX_SITES sites,
    else the lowest moving-average energy any run found (as the paper does). Writes
    `compare_training.h5` (a group per run) and `compare_training.png`.

    Args:
        cfg: the composed `compare_training` config.
        out_dir: the run directory.

    Returns:
        `tasks.TaskResult` with a table of steps and final relative errors per run.
    """
    from naqs_cli import exact, plots
    from naqs_cli.tasks import TaskResult, run_attrs

    out_dir = Path(out_dir)
    build.validate(cfg, "compare_training")
    device = build.resolve_device(cfg.device)
    dtype = build.resolve_dtype(cfg.dtype)
    lattice = build.build_lattice(cfg)
    hamiltonian = build.build_hamiltonian(cfg, lattice)
    torch.manual_seed(int(cfg.seed))
    initial = build.build_model(cfg, lattice, device, dtype)
    initial_state = {k: v.clone() for k, v in unwrap(initial).state_dict().items()}
    n_params = sum(p.numel() for p in initial.parameters())
    del initial
    compare = cfg.compare
    n_samples = int(cfg.sampler.n_samples)
    wall_time = float(compare.wall_time)
    max_steps = None if compare.max_steps is None else int(compare.max_steps)

    runs: dict[str, dict[str, Any]] = {}
    direct = DirectSampler(
        n_samples=n_samples,
        method=str(cfg.sampler.get("method", "cached")),
        seed=int(cfg.seed),
        device=device,
    )
    log.info(
        "compare training on %s: %s with %d parameters, %d samples/step, %.0f s per run",
        hamiltonian.describe(),
        target_kind(cfg.model),
        n_params,
        n_samples,
        wall_time,
    )
    columns = _train_run(
        cfg, hamiltonian, lattice, initial_state, direct, n_samples, wall_time, max_steps, "direct"
    )
    runs["direct"] = {"columns": columns, "attrs": {"label": "direct", "sampler": "direct"}}
    for k in compare.ks:
        name = f"mcmc_k{int(k)}"
        sampler = MetropolisSampler(
            hamiltonian=hamiltonian,
            n_samples=n_samples,
            n_chains=int(compare.n_chains),
            sweeps_between_samples=int(k),
            burn_in=int(compare.burn_in),
            init=str(compare.init),
            move="auto",
            seed=int(cfg.seed),
            device=device,
        )
        columns = _train_run(
            cfg, hamiltonian, lattice, initial_state, sampler, n_samples, wall_time, max_steps, name
        )
        attrs = {
            "label": f"MCMC k={int(k)}",
            "sampler": "mcmc",
            "k": int(k),
            "n_chains": int(compare.n_chains),
            "burn_in": int(compare.burn_in),
            "move": sampler.move,
        }
        runs[name] = {"columns": columns, "attrs": attrs}

    if lattice.n_sites <= COMPARE_EXACT_MAX_SITES:
        result = exact.ground_state(hamiltonian, method="auto")
        reference, source = result.energy_per_site, f"exact ({result.method})"
    else:
        best_name, reference = "", math.inf
        for name, run in runs.items():
            energy = run["columns"]["energy"]
            smooth = _running_mean(energy, smoothing_window(energy.size))
            if np.isfinite(smooth).any() and np.nanmin(smooth) < reference:
                best_name, reference = name, float(np.nanmin(smooth))
        source = f"lowest moving-average energy found (run {best_name})"

    h5 = out_dir / "compare_training.h5"
    out_dir.mkdir(parents=True, exist_ok=True)
    h5.unlink(missing_ok=True)
    table: list[dict[str, Any]] = []
    for name, run in runs.items():
        columns = run["columns"]
        energy = columns["energy"]
        columns["relative_error"] = (energy - reference) / abs(reference)
        window = smoothing_window(energy.size)
        final_energy = float(np.nanmean(energy[-window:]))
        final = {
            "steps": int(energy.size),
            "wall_time": float(columns["wall_time"][-1]),
            "final_energy": final_energy,
            "final_relative_error": (final_energy - reference) / abs(reference),
            "final_energy_variance": float(np.nanmean(columns["energy_variance"][-window:])),
            "final_window": window,
        }
        if "acceptance" in columns:
            final["mean_acceptance"] = float(np.nanmean(columns["acceptance"]))
            final["mean_tau"] = float(np.nanmean(columns["tau"]))
        store.write_group(h5, name, columns, {**run["attrs"], **final})
        table.append({"name": name, **run["attrs"], **final})
    attrs = run_attrs(cfg, device)
    attrs.update(
        reference_energy=reference,
        reference_source=source,
        hamiltonian=hamiltonian.describe(),
        wall_time_budget=wall_time,
        n_parameters=n_params,
    )
    store.write_attrs(h5, attrs)
    png = out_dir / "compare_training.png"
    try:
        plots.compare_training_plot(h5, png)
    except Exception as err:  # a plot must never lose the numbers
        log.warning("could not draw %s: %s", png.name, err)

    lines = [
        f"naqs compare training: {hamiltonian.describe()}, {target_kind(cfg.model)}"
        f" ({n_params} parameters), {n_samples} samples/step, budget {wall_time:g} s per run"
        + (f" or {max_steps} steps" if max_steps is not None else ""),
        f"  reference energy {reference:.8f} ({source})",
        f"  {'run':<12}{'steps':>7}{'wall s':>9}{'s/step':>9}{'final E/N':>14}"
        f"{'rel. error':>12}{'Var/N²':>11}{'accept':>8}{'τ(E)':>7}",
    ]
    for r in table:
        lines.append(
            f"  {r['name']:<12}{r['steps']:>7d}{r['wall_time']:>9.1f}"
            f"{r['wall_time'] / max(r['steps'], 1):>9.3f}{r['final_energy']:>14.6f}"
            f"{r['final_relative_error']:>12.2e}{r['final_energy_variance']:>11.2e}"
            f"{r.get('mean_acceptance', math.nan):>8.3f}{r.get('mean_tau', math.nan):>7.2f}"
        )
    lines.append(
        "  (final values: mean over the last ~5 % of steps; rel. error = (E − E_ref)/|E_ref|)"
    )
    lines.append(f"  outputs: {h5}, {png}")
    summary = "\n".join(lines)
    log.info("\n%s", summary)
    values = {
        "reference_energy": reference,
        "reference_source": source,
        "runs": {r["name"]: r for r in table},
    }
    return TaskResult(summary, out_dir, values)
