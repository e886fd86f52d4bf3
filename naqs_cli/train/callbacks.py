"""What happens around each training step: history rows, checkpoints, the progress bar.

The loop (`loop.Trainer.run`) calls every callback in order at fixed points:

- `on_start(trainer)` before the first step of this process;
- `on_batch(trainer, batch)` after sampling, before local energies (may inspect the batch);
- `on_update(trainer, result)` after the update rule's step;
- `on_step_end(trainer, row, events)` after the step is counted; may raise `RollbackRequiredError`;
- `on_rollback(trainer)` after the state went back to the last checkpoint;
- `on_end(trainer, reason)` when training stops normally (`steps` or `time_budget`).

`default_callbacks` is the list a run gets; tests add their own by monkeypatching it.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from naqs_cli import distributed
from naqs_cli.train import checkpoint
from naqs_cli.train.resume import resume_command
from naqs_cli.vmc import to_floats

if TYPE_CHECKING:
    from naqs_cli.samplers import Samples
    from naqs_cli.train.loop import Trainer
    from naqs_cli.vmc import StepResult

log = logging.getLogger("naqs_cli.train")


@dataclass(frozen=True)
class StepEvents:
    """What the end of a step calls for.

    Attributes:
        log: a log point (every `train.log_every` steps, the last step, a signal).
        at_end: the last step (all steps done, or the time budget spent).
        stopping: a signal arrived (on any rank).
    """

    log: bool
    at_end: bool
    stopping: bool


class RollbackRequiredError(Exception):
    """Raised by a callback to send the run back to its last checkpoint."""


class Callback:
    """A no-op callback; subclasses override what they need."""

    def on_start(self, trainer: Trainer) -> None:
        """Before the first step of this process."""

    def on_batch(self, trainer: Trainer, batch: Samples) -> None:
        """After sampling, before local energies."""

    def on_update(self, trainer: Trainer, result: StepResult) -> None:
        """After the update rule's step."""

    def on_step_end(self, trainer: Trainer, row: dict[str, Any], events: StepEvents) -> None:
        """After the step is counted."""

    def on_rollback(self, trainer: Trainer) -> None:
        """After a rollback to the last checkpoint."""

    def on_end(self, trainer: Trainer, reason: str) -> None:
        """When training stops normally."""

    def flush(self, trainer: Trainer) -> None:
        """Write what is buffered (before a checkpoint, a rollback or a stop)."""


#: Steps in a row with a gradient of exactly 0 after which the run warns of a collapse.
COLLAPSE_STEPS = 10


class HistoryRows(Callback):
    """Buffer each step's row (device values) and append them to history.h5 at log points.

    Reading the rows is the loop's only host-device sync besides the step's own; the energies
    read feed the smoothing window of best.pt (`trainer.recent`). The gradients read are
    watched for a collapse: a gradient of exactly 0 for `COLLAPSE_STEPS` steps in a row means
    every sample is one configuration (Var E_loc = 0 on the samples); an autoregressive state
    that put all its weight on one product state draws nothing else and cannot leave it (seen
    after a first natural-gradient step with a small shift, before the trust region
    `optim.max_infidelity` existed). The run warns once and goes on.
    """

    def __init__(self) -> None:
        self.rows: dict[str, list] = {}
        self.zero_gradients = 0  # steps in a row with a gradient of exactly 0
        self.warned_collapse = False

    def on_step_end(self, trainer: Trainer, row: dict[str, Any], events: StepEvents) -> None:
        for key, value in row.items():
            self.rows.setdefault(key, []).append(value)
        if events.log:
            self.flush(trainer)

    def flush(self, trainer: Trainer) -> None:
        rows = self.rows
        if not rows:
            return
        self._to_host(trainer, rows)
        self._watch_collapse(rows)

        def append() -> None:
            try:
                with trainer.catcher.critical():
                    trainer.history.append({k: np.asarray(v) for k, v in rows.items()})
            except OSError as err:
                resume = (
                    f"; the checkpoint of step {trainer.saved_step} is kept: resume with:"
                    f" {resume_command(trainer.out_dir)}"
                    if trainer.saved_step is not None
                    else ""
                )
                raise OSError(err.errno, f"{err.strerror}{resume}") from err

        try:
            distributed.on_main(append, share_result=False)
        finally:
            rows.clear()

    @staticmethod
    def _to_host(trainer: Trainer, rows: dict[str, list]) -> None:
        """Read the rows' device values (one sync) and note their energies for best.pt."""
        cells = [(k, i) for k, column in rows.items() for i, v in enumerate(column)]
        tensors = [(k, i) for k, i in cells if torch.is_tensor(rows[k][i])]
        if tensors:
            numbers = to_floats({f"{k}\0{i}": rows[k][i] for k, i in tensors})
            for (k, i), number in zip(tensors, numbers.values(), strict=True):
                rows[k][i] = number
        energies = rows.get("energy", [])
        smoothing = trainer.settings.best_smoothing
        for energy in energies:
            if math.isfinite(energy):
                trainer.recent = (trainer.recent + [energy])[-smoothing:]
        if energies:
            trainer.last_values = {k: column[-1] for k, column in rows.items()}

    def _watch_collapse(self, rows: dict[str, list]) -> None:
        """Warn once when the gradient has been exactly 0 for `COLLAPSE_STEPS` steps."""
        for step, norm in zip(rows.get("step", []), rows.get("grad_norm", []), strict=False):
            self.zero_gradients = self.zero_gradients + 1 if norm == 0 else 0
            if self.zero_gradients == COLLAPSE_STEPS and not self.warned_collapse:
                self.warned_collapse = True
                log.warning(
                    "steps %d-%d: the gradient was exactly 0 in each: every sample is the same"
                    " configuration, so the state sits on one product state and cannot leave"
                    " it; unless that is the ground state (e.g. the TFIM at gamma=0), rerun"
                    " with a smaller optim.lr or optim.max_infidelity (natural gradient's trust"
                    " region), or a larger optim.diag_shift",
                    step - COLLAPSE_STEPS + 1,
                    step,
                )


class ProgressBar(Callback):
    """A tqdm bar on a terminal (rank 0) and a log line at every log point."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_start(self, trainer: Trainer) -> None:
        budget = trainer.settings.time_budget
        self.bar = tqdm(
            # with a time budget the end is a time, not a step: count steps, no total
            total=trainer.total_steps if budget is None else None,
            initial=trainer.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (sys.stdout.isatty() and distributed.is_main()),
        )

    def on_step_end(self, trainer: Trainer, row: dict[str, Any], events: StepEvents) -> None:
        self.bar.update(1)
        values = trainer.last_values
        if not events.log or not values:
            return
        self.bar.set_postfix_str(
            f"E={values['energy']:.5f}±{values['energy_err']:.1e}"
            f" var={values['energy_variance']:.2e} |m|={values['abs_magnetization']:.3f}",
            refresh=False,
        )
        budget = trainer.settings.time_budget
        where = (
            f"{trainer.step}/{trainer.total_steps}"
            if budget is None
            else f"{trainer.step} ({trainer.elapsed:.0f}/{budget:g} s)"
        )
        log.info(
            "step %s  E/N = %.6f ± %.1e  var = %.3e  |m| = %.4f  lr = %.2e",
            where,
            values["energy"],
            values["energy_err"],
            values["energy_variance"],
            values["abs_magnetization"],
            row["lr"],
        )

    def on_rollback(self, trainer: Trainer) -> None:
        self.bar.n = trainer.step

    def on_end(self, trainer: Trainer, reason: str) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar (also when a signal stops the run)."""
        if self.bar is not None:
            self.bar.close()


class Checkpoints(Callback):
    """best.pt at log points when the smoothed energy improved; last.pt when due.

    last.pt is written every `train.checkpoint_every` steps once no non-finite streak is
    running (so a rollback never returns to a failing state), at the last step and on a
    signal. A state holding NaN/inf is never written: that sends the run back instead.
    """

    def on_step_end(self, trainer: Trainer, row: dict[str, Any], events: StepEvents) -> None:
        clean = trainer.bad_in_a_row == 0
        if events.log and clean:
            self._maybe_save_best(trainer)
        if (trainer.save_due and clean) or events.at_end or events.stopping:
            trainer.flush()
            if (clean or events.at_end) and not checkpoint.save(trainer):
                raise RollbackRequiredError("non-finite state at a checkpoint")
            trainer.save_due = False

    @staticmethod
    def _maybe_save_best(trainer: Trainer) -> None:
        smoothed = math.inf
        if len(trainer.recent) >= min(trainer.settings.best_smoothing, max(trainer.step, 1)):
            smoothed = float(np.mean(trainer.recent))
        smoothed = distributed.broadcast_object(smoothed)  # rank 0 decides
        if smoothed < trainer.best_energy:
            previous, trainer.best_energy = trainer.best_energy, smoothed
            if not checkpoint.save(trainer, "best.pt"):
                trainer.best_energy = previous


def default_callbacks() -> list[Callback]:
    """Return the callbacks of a training run, in the order they are called."""
    return [HistoryRows(), ProgressBar(), Checkpoints()]
