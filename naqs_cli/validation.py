"""Every rule a composed config must satisfy, checked in one pass before anything is built.

Each rule raises `ConfigError` with one line naming the key, the bad value and what is
allowed. `cli.py` runs `validate` before any work or output (so a mistake writes nothing);
the tasks run it again (cheap). The rules sit next to the factories they guard
(`build.py`) and ask those factories and the physics classes (the Hamiltonian's own
`conserves_sz` and sign rule, the samplers' and schedules' option lists) instead of
restating them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from naqs_cli import distributed, natural_config
from naqs_cli.build import build_hamiltonian, build_lattice, target_kind
from naqs_cli.errors import ConfigError
from naqs_cli.exact import METHODS as EXACT_METHODS
from naqs_cli.hamiltonians import SIGN_RULE_CHOICES, normalize_sign_rule
from naqs_cli.lattice import SquareLattice
from naqs_cli.limits import ED_MAX_SITES, FULLSUM_MAX_SITES
from naqs_cli.models.base import SAMPLING_METHODS
from naqs_cli.models.symmetry import SYMMETRIES
from naqs_cli.reference import EXACT_REFERENCE_MODES
from naqs_cli.samplers.metropolis import INITS, MOVES
from naqs_cli.train.schedule import SCHEDULES

# Option lists live with the code that implements them; the ones only configs have are here.
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")
SAMPLER_KINDS = ("direct", "fullsum", "mcmc")
#: What `naqs evaluate` may change of the stored config, for messages.
EVALUATE_OVERRIDABLE = (
    "n_samples, sampler, model.symmetry, device, dtype, seed, chunk_size,"
    " allow_unverified_checkpoint"
)
#: Top-level keys of `naqs evaluate` (all else comes from the checkpoint).
EVALUATE_KEYS = (
    "checkpoint",
    "n_samples",
    "sampler",
    "model",
    "seed",
    "device",
    "dtype",
    "chunk_size",
    "allow_unverified_checkpoint",
)
#: Largest `seed` (samplers add 1000·rank and small offsets; torch takes < 2^63).
MAX_SEED = 2**62


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={_show(value)}: {allowed}")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


def _choice(key: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        _fail(key, value, "allowed: " + " | ".join(options))


def _int_at_least(key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _fail(key, value, f"must be an integer >= {low}")


def _finite(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "must be a finite number")


def _positive(key: str, value: Any) -> None:
    _finite(key, value)
    if value <= 0:
        _fail(key, value, "must be > 0")


def validate(cfg: DictConfig, task: str) -> None:
    """Check every key and cross-key rule of a composed config for `task`.

    `task` "stored": a train config read back to rebuild a model for evaluation; the train
    rules but those pairing the optimizer with the sampler (the model is not trained again).

    Raises:
        ConfigError: the first violation, as one line naming key, value and what is allowed.
    """
    training, task = task != "stored", "train" if task == "stored" else task
    if task in ("train", "compare_training", "exact"):
        lattice = _validate_lattice(cfg)
        ham_kind = _validate_ham(cfg, lattice)
    if task in ("train", "compare_training"):
        _validate_model(cfg, lattice, ham_kind)
        _validate_sampler(cfg, lattice, ham_kind)
        _validate_optim(cfg, training)
        _validate_train(cfg)
        _validate_runtime(cfg)
        if cfg.resume is not None:
            validate_path("resume", cfg.resume)
    if task == "exact":
        _validate_exact(cfg, lattice, ham_kind)
    if task in ("evaluate", "compare_sampling"):
        validate_path("checkpoint", cfg.checkpoint)
        _int_at_least("n_samples", cfg.n_samples, 1)
        _validate_runtime(cfg, allow_null=True)
    if task == "evaluate":
        extra = [k for k in cfg if k not in EVALUATE_KEYS]
        extra += [f"model.{k}" for k in cfg.model if k != "symmetry"]
        if extra:
            raise ConfigError(
                f"{extra[0]}: evaluate uses the checkpoint's config and may change only"
                f" {EVALUATE_OVERRIDABLE}"
            )
        _int_at_least("chunk_size", cfg.chunk_size, 1)
        if cfg.get("sampler") is not None:
            _choice("sampler", target_kind(cfg.sampler), SAMPLER_KINDS)
        if cfg.model.symmetry is not None:
            _choice("model.symmetry", cfg.model.symmetry, SYMMETRIES)
    if task == "compare_sampling":
        _int_at_least("n_chains", cfg.n_chains, 1)
        _int_at_least("samples_per_chain", cfg.samples_per_chain, 2)
        _int_at_least("sweeps_between_samples", cfg.sweeps_between_samples, 1)
        _int_at_least("burn_in", cfg.burn_in, 0)
        _choice("init", cfg.init, INITS)
        if cfg.symmetry is not None:
            _choice("symmetry", cfg.symmetry, SYMMETRIES)
        _int_at_least("chunk_size", cfg.chunk_size, 1)
    if task == "compare_training":
        ks = list(cfg.compare.ks)
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
            _fail("compare.ks", ks, "must be a non-empty list of integers >= 1")
        _int_at_least("compare.n_chains", cfg.compare.n_chains, 1)
        _int_at_least("compare.burn_in", cfg.compare.burn_in, 0)
        _choice("compare.init", cfg.compare.init, INITS)
        _positive("compare.wall_time", cfg.compare.wall_time)
        if cfg.compare.max_steps is not None:
            _int_at_least("compare.max_steps", cfg.compare.max_steps, 1)
        if target_kind(cfg.sampler) != "direct":
            _fail(
                "sampler",
                target_kind(cfg.sampler),
                "compare training runs direct sampling itself and builds its MCMC runs from"
                " compare.*; use sampler=direct (sampler.n_samples sets the batch of every run)",
            )
        if ham_kind == "heisenberg" and cfg.compare.init in ("up", "down"):
            _fail(
                "compare.init",
                cfg.compare.init,
                "the MCMC runs use exchange moves (H conserves Σσᶻ), which cannot leave a fully"
                " polarized state; use compare.init=random",
            )
        if ham_kind == "tfim" and float(cfg.ham.gamma) == 0 and cfg.compare.init != "random":
            _fail(
                "compare.init",
                cfg.compare.init,
                "at ham.gamma=0 the TFIM conserves Σσᶻ and the MCMC runs use exchange moves,"
                " which cannot leave a fully polarized state; use compare.init=random",
            )


def validate_path(key: str, value: Any) -> None:
    """Check that `value` names a checkpoint file or a run directory holding one.

    Raises:
        ConfigError: naming `key`.
    """
    if value is None or str(value).strip() in ("", "???"):
        _fail(key, value, "give a checkpoint file or run directory")
    path = Path(str(value)).expanduser()
    if path.is_dir():
        if not (path / "checkpoints" / "last.pt").is_file():
            _fail(key, value, "this directory holds no checkpoints/last.pt")
    elif not path.is_file():
        _fail(key, value, "no such file or directory")


def _validate_lattice(cfg: DictConfig) -> SquareLattice:
    _int_at_least("lattice.Lx", cfg.lattice.Lx, 1)
    _int_at_least("lattice.Ly", cfg.lattice.Ly, 1)
    try:
        return build_lattice(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _validate_ham(cfg: DictConfig, lattice: SquareLattice) -> str:
    kind = target_kind(cfg.ham)
    if kind not in ("tfim", "heisenberg"):
        _fail("ham._target_", cfg.ham.get("_target_"), "allowed: the tfim and heisenberg options")
    _finite("ham.J", cfg.ham.J)
    if kind == "tfim":
        _finite("ham.gamma", cfg.ham.gamma)
    else:
        rule = normalize_sign_rule(cfg.ham.sign_rule)
        _choice("ham.sign_rule", rule, SIGN_RULE_CHOICES)
        if rule == "true" and not lattice.is_bipartite:
            _fail(
                "ham.sign_rule",
                "true",
                f"the Marshall sign rule needs a bipartite lattice; {lattice.describe()} is not"
                " (use ham.sign_rule=false or auto)",
            )
    return kind


def _conserves_sz(cfg: DictConfig, lattice: SquareLattice) -> bool:
    """Return whether the Hamiltonian conserves Σσᶻ (as the Hamiltonian itself says)."""
    return bool(build_hamiltonian(cfg, lattice).conserves_sz)


def _sign_rule_on(cfg: DictConfig, lattice: SquareLattice) -> bool:
    """Return whether the Marshall sign rule is applied (as the Hamiltonian resolves it)."""
    return bool(getattr(build_hamiltonian(cfg, lattice), "uses_sign_rule", False))


def _validate_model(cfg: DictConfig, lattice: SquareLattice, ham_kind: str) -> None:
    model = cfg.model
    kind = target_kind(model)
    _int_at_least("model.layers", model.layers, 1)
    if kind == "pixelcnn":
        _int_at_least("model.channels", model.channels, 2)
        k = model.kernel_size
        if not isinstance(k, int) or k < 3 or k % 2 == 0:
            _fail("model.kernel_size", k, "must be an odd integer >= 3")
    elif kind == "dense":
        _int_at_least("model.hidden", model.hidden, 1)
    _choice("model.symmetry", model.symmetry, SYMMETRIES)
    n_sites = lattice.n_sites
    if model.total_sz is not None:
        _finite("model.total_sz", model.total_sz)
        if not _conserves_sz(cfg, lattice):
            _fail(
                "model.total_sz",
                model.total_sz,
                f"a fixed Σσᶻ sector needs a Hamiltonian that conserves it (ham=heisenberg, or"
                f" tfim at gamma=0); ham={ham_kind} does not: use model.total_sz=null",
            )
        n_up = n_sites / 2 + float(model.total_sz)
        if not float(n_up).is_integer() or not 0 <= n_up <= n_sites:
            _fail(
                "model.total_sz",
                model.total_sz,
                f"Σσᶻ/2 must make N/2 + total_sz an integer in [0, N] (N = {n_sites})",
            )
    if model.get("count_feature", False) and model.total_sz is None:
        _fail("model.count_feature", True, "needs a sector: set model.total_sz (e.g. 0) or false")
    _validate_symmetry("model.symmetry", model.symmetry, model.total_sz)
    final_symmetry = cfg.train.get("final_symmetry") if "train" in cfg else None
    if final_symmetry is not None:
        _validate_symmetry("train.final_symmetry", final_symmetry, model.total_sz)
    if not model.phase:
        _validate_positive_ground_state(cfg, lattice, ham_kind)
    marshall_matters = (
        ham_kind == "heisenberg"
        and not _sign_rule_on(cfg, lattice)
        and lattice.is_bipartite
        and float(cfg.ham.J) > 0
    )
    for key, symmetry in (
        ("model.symmetry", model.symmetry),
        ("train.final_symmetry", final_symmetry),
    ):
        if (
            marshall_matters
            and symmetry not in (None, "none")
            and _marshall_breaking(lattice, symmetry, model.total_sz)
        ):
            _fail(
                key,
                symmetry,
                "without the sign rule the target state changes sign under some symmetry"
                " operation, which the symmetrized phase cannot represent; use"
                " ham.sign_rule=true or none",
            )


def _validate_symmetry(key: str, symmetry: Any, total_sz: Any) -> None:
    _choice(key, symmetry, SYMMETRIES)
    if "spin_flip" in symmetry and total_sz not in (None, 0):
        _fail(
            key,
            symmetry,
            f"spin flips leave no sector with total_sz={total_sz} invariant; use"
            " model.total_sz=0 or null, or none|lattice",
        )


def _validate_positive_ground_state(cfg: DictConfig, lattice: SquareLattice, ham_kind: str) -> None:
    """Refuse model.phase=false where the ground state has signs in the sampled basis."""
    if ham_kind == "tfim":
        if float(cfg.ham.gamma) < 0:
            _fail(
                "model.phase",
                False,
                "with ham.gamma < 0 the TFIM ground state has signs (-1)^(number of down"
                " spins); use model.phase=true or ham.gamma >= 0",
            )
        return
    J, sign_on = float(cfg.ham.J), _sign_rule_on(cfg, lattice)
    if J > 0 and not sign_on:
        _fail(
            "model.phase",
            False,
            "the antiferromagnetic Heisenberg ground state has signs; use model.phase=true"
            " or ham.sign_rule=auto|true (bipartite lattices)",
        )
    if J < 0 and sign_on:
        _fail(
            "model.phase",
            False,
            "with ham.J < 0 (ferromagnet) the ground state is positive only without the sign"
            " rule; use ham.sign_rule=auto|false or model.phase=true",
        )


def _marshall_breaking(lattice: SquareLattice, symmetry: str, total_sz: Any) -> bool:
    """Return whether some g changes the Marshall sign (−1)^(ups on sublattice B)."""
    from naqs_cli.models.symmetry import symmetry_group

    generator = torch.Generator().manual_seed(0)
    n_sites = lattice.n_sites
    n_up = n_sites // 2 + (int(total_sz) if total_sz is not None else 0)
    x = torch.zeros(16, n_sites, dtype=torch.int8)
    for row in range(16):
        x[row, torch.randperm(n_sites, generator=generator)[:n_up]] = 1
    on_b = (lattice.sublattice_sign() < 0).long()
    parity = (x.long() * on_b).sum(-1) % 2
    for perm, flip in symmetry_group(lattice, symmetry):
        gx = x[:, perm]
        if flip:
            gx = 1 - gx
        if not torch.equal((gx.long() * on_b).sum(-1) % 2, parity):
            return True
    return False


def _validate_sampler(cfg: DictConfig, lattice: SquareLattice, ham_kind: str) -> None:
    kind = target_kind(cfg.sampler)
    _choice("sampler", kind, SAMPLER_KINDS)
    _int_at_least("sampler.n_samples", cfg.sampler.n_samples, 1)
    if kind != "fullsum" and (cfg.get("train") is None or cfg.train.stages is None):
        _divides_over_ranks("sampler.n_samples", cfg.sampler.n_samples, "samples")
    if kind == "mcmc":
        _divides_over_ranks("sampler.n_chains", cfg.sampler.n_chains, "Markov chains")
    if kind == "direct":
        _choice("sampler.method", cfg.sampler.method, SAMPLING_METHODS)
    if kind == "fullsum" and lattice.n_sites > FULLSUM_MAX_SITES:
        _fail(
            "sampler",
            "fullsum",
            f"full sums hold all 2^N states, so N <= FULLSUM_MAX_SITES = {FULLSUM_MAX_SITES};"
            f" {lattice.describe()} has N = {lattice.n_sites}: use sampler=direct",
        )
    if kind == "mcmc":
        _int_at_least("sampler.n_chains", cfg.sampler.n_chains, 1)
        _int_at_least("sampler.sweeps_between_samples", cfg.sampler.sweeps_between_samples, 1)
        _int_at_least("sampler.burn_in", cfg.sampler.burn_in, 0)
        _choice("sampler.init", cfg.sampler.init, INITS)
        _choice("sampler.move", cfg.sampler.move, MOVES)
        move = cfg.sampler.move
        conserves = _conserves_sz(cfg, lattice)
        if move == "auto":
            move = "exchange" if conserves else "flip"
        if move == "exchange" and not conserves:
            _fail(
                "sampler.move",
                "exchange",
                f"exchange moves keep Σσᶻ fixed, but ham={ham_kind} does not conserve it, so the"
                " chains could not reach the ground state; use sampler.move=flip or auto",
            )
        if move == "exchange" and not lattice.bonds:
            _fail(
                "sampler.move",
                "exchange",
                f"exchange moves swap spins along bonds, and {lattice.describe()} has none;"
                " use a larger lattice or sampler.move=flip",
            )
        if move == "flip" and cfg.model.total_sz is not None:
            _fail(
                "sampler.move",
                "flip",
                "single-spin flips leave the fixed model.total_sz sector; use"
                " sampler.move=exchange or model.total_sz=null",
            )
        if move == "exchange" and cfg.sampler.init in ("up", "down"):
            _fail(
                "sampler.init",
                cfg.sampler.init,
                "exchange moves cannot leave a fully polarized state; use sampler.init=random",
            )


def _divides_over_ranks(key: str, value: Any, what: str) -> None:
    """Refuse a count that torchrun's ranks cannot share equally (WORLD_SIZE from the env)."""
    n_ranks = distributed.env_world_size()
    if n_ranks > 1 and isinstance(value, int) and value % n_ranks != 0:
        _fail(
            key,
            value,
            f"must be a multiple of the number of ranks (WORLD_SIZE={n_ranks}), so that every"
            f" rank holds {key.rsplit('.', 1)[-1]}/{n_ranks} {what}",
        )


def _validate_optim(cfg: DictConfig, training: bool) -> None:
    _positive("optim.lr", cfg.optim.lr)
    _choice("optim.schedule", cfg.optim.schedule, SCHEDULES)
    if cfg.optim.schedule == "step":
        _int_at_least("optim.step_every", cfg.optim.step_every, 1)
        _positive("optim.step_factor", cfg.optim.step_factor)
    if cfg.optim.grad_clip is not None:
        _positive("optim.grad_clip", cfg.optim.grad_clip)
    if target_kind(cfg.optim) in ("sr", "minsr"):
        natural_config.check_config(cfg, training)
    if target_kind(cfg.optim) == "adam":
        betas = list(cfg.optim.betas)
        if len(betas) != 2 or any(not 0 <= float(b) < 1 for b in betas):
            _fail("optim.betas", betas, "must be two numbers in [0, 1)")
    if target_kind(cfg.optim) == "sgd":
        _finite("optim.momentum", cfg.optim.momentum)
        if cfg.optim.momentum < 0:
            _fail("optim.momentum", cfg.optim.momentum, "must be >= 0")


def _validate_train(cfg: DictConfig) -> None:
    train = cfg.train
    _int_at_least("train.steps", train.steps, 0)
    _int_at_least("train.chunk_size", train.chunk_size, 1)
    _int_at_least("train.log_every", train.log_every, 1)
    _int_at_least("train.checkpoint_every", train.checkpoint_every, 1)
    _int_at_least("train.final_samples", train.final_samples, 0)
    _int_at_least("train.best_smoothing", train.best_smoothing, 1)
    _int_at_least("train.max_nonfinite", train.max_nonfinite, 1)
    _int_at_least("train.max_rollbacks", train.max_rollbacks, 0)
    # .get: configs stored by runs that predate the key mean "auto".
    _choice("train.exact_reference", train.exact_reference, EXACT_REFERENCE_MODES)
    if train.stages is not None:
        if len(train.stages) == 0:
            _fail("train.stages", "[]", "give at least one {steps, n_samples, lr} or null")
        for i, stage in enumerate(train.stages):
            _int_at_least(f"train.stages[{i}].steps", stage.steps, 1)
            _int_at_least(f"train.stages[{i}].n_samples", stage.n_samples, 1)
            _positive(f"train.stages[{i}].lr", stage.lr)
            if target_kind(cfg.sampler) != "fullsum":
                _divides_over_ranks(f"train.stages[{i}].n_samples", stage.n_samples, "samples")
    if train.init_from is not None:
        validate_path("train.init_from", train.init_from)
    if train.time_budget is not None:
        _positive("train.time_budget", train.time_budget)
    reference = cfg.get("reference") or {}
    if reference.get("energy") is not None:
        _finite("reference.energy", reference.energy)
    for i, row in enumerate(reference.get("table") or []):
        if len(row) < 2 or not all(math.isfinite(v) for v in row):
            _fail(f"reference.table[{i}]", list(row), "a row is [gamma, energy, ...], all finite")


def _validate_runtime(cfg: DictConfig, allow_null: bool = False) -> None:
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        _fail("seed", seed, "must be an integer in [0, 2^62]")
    if not (allow_null and cfg.device is None):
        _choice("device", cfg.device, DEVICES)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            _fail("device", "cuda", "no CUDA device is available here; use device=cpu or auto")
    if not (allow_null and cfg.dtype is None):
        _choice("dtype", cfg.dtype, DTYPES)


def _validate_exact(cfg: DictConfig, lattice: SquareLattice, ham_kind: str) -> None:
    _choice("method", cfg.method, EXACT_METHODS)
    one_d_tfim = ham_kind == "tfim" and lattice.Ly == 1 and float(cfg.ham.J) > 0
    if cfg.method == "free_fermion" and not one_d_tfim:
        _fail(
            "method",
            "free_fermion",
            "free fermions solve only the 1D TFIM chain (lattice=chain, ham=tfim, ham.J > 0);"
            " use method=ed or auto",
        )
    uses_ed = cfg.method == "ed" or (cfg.method == "auto" and not one_d_tfim)
    if uses_ed and lattice.n_sites > ED_MAX_SITES:
        _fail(
            "method",
            cfg.method,
            f"exact diagonalization handles at most ED_MAX_SITES = {ED_MAX_SITES} sites;"
            f" {lattice.describe()} has {lattice.n_sites}"
            + (": use method=free_fermion" if one_d_tfim else ": train a model instead"),
        )
