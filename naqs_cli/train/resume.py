"""Continuing runs: the resume command, the new-run guard, and weights from another run.

The config side of resuming (the stored config with the command line's overrides, and what
they may not change) is `naqs_cli.compose.prepare_resume`; restoring the state is
`checkpoint.restore`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from naqs_cli import distributed, store
from naqs_cli.errors import CheckpointError, ConfigError, first_line
from naqs_cli.models import unwrap


def resume_command(out_dir: Path) -> str:
    """Return the shell command that continues the run in `out_dir` (on as many ranks)."""
    resume = shlex.quote(f"resume={out_dir}")
    ranks = distributed.world_size()
    if ranks > 1:
        return f"torchrun --nproc_per_node={ranks} -m naqs_cli train {resume}"
    return f"naqs train {resume}"


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


def load_init_weights(
    model: torch.nn.Module, path: str | Path, allow_unverified: bool = False
) -> None:
    """Load the weights of checkpoint `path` into `model` (`train.init_from`).

    Args:
        allow_unverified: accept a checkpoint without a checksum.

    Raises:
        CheckpointError: the file is unreadable or its weights do not fit the model.
    """
    state = store.load_checkpoint(path, allow_unverified=allow_unverified)
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        first = lines[1] if len(lines) > 1 else first_line(err)
        raise CheckpointError(
            f"train.init_from={path}: its weights do not fit this model ({first[:200]})"
        ) from None
