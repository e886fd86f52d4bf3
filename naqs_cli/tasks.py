"""The subcommands as plain functions `(cfg, out_dir) -> TaskResult` that tests call directly.

Each task validates its config, turns it into objects once (`build`), and hands the objects
to the layer that does the work (`train`, `evaluate`, `exact`, `compare`). Nothing here
touches HydraConfig or the working directory: `cli.py` passes the run directory. Tasks log to
the `naqs_cli` loggers (Hydra files them in `<task>.log`) and return the text the CLI prints.
"""

from __future__ import annotations

import logging
import shlex
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from naqs_cli import build, distributed, store, validation
from naqs_cli.compose import evaluate_config, prepare_resume
from naqs_cli.errors import InterruptedRunError
from naqs_cli.evaluate import (
    Trained,
    evaluate_model,
    format_table,
    load_trained,
    write_evaluation,
)
from naqs_cli.results import TaskResult
from naqs_cli.train.final import finish
from naqs_cli.train.loop import Trainer, run_catching_signals
from naqs_cli.train.resume import check_new_run_dir, load_init_weights
from naqs_cli.train.signals import SignalCatcher

log = logging.getLogger(__name__)

__all__ = ["TaskResult", "compare_sampling", "compare_training", "evaluate", "exact", "train"]


def check_init_from(cfg: DictConfig) -> None:
    """Check that `train.init_from`, if set, loads into the model `cfg` builds (on the CPU).

    Raises:
        CheckpointError: the file is unreadable or its weights do not fit.
    """
    if not cfg.train.get("init_from"):
        return
    lattice = build.build_lattice(cfg)
    model = build.build_model(cfg, lattice, "cpu", build.resolve_dtype(cfg.dtype))
    load_init_weights(model, cfg.train.init_from, bool(cfg.allow_unverified_checkpoint))


def train(
    cfg: DictConfig, out_dir: Path | str, overrides: Sequence[str] | None = None
) -> TaskResult:
    """Train a NAQS on a ground-state problem; write history, checkpoints, plot and summary.

    Under torchrun every rank calls it with the same arguments (the same `out_dir`); rank 0
    alone writes, every rank returns the summary.

    Args:
        cfg: the composed `train` config.
        out_dir: the run directory (a resumed run continues in its own directory instead).
        overrides: the command line's overrides, applied on top of a resumed checkpoint's
            config (with `resume` set).

    Raises:
        InterruptedRunError: SIGINT/SIGTERM (checkpoint written) or a second signal.
        TrainingDivergedError: non-finite steps persisted through every rollback.
        OSError: a checkpoint or history write failed (the previous checkpoint is kept).
        PeerFailedError: on ranks other than 0, when rank 0 failed to write.
    """
    out_dir = Path(out_dir)
    checkpoint, path = None, None
    if cfg.get("resume"):
        allow = bool(cfg.get("allow_unverified_checkpoint", False))
        cfg, path, checkpoint = prepare_resume(cfg.resume, overrides, allow)
        out_dir = store.run_dir_of(path)
    else:
        validation.validate(cfg, "train")
        distributed.on_main(lambda: check_new_run_dir(out_dir), share_result=False)
    setup = build.build_training(cfg)
    trainer = Trainer(setup, out_dir, checkpoint, path)
    log.info(
        "training %s on %s (%d parameters), %d steps%s, device %s, %s, %d rank(s)",
        setup.model_kind,
        setup.hamiltonian.describe(),
        sum(p.numel() for p in trainer.model.parameters()),
        trainer.total_steps,
        ""
        if setup.settings.time_budget is None
        else f" or {setup.settings.time_budget:g} s of training",
        setup.runtime.device,
        str(setup.runtime.dtype).removeprefix("torch."),
        setup.runtime.world_size,
    )
    run_catching_signals(trainer)
    with SignalCatcher(immediate=True) as catcher:
        trainer.catcher = catcher
        try:
            return finish(trainer)
        except KeyboardInterrupt:
            name = catcher.signal_name or "SIGINT"
            raise InterruptedRunError(
                f"{name}: stopped during the final evaluation; training finished at step"
                f" {trainer.step} and its checkpoints are saved in {trainer.out_dir}. Evaluate"
                f" with: naqs evaluate {shlex.quote(str(trainer.out_dir))}",
                exit_code=128 + int(catcher.signum or signal.SIGINT),
            ) from None


def evaluation_model(cfg: DictConfig) -> tuple[DictConfig, Trained]:
    """Return the config and the trained model `naqs evaluate` works with.

    The CLI calls this before Hydra creates anything (so weights that do not fit their own
    config write nothing), and `evaluate` again.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, foreign, its stored config
            unusable or its weights do not fit.
        ConfigError: an override the stored model cannot take (the message names the file).
    """
    run_cfg, path, state = evaluate_config(cfg)
    run_cfg.seed = int(cfg.seed)  # the evaluation's own sampling stream
    return run_cfg, load_trained(build.build_training(run_cfg), path, state)


def evaluate(cfg: DictConfig, out_dir: Path | str) -> TaskResult:
    """Rebuild a trained model from its checkpoint and estimate every observable.

    Only `sampler`, `model.symmetry`, `device`, `dtype`, `n_samples`, `seed` and `chunk_size`
    may differ from the stored config (the config schema refuses other keys).
    """
    out_dir = Path(out_dir)
    run_cfg, trained = evaluation_model(cfg)
    setup = trained.setup
    values = evaluate_model(
        trained.model,
        setup.hamiltonian,
        setup.state.sampler,
        int(cfg.n_samples),
        int(cfg.chunk_size),
    )
    symmetry = str(run_cfg.model.symmetry)
    h5, result, reference = write_evaluation(trained, values, out_dir, setup.sampler_kind, symmetry)
    title = (
        f"naqs evaluate: {trained.path} (step {trained.step}), {setup.hamiltonian.describe()},"
        f" sampler={setup.sampler_kind}, symmetry={symmetry}, {values['n_samples']} samples"
    )
    summary = format_table(values, reference, title) + f"\n  outputs: {h5}"
    log.info("\n%s", summary)
    return TaskResult(summary, out_dir, result)


def exact(cfg: DictConfig, out_dir: Path | str) -> TaskResult:
    """Compute the exact ground-state energy per site and observables; write `exact.h5`."""
    from naqs_cli.reference import cached_ground_state

    out_dir = Path(out_dir)
    validation.validate(cfg, "exact")
    lattice = build.build_lattice(cfg)
    hamiltonian = build.build_hamiltonian(cfg, lattice)
    started = time.perf_counter()
    result = cached_ground_state(hamiltonian, method=cfg.method)
    seconds = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    h5 = out_dir / "exact.h5"
    values = {"energy": result.energy_per_site, "energy_total": result.energy}
    values.update(result.observables)
    attrs = build.run_attrs(build.config_yaml(cfg), int(cfg.get("seed", 0)), torch.device("cpu"))
    attrs.update(method=result.method, sector=result.sector, seconds=seconds)
    for name, why in result.missing.items():
        attrs[f"missing_{name}"] = why
    store.write_group(h5, "exact", values)
    store.write_attrs(h5, attrs)
    observables = "  ".join(f"{k}={v:.8f}" for k, v in result.observables.items())
    line = (
        f"{hamiltonian.describe()}: E0/N = {result.energy_per_site:.12f}"
        f" (E0 = {result.energy:.10f}) [{result.method}, {result.sector}]"
        + (f"  {observables}" if observables else "")
    )
    if result.missing:
        line += "\n  not available with " + result.method + ": " + ", ".join(result.missing)
    line += f"\n  outputs: {h5}"
    log.info(line)
    return TaskResult(line, out_dir, values)


def compare_sampling(cfg: DictConfig, out_dir: Path | str) -> TaskResult:
    """Compare direct sampling with Markov chains started all-up (paper Fig. 2)."""
    from naqs_cli import compare

    return compare.compare_sampling(cfg, out_dir)


def compare_training(cfg: DictConfig, out_dir: Path | str) -> TaskResult:
    """Train with direct sampling and with MCMC at several k under equal wall time (Fig. 3)."""
    from naqs_cli import compare

    return compare.compare_training(cfg, out_dir)
