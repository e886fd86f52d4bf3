"""The subcommands as plain functions `(cfg, out_dir) -> TaskResult` that tests call directly.

Nothing here touches HydraConfig or the working directory: `cli.py` passes the run directory.
Tasks log to the `naqs_cli` loggers (Hydra files them in `<task>.log`) and return the text the
CLI prints.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

import naqs_cli
from naqs_cli import build, distributed, store
from naqs_cli.build import ConfigError, target_kind, unwrap
from naqs_cli.limits import ED_MAX_SITES
from naqs_cli.samplers import Samples
from naqs_cli.vmc import (
    LocalEnergy,
    batch_local_energy,
    estimate_observables,
    observable_estimates,
    to_floats,
    train_step,
)

log = logging.getLogger(__name__)

#: History columns besides the observables.
BOOK_KEEPING = ("step", "stage", "n_samples", "wall_time", "lr", "grad_norm")
#: Observables (each stored with `<name>_err`).
OBSERVABLES = (
    "energy",
    "energy_variance",
    "v_score",
    "abs_magnetization",
    "magnetization",
    "magnetization_sq",
)
#: Keys of a checkpoint's config that `resume` may not change (they define the state).
FROZEN_ON_RESUME = ("lattice", "ham", "model", "sampler._target_")
#: Config groups: naming another option than the stored one is refused on resume.
RESUME_GROUPS = ("lattice", "ham", "model", "sampler", "optim", "experiment")
#: Resuming on another number of ranks reseeds the samplers with seed + this × step (+ 1000·rank).
RESEED_PER_STEP = 1_000_003


class NotImplementedYetError(Exception):
    """A subcommand that a later issue builds."""


class TrainingDivergedError(RuntimeError):
    """Non-finite energies or gradients persisted through every rollback (exit code 3)."""

    exit_code = 3


class InterruptedRunError(Exception):
    """SIGINT/SIGTERM stopped training; the message says the step reached and how to resume.

    Attributes:
        exit_code: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TaskResult:
    """What a task hands back: the text the CLI prints and the files it wrote."""

    summary: str
    out_dir: Path
    values: dict[str, Any] = field(default_factory=dict)


# --- shared helpers -----------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(naqs_cli.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_attrs(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Return the root attributes every HDF5 output carries."""
    return {
        "naqs_version": naqs_cli.__version__,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "seed": int(cfg.get("seed", 0)),
        "torch_version": str(torch.__version__),
        "device": str(device),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


@dataclass(frozen=True)
class Reference:
    """A reference energy per site and where it comes from."""

    energy: float
    source: str
    observables: dict[str, float] = field(default_factory=dict)


def find_reference(cfg: DictConfig, hamiltonian) -> Reference | None:
    """Return the exact ground-state energy when computable (N ≤ 24 or 1D TFIM), else the
    literature value of `cfg.reference`, else None."""
    from naqs_cli import exact

    lattice = hamiltonian.lattice
    one_d_tfim = hamiltonian.name == "tfim" and lattice.Ly == 1 and float(hamiltonian.J) > 0
    if lattice.n_sites <= ED_MAX_SITES or one_d_tfim:
        result = exact.ground_state(hamiltonian, method="auto")
        return Reference(result.energy_per_site, f"exact ({result.method})", result.observables)
    ref = cfg.get("reference")
    if ref is None:
        return None
    if ref.get("table") and hamiltonian.name == "tfim":
        for row in ref.table:
            if math.isclose(float(row[0]), float(hamiltonian.gamma), abs_tol=1e-9):
                observables = {"abs_magnetization": float(row[3])} if len(row) > 3 else {}
                return Reference(float(row[1]), ref.source or "reference", observables)
    if ref.get("energy") is not None:
        return Reference(float(ref.energy), ref.source or "reference")
    return None


def relative_error(energy: float, reference: Reference | None) -> float:
    """Return the signed relative error (E − E_ref)/|E_ref| (NaN without a reference)."""
    if reference is None or reference.energy == 0:
        return math.nan
    return (energy - reference.energy) / abs(reference.energy)


def _cat_samples(parts: Sequence[Samples]) -> Samples:
    first = parts[0]
    return Samples(
        x=torch.cat([p.x for p in parts]),
        weights=None if first.weights is None else torch.cat([p.weights for p in parts]),
        log_psi=torch.cat([p.log_psi for p in parts]),
        n_chains=first.n_chains,
        full_basis=first.full_basis,
    )


def evaluate_model(
    model: torch.nn.Module,
    hamiltonian,
    sampler,
    n_samples: int,
    chunk_size: int,
) -> dict[str, float]:
    """Estimate every observable of `model` with `n_samples` samples, drawn in chunks.

    On several ranks (a collective: every rank calls it with its own sampler) each rank draws
    its share of the `n_samples` and the statistics are those of all of them.

    Returns the per-site observables of `vmc.estimate_observables` plus `n_samples`.
    """
    batches: list[Samples] = []
    energies: list[LocalEnergy] = []
    if getattr(sampler, "basis", None) is not None:  # fullsum: one exact pass
        batch = sampler.sample(model)
        e_loc = batch_local_energy(model, hamiltonian, batch)
        values = estimate_observables(batch, e_loc, hamiltonian)
        values["n_samples"] = int(sampler.basis.shape[0])
        return values
    start, stop = distributed.split(n_samples)
    remaining = stop - start
    while remaining > 0:
        size = min(remaining, chunk_size)
        batch = sampler.sample(model, size)
        batches.append(batch)
        energies.append(batch_local_energy(model, hamiltonian, batch, chunk_size=chunk_size))
        remaining -= size
    if not batches:  # more ranks than samples: this rank contributes none
        x = torch.zeros(0, hamiltonian.n_sites, dtype=torch.int8, device=sampler.generator.device)
        empty = torch.zeros(0, dtype=torch.complex128, device=x.device)
        batches.append(Samples(x=x, log_psi=empty))
        energies.append(LocalEnergy(empty, empty))
    batch = _cat_samples(batches)
    e_loc = LocalEnergy(
        torch.cat([e.total for e in energies]), torch.cat([e.off_diagonal for e in energies])
    )
    values = estimate_observables(batch, e_loc, hamiltonian)
    values["n_samples"] = sum(distributed.all_gather_object(batch.n_samples))
    return values


def format_table(values: dict[str, float], reference: Reference | None, title: str) -> str:
    """Return a one-screen table of observables with errors and the relative energy error."""
    lines = [title]
    names = [n for n in values if not n.endswith("_err") and n not in ("n_samples", "tau")]
    for name in names:
        value = values[name]
        err = values.get(f"{name}_err")
        text = f"{value: .8f}" if isinstance(value, float) else f"{value}"
        if err is not None and math.isfinite(err):
            text += f" ± {err:.1e}"
        lines.append(f"  {name:<24}{text}")
    if reference is not None:
        rel = relative_error(values["energy"], reference)
        lines.append(f"  {'reference energy':<24}{reference.energy: .8f}  ({reference.source})")
        lines.append(f"  {'relative error':<24}{rel: .3e}")
    return "\n".join(lines)


# --- train --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """A contiguous block of steps with one batch size and base learning rate."""

    start: int
    steps: int
    n_samples: int
    lr: float


def make_stages(cfg: DictConfig) -> list[Stage]:
    """Return the stages of `train.stages`, or one stage from the single keys."""
    raw = cfg.train.stages
    if raw is None:
        raw = [{"steps": cfg.train.steps, "n_samples": cfg.sampler.n_samples, "lr": cfg.optim.lr}]
    stages, start = [], 0
    for s in raw:
        stages.append(Stage(start, int(s["steps"]), int(s["n_samples"]), float(s["lr"])))
        start += int(s["steps"])
    return stages


def stage_at(stages: Sequence[Stage], step: int) -> tuple[int, Stage]:
    """Return (index, stage) of the stage that holds `step`."""
    for i, stage in enumerate(stages):
        if step < stage.start + stage.steps:
            return i, stage
    return len(stages) - 1, stages[-1]


def lr_at(cfg: DictConfig, stage: Stage, step: int, lr_scale: float) -> float:
    """Return the learning rate of `step` under `optim.schedule` within its stage."""
    t, total = step - stage.start, max(stage.steps, 1)
    schedule = cfg.optim.schedule
    if schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    elif schedule == "step":
        factor = float(cfg.optim.step_factor) ** (t // int(cfg.optim.step_every))
    else:
        factor = 1.0
    return stage.lr * factor * lr_scale


def resume_config(stored: dict, overrides: Sequence[str] | None) -> DictConfig:
    """Return a checkpoint's config with the command line's overrides applied.

    Group switches and changes of lattice, Hamiltonian, model or sampler kind are refused:
    they would not continue the same run (naming a group's stored option again is harmless).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = OmegaConf.create(stored)
    if not overrides:
        cfg.resume = None
        return cfg
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    for override in parsed:
        key = override.key_or_group
        if key in ("resume",) or key.startswith("hydra"):
            continue
        if override.is_sweep_override():
            raise ConfigError(f"{key}: a resumed run takes single values, not a sweep")
        if override.is_delete():
            raise ConfigError(f"~{key}: a resumed run cannot delete keys of its stored config")
        if key in RESUME_GROUPS:
            stored_node = cfg.get(key)
            same = isinstance(stored_node, DictConfig) and key != "lattice"
            if same and target_kind(stored_node) == str(override.value()):
                continue
            raise ConfigError(
                f"{key}={override.value()}: a resumed run keeps the checkpoint's {key}; start a"
                " new run (train.init_from=CHECKPOINT reuses the weights)"
            )
        frozen = next((f for f in FROZEN_ON_RESUME if key == f or key.startswith(f + ".")), None)
        if frozen is not None:
            raise ConfigError(
                f"{key}: a resumed run keeps the checkpoint's {frozen}; start a new run"
                " (train.init_from=CHECKPOINT reuses the weights)"
            )
        OmegaConf.update(cfg, key, override.value(), merge=True)
    cfg.resume = None
    return cfg


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


@contextlib.contextmanager
def _stored_config_errors(path: Path, verb: str):
    """Name the checkpoint in config errors; report an unusable stored config as a bad file."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{err} ({verb} {path})") from None
    except (OmegaConfBaseException, AttributeError, KeyError, TypeError, ValueError) as err:
        raise store.CheckpointError(
            f"{path}: its stored config cannot be used ({_first_line(err)})"
        ) from None


def prepare_resume(
    resume: str, overrides: Sequence[str] | None
) -> tuple[DictConfig, Path, dict[str, Any]]:
    """Load the checkpoint of `resume=`, apply the overrides and validate the result.

    The CLI calls this before Hydra creates anything, and `train` again.

    Args:
        resume: a checkpoint file or a run directory.
        overrides: the command line's overrides (those of the stored config may change).

    Returns:
        (the config to continue with, the checkpoint file, the checkpoint's state).

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, foreign or its config unusable.
        ConfigError: an override the resumed run cannot take (the message names the file).
    """
    build.validate_path("resume", resume)
    path = store.resolve_checkpoint(resume)
    state = store.load_checkpoint(path)
    with _stored_config_errors(path, "resuming"):
        cfg = resume_config(state["config"], overrides)
        build.validate(cfg, "train")
    stages = make_stages(cfg)
    total = stages[-1].start + stages[-1].steps
    if state["step"] > total:
        key = "train.stages" if cfg.train.stages is not None else "train.steps"
        raise ConfigError(
            f"{key}: {total} steps in all, but {path} is already at step {state['step']};"
            f" give at least {state['step']}"
        )
    return cfg, path, state


def check_new_run_dir(out_dir: Path | str) -> None:
    """Refuse to start a new run in a directory that already holds one.

    Raises:
        ConfigError: `out_dir` holds history.h5 or checkpoints/last.pt.
    """
    out_dir = Path(out_dir)
    for name in ("checkpoints/last.pt", "history.h5"):
        if (out_dir / name).exists():
            raise ConfigError(
                f"hydra.run.dir={out_dir}: already holds a training run ({name}); continue it"
                f" with: {resume_command(out_dir)}, or choose another directory"
            )


def load_init_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load the weights of checkpoint `path` into `model` (`train.init_from`).

    Raises:
        CheckpointError: the file is unreadable or its weights do not fit the model.
    """
    state = store.load_checkpoint(path)
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        first = lines[1] if len(lines) > 1 else _first_line(err)
        raise store.CheckpointError(
            f"train.init_from={path}: its weights do not fit this model ({first[:200]})"
        ) from None


def check_init_from(cfg: DictConfig) -> None:
    """Check that `train.init_from`, if set, loads into the model `cfg` builds (on the CPU).

    Raises:
        CheckpointError: the file is unreadable or its weights do not fit.
    """
    if not cfg.train.get("init_from"):
        return
    lattice = build.build_lattice(cfg)
    model = build.build_model(cfg, lattice, "cpu", build.resolve_dtype(cfg.dtype))
    load_init_weights(model, cfg.train.init_from)


def resume_command(out_dir: Path) -> str:
    """Return the shell command that continues the run in `out_dir` (on as many ranks)."""
    resume = shlex.quote(f"resume={out_dir}")
    ranks = distributed.world_size()
    if ranks > 1:
        return f"torchrun --nproc_per_node={ranks} -m naqs_cli train {resume}"
    return f"naqs train {resume}"


class _SignalCatcher:
    """Turn SIGINT/SIGTERM into a flag the training loop checks after each step.

    A second signal (with `immediate`, the first) stops at once by raising KeyboardInterrupt,
    except inside `critical()` blocks (HDF5 writes, checkpoint writes), which it lets finish
    first.
    """

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.signal_name: str | None = None
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._critical = 0
        self._abort = False

    def __enter__(self) -> _SignalCatcher:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signal_name is None
        if first:
            self.signal_name = signal.Signals(signum).name
            self.signum = signum
        if first and not self.immediate:
            return
        if self._critical:
            self._abort = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        """Defer a second signal's immediate stop until the block has finished."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._abort and not self._critical:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Trainer:
    """The state of one training run (model, optimizer, sampler, files); see `train`.

    Nothing is written until every checkpoint to restore or initialize from has loaded. On
    several ranks (torchrun) every rank holds the same model and optimizer and its own sampler
    (its share of the samples, chains or basis, with its own random stream); rank 0 alone writes
    files, and every decision that changes the control flow (skip, rollback, save, stop) comes
    from all-reduced values or from rank 0, so the ranks never part ways.
    """

    def __init__(
        self,
        cfg: DictConfig,
        out_dir: Path,
        checkpoint: dict | None = None,
        checkpoint_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.device = build.resolve_device(cfg.device)
        self.dtype = build.resolve_dtype(cfg.dtype)
        torch.manual_seed(cfg.seed)
        self.lattice = build.build_lattice(cfg)
        self.hamiltonian = build.build_hamiltonian(cfg, self.lattice)
        self.model = build.build_model(cfg, self.lattice, self.device, self.dtype)
        self.sampler = self._build_sampler(int(cfg.seed))
        self.n_chains = int(cfg.sampler.n_chains) if target_kind(cfg.sampler) == "mcmc" else None
        self.optimizer = build.build_optimizer(cfg, self.model)
        self.stages = make_stages(cfg)
        self.total_steps = self.stages[-1].start + self.stages[-1].steps
        self.step = 0
        self.lr_scale = 1.0
        self.best_energy = math.inf
        self.recent: list[float] = []
        self.last_values: dict[str, float] = {}
        self.elapsed = 0.0
        self.rollbacks = 0  # rollbacks since the last checkpoint past the failure point
        self.failed_at = -1  # step of the last rollback
        self.saved_step: int | None = None  # step of the last good checkpoints/last.pt
        self.params_check: torch.Tensor | None = None  # unread finiteness of the last update
        self.catcher = _SignalCatcher()
        self.ckpt_dir = out_dir / "checkpoints"
        if checkpoint is not None:
            self._restore(checkpoint, checkpoint_path or self.ckpt_dir / "last.pt")
            self.saved_step = self.step
            self._recall_best()
        elif cfg.train.init_from:
            self._init_from(cfg.train.init_from)
        self.history: store.HistoryWriter | None = distributed.on_main(
            lambda: self._open_history(resumed=checkpoint is not None), share_result=False
        )

    def _build_sampler(self, seed: int):
        return build.build_sampler(
            self.cfg, self.hamiltonian, self.device, seed, self.rank, self.world_size
        )

    def _open_history(self, resumed: bool) -> store.HistoryWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "history.h5"
        attrs = None  # a resumed run keeps the file's attributes
        if not path.exists():
            attrs = {**run_attrs(self.cfg, self.device), "world_size": self.world_size}
        history = store.HistoryWriter(path, attrs)
        if resumed:
            kept = history.truncate_from(self.step)
            log.info("resumed at step %d (%d history rows kept)", self.step, kept)
        return history

    # -- state ---------------------------------------------------------------------------
    def state(self, streams: Sequence[tuple[dict, torch.Tensor]] | None = None) -> dict[str, Any]:
        """Return the checkpoint of this state.

        Args:
            streams: every rank's (sampler state, torch RNG state), in rank order (default:
                this process's only).
        """
        streams = streams or [self._stream_state()]
        return {
            "format_version": store.CHECKPOINT_FORMAT_VERSION,
            "naqs_version": naqs_cli.__version__,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "lr_scale": self.lr_scale,
                "rollbacks": self.rollbacks,
                "failed_at": self.failed_at,
            },
            "sampler": [sampler for sampler, _ in streams],
            "step": self.step,
            "rng": [rng for _, rng in streams],
            "world_size": len(streams),
            "best_energy": self.best_energy,
            "recent_energies": list(self.recent),
            "elapsed": self.elapsed,
        }

    def _stream_state(self) -> tuple[dict, torch.Tensor]:
        return self.sampler.state_dict(), torch.get_rng_state()

    def _restore(self, state: dict, path: Path, rollback: bool = False) -> None:
        """Load a checkpoint's state; a rollback keeps the sampler, RNG, clock and best."""
        try:
            unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if not rollback:
                self._restore_streams(state)
                self.best_energy = float(state["best_energy"])
                self.elapsed = float(state.get("elapsed", 0.0))
                scheduler = state["scheduler"]
                self.lr_scale = float(scheduler["lr_scale"])
                self.rollbacks = int(scheduler.get("rollbacks", 0))
                self.failed_at = int(scheduler.get("failed_at", -1))
            self.step = int(state["step"])
            self.recent = [float(e) for e in state.get("recent_energies", [])]
            self.params_check = None
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as err:
            raise store.CheckpointError(
                f"{path}: cannot restore the training state from it ({_first_line(err)})"
            ) from None

    def _restore_streams(self, state: dict) -> None:
        """Restore each rank's sampler and torch RNG; on another number of ranks, reseed.

        The same number of ranks continues every random stream exactly. Another number
        continues the model, optimizer and schedule exactly, but the samplers are rebuilt with
        seed + RESEED_PER_STEP·step (+ 1000·rank) and the Markov chains of all ranks are
        shared out anew (see `resume_world_note`).
        """
        samplers, rngs = list(state["sampler"]), list(state["rng"])
        saved = checkpoint_world_size(state)
        if saved == self.world_size and len(samplers) == len(rngs) == saved:
            self.sampler.load_state_dict(samplers[self.rank])
            torch.set_rng_state(rngs[self.rank].cpu())
            return
        seed = int(self.cfg.seed) + RESEED_PER_STEP * int(state["step"])
        self.sampler = self._build_sampler(seed)
        torch.manual_seed(seed + 1000 * self.rank)
        chains = [s.get("x") for s in samplers if isinstance(s, dict)]
        if chains and all(torch.is_tensor(c) for c in chains):
            every = torch.cat(chains)  # rank-major: the chains in their original order
            if every.shape[0] % self.world_size == 0:
                n = every.shape[0] // self.world_size
                own = self.sampler.state_dict()
                own["x"] = every[self.rank * n : (self.rank + 1) * n]
                own["needs_burn_in"] = any(bool(s.get("needs_burn_in")) for s in samplers)
                self.sampler.load_state_dict(own)
        if distributed.is_main():  # the CLI says so on stderr; here for train.log
            log.info("%s", resume_world_note(saved, self.world_size))

    def _recall_best(self) -> None:
        """Take the best energy from best.pt when it is newer than last.pt's (a killed run)."""
        best = self.ckpt_dir / "best.pt"
        if not best.is_file():
            return
        try:
            energy = float(store.load_checkpoint(best)["best_energy"])
        except (store.CheckpointError, KeyError, TypeError, ValueError):
            return
        if math.isfinite(energy):
            self.best_energy = min(self.best_energy, energy)

    def _init_from(self, path: str) -> None:
        load_init_weights(self.model, path)
        log.info("initialized weights from %s", path)

    def _state_problems(self) -> list[str]:
        """Return the names of non-finite parameters or optimizer state (empty if none)."""
        return store.non_finite_tensors(
            {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict()}
        )

    def _params_finite(self) -> torch.Tensor:
        """Return whether every parameter is finite on every rank: a 0-dim bool device tensor.

        Nothing is read from the device here; the caller decides when to look.
        """
        flags = torch.stack([torch.isfinite(p.detach()).all() for p in self.model.parameters()])
        n_bad = (~flags).sum().to(torch.float64).reshape(1)
        if self.world_size > 1:
            n_bad = distributed.all_reduce_sum(n_bad)
        return n_bad.reshape(()) == 0

    def save(self, name: str = "last.pt") -> bool:
        """Write a checkpoint unless the state holds NaN/inf; return whether it was written.

        Every rank calls it: the ranks' sampler and RNG states are gathered into rank 0's file.

        Raises:
            OSError: the write failed (the previous file is kept); the message says how to
                resume. Other ranks raise `distributed.PeerFailedError`.
        """
        streams = distributed.gather_object(self._stream_state())
        problems = distributed.on_main(self._state_problems)
        if problems:
            if distributed.is_main():
                log.error(
                    "step %d: refusing to write %s: non-finite values in %s",
                    self.step,
                    name,
                    ", ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""),
                )
            return False
        if name == "last.pt" and self.step > self.failed_at:
            self.rollbacks = 0  # a good state past the last failure: a new incident starts over
        distributed.on_main(lambda: self._write_checkpoint(name, streams), share_result=False)
        if name == "last.pt":
            self.saved_step = self.step
        return True

    def _write_checkpoint(self, name: str, streams: Sequence[tuple[dict, torch.Tensor]]) -> None:
        try:
            with self.catcher.critical():
                store.save_checkpoint(self.ckpt_dir / name, self.state(streams))
        except OSError as err:
            kept = (
                f"the previous checkpoint (step {self.saved_step}) is kept"
                if self.saved_step is not None
                else "no checkpoint was written"
            )
            resume = (
                f"; then resume with: {resume_command(self.out_dir)}"
                if self.saved_step is not None
                else ""
            )
            raise OSError(err.errno, f"{err.strerror}; {kept}{resume}") from err

    # -- loop ----------------------------------------------------------------------------
    def run(self, catcher: _SignalCatcher) -> None:
        """Train until `total_steps`, a signal (InterruptedRunError) or divergence.

        Non-finite local energies or gradients skip the update (the row is kept with NaN
        energies); `train.max_nonfinite` of them in a row, an update that makes parameters
        non-finite, or a checkpoint refused for NaN/inf roll back to the last good checkpoint
        with the learning rate halved; more than `train.max_rollbacks` rollbacks without
        progress raise TrainingDivergedError. No checkpoint is written during a non-finite
        streak, so a rollback never returns to the state that failed.

        Host-device syncs: one per step (`train_step` reads the finiteness flags and the
        gradient norm together; the check that the previous update left the parameters finite
        rides along, unless the step logs or checkpoints, where it is read at once). Statistics
        stay on the device until the rows are flushed, every `train.log_every` steps.
        """
        cfg = self.cfg
        self.catcher = catcher
        rows: dict[str, list] = {}
        bad_in_a_row = 0
        save_due = False
        if self.step == 0 and self.saved_step is None:
            self.save()  # a good state to roll back to, and a file for resume from the start
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (sys.stdout.isatty() and distributed.is_main()),
        )
        t_start = time.perf_counter() - self.elapsed
        while self.step < self.total_steps:
            stage_index, stage = stage_at(self.stages, self.step)
            lr = lr_at(cfg, stage, self.step, self.lr_scale)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = self.sampler.sample(self.model, stage.n_samples // self.world_size)
            hook = store._test_hook("training_batch")
            if hook is not None:
                hook(self.step, batch)
            result = train_step(
                self.model,
                self.hamiltonian,
                batch,
                self.optimizer,
                chunk_size=cfg.train.chunk_size,
                grad_clip=cfg.optim.grad_clip,
                pending_check=self.params_check,
            )
            self.params_check = None
            if not result.pending_ok:  # the previous step's update, found out now
                log.error("step %d: the update made parameters non-finite", self.step - 1)
                self._flush(rows)
                self._rollback("non-finite parameters")
                bad_in_a_row, save_due = 0, False
                bar.n = self.step
                continue
            hook = store._test_hook("after_update")
            if hook is not None:
                hook(self.step, self.model)
            if result.is_finite:
                params_ok = self._params_finite()
                upcoming = self.step + 1
                look_now = (
                    save_due
                    or upcoming == self.total_steps
                    or upcoming % cfg.train.log_every == 0
                    or upcoming % cfg.train.checkpoint_every == 0
                )
                if not look_now:
                    self.params_check = params_ok  # read with the next step's flags
                elif not bool(params_ok):
                    log.error("step %d: the update made parameters non-finite", self.step)
                    self._flush(rows)
                    self._rollback("non-finite parameters")
                    bad_in_a_row, save_due = 0, False
                    bar.n = self.step
                    continue
            if not result.is_finite:
                bad_in_a_row += 1
                log.warning(
                    "step %d: non-finite %s, update skipped (%d in a row, limit %d)",
                    self.step,
                    "gradient" if result.energy_finite else "local energy",
                    bad_in_a_row,
                    cfg.train.max_nonfinite,
                )
                if bad_in_a_row >= cfg.train.max_nonfinite:
                    self._flush(rows)
                    self._rollback(f"{bad_in_a_row} non-finite steps in a row")
                    bad_in_a_row, save_due = 0, False
                    bar.n = self.step
                    continue
            else:
                bad_in_a_row = 0
            values = observable_estimates(
                batch, result.e_loc, self.hamiltonian, n_chains=self.n_chains
            )
            self.elapsed = time.perf_counter() - t_start
            row = {
                "step": self.step,
                "stage": stage_index,
                "n_samples": self._n_total(batch),
                "wall_time": self.elapsed,
                "lr": lr,
                "grad_norm": result.grad_norm,
                **values,
                **self._sampler_info(batch),
            }
            for key, value in row.items():
                rows.setdefault(key, []).append(value)
            self.step += 1
            bar.update(1)
            at_end = self.step == self.total_steps
            stopping = distributed.any_true(catcher.signal_name is not None)
            save_due = save_due or self.step % cfg.train.checkpoint_every == 0
            if self.step % cfg.train.log_every == 0 or at_end or stopping:
                self._flush(rows)
                if bad_in_a_row == 0:
                    self._maybe_save_best()
                self._log_progress(bar, lr)
            if (save_due and bad_in_a_row == 0) or at_end or stopping:
                self._flush(rows)
                if (bad_in_a_row == 0 or at_end) and not self.save():
                    self._rollback("non-finite state at a checkpoint")
                    bad_in_a_row, save_due = 0, False
                    bar.n = self.step
                    continue
                save_due = False
            if stopping:
                bar.close()
                self._stop(catcher)
        bar.close()

    def _n_total(self, batch: Samples) -> int:
        """Return the number of samples of a step over all ranks."""
        if batch.basis_part is not None:
            return int(batch.basis_part.x.shape[0])
        return batch.n_samples * self.world_size

    def _sampler_info(self, batch: Samples) -> dict[str, float]:
        """Return the sampler's numeric diagnostics (acceptance), averaged over ranks."""
        info = {k: v for k, v in batch.info.items() if isinstance(v, (int, float))}
        if info and self.world_size > 1:
            sums = distributed.all_reduce_sum(torch.tensor(list(info.values()), dtype=float))
            info = dict(zip(info, (sums / self.world_size).tolist(), strict=True))
        return info

    def _log_progress(self, bar: tqdm, lr: float) -> None:
        values = self.last_values
        if not values:
            return
        bar.set_postfix_str(
            f"E={values['energy']:.5f}±{values['energy_err']:.1e}"
            f" var={values['energy_variance']:.2e} |m|={values['abs_magnetization']:.3f}",
            refresh=False,
        )
        log.info(
            "step %d/%d  E/N = %.6f ± %.1e  var = %.3e  |m| = %.4f  lr = %.2e",
            self.step,
            self.total_steps,
            values["energy"],
            values["energy_err"],
            values["energy_variance"],
            values["abs_magnetization"],
            lr,
        )

    def _stop(self, catcher: _SignalCatcher) -> None:
        """Raise InterruptedRunError after a signal (history flushed, checkpoint written)."""
        name = catcher.signal_name or "SIGTERM"  # a rank the signal has not reached yet
        if self.saved_step == self.step:
            where = f"checkpoint and history saved in {self.out_dir}"
        else:
            where = (
                f"the last good checkpoint is at step {self.saved_step} (the last steps had"
                f" non-finite energies or gradients), history saved in {self.out_dir}"
            )
        log.warning("%s: stopped at step %d/%d", name, self.step, self.total_steps)
        raise InterruptedRunError(
            f"{name}: stopped at step {self.step}/{self.total_steps}; {where}."
            f" Resume with: {resume_command(self.out_dir)}",
            exit_code=128 + int(catcher.signum or signal.SIGTERM),
        )

    def _rows_to_host(self, rows: dict[str, list]) -> None:
        """Read the rows' device values (one sync) and note their energies for best.pt."""
        cells = [(k, i) for k, column in rows.items() for i, v in enumerate(column)]
        tensors = [(k, i) for k, i in cells if torch.is_tensor(rows[k][i])]
        if tensors:
            numbers = to_floats({f"{k}\0{i}": rows[k][i] for k, i in tensors})
            for (k, i), number in zip(tensors, numbers.values(), strict=True):
                rows[k][i] = number
        energies = rows.get("energy", [])
        for energy in energies:
            if math.isfinite(energy):
                self.recent = (self.recent + [energy])[-self.cfg.train.best_smoothing :]
        if energies:
            self.last_values = {k: column[-1] for k, column in rows.items()}

    def _flush(self, rows: dict[str, list]) -> None:
        if not rows:
            return
        self._rows_to_host(rows)

        def append() -> None:
            try:
                with self.catcher.critical():
                    self.history.append({k: np.asarray(v) for k, v in rows.items()})
            except OSError as err:
                resume = (
                    f"; the checkpoint of step {self.saved_step} is kept: resume with:"
                    f" {resume_command(self.out_dir)}"
                    if self.saved_step is not None
                    else ""
                )
                raise OSError(err.errno, f"{err.strerror}{resume}") from err

        try:
            distributed.on_main(append, share_result=False)
        finally:
            rows.clear()

    def _maybe_save_best(self) -> None:
        smoothed = math.inf
        if len(self.recent) >= min(self.cfg.train.best_smoothing, max(self.step, 1)):
            smoothed = float(np.mean(self.recent))
        smoothed = distributed.broadcast_object(smoothed)  # rank 0 decides
        if smoothed < self.best_energy:
            previous, self.best_energy = self.best_energy, smoothed
            if not self.save("best.pt"):
                self.best_energy = previous

    def _rollback(self, reason: str) -> None:
        """Return to checkpoints/last.pt with the learning rate halved (optimizer included)."""
        self.rollbacks += 1
        self.failed_at = max(self.failed_at, self.step)
        path = self.ckpt_dir / "last.pt"
        if self.rollbacks > self.cfg.train.max_rollbacks or self.saved_step is None:
            raise TrainingDivergedError(
                f"training diverged at step {self.step} ({reason}) after"
                f" {self.rollbacks - 1} rollbacks with the learning rate halved each time"
                f" (train.max_rollbacks={self.cfg.train.max_rollbacks}); the last good checkpoint"
                f" is {path} (step {self.saved_step}): lower optim.lr (now {self.cfg.optim.lr})"
                " or set optim.grad_clip and start again, e.g. with train.init_from="
                f"{path}"
            )
        state = store.load_checkpoint(path, map_location=self.device)
        self._restore(state, path, rollback=True)
        self.lr_scale *= 0.5

        def truncate() -> int:
            with self.catcher.critical():
                return self.history.truncate_from(self.step)

        kept = distributed.on_main(truncate) or 0
        log.warning(
            "%s: rolled back to step %d (%d history rows kept), learning rate halved"
            " (scale %.3g, rollback %d of at most %d)",
            reason,
            self.step,
            kept,
            self.lr_scale,
            self.rollbacks,
            self.cfg.train.max_rollbacks,
        )


def checkpoint_world_size(state: dict) -> int:
    """Return the number of ranks that wrote a checkpoint (older files: one per sampler state)."""
    return int(state.get("world_size", len(state.get("sampler", [None])) or 1))


def resume_world_note(saved: int, now: int) -> str | None:
    """Return what resuming on `now` ranks a run checkpointed on `saved` ranks does (None if
    the numbers agree)."""
    if saved == now:
        return None
    return (
        f"the checkpoint was written by {saved} rank(s) and training continues on {now}: model,"
        " optimizer and schedule continue exactly, but the samplers' random streams restart from"
        f" seed + {RESEED_PER_STEP}·step (Markov chains are shared out anew), so the samples"
        f" differ from those {saved} rank(s) would have drawn"
    )


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
        distributed.PeerFailedError: on ranks other than 0, when rank 0 failed to write.
    """
    out_dir = Path(out_dir)
    checkpoint, path = None, None
    if cfg.get("resume"):
        cfg, path, checkpoint = prepare_resume(cfg.resume, overrides)
        out_dir = store.run_dir_of(path)
    else:
        build.validate(cfg, "train")
        distributed.on_main(lambda: check_new_run_dir(out_dir), share_result=False)
    trainer = _Trainer(cfg, out_dir, checkpoint, path)
    log.info(
        "training %s on %s (%d parameters), %d steps, device %s, %s, %d rank(s)",
        target_kind(cfg.model),
        trainer.hamiltonian.describe(),
        sum(p.numel() for p in trainer.model.parameters()),
        trainer.total_steps,
        trainer.device,
        cfg.dtype,
        trainer.world_size,
    )
    with _SignalCatcher() as catcher:
        try:
            trainer.run(catcher)
        except KeyboardInterrupt:
            name = catcher.signal_name or "SIGINT"
            raise InterruptedRunError(
                f"{name} twice: stopped during step {trainer.step}; the last checkpoint is at"
                f" step {trainer.saved_step} (later history rows are dropped on resume)."
                f" Resume with: {resume_command(trainer.out_dir)}",
                exit_code=128 + int(catcher.signum or signal.SIGINT),
            ) from None
    with _SignalCatcher(immediate=True) as catcher:
        trainer.catcher = catcher
        try:
            return _finish(trainer)
        except KeyboardInterrupt:
            name = catcher.signal_name or "SIGINT"
            raise InterruptedRunError(
                f"{name}: stopped during the final evaluation; training finished at step"
                f" {trainer.step} and its checkpoints are saved in {trainer.out_dir}. Evaluate"
                f" with: naqs evaluate {shlex.quote(str(trainer.out_dir))}",
                exit_code=128 + int(catcher.signum or signal.SIGINT),
            ) from None


def _finish(trainer: _Trainer) -> TaskResult:
    """Evaluate the final state (every rank draws its share), then write and plot (rank 0)."""
    cfg, out_dir = trainer.cfg, trainer.out_dir
    values: dict[str, Any] = {}
    model = trainer.model
    if cfg.train.final_symmetry:
        model = build.build_model(
            cfg, trainer.lattice, trainer.device, trainer.dtype, symmetry=cfg.train.final_symmetry
        )
        unwrap(model).load_state_dict(unwrap(trainer.model).state_dict())
    if cfg.train.final_samples > 0:
        sampler = _final_sampler(cfg, trainer)
        values = evaluate_model(model, trainer.hamiltonian, sampler, cfg.train.final_samples, 4096)
    title = (
        f"naqs train: {trainer.hamiltonian.describe()}, {target_kind(cfg.model)},"
        f" {trainer.step} steps, final evaluation on {values.get('n_samples', 0)} samples"
    )
    if not distributed.is_main():
        return TaskResult(title, out_dir, values)
    reference = find_reference(cfg, trainer.hamiltonian)
    if values:
        final = dict(values)
        final["relative_error"] = relative_error(values["energy"], reference)
        attrs = {"steps": trainer.step, "symmetry": cfg.train.final_symmetry or "as trained"}
        if reference is not None:
            final["reference_energy"] = reference.energy
            attrs["reference_source"] = reference.source
        with trainer.catcher.critical():
            trainer.history.write_group("final", final, attrs)
    from naqs_cli import plots

    try:
        plots.training_plot(
            out_dir / "history.h5",
            out_dir / "training.png",
            reference.energy if reference else None,
            title=f"{trainer.hamiltonian.describe()}, {target_kind(cfg.model)}"
            + (f" (reference: {reference.source})" if reference else ""),
        )
    except Exception as err:  # a plot must never lose a finished run
        log.warning("could not draw training.png: %s", err)
    summary = format_table(values, reference, title) if values else title
    summary += f"\n  outputs: {out_dir}"
    log.info("\n%s", summary)
    return TaskResult(summary, out_dir, values)


def _final_sampler(cfg: DictConfig, trainer: _Trainer):
    from naqs_cli.samplers.direct import DirectSampler
    from naqs_cli.samplers.fullsum import FullSumSampler

    if target_kind(cfg.sampler) == "fullsum":
        return FullSumSampler(
            hamiltonian=trainer.hamiltonian,
            device=trainer.device,
            rank=trainer.rank,
            world_size=trainer.world_size,
        )
    seed = int(cfg.seed) + 7919 + 1000 * trainer.rank
    return DirectSampler(seed=seed, device=trainer.device)


# --- evaluate -----------------------------------------------------------------------------
def evaluate_config(cfg: DictConfig) -> tuple[DictConfig, Path, dict[str, Any]]:
    """Return the config to evaluate with: the checkpoint's, with evaluate's overrides.

    The CLI calls this before Hydra creates anything, and `evaluate` again.

    Returns:
        (the run config, the checkpoint file, the checkpoint's state).

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, foreign or its config unusable.
        ConfigError: an override the stored model cannot take (the message names the file).
    """
    build.validate(cfg, "evaluate")
    path = store.resolve_checkpoint(cfg.checkpoint)
    state = store.load_checkpoint(path)
    with _stored_config_errors(path, "evaluating"):
        run_cfg = OmegaConf.create(state["config"])
        run_cfg.resume = None
        run_cfg.train.init_from = None
        for key in ("device", "dtype"):
            if cfg.get(key) is not None:
                run_cfg[key] = cfg[key]
        if cfg.model.symmetry is not None:
            run_cfg.model.symmetry = cfg.model.symmetry
        if cfg.get("sampler") is not None:
            run_cfg.sampler = OmegaConf.create(OmegaConf.to_container(cfg.sampler, resolve=True))
        run_cfg.sampler.n_samples = int(cfg.n_samples)
        build.validate(run_cfg, "train")
    return run_cfg, path, state


def evaluate(cfg: DictConfig, out_dir: Path | str) -> TaskResult:
    """Rebuild a trained model from its checkpoint and estimate every observable.

    Only `sampler`, `model.symmetry`, `device`, `dtype`, `n_samples` and `seed` may differ
    from the stored config (the config schema refuses other keys).
    """
    out_dir = Path(out_dir)
    run_cfg, path, state = evaluate_config(cfg)
    kind = target_kind(run_cfg.sampler)
    device = build.resolve_device(run_cfg.device)
    dtype = build.resolve_dtype(run_cfg.dtype)
    lattice = build.build_lattice(run_cfg)
    hamiltonian = build.build_hamiltonian(run_cfg, lattice)
    model = build.build_model(run_cfg, lattice, device, dtype)
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as err:
        raise store.CheckpointError(
            f"{path}: its weights do not fit the model of its own config ({_first_line(err)})"
        ) from None
    model.eval()
    sampler = build.build_sampler(run_cfg, hamiltonian, device, int(cfg.seed))
    values = evaluate_model(model, hamiltonian, sampler, int(cfg.n_samples), int(cfg.chunk_size))
    reference = find_reference(run_cfg, hamiltonian)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(values)
    result["relative_error"] = relative_error(values["energy"], reference)
    attrs = run_attrs(run_cfg, device)
    attrs.update(checkpoint=str(path), step=int(state["step"]), sampler=kind)
    attrs["symmetry"] = str(run_cfg.model.symmetry)
    if reference is not None:
        result["reference_energy"] = reference.energy
        attrs["reference_source"] = reference.source
    h5 = out_dir / "evaluation.h5"
    store.write_group(h5, "evaluation", result)
    store.write_attrs(h5, attrs)
    title = (
        f"naqs evaluate: {path} (step {state['step']}), {hamiltonian.describe()},"
        f" sampler={kind}, symmetry={run_cfg.model.symmetry}, {values['n_samples']} samples"
    )
    summary = format_table(values, reference, title) + f"\n  outputs: {h5}"
    log.info("\n%s", summary)
    return TaskResult(summary, out_dir, result)


# --- exact --------------------------------------------------------------------------------
def exact(cfg: DictConfig, out_dir: Path | str) -> TaskResult:
    """Compute the exact ground-state energy per site and observables; write `exact.h5`."""
    from naqs_cli import exact as exact_module

    out_dir = Path(out_dir)
    build.validate(cfg, "exact")
    lattice = build.build_lattice(cfg)
    hamiltonian = build.build_hamiltonian(cfg, lattice)
    started = time.perf_counter()
    result = exact_module.ground_state(hamiltonian, method=cfg.method)
    seconds = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    h5 = out_dir / "exact.h5"
    values = {"energy": result.energy_per_site, "energy_total": result.energy}
    values.update(result.observables)
    attrs = run_attrs(cfg, torch.device("cpu"))
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


# --- comparisons (issue: MCMC vs exact sampling) ------------------------------------------
def compare_sampling(cfg: DictConfig, out_dir: Path | str) -> TaskResult:
    """Compare direct sampling with Markov chains started all-up (paper Fig. 2)."""
    from naqs_cli import compare

    return compare.compare_sampling(cfg, out_dir)


def compare_training(cfg: DictConfig, out_dir: Path | str) -> TaskResult:
    """Train with direct sampling and with MCMC at several k under equal wall time (Fig. 3)."""
    from naqs_cli import compare

    return compare.compare_training(cfg, out_dir)
