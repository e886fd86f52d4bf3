"""The `naqs` command: subcommands as Hydra apps, every user error as one line and exit 2.

naqs train [overrides...]            train a NAQS (Hydra: --help, --cfg job, -m)
naqs evaluate CHECKPOINT [overrides] observables of a trained model
naqs compare sampling CHECKPOINT     direct sampling vs Markov chains (paper Fig. 2)
naqs compare training [overrides]    direct vs MCMC-driven training (paper Fig. 3)
naqs exact [overrides]               exact ground state (ED or free fermions)
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from pathlib import Path

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
GROUPS = ("lattice", "ham", "model", "sampler", "optim", "experiment")

USAGE = """usage: naqs <command> [overrides...]

Neural autoregressive quantum states (Sharir et al., PRL 124, 020503, 2020).

commands:
{commands}

Every command is a Hydra app: `naqs train --help` lists its config groups and keys,
`naqs train --cfg job` prints the composed config, `naqs train -m ham.gamma=2,3` sweeps.
Runs land in outputs/<command>/<date>/<time>/.
"""


class UserError(Exception):
    """A mistake on the command line, reported as one line with exit code 2."""


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
def _register_configs_once() -> None:
    from naqs_cli.config import register_configs

    register_configs()


def _compose(task: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from naqs_cli import CONF_DIR

    _register_configs_once()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return compose(config_name=task, overrides=overrides)
        except ValueError as err:  # Hydra's plain ValueErrors, e.g. for `sampler=null`
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
    from naqs_cli import store, tasks
    from naqs_cli.build import validate

    multirun = any(f in ("-m", "--multirun") for f in flags)
    jobs = _expand_sweeps(overrides) if multirun else [overrides]
    for job in jobs:
        job = [o for o in job if not o.startswith("hydra/") and not o.startswith("hydra.")]
        cfg = _compose(task, job)
        if task == "train" and cfg.get("resume"):
            tasks.prepare_resume(cfg.resume, job)
            continue
        if task == "evaluate":
            tasks.evaluate_config(cfg)
            continue
        validate(cfg, task)
        if task == "compare_sampling":
            store.load_checkpoint(cfg.checkpoint)
        if task in ("train", "compare_training"):
            tasks.check_init_from(cfg)
        if task == "train" and not multirun:
            run_dir = _hydra_run_dir(overrides)
            if run_dir is not None:
                tasks.check_new_run_dir(run_dir)


def _hydra_run_dir(overrides: list[str]) -> str | None:
    """Return the value of a `hydra.run.dir=` override, if given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    wanted = [o for o in overrides if o.startswith("hydra.run.dir=")]
    if not wanted:
        return None
    value = OverridesParser.create().parse_overrides(wanted[-1:])[0].value()
    return str(value) if value else None


def check_overrides(task: str, overrides: list[str], flags: list[str] | None = None) -> str | None:
    """Return the one-line error the CLI prints for these overrides, or None if they are valid.

    This is exactly the check `main` runs before Hydra creates anything (composition with
    type checking, `build.validate`, the checkpoints the config names), so tests can call it
    in-process.

    Args:
        task: the primary config (train, evaluate, compare_sampling, compare_training, exact).
        overrides: key=value overrides as given on the command line (paths not yet quoted).
        flags: Hydra flags such as -m.
    """
    try:
        _prevalidate(task, list(flags or []), _quote_paths(list(overrides)))
    except _user_error_types() as err:
        return _one_line(err, task)
    return None


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
            allowed = " | ".join(options) if options else "see --help"
            return f"{group}={option}: no such option; allowed: {allowed}"
        return str(err).strip().splitlines()[0]
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(err).__name__
    cause = err.__cause__ or err.__context__
    if first.startswith("Could not override '") or "not in struct" in text:
        key = first.split("'")[1] if "'" in first else "?"
        if task == "evaluate":
            from naqs_cli.build import EVALUATE_OVERRIDABLE

            return (
                f"{key}: evaluate uses the checkpoint's config and may change only"
                f" {EVALUATE_OVERRIDABLE} (pick a sampler option before setting its keys)"
            )
        return (
            f"{key}: unknown key; `naqs <command> --cfg job` lists the keys"
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
    return first


def _user_error_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from naqs_cli.build import ConfigError
    from naqs_cli.store import CheckpointError
    from naqs_cli.tasks import NotImplementedYetError

    return (
        HydraException,
        OmegaConfBaseException,
        ConfigError,
        CheckpointError,
        NotImplementedYetError,
        UserError,
    )


def _fail(command: str, message: str, code: int = 2) -> None:
    sys.stderr.write(f"naqs {command}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _os_error_line(err: OSError) -> str:
    """Return one line for a failed read or write, naming the file."""
    text = str(err.strerror or err).strip()
    if err.filename and str(err.filename) not in text:
        text += f": {err.filename}"
    return text.splitlines()[0] if text else type(err).__name__


def _run_hydra(command: str, task: str, hydra_args: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from naqs_cli import CONF_DIR, tasks
    from naqs_cli.config import register_configs

    register_configs()
    user_errors = _user_error_types()

    @hydra.main(config_path=str(CONF_DIR), config_name=task, version_base="1.3")
    def app(cfg) -> None:
        hc = HydraConfig.get()
        out_dir = Path(hc.runtime.output_dir)
        try:
            if task == "train":
                result = tasks.train(cfg, out_dir, overrides=list(hc.overrides.task))
            else:
                result = getattr(tasks, task)(cfg, out_dir)
        except tasks.InterruptedRunError as err:
            sys.stderr.write(f"naqs {command}: {err}\n")
            sys.stderr.flush()
            raise SystemExit(err.exit_code) from None
        except tasks.TrainingDivergedError as err:
            _fail(command, str(err), code=3)
        except OSError as err:
            _fail(command, _os_error_line(err), code=1)
        except user_errors as err:
            _fail(command, _one_line(err, task))
        print(result.summary, flush=True)

    sys.argv = [f"naqs {command}", *hydra_args]
    app()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `naqs` console script.

    Exit codes: 0 done, 1 a failed read or write (disk full, unwritable directory), 2 a user
    error (one line on stderr, nothing written), 3 training diverged, 128 + signal number
    after SIGINT/SIGTERM (the checkpoint is written; the message says how to resume).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    try:
        command, task, rest = _split_command(argv)
        flags, positional = _split_flags(rest)
        overrides = _quote_paths(_rewrite_checkpoint(task, positional))
        os.environ["HYDRA_FULL_ERROR"] = "1"  # we format errors ourselves
        if not any(f in INFO_FLAGS or f.startswith("--cfg") for f in flags):
            message = check_overrides(task, overrides, flags)
            if message is not None:
                _fail(command, message)
        overrides = _resume_run_dir(task, flags, overrides)
        _run_hydra(command, task, flags + overrides)
    except UserError as err:
        _fail(command, str(err))
    except _user_error_types() as err:
        _fail(command, _one_line(err))
    except OSError as err:  # e.g. Hydra cannot create the run directory
        _fail(command, _os_error_line(err), code=1)
    except KeyboardInterrupt:
        _fail(command, "interrupted", code=130)


if __name__ == "__main__":
    main()
