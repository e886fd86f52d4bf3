"""The one place that turns a composed config into objects.

`build_training(cfg)` returns a `TrainingSetup` (runtime, lattice, Hamiltonian, variational
state, update rule, typed train settings); everything below the task layer works with it and
never reads the config again. The config must have passed `validation.validate` first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from naqs_cli import distributed
from naqs_cli.errors import ConfigError
from naqs_cli.lattice import SquareLattice
from naqs_cli.models import unwrap  # noqa: F401  (re-exported)
from naqs_cli.optim import UpdateRule, first_order_rule
from naqs_cli.reference import LiteratureReference
from naqs_cli.state import VariationalState
from naqs_cli.train.schedule import Schedule, make_stages


def target_kind(node: Any) -> str:
    """Return the short kind of a group option from its `_target_` (e.g. 'tfim', 'pixelcnn')."""
    target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
    return {
        "TransverseFieldIsing": "tfim",
        "Heisenberg": "heisenberg",
        "PixelCNN": "pixelcnn",
        "DenseNAQS": "dense",
        "DirectSampler": "direct",
        "FullSumSampler": "fullsum",
        "MetropolisSampler": "mcmc",
        "Adam": "adam",
        "SGD": "sgd",
        "SR": "sr",
        "MinSR": "minsr",
    }.get(target, target.lower())


# --- builders -----------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """Return the torch device for `device` = auto | cpu | cuda.

    `auto` is CUDA when present. Under torchrun each rank gets GPU LOCAL_RANK (modulo the GPU
    count), so the ranks of one node use one GPU each.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.env_world_size() > 1 and torch.cuda.is_available():
        return torch.device("cuda", distributed.env_local_rank() % torch.cuda.device_count())
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for `dtype` = float32 | float64."""
    return {"float32": torch.float32, "float64": torch.float64}[name]


def build_lattice(cfg: DictConfig) -> SquareLattice:
    """Return the lattice of `cfg.lattice`."""
    node = cfg.lattice
    return SquareLattice(Lx=int(node.Lx), Ly=int(node.Ly), pbc=bool(node.pbc))


def build_hamiltonian(cfg: DictConfig, lattice: SquareLattice):
    """Return the Hamiltonian of `cfg.ham` on `lattice`."""
    from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing

    kind = target_kind(cfg.ham)
    if kind == "tfim":
        return TransverseFieldIsing(lattice=lattice, J=float(cfg.ham.J), gamma=float(cfg.ham.gamma))
    if kind == "heisenberg":
        return Heisenberg(lattice=lattice, J=float(cfg.ham.J), sign_rule=str(cfg.ham.sign_rule))
    raise ConfigError(f"ham._target_={cfg.ham._target_}: unknown Hamiltonian")


def build_model(
    cfg: DictConfig,
    lattice: SquareLattice,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    symmetry: str | None = None,
) -> torch.nn.Module:
    """Return the wave function of `cfg.model` (symmetrized if asked), on device and dtype.

    Args:
        symmetry: overrides `cfg.model.symmetry` when given.
    """
    from hydra.utils import get_class

    from naqs_cli.models.symmetry import SymmetrizedWaveFunction

    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    target = kwargs.pop("_target_")
    symmetry = kwargs.pop("symmetry", "none") if symmetry is None else symmetry
    kwargs.pop("symmetry", None)
    model = get_class(target)(lattice=lattice, **kwargs)
    if symmetry != "none":
        model = SymmetrizedWaveFunction(model, symmetry=symmetry)
    return model.to(device=device, dtype=dtype)


def build_sampler(
    cfg: DictConfig,
    hamiltonian,
    device: torch.device,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
):
    """Return rank `rank`'s sampler of `cfg.sampler`, its generator seeded `seed + 1000·rank`.

    On several ranks each one gets its share: `sampler.n_samples / world_size` samples by
    default, `sampler.n_chains / world_size` Markov chains (mcmc), its part of the basis
    (fullsum). `validate` checks that the counts divide.
    """
    from hydra.utils import get_class

    kwargs = OmegaConf.to_container(cfg.sampler, resolve=True)
    target = kwargs.pop("_target_")
    cls = get_class(target)
    kind = target_kind(cfg.sampler)
    extra: dict[str, Any] = {"seed": seed + 1000 * rank, "device": device}
    if kind in ("mcmc", "fullsum"):
        extra["hamiltonian"] = hamiltonian
    if world_size > 1:
        if kind == "fullsum":
            extra.update(rank=rank, world_size=world_size)
        else:
            kwargs["n_samples"] = max(1, int(kwargs["n_samples"]) // world_size)
        if kind == "mcmc":
            kwargs["n_chains"] = max(1, int(kwargs["n_chains"]) // world_size)
    return cls(**kwargs, **extra)


# --- the config turned into objects, once ---------------------------------------------------
# Everything below the task layer (`tasks.py`) works with these objects; none of it reads the
# config again.
@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes.

    Attributes:
        seed: the run's seed (`seed`).
        device: the torch device (`device`, resolved; GPU LOCAL_RANK under torchrun).
        dtype: the network's dtype (`dtype`).
        rank: this process's rank (0 without torchrun).
        world_size: number of ranks.
    """

    seed: int
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class TrainSettings:
    """The `train` section (and `optim.lr`, for messages), typed.

    Attributes:
        schedule: stages and learning-rate schedule (`train.stages`/`steps`, `optim.schedule`).
        chunk_size: samples per network pass and per backward pass.
        log_every: steps between history flushes and log lines.
        checkpoint_every: steps between checkpoints.
        final_samples: samples of the final evaluation (0: none).
        final_symmetry: symmetrize the final evaluation (None: as trained).
        init_from: a checkpoint whose weights start the run.
        best_smoothing: energies averaged to select best.pt.
        max_nonfinite: non-finite steps in a row before a rollback.
        max_rollbacks: rollbacks without progress before giving up.
        time_budget: seconds of training (None: no limit but the steps).
        exact_reference: auto | never (the exact energy at the end).
        lr: `optim.lr` as configured.
        allow_unverified_checkpoint: accept `init_from` without a checksum.
    """

    schedule: Schedule
    chunk_size: int = 1024
    log_every: int = 10
    checkpoint_every: int = 100
    final_samples: int = 8192
    final_symmetry: str | None = None
    init_from: str | None = None
    best_smoothing: int = 20
    max_nonfinite: int = 5
    max_rollbacks: int = 3
    time_budget: float | None = None
    exact_reference: str = "auto"
    lr: float = 1e-2
    allow_unverified_checkpoint: bool = False


@dataclass
class TrainingSetup:
    """Everything a training run needs, built from one validated config.

    Attributes:
        config: the resolved config as plain containers (stored in checkpoints).
        config_yaml: the same as YAML (stored in HDF5 attributes).
        runtime: seed, device, dtype, rank, world size.
        lattice, hamiltonian: the problem.
        state: the variational state (model, this rank's sampler, Hamiltonian).
        rule: the update rule of `optim`.
        settings: the `train` section.
        literature: the `reference` section (a published energy), or None.
        model_kind, sampler_kind: option names, for summaries.
        new_sampler: builds this rank's sampler with another seed (resume on other ranks).
        new_model: builds the model with another symmetry (`train.final_symmetry`).
    """

    config: dict
    config_yaml: str
    runtime: Runtime
    lattice: SquareLattice
    hamiltonian: Any
    state: VariationalState
    rule: UpdateRule
    settings: TrainSettings
    literature: LiteratureReference | None
    model_kind: str
    sampler_kind: str
    new_sampler: Callable[[int], Any]
    new_model: Callable[[str], torch.nn.Module]

    def final_sampler(self):
        """Return this rank's sampler for the final evaluation.

        Full sums stay full sums; every other sampler is replaced by exact direct sampling
        with its own stream (seed + 7919 + 1000·rank), so the final numbers are i.i.d.
        """
        from naqs_cli.samplers.direct import DirectSampler
        from naqs_cli.samplers.fullsum import FullSumSampler

        runtime = self.runtime
        if self.sampler_kind == "fullsum":
            return FullSumSampler(
                hamiltonian=self.hamiltonian,
                device=runtime.device,
                rank=runtime.rank,
                world_size=runtime.world_size,
            )
        return DirectSampler(seed=runtime.seed + 7919 + 1000 * runtime.rank, device=runtime.device)

    def run_attrs(self) -> dict[str, Any]:
        """Return the root attributes every HDF5 output of this run carries."""
        return run_attrs(self.config_yaml, self.runtime.seed, self.runtime.device)


def _git_commit() -> str | None:
    import subprocess

    import naqs_cli

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


def run_attrs(config_yaml: str, seed: int, device: torch.device) -> dict[str, Any]:
    """Return the root attributes of an HDF5 output (config, seed, versions, device, time)."""
    import datetime

    import naqs_cli

    return {
        "naqs_version": naqs_cli.__version__,
        "config": config_yaml,
        "seed": int(seed),
        "torch_version": str(torch.__version__),
        "device": str(device),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def build_runtime(cfg: DictConfig) -> Runtime:
    """Return the runtime of a config (device and dtype resolved, this process's rank)."""
    return Runtime(
        seed=int(cfg.get("seed", 0)),
        device=resolve_device(cfg.device),
        dtype=resolve_dtype(cfg.dtype),
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )


def build_update_rule(cfg: DictConfig, model: torch.nn.Module) -> UpdateRule:
    """Return the update rule of `cfg.optim` over the model's parameters."""
    kind = target_kind(cfg.optim)
    grad_clip = None if cfg.optim.grad_clip is None else float(cfg.optim.grad_clip)
    if kind == "adam":
        return first_order_rule(
            "adam", model, float(cfg.optim.lr), betas=tuple(cfg.optim.betas), grad_clip=grad_clip
        )
    if kind == "sgd":
        return first_order_rule(
            "sgd",
            model,
            float(cfg.optim.lr),
            momentum=float(cfg.optim.momentum),
            grad_clip=grad_clip,
        )
    if kind in ("sr", "minsr"):
        from naqs_cli.natural import SR, MinSR

        optim = cfg.optim
        rule = SR if kind == "sr" else MinSR
        final = optim.diag_shift_final
        return rule(
            [p for p in model.parameters() if p.requires_grad],
            lr=float(optim.lr),
            diag_shift=float(optim.diag_shift),
            diag_shift_rel=float(optim.diag_shift_rel),
            diag_shift_final=None if final is None else float(final),
            rcond=None if optim.rcond is None else float(optim.rcond),
            spring=float(optim.spring),
            solver=str(optim.solver),
            grad_clip=grad_clip,
            max_infidelity=None if optim.max_infidelity is None else float(optim.max_infidelity),
        )
    raise ConfigError(f"optim._target_={cfg.optim._target_}: allowed: adam | sgd | sr | minsr")


def build_schedule(cfg: DictConfig) -> Schedule:
    """Return the stages and learning-rate schedule of a train config."""
    stages = cfg.train.stages
    raw = None if stages is None else OmegaConf.to_container(stages, resolve=True)
    return Schedule(
        stages=make_stages(
            raw, int(cfg.train.steps), int(cfg.sampler.n_samples), float(cfg.optim.lr)
        ),
        kind=str(cfg.optim.schedule),
        step_every=int(cfg.optim.step_every),
        step_factor=float(cfg.optim.step_factor),
        time_budget=None if cfg.train.time_budget is None else float(cfg.train.time_budget),
    )


def build_train_settings(cfg: DictConfig) -> TrainSettings:
    """Return the typed `train` section of a train config."""
    train = cfg.train
    return TrainSettings(
        schedule=build_schedule(cfg),
        chunk_size=int(train.chunk_size),
        log_every=int(train.log_every),
        checkpoint_every=int(train.checkpoint_every),
        final_samples=int(train.final_samples),
        final_symmetry=train.final_symmetry or None,
        init_from=None if train.init_from is None else str(train.init_from),
        best_smoothing=int(train.best_smoothing),
        max_nonfinite=int(train.max_nonfinite),
        max_rollbacks=int(train.max_rollbacks),
        time_budget=None if train.time_budget is None else float(train.time_budget),
        exact_reference=str(train.exact_reference),
        lr=float(cfg.optim.lr),
        allow_unverified_checkpoint=bool(cfg.get("allow_unverified_checkpoint", False)),
    )


def build_literature(cfg: DictConfig) -> LiteratureReference | None:
    """Return the typed `reference` section (a published energy to compare with), or None."""
    section = cfg.get("reference")
    if section is None:
        return None
    energy, table = section.get("energy"), section.get("table")
    return LiteratureReference(
        energy=None if energy is None else float(energy),
        source=str(section.get("source") or ""),
        table=None if table is None else tuple(tuple(float(v) for v in row) for row in table),
    )


def build_training(cfg: DictConfig) -> TrainingSetup:
    """Turn a validated `train` config into the objects of a training run.

    The global torch seed is set to `seed` before the model is built (its initial weights);
    the sampler has its own generator, seeded `seed + 1000·rank`.
    """
    runtime = build_runtime(cfg)
    torch.manual_seed(runtime.seed)
    lattice = build_lattice(cfg)
    hamiltonian = build_hamiltonian(cfg, lattice)
    model = build_model(cfg, lattice, runtime.device, runtime.dtype)

    def new_sampler(seed: int):
        return build_sampler(
            cfg, hamiltonian, runtime.device, seed, runtime.rank, runtime.world_size
        )

    def new_model(symmetry: str) -> torch.nn.Module:
        return build_model(cfg, lattice, runtime.device, runtime.dtype, symmetry=symmetry)

    sampler = new_sampler(runtime.seed)
    sampler_kind = target_kind(cfg.sampler)
    n_chains = int(cfg.sampler.n_chains) if sampler_kind == "mcmc" else None
    rule = build_update_rule(cfg, model)
    settings = build_train_settings(cfg)
    state = VariationalState(
        model,
        sampler,
        hamiltonian,
        chunk_size=settings.chunk_size,
        n_chains=n_chains,
        world_size=runtime.world_size,
    )
    return TrainingSetup(
        config=OmegaConf.to_container(cfg, resolve=True),
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        runtime=runtime,
        lattice=lattice,
        hamiltonian=hamiltonian,
        state=state,
        rule=rule,
        settings=settings,
        literature=build_literature(cfg),
        model_kind=target_kind(cfg.model),
        sampler_kind=sampler_kind,
        new_sampler=new_sampler,
        new_model=new_model,
    )


def config_yaml(cfg: DictConfig) -> str:
    """Return a config as resolved YAML (the `config` attribute of HDF5 outputs)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
