"""The `naqs` command: subcommands as Hydra apps, every user error as one line and exit 2.

naqs train [overrides...]            train a NAQS (Hydra: --help, --cfg job, -m)
naqs evaluate CHECKPOINT [overrides] observables of a trained model
naqs compare sampling CHECKPOINT     direct sampling vs Markov chains (paper Fig. 2)
naqs compare training [overrides]    direct vs MCMC-driven training (paper Fig. 3)
naqs exact [overrides]               exact ground state (ED or free fermions)

torchrun --nproc_per_node=P -m naqs_cli train [overrides]   data-parallel training on P
processes: rank 0 picks the run directory and alone writes; a user error is one line from
rank 0 and every rank exits with code 2.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from naqs_cli.errors import UserError

SUBCOMMANDS = {
    "train": ("train", "train a NAQS ground state: naqs train model=pixelcnn ham=tfim"),
    "evaluate": ("evaluate", "observables of a trained model: naqs evaluate CHECKPOINT"),
    "compare sampling": (
        "compare_sampling",
        "direct sampling vs Markov chains from a checkpoint (paper Fig. 2)",
    ),
    "compare training": (
        "compare_training",
        "direct vs MCMC-driven training under equal wall time (paper Fig. 3)",
    ),
    "exact": ("exact", "exact ground state: ED (N <= 24) or 1D TFIM free fermions"),
}
#: Tasks that take a positional checkpoint.
CHECKPOINT_TASKS = ("evaluate", "compare_sampling")
#: Hydra flags after which no job runs (nothing to pre-validate).
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve")
#: Largest sweep that is pre-validated combination by combination.
MAX_PREVALIDATED_JOBS = 256
#: Hydra launchers from the optional extra naqs[cluster], with the plugin module each needs
#: (`slurm` is our preset, conf/hydra/launcher/slurm.yaml, on top of `submitit_slurm`).
CLUSTER_LAUNCHERS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
}
GROUPS = ("lattice", "ham", "model", "sampler", "optim", "experiment")

USAGE = """usage: naqs <command> [overrides...]

Neural autoregressive quantum states (Sharir et al., PRL 124, 020503, 2020).

commands:
{commands}

Every command is a Hydra app: `naqs train --help` lists its config groups and keys,
`naqs train --cfg job` prints the composed config, `naqs train -m ham.gamma=2,3` sweeps.
Runs land in outputs/<command>/<date>/<time>/.
"""


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def _split_command(argv: list[str]) -> tuple[str, str, list[str]]:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        raise SystemExit(0)
    if argv[0] in ("-V", "--version"):
        from naqs_cli import __version__

        print(f"naqs {__version__}")
        raise SystemExit(0)
    if argv[0] == "compare":
        if len(argv) < 2 or argv[1] not in ("sampling", "training"):
            got = argv[1] if len(argv) > 1 else "nothing"
            raise UserError(f"compare needs 'sampling' or 'training', got {got}")
        name = f"compare {argv[1]}"
        rest = argv[2:]
    else:
        name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise UserError(f"unknown command '{name}'; commands: " + ", ".join(SUBCOMMANDS))
    return name, SUBCOMMANDS[name][0], rest


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_override(arg: str) -> bool:
    if arg.startswith("-"):
        return False
    key = arg.split("=", 1)[0]
    return (
        "=" in arg
        and key.lstrip("+~")
        .replace(".", "")
        .replace("_", "")
        .replace("/", "")
        .replace("@", "")
        .replace("[", "")
        .replace("]", "")
        .isalnum()
    )


def _rewrite_checkpoint(task: str, args: list[str]) -> list[str]:
    """Turn a bare CHECKPOINT (which may contain '=') into checkpoint='<abs path>'."""
    out, seen = [], False
    for arg in args:
        bare = not arg.startswith("-") and (os.path.exists(arg) or not _is_override(arg))
        if task in CHECKPOINT_TASKS and bare and not seen:
            out.append("checkpoint=" + _quote(str(Path(arg).expanduser().resolve())))
            seen = True
        elif not arg.startswith("-") and "=" not in arg and not arg.startswith("~"):
            raise UserError(f"unexpected argument '{arg}': overrides look like key=value")
        else:
            out.append(arg)
    return out


#: Overrides whose values are paths (which may contain '=' in multirun directories).
PATH_KEYS = ("checkpoint", "resume", "train.init_from")


def _quote_paths(args: list[str]) -> list[str]:
    """Quote path-valued overrides and make them absolute."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in PATH_KEYS and value and value[0] not in "'\"" and value != "null":
            arg = f"{key}=" + _quote(str(Path(value).expanduser().resolve()))
        out.append(arg)
    return out


def _resume_run_dir(task: str, flags: list[str], overrides: list[str]) -> list[str]:
    """Make a resumed run write Hydra's files into its own directory, beside the originals."""
    import datetime as dt

    from naqs_cli.store import CheckpointError, resolve_checkpoint, run_dir_of

    if task != "train" or any(f in ("-m", "--multirun") for f in flags):
        return overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    value = next((o.value() for o in parsed if o.key_or_group == "resume"), None)
    if not value:
        return overrides
    try:
        run_dir = run_dir_of(resolve_checkpoint(str(value)))
    except CheckpointError as err:
        raise UserError(f"resume={value}: {err}") from None
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return [
        *overrides,
        "hydra.run.dir=" + _quote(str(run_dir)),
        f"hydra.output_subdir=.hydra/resume-{stamp}",
    ]


def _check_flag_combination(flags: list[str]) -> None:
    """Refuse Hydra's mutually exclusive modes (-m with --cfg/--info) in one line."""
    modes = {"-m": "-m", "--multirun": "-m", "--cfg": "--cfg", "-c": "--cfg"}
    modes |= {"--info": "--info", "-i": "--info", "--shell-completion": "--shell-completion"}
    given = sorted({modes[f] for f in flags if f in modes})
    if len(given) > 1:
        raise UserError(
            f"{' and '.join(given)} cannot be combined: Hydra runs one mode at a time (e.g. drop"
            " -m to print the config a sweep's jobs start from with --cfg)"
        )


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    flags, overrides = [], []
    takes_value = ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir")
    it = iter(args)
    for arg in it:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in takes_value:
                flags.append(next(it, ""))
        else:
            overrides.append(arg)
    return flags, overrides


def _expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Return the override lists of every job of a basic sweep (cartesian product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override, text in zip(parsed, overrides, strict=True):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([text])
    jobs = []
    for combo in itertools.product(*choices):
        jobs.append(list(combo))
        if len(jobs) >= MAX_PREVALIDATED_JOBS:
            break
    return jobs


@functools.cache
def _task_groups(task: str) -> dict[str, tuple[str, ...]]:
    """Return the config groups in the defaults list of `task`, each with its option names."""
    from omegaconf import OmegaConf

    from naqs_cli import CONF_DIR

    groups = {}
    for entry in OmegaConf.load(Path(CONF_DIR) / f"{task}.yaml").get("defaults", []):
        if isinstance(entry, str):
            continue
        for key in entry:
            group = str(key).split()[-1]  # "optional sampler" -> "sampler"
            folder = Path(CONF_DIR) / group
            names = (f.relative_to(folder).with_suffix("") for f in folder.rglob("*.yaml"))
            groups[group] = tuple(sorted(name.as_posix() for name in names))
    return groups


def _parse_overrides(overrides: list[str]) -> list:
    """Parse overrides with Hydra's grammar; a malformed one is a `UserError` naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "invalid syntax"
            raise UserError(
                f"{text}: cannot be parsed ({reason}); overrides are key=value, and a value"
                " with spaces, '=' or brackets needs quotes: key='a=b'"
            ) from None
    return parsed


def _kind_of(value: object) -> str:
    """Name the kind of a parsed override value for a message: a list, null, a number..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a mapping" if isinstance(value, dict) else "a list"


def _check_group_overrides(task: str, overrides: list[str]) -> None:
    """Refuse a config-group override that is not one option name of that group.

    Hydra fails on some of these with a TypeError (``sampler=[1,2]``), merges others as config
    values (``sampler={...}``) or, for an optional group, ignores a misspelt option; here each
    is one `UserError` naming the override and the allowed options.
    """
    groups = _task_groups(task)
    for override, text in zip(_parse_overrides(overrides), overrides, strict=True):
        options = groups.get(override.key_or_group)
        if options is None or override.package is not None:
            continue
        group = override.key_or_group
        allowed = " | ".join(options)
        if override.is_sweep_override():
            raise UserError(
                f"{text}: a config group takes one option name ({allowed});"
                f" add -m to sweep over several"
            )
        value = override.value()
        if override.is_delete() and value is None:
            continue
        if not isinstance(value, str):
            hint = (
                f"set its keys one by one ({group}.KEY=VALUE)"
                if isinstance(value, dict)
                else f"to run several, sweep with -m {group}=a,b"
            )
            raise UserError(
                f"{text}: a config group takes one option name ({allowed}), not"
                f" {_kind_of(value)}; {hint}"
            )
        if not override.is_delete() and value not in options:
            raise UserError(f"{group}={value}: no such option; allowed: {allowed}")


def _compose(task: str, overrides: list[str]):
    from naqs_cli.compose import compose

    _check_group_overrides(task, overrides)
    try:
        return compose(task, overrides)
    except ValueError as err:  # Hydra's, e.g. `exact sampler=1` (a group exact does not use)
        groups = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in GROUPS]
        odd = [o for o in groups if not o.split("=", 1)[-1].isidentifier()]
        where = ", ".join(odd or groups or overrides)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "invalid"
        raise UserError(f"{where}: {reason} (a config group takes an option name)") from None


def _prevalidate(task: str, flags: list[str], overrides: list[str]) -> None:
    """Compose and validate every job's config before Hydra creates any run directory.

    Checkpoints named by the config (`checkpoint`, `resume`, `train.init_from`) are loaded
    and checked here too, so a bad file or an override it cannot take writes nothing.
    """
    from naqs_cli import compose, tasks
    from naqs_cli.train.resume import check_new_run_dir
    from naqs_cli.validation import validate

    multirun = any(f in ("-m", "--multirun") for f in flags)
    _parse_overrides(overrides)
    jobs = _expand_sweeps(overrides) if multirun else [overrides]
    for job in jobs:
        job = [o for o in job if not o.startswith("hydra/") and not o.startswith("hydra.")]
        cfg = _compose(task, job)
        if task == "train" and cfg.get("resume"):
            compose.prepare_resume(cfg.resume, job, bool(cfg.allow_unverified_checkpoint))
            continue
        if task == "evaluate":
            tasks.evaluation_model(cfg)
            continue
        validate(cfg, task)
        if task == "compare_sampling":
            from naqs_cli.compare.sampling import load_checkpoint_model

            load_checkpoint_model(cfg)
        if task in ("train", "compare_training"):
            tasks.check_init_from(cfg)
        if task == "train" and not multirun:
            run_dir = _hydra_run_dir(overrides)
            if run_dir is not None:
                check_new_run_dir(run_dir)


def _hydra_run_dir(overrides: list[str]) -> str | None:
    """Return the value of a `hydra.run.dir=` override, if given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    wanted = [o for o in overrides if o.startswith("hydra.run.dir=")]
    if not wanted:
        return None
    value = OverridesParser.create().parse_overrides(wanted[-1:])[0].value()
    return str(value) if value else None


def _check_launcher(overrides: list[str]) -> None:
    """Raise UserError if a `hydra/launcher=` override names a launcher that is not installed."""
    import importlib.util

    for arg in overrides:
        key, _, value = arg.partition("=")
        module = CLUSTER_LAUNCHERS.get(value.strip("'\""))
        if key.lstrip("+") == "hydra/launcher" and module:
            try:
                missing = importlib.util.find_spec(module) is None
            except ImportError:
                missing = True
            if missing:
                raise UserError(_missing_launcher(value))
            if value.strip("'\"") in ("slurm", "submitit_slurm") and not shutil.which("sbatch"):
                raise UserError(
                    f"hydra/launcher={value}: SLURM's sbatch is not on this machine's PATH;"
                    " submit from a SLURM login node, or use hydra/launcher=joblib here"
                )


def _missing_launcher(name: str) -> str:
    return (
        f"hydra/launcher={name}: the launcher plugins are not installed;"
        " pip install 'naqs[cluster]' (or make install)"
    )


def check_overrides(task: str, overrides: list[str], flags: list[str] | None = None) -> str | None:
    """Return the one-line error the CLI prints for these overrides, or None if they are valid.

    This is exactly the check `main` runs before Hydra creates anything (composition with
    type checking, `validation.validate`, the checkpoints the config names), so tests can call it
    in-process.

    Args:
        task: the primary config (train, evaluate, compare_sampling, compare_training, exact).
        overrides: key=value overrides as given on the command line (paths not yet quoted).
        flags: Hydra flags such as -m.
    """
    try:
        _check_launcher(list(overrides))
        _prevalidate(task, list(flags or []), _quote_paths(list(overrides)))
    except _user_error_types() as err:
        return _one_line(err, task)
    return None


def _command_of(task: str | None) -> str:
    """Return the command line name of a task (`compare_sampling` → `compare sampling`)."""
    names = {t: name for name, (t, _) in SUBCOMMANDS.items()}
    return names.get(task or "", "<command>")


def _one_line(err: BaseException, task: str | None = None) -> str:
    """Return a one-line description of a Hydra/OmegaConf/naqs user error."""
    from hydra.errors import MissingConfigException

    if isinstance(err, UserError):
        return str(err).strip().splitlines()[0]
    if isinstance(err, MissingConfigException):
        options = [o for o in (err.options or []) if not o.startswith("base_")]
        name = err.missing_cfg_file or ""
        if "/" in name:
            group, option = name.rsplit("/", 1)
            if group == "hydra/launcher" and option in CLUSTER_LAUNCHERS:  # e.g. with --cfg
                return _missing_launcher(option)
            allowed = " | ".join(options) if options else "see --help"
            return f"{group}={option}: no such option; allowed: {allowed}"
        return str(err).strip().splitlines()[0]
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(err).__name__
    cause = err.__cause__ or err.__context__
    if first.startswith("In '") and first.endswith("while composing config:") and len(lines) > 1:
        group, _, option = first.split("'")[1].rpartition("/")  # a preset that does not fit
        return f"{group}={option}: {lines[1]}" if group else f"{option}: {lines[1]}"
    if first.startswith("Ambiguous value for argument '"):
        override = first.split("'", 1)[1].rsplit("'", 1)[0]
        return (
            f"{override}: several values; add -m to sweep over them, or write a list as"
            " key=[a,b] or a string with commas as key='a,b'"
        )
    if first.startswith("Could not override '") or "not in struct" in text:
        key = first.split("'")[1] if "'" in first else "?"
        if task == "evaluate":
            from naqs_cli.validation import EVALUATE_OVERRIDABLE

            return (
                f"{key}: evaluate uses the checkpoint's config and may change only"
                f" {EVALUATE_OVERRIDABLE} (pick a sampler option before setting its keys)"
            )
        return (
            f"{key}: unknown key; `naqs {_command_of(task)} --cfg job` lists the keys"
            " (prefix with + only to add keys on purpose)"
        )
    if first.startswith("Error merging override") and cause is not None:
        override = first.removeprefix("Error merging override").strip()
        reason = str(cause).strip().splitlines()[0]
        return f"{override}: {reason}"
    for candidate in (first, str(cause or "").strip().splitlines()[0] if cause else ""):
        if candidate.startswith("Missing mandatory value:"):
            key = candidate.split(":", 1)[1].strip()
            if key and "$" not in key:
                return f"{key}: missing; give it on the command line"
    if "Missing mandatory value" in first:
        return f"{first} (give it on the command line)"
    key = getattr(err, "full_key", None)  # OmegaConf's errors know the key they failed on
    return f"{key}: {first}" if key and key not in first else first


def _user_error_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from naqs_cli.errors import NaqsError

    return (HydraException, OmegaConfBaseException, NaqsError, UserError)


def _handled_errors() -> tuple[type[BaseException], ...]:
    """Return every error type `_exit` reports as one line (the rest are bugs: traceback)."""
    return (*_user_error_types(), OSError, KeyboardInterrupt)


def _exit(command: str, err: BaseException, task: str | None = None) -> NoReturn:
    """Report `err` as one line on stderr (rank 0 only) and exit with its code.

    The one place errors become exit codes: a `NaqsError` carries its own (`errors.py`), a
    Hydra/OmegaConf composition error is a user mistake (2), a failed read or write is 1,
    an interrupt 130. Another rank's failure (`PeerFailedError`) exits silently with rank 0's
    code, since rank 0 reports it.
    """
    from naqs_cli.errors import InterruptedRunError, NaqsError, PeerFailedError

    if isinstance(err, PeerFailedError):
        raise SystemExit(err.exit_code)
    if isinstance(err, InterruptedRunError):  # not an error: the run is saved, say how to go on
        if _launch_rank() == 0:
            sys.stderr.write(f"naqs {command}: {err}\n")
            sys.stderr.flush()
        raise SystemExit(err.exit_code)
    if isinstance(err, OSError):
        _fail(command, _os_error_line(err), code=1)
    if isinstance(err, KeyboardInterrupt):
        _fail(command, "interrupted", code=130)
    _fail(command, _one_line(err, task), code=err.exit_code if isinstance(err, NaqsError) else 2)


def _fail(command: str, message: str, code: int = 2) -> NoReturn:
    if _launch_rank() == 0:  # under torchrun every rank fails alike; rank 0 says why
        sys.stderr.write(f"naqs {command}: error: {message}\n")
        sys.stderr.flush()
    raise SystemExit(code)


def _os_error_line(err: OSError) -> str:
    """Return one line for a failed read or write, naming the file."""
    text = str(err.strerror or err).strip()
    if err.filename and str(err.filename) not in text:
        text += f": {err.filename}"
    return text.splitlines()[0] if text else type(err).__name__


def _run_hydra(
    command: str, task: str, hydra_args: list[str], on_start: Callable[[], None] | None = None
) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from naqs_cli import CONF_DIR, tasks
    from naqs_cli.config import register_configs

    register_configs()
    handled = _handled_errors()

    @hydra.main(config_path=str(CONF_DIR), config_name=task, version_base="1.3")
    def app(cfg) -> None:
        hc = HydraConfig.get()
        out_dir = Path(hc.runtime.output_dir)
        if on_start is not None:
            on_start()
        try:
            if task == "train":
                result = tasks.train(cfg, out_dir, overrides=list(hc.overrides.task))
            else:
                result = getattr(tasks, task)(cfg, out_dir)
        except handled as err:
            _exit(command, err, task)
        print(result.summary, flush=True)

    sys.argv = [f"naqs {command}", *hydra_args]
    app()


# --- torchrun: data-parallel training ---------------------------------------------------
def _launch_world_size() -> int:
    """Return WORLD_SIZE as set by torchrun (1 when unset); read without importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _launch_rank() -> int:
    """Return RANK as set by torchrun (0 when unset)."""
    return int(os.environ.get("RANK", "0") or 0) if _launch_world_size() > 1 else 0


def _check_torchrun(command: str, task: str, flags: list[str]) -> bool:
    """Return whether this process is one of several torchrun ranks that must train together.

    Raises:
        UserError: torchrun around another command than train, or around a sweep.
    """
    n_ranks = _launch_world_size()
    if n_ranks <= 1 or any(f in INFO_FLAGS or f.startswith("--cfg") for f in flags):
        return False
    if task != "train":
        raise UserError(
            f"torchrun (WORLD_SIZE={n_ranks}): only `naqs train` runs on several processes;"
            f" run `naqs {command}` without torchrun"
        )
    if any(f in ("-m", "--multirun") for f in flags):
        raise UserError(
            f"-m/--multirun: a sweep cannot run under torchrun (WORLD_SIZE={n_ranks}); start"
            " one torchrun per point of the sweep (or use hydra/launcher=... without torchrun)"
        )
    return True


def _note_resume_world_size(task: str, flags: list[str], overrides: list[str]) -> None:
    """Say on stderr (rank 0) when a run resumes on another number of ranks than it had."""
    if task != "train" or any(f in ("-m", "--multirun") for f in flags) or _launch_rank() != 0:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    value = next((o.value() for o in parsed if o.key_or_group == "resume"), None)
    if not value:
        return
    from naqs_cli import store
    from naqs_cli.train.checkpoint import checkpoint_world_size, resume_world_note

    state = store.load_checkpoint(value, allow_unverified=True)  # checked by _prevalidate
    note = resume_world_note(checkpoint_world_size(state), _launch_world_size())
    if note is not None:
        sys.stderr.write(f"naqs train: note: {note}\n")
        sys.stderr.flush()


def _planned_run_dir(task: str, overrides: list[str]) -> str:
    """Return the absolute run directory Hydra would make of these overrides (rank 0 decides
    it once, so that `${now:...}` in `hydra.run.dir` gives every rank the same one)."""
    from omegaconf import OmegaConf

    from naqs_cli.compose import compose

    wanted = [o for o in overrides if not o.lstrip("+~").startswith("hydra/")]
    cfg = compose(task, wanted, return_hydra_config=True)
    try:
        run_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
    except Exception as err:  # an interpolation that needs Hydra's runtime
        raise UserError(
            f"hydra.run.dir: cannot be resolved before the run under torchrun ({err});"
            " give a plain directory"
        ) from None
    return str(Path(run_dir).expanduser().resolve())


def _run_ranks(command: str, task: str, flags: list[str], overrides: list[str]) -> None:
    """Train on every torchrun rank: rank 0 picks the run directory and runs the Hydra app
    (the only one to write), the other ranks run the task on the same directory without Hydra
    (no .hydra/, no log file). Every rank exits with the same code."""
    import logging

    from naqs_cli import distributed, tasks

    distributed.init()
    released = False

    def release(code: int = 0) -> None:
        nonlocal released
        if not released:
            released = True
            distributed.broadcast_object(code)

    try:
        try:
            run_dir = distributed.on_main(lambda: _planned_run_dir(task, overrides))
        except distributed.PeerFailedError as err:
            raise SystemExit(err.exit_code) from None
        job = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
        if distributed.is_main():
            try:
                _run_hydra(
                    command,
                    task,
                    [*flags, *job, *_hydra_overrides(overrides, run_dir)],
                    on_start=release,
                )
            except SystemExit as err:  # failed before the job started: let the others go
                release(err.code if isinstance(err.code, int) and err.code else 1)
                raise
            except BaseException:
                release(1)
                raise
            return
        code = distributed.broadcast_object(None)  # rank 0 started the job, or failed
        if code:
            raise SystemExit(code)
        logging.basicConfig(
            level=logging.ERROR,
            format=f"[rank {distributed.rank()}] %(levelname)s %(message)s",
            stream=sys.stderr,
        )
        try:
            tasks.train(_compose(task, job), Path(run_dir), overrides=job)
        except _handled_errors() as err:  # rank 0 reports; this rank exits alike
            _exit(command, err, task)
    finally:
        distributed.shutdown()


def _hydra_overrides(overrides: list[str], run_dir: str) -> list[str]:
    """Return the `hydra.*` overrides with the run directory rank 0 picked."""
    kept = [
        o
        for o in overrides
        if o.lstrip("+~").startswith(("hydra.", "hydra/")) and not o.startswith("hydra.run.dir=")
    ]
    return [*kept, "hydra.run.dir=" + _quote(run_dir)]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `naqs` console script.

    Exit codes: 0 done, 1 a failed read or write (disk full, unwritable directory), 2 a user
    error (one line on stderr, nothing written), 3 training diverged, 128 + signal number
    after SIGINT/SIGTERM (the checkpoint is written; the message says how to resume).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if _launch_rank() > 0:  # under torchrun only rank 0 prints (help, summary)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    try:
        command, task, rest = _split_command(argv)
        flags, positional = _split_flags(rest)
        _check_flag_combination(flags)
        overrides = _quote_paths(_rewrite_checkpoint(task, positional))
        os.environ["HYDRA_FULL_ERROR"] = "1"  # we format errors ourselves
        on_ranks = _check_torchrun(command, task, flags)
        if not any(f in INFO_FLAGS or f.startswith("--cfg") for f in flags):
            message = check_overrides(task, overrides, flags)
            if message is not None:
                _fail(command, message)
            _note_resume_world_size(task, flags, overrides)
        overrides = _resume_run_dir(task, flags, overrides)
        if on_ranks:
            _run_ranks(command, task, flags, overrides)
        else:
            _run_hydra(command, task, flags + overrides)
    except _handled_errors() as err:  # e.g. OSError: Hydra cannot create the run directory
        _exit(command, err)
    except Exception as err:
        if type(err).__name__ != "UncompletedJobError":  # submitit: a SLURM job failed
            raise
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        _fail(
            command,
            f"a SLURM job did not complete: {first} (its stdout/stderr are in"
            " <sweep dir>/.submitit/<job id>/; the other jobs go on and update the summary)",
            code=1,
        )


if __name__ == "__main__":
    main()
