"""Training-step test seams: callbacks added to the training loop by monkeypatching.

`add_callbacks(*callbacks)` makes `naqs_cli.train.callbacks.default_callbacks` return the
run's own callbacks followed by these, so the loop calls them at its fixed points
(`on_batch` after sampling, `on_update` after the update rule's step). Production code reads
no environment variable for them: a test patches its own process (in-process tests, forked
ranks) or runs tests/hooked_cli.py, which patches the subprocess before the CLI starts.

Counters count calls in this process, so a step that is repeated after a rollback or a resume
is a new call.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from naqs_cli import vmc
from naqs_cli.train import callbacks as callbacks_module
from naqs_cli.train.callbacks import Callback


def add_callbacks(*extra: Callback) -> None:
    """Append `extra` to every training run's callbacks in this process."""
    defaults = callbacks_module.default_callbacks

    def with_extra() -> list[Callback]:
        return [*defaults(), *extra]

    callbacks_module.default_callbacks = with_extra


def in_calls(call: int, spec: str) -> bool:
    """Return whether 1-based `call` is in a spec like "6-8,14-" or "3,7"."""
    for part in filter(None, spec.split(",")):
        low, sep, high = part.partition("-")
        top = (int(high) if high else math.inf) if sep else int(low)
        if int(low) <= call <= top:
            return True
    return False


class RecordProgress(Callback):
    """Write the step about to run to `path` (atomically) after each sampling."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def on_batch(self, trainer, batch) -> None:
        tmp = f"{self.path}.tmp"
        Path(tmp).write_text(str(trainer.step))
        os.replace(tmp, self.path)


class RecordBatches(Callback):
    """Append "step batch-size" lines to `prefix`.RANK (one file per torchrun rank)."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)

    def on_batch(self, trainer, batch) -> None:
        path = f"{self.prefix}.{os.environ.get('RANK', '0')}"
        with open(path, "a") as f:
            f.write(f"{trainer.step} {batch.n_samples}\n")


class PoisonEnergies(Callback):
    """Make every local energy NaN on the sampled batches whose call number is in `calls`."""

    def __init__(self, calls: str) -> None:
        self.calls = calls
        self.count = 0
        self.poisoned: list = []
        original = vmc.local_energy

        def local_energy(model, hamiltonian, batch, *args, **kwargs):
            result = original(model, hamiltonian, batch, *args, **kwargs)
            if any(batch is p for p in self.poisoned):
                nan = float("nan")
                return vmc.LocalEnergy(result.total * nan, result.off_diagonal * nan)
            return result

        vmc.local_energy = local_energy

    def on_batch(self, trainer, batch) -> None:
        self.count += 1
        self.poisoned[:] = [batch] if in_calls(self.count, self.calls) else []


class PoisonParameters(Callback):
    """Fill the first parameter with NaN after the updates whose call number is in `calls`."""

    def __init__(self, calls: str) -> None:
        self.calls = calls
        self.count = 0

    def on_update(self, trainer, result) -> None:
        self.count += 1
        if in_calls(self.count, self.calls):
            next(trainer.model.parameters()).data.fill_(float("nan"))
