"""`naqs compare training` (paper Fig. 3): direct versus MCMC-driven training under equal wall time.

Every run is an ordinary training run: the config of `compare training` becomes one `train`
config per run (`run_configs`), each trained by the `Trainer` of `naqs train` (non-finite
guard, rollbacks, history, checkpoints) in `runs/<name>/` of the output directory, which
`naqs train resume=...` can continue. The per-step columns of `compare_training.h5` are read
back from each run's `history.h5`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from naqs_cli import build, store, validation
from naqs_cli.build import TrainingSetup, target_kind
from naqs_cli.config import MCMCSamplerConfig
from naqs_cli.errors import ConfigError, InterruptedRunError, TrainingDivergedError
from naqs_cli.results import TaskResult
from naqs_cli.train.loop import Trainer, run_catching_signals

log = logging.getLogger(__name__)

#: Exact references (ED) for `compare training` up to this many sites; beyond, the lowest
#: energy any run found (paper Fig. 3).
COMPARE_EXACT_MAX_SITES = 20
#: `train.steps` (and `train.checkpoint_every`) of a run without `compare.max_steps`: the
#: wall time ends it first.
UNBOUNDED_STEPS = 10**9
#: Per-step columns of every run group, read from the run's history.h5.
RUN_COLUMNS = (
    "step",
    "wall_time",
    "energy",
    "energy_err",
    "energy_variance",
    "energy_variance_err",
    "n_samples",
)
#: Further columns of a Markov-chain run (acceptance rate; τ and split R̂ of the energy).
CHAIN_COLUMNS = ("acceptance", "tau", "r_hat")
#: Subdirectory of the output directory holding one training run per sampler.
RUNS_DIR = "runs"


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


def run_config(cfg: DictConfig, k: int | None = None) -> DictConfig:
    """Return the `train` config of one run of the comparison.

    The run keeps the model, Hamiltonian, optimizer, seed (so every run starts from the same
    weights) and `sampler.n_samples` of `cfg`, and trains at the constant `optim.lr`
    (`train.stages` and `optim.schedule` are not used) for `compare.wall_time` seconds of the
    loop's clock (`train.time_budget`: sampling included) or `compare.max_steps` steps.
    Checkpoints are written only at the start and the end; there is no final evaluation.

    Args:
        cfg: the composed `compare_training` config.
        k: sweeps between kept samples of an MCMC run (`compare.n_chains` chains, moves
            `auto`); None for the direct-sampling run.
    """
    raw = OmegaConf.to_container(cfg, resolve=True)
    compare = raw.pop("compare")
    steps = UNBOUNDED_STEPS if compare["max_steps"] is None else int(compare["max_steps"])
    raw["resume"] = None
    raw["optim"]["schedule"] = "constant"
    raw["train"].update(
        stages=None,
        steps=steps,
        time_budget=float(compare["wall_time"]),
        final_samples=0,
        checkpoint_every=steps,
    )
    if k is not None:
        raw["sampler"] = {
            "_target_": MCMCSamplerConfig._target_,
            "n_samples": int(cfg.sampler.n_samples),
            "n_chains": int(compare["n_chains"]),
            "sweeps_between_samples": int(k),
            "burn_in": int(compare["burn_in"]),
            "init": str(compare["init"]),
            "move": "auto",
        }
    return OmegaConf.create(raw)


def run_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """Return the validated `train` config of every run: `direct`, then `mcmc_k<k>` per k.

    Raises:
        ConfigError: a run's config is invalid (naming the run).
    """
    runs = {"direct": run_config(cfg)}
    runs.update({f"mcmc_k{int(k)}": run_config(cfg, int(k)) for k in cfg.compare.ks})
    for name, run_cfg in runs.items():
        try:
            validation.validate(run_cfg, "train")
        except ConfigError as err:
            raise ConfigError(f"{err} (in run {name}, which compare training builds)") from None
    return runs


def _check_new_runs(out_dir: Path, names: list[str]) -> None:
    """Refuse an output directory that already holds runs of a comparison."""
    for name in names:
        for file in ("history.h5", "checkpoints/last.pt"):
            if (out_dir / RUNS_DIR / name / file).exists():
                raise ConfigError(
                    f"hydra.run.dir={out_dir}: already holds compare training runs"
                    f" ({RUNS_DIR}/{name}/{file}); choose another directory"
                )


def _train(setup: TrainingSetup, run_dir: Path, name: str) -> Trainer:
    """Train one run with the loop of `naqs train` (no final evaluation); return its trainer.

    Raises:
        InterruptedRunError: SIGINT/SIGTERM (the run's checkpoint written) or a second signal.
        TrainingDivergedError: non-finite steps persisted through every rollback.
    """
    trainer = Trainer(setup, run_dir)
    try:
        run_catching_signals(trainer)
    except InterruptedRunError as err:
        raise InterruptedRunError(
            f"compare training stopped in run {name}: {err}", exit_code=err.exit_code
        ) from None
    except TrainingDivergedError as err:
        raise TrainingDivergedError(f"compare training, run {name}: {err}") from None
    log.info("%s: %d steps in %.1f s (%s)", name, trainer.step, trainer.elapsed, trainer.stopped)
    return trainer


def _run_columns(history: dict[str, np.ndarray], chains: bool) -> dict[str, np.ndarray]:
    """Return the per-step columns of a run group from the run's history."""
    names = RUN_COLUMNS + (CHAIN_COLUMNS if chains else ())
    return {name: np.asarray(history[name]) for name in names}


def compare_training(cfg: DictConfig, out_dir: Path | str) -> TaskResult:
    """Train with direct sampling and with MCMC at each k under equal wall time (paper Fig. 3).

    Every run starts from the same initial weights (seeded by `seed`) and trains with
    `optim.lr` (constant) and `sampler.n_samples` samples per step, until `compare.wall_time`
    seconds of training (sampling included) or `compare.max_steps` steps (`run_config`). MCMC
    runs use `compare.n_chains` chains with k = `compare.ks[i]` sweeps between kept samples,
    `compare.burn_in` burn-in sweeps on the first step and chains that persist across steps
    (moves: flips, or exchanges when H conserves Σσᶻ). The reference energy is exact (ED) up
    to COMPARE_EXACT_MAX_SITES sites, else the lowest moving-average energy any run found (as
    the paper does). Writes `compare_training.h5` (a group per run), `compare_training.png`
    and each run's directory `runs/<name>/` (history.h5, checkpoints).

    Args:
        cfg: the composed `compare_training` config.
        out_dir: the run directory.

    Returns:
        A table of steps and final relative errors per run.

    Raises:
        ConfigError: invalid config, or `out_dir` already holds the runs of a comparison.
        InterruptedRunError: SIGINT/SIGTERM during a run.
        TrainingDivergedError: a run diverged through every rollback.
    """
    out_dir = Path(out_dir)
    validation.validate(cfg, "compare_training")
    configs = run_configs(cfg)
    _check_new_runs(out_dir, list(configs))
    compare = cfg.compare
    n_samples = int(cfg.sampler.n_samples)
    wall_time = float(compare.wall_time)
    max_steps = None if compare.max_steps is None else int(compare.max_steps)

    runs: dict[str, dict[str, Any]] = {}
    hamiltonian, n_params = None, 0
    for name, run_cfg in configs.items():
        chains = name != "direct"
        setup = build.build_training(run_cfg)
        if hamiltonian is None:
            hamiltonian = setup.hamiltonian
            n_params = sum(p.numel() for p in setup.state.model.parameters())
            log.info(
                "compare training on %s: %s with %d parameters, %d samples/step, %.0f s per run",
                hamiltonian.describe(),
                target_kind(cfg.model),
                n_params,
                n_samples,
                wall_time,
            )
        trainer = _train(setup, out_dir / RUNS_DIR / name, name)
        history = store.read_history(trainer.out_dir / "history.h5")
        attrs: dict[str, Any] = {"label": "direct", "sampler": "direct"}
        if chains:
            k = int(run_cfg.sampler.sweeps_between_samples)
            attrs = {
                "label": f"MCMC k={k}",
                "sampler": "mcmc",
                "k": k,
                "n_chains": int(compare.n_chains),
                "burn_in": int(compare.burn_in),
                "move": trainer.sampler.move,
            }
        runs[name] = {"columns": _run_columns(history, chains), "attrs": attrs}

    reference, source = _reference(hamiltonian, runs)
    h5 = out_dir / "compare_training.h5"
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
    device = build.resolve_device(cfg.device)
    attrs = build.run_attrs(build.config_yaml(cfg), int(cfg.seed), device)
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
        from naqs_cli import plots

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
    lines.append(f"  outputs: {h5}, {png}, {out_dir / RUNS_DIR}/<run>/ (resumable training runs)")
    summary = "\n".join(lines)
    log.info("\n%s", summary)
    values = {
        "reference_energy": reference,
        "reference_source": source,
        "runs": {r["name"]: r for r in table},
    }
    return TaskResult(summary, out_dir, values)


def _reference(hamiltonian, runs: dict[str, dict[str, Any]]) -> tuple[float, str]:
    """Return the reference energy per site and its source.

    Exact (cached on disk) up to COMPARE_EXACT_MAX_SITES sites, else the lowest moving-average
    energy of any run.
    """
    if hamiltonian.n_sites <= COMPARE_EXACT_MAX_SITES:
        from naqs_cli.reference import cached_ground_state

        result = cached_ground_state(hamiltonian, method="auto")
        return result.energy_per_site, f"exact ({result.method})"
    best_name, reference = "", math.inf
    for name, run in runs.items():
        energy = run["columns"]["energy"]
        smooth = _running_mean(energy, smoothing_window(energy.size))
        if np.isfinite(smooth).any() and np.nanmin(smooth) < reference:
            best_name, reference = name, float(np.nanmin(smooth))
    return reference, f"lowest moving-average energy found (run {best_name})"
