"""What every subcommand hands back to the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TaskResult:
    """What a task hands back: the text the CLI prints and the files it wrote.

    Attributes:
        summary: the text printed on stdout.
        out_dir: the directory the task wrote to.
        values: the numbers behind the summary (per-site observables, errors, ...).
    """

    summary: str
    out_dir: Path
    values: dict[str, Any] = field(default_factory=dict)
