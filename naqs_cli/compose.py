"""Configs from the command line and from checkpoints: composing, upgrading, merging.

- `compose(task, overrides)`: the primary config `task` with overrides, as the CLI builds it
  (Hydra's ConfigStore schemas included), without a run directory — the CLI's pre-validation
  and the tests use it;
- `stored_config(state)`: a checkpoint's config, upgraded to this version's schema (keys
  added since get their defaults, keys removed since are dropped);
- `prepare_resume`: the stored config with the command line's overrides, refused where they
  would not continue the same run;
- `checkpoint_config`: a stored config with what a command reading the model may change;
- `evaluate_config`: the stored config with what `naqs evaluate` may change.

With `build.py` (config → objects) and `tasks.py` (the subcommands), this is one of the three
places that read configs; everything below them works with the objects `build` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from naqs_cli import build, store, validation
from naqs_cli.config import ReferenceConfig, TrainSection
from naqs_cli.errors import CheckpointError, ConfigError

#: Keys of a checkpoint's config that `resume` may not change (they define the state).
FROZEN_ON_RESUME = ("lattice", "ham", "model", "sampler._target_")
#: Config groups: naming another option than the stored one is refused on resume.
RESUME_GROUPS = ("lattice", "ham", "model", "sampler", "optim", "experiment")
#: Sections of a stored config that follow a schema of their own, upgraded key by key.
_UPGRADED_SECTIONS = {"train": TrainSection, "reference": ReferenceConfig}


def compose(
    task: str, overrides: Sequence[str] | None = None, return_hydra_config: bool = False
) -> DictConfig:
    """Compose the primary config `task` with overrides, as the CLI does (no run directory).

    Args:
        task: the primary config (train, evaluate, exact, compare_sampling, compare_training).
        overrides: key=value and group=option overrides.
        return_hydra_config: include the `hydra` node (run directory, launcher).

    Raises:
        hydra/omegaconf errors for unknown groups, options and keys (the CLI turns them into
        one line).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from naqs_cli import CONF_DIR
    from naqs_cli.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            config_name=task,
            overrides=list(overrides or []),
            return_hydra_config=return_hydra_config,
        )


def stored_config(state: dict[str, Any]) -> DictConfig:
    """Return a checkpoint's config, upgraded to this version's schema.

    Keys the `train` and `reference` schemas gained since the checkpoint was written get their
    defaults (e.g. `train.time_budget`); keys they lost are dropped.
    """
    raw = dict(state["config"])
    for section, schema in _UPGRADED_SECTIONS.items():
        stored = raw.get(section)
        if not isinstance(stored, dict):
            continue
        fields = {f.name: f for f in dataclasses.fields(schema)}
        upgraded = {k: v for k, v in stored.items() if k in fields}
        for name, f in fields.items():
            if name not in upgraded:
                default = f.default_factory() if callable(f.default_factory) else f.default
                upgraded[name] = default
        raw[section] = upgraded
    return OmegaConf.create(raw)


def resume_config(stored: DictConfig, overrides: Sequence[str] | None) -> DictConfig:
    """Return a checkpoint's config with the command line's overrides applied.

    Group switches and changes of lattice, Hamiltonian, model or sampler kind are refused:
    they would not continue the same run (naming a group's stored option again is harmless).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = stored
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
            if same and build.target_kind(stored_node) == str(override.value()):
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
def stored_config_errors(path: Path, verb: str):
    """Name the checkpoint in config errors; report an unusable stored config as a bad file."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{err} ({verb} {path})") from None
    except (OmegaConfBaseException, AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: its stored config cannot be used ({_first_line(err)})"
        ) from None


def prepare_resume(
    resume: str, overrides: Sequence[str] | None, allow_unverified: bool = False
) -> tuple[DictConfig, Path, dict[str, Any]]:
    """Load the checkpoint of `resume=`, apply the overrides and validate the result.

    The CLI calls this before Hydra creates anything, and `train` again.

    Args:
        resume: a checkpoint file or a run directory.
        overrides: the command line's overrides (those of the stored config may change).
        allow_unverified: accept a checkpoint without a checksum
            (`allow_unverified_checkpoint`).

    Returns:
        (the config to continue with, the checkpoint file, the checkpoint's state with its
        random states placed for the run's device).

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, foreign, its config unusable,
            or its samplers drew on another device type than `device` (one line naming the
            `device=` to resume with).
        ConfigError: an override the resumed run cannot take (the message names the file).
    """
    validation.validate_path("resume", resume)
    path = store.resolve_checkpoint(resume)
    state = store.load_checkpoint(path, allow_unverified=allow_unverified)
    with stored_config_errors(path, "resuming"):
        cfg = resume_config(stored_config(state), overrides)
        validation.validate(cfg, "train")
        total = build.build_schedule(cfg).total_steps
    state = store.map_rng_states(state, build.resolve_device(cfg.device), path)
    if state["step"] > total:
        key = "train.stages" if cfg.train.stages is not None else "train.steps"
        raise ConfigError(
            f"{key}: {total} steps in all, but {path} is already at step {state['step']};"
            f" give at least {state['step']}"
        )
    return cfg, path, state


def checkpoint_config(
    checkpoint: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    symmetry: str | None = None,
    *,
    sampler: DictConfig | None = None,
    n_samples: int | None = None,
    verb: str = "reading",
    allow_unverified: bool = False,
) -> tuple[DictConfig, Path, dict[str, Any]]:
    """Return a checkpoint's config, upgraded, with a reading command's overrides, validated.

    The one way a command that reads a trained model (`evaluate`, `compare sampling`) gets
    the config to rebuild it with (`build.build_training`, then `evaluate.load_trained`).

    Args:
        checkpoint: a checkpoint file or a run directory.
        device, dtype: replace the stored `device`/`dtype` when given.
        symmetry: replaces the stored `model.symmetry` when given.
        sampler: replaces the stored `sampler` section when given.
        n_samples: replaces `sampler.n_samples` when given.
        verb: what the command does with the file, for messages ("evaluating PATH").
        allow_unverified: accept a checkpoint without a checksum.

    Returns:
        (the run config, the checkpoint file, the checkpoint's state).

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, foreign or its config unusable.
        ConfigError: the (overridden) stored config is invalid here, e.g. a stored
            `device=cuda` without CUDA (the message names the file).
    """
    path = store.resolve_checkpoint(checkpoint)
    state = store.load_checkpoint(path, allow_unverified=allow_unverified)
    with stored_config_errors(path, verb):
        run_cfg = stored_config(state)
        run_cfg.resume = None
        run_cfg.train.init_from = None
        for key, value in (("device", device), ("dtype", dtype)):
            if value is not None:
                run_cfg[key] = value
        if symmetry is not None:
            run_cfg.model.symmetry = symmetry
        if sampler is not None:
            run_cfg.sampler = OmegaConf.create(OmegaConf.to_container(sampler, resolve=True))
        if n_samples is not None:
            run_cfg.sampler.n_samples = int(n_samples)
        validation.validate(run_cfg, "stored")
    return run_cfg, path, state


def evaluate_config(cfg: DictConfig) -> tuple[DictConfig, Path, dict[str, Any]]:
    """Return the config to evaluate with: the checkpoint's, with evaluate's overrides.

    The CLI calls this before Hydra creates anything, and `evaluate` again.

    Returns:
        (the run config, the checkpoint file, the checkpoint's state).

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, foreign or its config unusable.
        ConfigError: an override the stored model cannot take (the message names the file).
    """
    validation.validate(cfg, "evaluate")
    return checkpoint_config(
        cfg.checkpoint,
        cfg.get("device"),
        cfg.get("dtype"),
        cfg.model.symmetry,
        sampler=cfg.get("sampler"),
        n_samples=int(cfg.n_samples),
        verb="evaluating",
        allow_unverified=bool(cfg.allow_unverified_checkpoint),
    )
