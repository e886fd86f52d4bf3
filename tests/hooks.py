"""Training-step test hooks, selected with NAQS_TEST_HOOKS=<path of this file>:<function>.

Each function below returns the {hook name: callable} dict that the training loop looks up
(`naqs_cli.store._test_hook`) at fixed points of a step:

- "training_batch"(step, batch): after sampling, before the training step (may edit `batch`);
- "after_update"(step, model): after the optimizer step.

Tests select them through tests/hooked_cli.py (hooksets progress, nan_energies,
nan_parameters and the write hooksets, which record progress too) or by setting the
variable themselves. Parameters come from environment variables, so a test sets them for one
subprocess:

- NAQS_TEST_PROGRESS: a file that receives the current step before each training step;
- NAQS_TEST_CALLS: training steps (1-based call counts) that get NaN, e.g. "6-8" or "3-".

Counters count calls in this process, so a step that is repeated after a rollback or a resume
is a new call.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_COUNTS: dict[str, int] = {}


def _count(name: str) -> int:
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    return _COUNTS[name]


def _in_calls(call: int) -> bool:
    text = os.environ.get("NAQS_TEST_CALLS", "")
    for part in filter(None, text.split(",")):
        low, sep, high = part.partition("-")
        top = (int(high) if high else math.inf) if sep else int(low)
        if int(low) <= call <= top:
            return True
    return False


def _record_progress(step: int, batch) -> None:
    path = os.environ.get("NAQS_TEST_PROGRESS")
    if path:
        tmp = f"{path}.tmp"
        Path(tmp).write_text(str(step))
        os.replace(tmp, path)


_POISONED: list = []  # batches whose local energies come out NaN


def _poison_local_energies() -> None:
    """Wrap `vmc.local_energy` (once) so that the batches in _POISONED get NaN energies."""
    from naqs_cli import vmc

    original = vmc.local_energy
    if getattr(original, "poisoning", False):
        return

    def local_energy(model, hamiltonian, batch, *args, **kwargs):
        result = original(model, hamiltonian, batch, *args, **kwargs)
        if any(batch is poisoned for poisoned in _POISONED):
            nan = float("nan")
            return vmc.LocalEnergy(result.total * nan, result.off_diagonal * nan)
        return result

    local_energy.poisoning = True
    vmc.local_energy = local_energy


def _nan_energies(step: int, batch) -> None:
    _record_progress(step, batch)
    _poison_local_energies()
    if _in_calls(_count("batch")):
        _POISONED[:] = [batch]  # every local energy of this step becomes NaN


def _nan_parameters(step: int, model) -> None:
    if _in_calls(_count("update")):
        first = next(model.parameters())
        first.data.fill_(float("nan"))


def progress() -> dict:
    """Record the step in NAQS_TEST_PROGRESS."""
    return {"training_batch": _record_progress}


def nan_energies() -> dict:
    """Make every local energy NaN on the training steps listed in NAQS_TEST_CALLS."""
    return {"training_batch": _nan_energies}


def nan_parameters() -> dict:
    """Fill a parameter with NaN after the updates listed in NAQS_TEST_CALLS."""
    return {"after_update": _nan_parameters}
