"""Structured configs: one dataclass per config-group option, registered in Hydra's ConfigStore.

The YAML files in `conf/` extend these schemas (``defaults: [base_<name>, _self_]``), so every
override is type-checked by OmegaConf: ``ham.gamma=abc`` or an unknown key fails at composition.
Each option carries the ``_target_`` that `build.py` instantiates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional  # noqa: F401  (Optional is needed by OmegaConf on 3.10)

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# --- lattice -------------------------------------------------------------------------------
@dataclass
class LatticeConfig:
    _target_: str = "naqs_cli.lattice.SquareLattice"
    Lx: int = 4
    Ly: int = 4
    pbc: bool = False


# --- Hamiltonians --------------------------------------------------------------------------
@dataclass
class TFIMConfig:
    _target_: str = "naqs_cli.hamiltonians.TransverseFieldIsing"
    J: float = 1.0
    gamma: float = 3.0


@dataclass
class HeisenbergConfig:
    _target_: str = "naqs_cli.hamiltonians.Heisenberg"
    J: float = 1.0
    sign_rule: str = "auto"


# --- models --------------------------------------------------------------------------------
@dataclass
class PixelCNNConfig:
    _target_: str = "naqs_cli.models.pixelcnn.PixelCNN"
    layers: int = 4
    channels: int = 16
    kernel_size: int = 3
    phase: bool = True
    total_sz: float | None = None
    count_feature: bool = False  # conditionals also see ln(ups/downs still needed); needs total_sz
    symmetry: str = "none"


@dataclass
class DenseConfig:
    _target_: str = "naqs_cli.models.dense.DenseNAQS"
    layers: int = 2
    hidden: int = 64
    phase: bool = True
    total_sz: float | None = None
    count_feature: bool = False  # conditionals also see ln(ups/downs still needed); needs total_sz
    symmetry: str = "none"


# --- samplers ------------------------------------------------------------------------------
@dataclass
class DirectSamplerConfig:
    _target_: str = "naqs_cli.samplers.direct.DirectSampler"
    n_samples: int = 512
    method: str = "cached"


@dataclass
class FullSumSamplerConfig:
    _target_: str = "naqs_cli.samplers.fullsum.FullSumSampler"
    # Not used for drawing (all 2^N states are weighted by |Ψ|²); kept so stage lists and
    # scripts that set sampler.n_samples work unchanged.
    n_samples: int = 512


@dataclass
class MCMCSamplerConfig:
    _target_: str = "naqs_cli.samplers.metropolis.MetropolisSampler"
    n_samples: int = 512
    n_chains: int = 16
    sweeps_between_samples: int = 10
    burn_in: int = 100
    init: str = "random"
    move: str = "auto"


# --- optimizers ----------------------------------------------------------------------------
@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    lr: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    schedule: str = "constant"
    step_every: int = 1000
    step_factor: float = 0.5
    grad_clip: float | None = None


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    lr: float = 1e-2
    momentum: float = 0.0
    schedule: str = "constant"
    step_every: int = 1000
    step_factor: float = 0.5
    grad_clip: float | None = None


@dataclass
class MinSRConfig:
    """MinSR (naqs_cli.natural: the keys are explained there)."""

    _target_: str = "naqs_cli.natural.MinSR"
    lr: float = 0.02
    diag_shift: float = 1e-3
    diag_shift_rel: float = 0.0
    diag_shift_final: float | None = None
    rcond: float | None = None
    spring: float = 0.0
    solver: str = "cholesky"
    schedule: str = "constant"
    step_every: int = 1000
    step_factor: float = 0.5
    grad_clip: float | None = None
    max_infidelity: float | None = 0.5


@dataclass
class SRConfig(MinSRConfig):
    """Stochastic reconfiguration: MinSR's keys plus `max_params` (naqs_cli.natural)."""

    _target_: str = "naqs_cli.natural.SR"
    max_params: int = 20000


# --- primary configs -----------------------------------------------------------------------
@dataclass
class StageConfig:
    steps: int = MISSING
    n_samples: int = MISSING
    lr: float = MISSING


@dataclass
class TrainSection:
    steps: int = 200
    # A list of {steps, n_samples, lr}; replaces steps / sampler.n_samples / optim.lr.
    stages: list[StageConfig] | None = None
    chunk_size: int = 1024  # samples per network pass and per backward chunk (bounds memory)
    log_every: int = 10  # steps between HDF5 flushes and log lines
    checkpoint_every: int = 100
    final_samples: int = 8192  # samples of the final evaluation (0: none)
    # Symmetrize the final evaluation (none | spin_flip | lattice | lattice_spin_flip).
    final_symmetry: str | None = None
    # A checkpoint whose weights start this run (Γ continuation, a bigger lattice).
    init_from: str | None = None
    best_smoothing: int = 20
    max_nonfinite: int = 5
    max_rollbacks: int = 3
    # auto: exact reference (cached on disk) when computable, else `reference`; never: only
    # the `reference` section (no exact diagonalization at the end of a run).
    exact_reference: str = "auto"
    # Seconds of training (null: none). The run then ends when the budget is spent or the
    # steps are done, whichever comes first, like a finished run; schedules follow the
    # elapsed fraction of the budget.
    time_budget: float | None = None


@dataclass
class ReferenceConfig:
    """A literature value to report relative errors against (per site), e.g. the paper's QMC."""

    energy: float | None = None
    source: str = ""
    # Rows [gamma, energy, naqs_energy, abs_magnetization, naqs_abs_magnetization]: the row
    # whose gamma equals ham.gamma supplies the reference (paper Table I).
    table: list[list[float]] | None = None


@dataclass
class TrainConfig:
    lattice: Any = MISSING
    ham: Any = MISSING
    model: Any = MISSING
    sampler: Any = MISSING
    optim: Any = MISSING
    train: TrainSection = field(default_factory=TrainSection)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    seed: int = 0
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda; under torchrun: LOCAL_RANK
    dtype: str = "float32"  # float32 | float64 (sums over sites are float64 either way)
    resume: str | None = None  # a run directory or checkpoint to continue
    # Accept checkpoints (resume, train.init_from) that carry no checksum: only for files
    # you trust (written by another program, or edited by hand).
    allow_unverified_checkpoint: bool = False


@dataclass
class EvaluateModelOverrides:
    symmetry: str | None = None


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING
    n_samples: int = 65536
    sampler: Any = None
    model: EvaluateModelOverrides = field(default_factory=EvaluateModelOverrides)
    seed: int = 1
    device: str | None = None
    dtype: str | None = None
    chunk_size: int = 4096
    allow_unverified_checkpoint: bool = False  # accept a checkpoint without a checksum


@dataclass
class ExactConfig:
    lattice: Any = MISSING
    ham: Any = MISSING
    method: str = "auto"


@dataclass
class CompareSamplingConfig:
    """`naqs compare sampling CHECKPOINT`: direct samples vs Markov chains (paper Fig. 2)."""

    checkpoint: str = MISSING
    n_samples: int = 16384  # direct (i.i.d.) samples
    n_chains: int = 4  # the paper's Fig. 2 shows four chains
    samples_per_chain: int = 512
    sweeps_between_samples: int = 1  # k: sweeps (N proposals each) between kept samples
    burn_in: int = 20  # sweeps discarded first (the chains stay in their start's mode)
    init: str = "up"  # up | down | random (Σσᶻ-conserving H: up/down = the two Néel states)
    symmetry: str | None = None  # overrides the stored model.symmetry (e.g. spin_flip)
    chunk_size: int = 4096  # configurations per network pass
    seed: int = 1
    device: str | None = None
    dtype: str | None = None
    allow_unverified_checkpoint: bool = False  # accept a checkpoint without a checksum


@dataclass
class CompareTrainingSection:
    ks: list[int] = field(default_factory=lambda: [1, 10])  # sweeps between kept samples
    n_chains: int = 16
    burn_in: int = 20  # sweeps before the first step's samples
    init: str = "random"  # random | up | down (exchange moves need random)
    wall_time: float = 60.0  # seconds per run (sampling included)
    max_steps: int | None = None  # optional cap on steps per run


@dataclass
class CompareTrainingConfig(TrainConfig):
    compare: CompareTrainingSection = field(default_factory=CompareTrainingSection)


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(group="lattice", name="base_lattice", node=LatticeConfig)
    cs.store(group="ham", name="base_tfim", node=TFIMConfig)
    cs.store(group="ham", name="base_heisenberg", node=HeisenbergConfig)
    cs.store(group="model", name="base_pixelcnn", node=PixelCNNConfig)
    cs.store(group="model", name="base_dense", node=DenseConfig)
    cs.store(group="sampler", name="base_direct", node=DirectSamplerConfig)
    cs.store(group="sampler", name="base_fullsum", node=FullSumSamplerConfig)
    cs.store(group="sampler", name="base_mcmc", node=MCMCSamplerConfig)
    cs.store(group="optim", name="base_adam", node=AdamConfig)
    cs.store(group="optim", name="base_sgd", node=SGDConfig)
    cs.store(group="optim", name="base_sr", node=SRConfig)
    cs.store(group="optim", name="base_minsr", node=MinSRConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="exact_schema", node=ExactConfig)
    cs.store(name="compare_sampling_schema", node=CompareSamplingConfig)
    cs.store(name="compare_training_schema", node=CompareTrainingConfig)
