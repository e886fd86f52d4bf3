"""The training loop, read top to bottom: sample, local energies, update, record, repeat.

Non-finite local energies or gradients skip the update (the row is kept with NaN energies);
`train.max_nonfinite` of them in a row, an update that makes parameters non-finite, or a
checkpoint refused for NaN/inf roll back to the last good checkpoint with the learning rate
halved; more than `train.max_rollbacks` rollbacks without progress raise
`TrainingDivergedError`. No checkpoint is written during a non-finite streak, so a rollback
never returns to the state that failed.

The run ends when every step is done or `train.time_budget` seconds of training are spent
(rank 0's clock decides, and every rank follows), or on SIGINT/SIGTERM (checkpoint first).

Host-device syncs: one per step (the update rule reads the finiteness flags and the gradient
norm together; the check that the previous update left the parameters finite rides along,
unless the step logs or checkpoints, where it is read at once). Statistics stay on the device
until the rows are flushed, every `train.log_every` steps.

On several ranks (torchrun) every rank holds the same model and update rule and its own
sampler (its share of the samples, chains or basis, with its own random stream); rank 0 alone
writes files, and every decision that changes the control flow (skip, rollback, save, stop)
comes from all-reduced values or from rank 0, so the ranks never part ways.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from naqs_cli import distributed, store
from naqs_cli.errors import InterruptedRunError, TrainingDivergedError
from naqs_cli.train import callbacks as callbacks_module
from naqs_cli.train import checkpoint
from naqs_cli.train.callbacks import RollbackRequiredError, StepEvents
from naqs_cli.train.resume import load_init_weights, resume_command
from naqs_cli.train.signals import SignalCatcher

if TYPE_CHECKING:
    from naqs_cli.build import TrainingSetup
    from naqs_cli.samplers import Samples

log = logging.getLogger("naqs_cli.train")

#: Values of the `stopped` attribute of history.h5.
#: `running` while a process trains (a killed run keeps it), then why it stopped.
STOPPED_STEPS, STOPPED_BUDGET, STOPPED_SIGNAL = "steps", "time_budget", "signal"
RUNNING, DIVERGED = "running", "diverged"


class Trainer:
    """The state of one training run (variational state, update rule, files).

    Nothing is written until every checkpoint to restore or initialize from has loaded.

    Args:
        setup: what `build.build_training` made of the config.
        out_dir: the run directory.
        checkpoint: a checkpoint's state to continue from (resume), or None.
        checkpoint_path: where it was read (for messages).
    """

    def __init__(
        self,
        setup: TrainingSetup,
        out_dir: Path,
        checkpoint_state: dict | None = None,
        checkpoint_path: Path | None = None,
    ) -> None:
        self.setup = setup
        self.settings = setup.settings
        self.runtime = setup.runtime
        self.state = setup.state
        self.rule = setup.rule
        self.schedule = setup.settings.schedule
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.step = 0
        self.lr_scale = 1.0
        self.best_energy = math.inf
        self.recent: list[float] = []
        self.last_values: dict[str, float] = {}
        self.elapsed = 0.0
        self.rollbacks = 0  # rollbacks since the last checkpoint past the failure point
        self.failed_at = -1  # step of the last rollback
        self.saved_step: int | None = None  # step of the last good checkpoints/last.pt
        self.params_check: torch.Tensor | None = None  # unread finiteness of the last update
        self.bad_in_a_row = 0  # non-finite steps in a row
        self.save_due = False  # a checkpoint_every boundary passed since the last save
        self.stopped: str | None = None
        self.catcher = SignalCatcher()
        if checkpoint_state is not None:
            checkpoint.restore(self, checkpoint_state, checkpoint_path or self.ckpt_dir / "last.pt")
            self.saved_step = self.step
            checkpoint.recall_best(self)
        elif self.settings.init_from:
            load_init_weights(
                self.model, self.settings.init_from, self.settings.allow_unverified_checkpoint
            )
            log.info("initialized weights from %s", self.settings.init_from)
        self.history: store.HistoryWriter | None = distributed.on_main(
            lambda: self._open_history(resumed=checkpoint_state is not None), share_result=False
        )
        self.callbacks = callbacks_module.default_callbacks()

    @property
    def model(self) -> torch.nn.Module:
        """The wave function being trained."""
        return self.state.model

    @property
    def sampler(self):
        """This rank's sampler."""
        return self.state.sampler

    @property
    def total_steps(self) -> int:
        """The number of steps of all stages."""
        return self.schedule.total_steps

    def _open_history(self, resumed: bool) -> store.HistoryWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "history.h5"
        attrs = None  # a resumed run keeps the file's attributes
        if not path.exists():
            attrs = {**self.setup.run_attrs(), "world_size": self.runtime.world_size}
        history = store.HistoryWriter(path, attrs)
        if resumed:
            kept = history.truncate_from(self.step)
            log.info("resumed at step %d (%d history rows kept)", self.step, kept)
        return history

    # -- the loop ------------------------------------------------------------------------
    def run(self, catcher: SignalCatcher) -> None:
        """Train until every step is done, the time budget is spent, a signal, or divergence.

        Raises:
            InterruptedRunError: a signal stopped the run (history flushed, checkpoint written).
            TrainingDivergedError: non-finite steps persisted through every rollback.
        """
        self.catcher = catcher
        self.bad_in_a_row, self.save_due = 0, False
        if self.step == 0 and self.saved_step is None:
            checkpoint.save(self)  # a good state to roll back to, and a file to resume from
        self._mark_stopped(RUNNING)
        for callback in self.callbacks:
            callback.on_start(self)
        t_start = time.perf_counter() - self.elapsed
        clock = self._clock(self.elapsed)
        if self.step >= self.total_steps or self._budget_spent(clock):
            self.stopped = self._stop_reason(clock)  # a resumed run with nothing left to do
        while self.stopped is None:
            # the end of a run is decided at the end of a step (`_events`), where it is saved
            clock = self._clock(time.perf_counter() - t_start)
            stage_index, stage, lr = self.schedule.at(self.step, self.lr_scale, clock)
            self.rule.lr = lr
            self.rule.position = self._position(clock)
            batch = self.state.sample(stage.n_samples // self.runtime.world_size)
            for callback in self.callbacks:
                callback.on_batch(self, batch)
            e_loc = self.state.local_energy(batch)
            result = self.rule.step(self.state, batch, e_loc, pending_check=self.params_check)
            self.params_check = None
            if not result.pending_ok:  # the previous step's update, found out now
                log.error("step %d: the update made parameters non-finite", self.step - 1)
                self._rollback("non-finite parameters")
                continue
            for callback in self.callbacks:
                callback.on_update(self, result)
            if result.is_finite:
                if not self._check_parameters():
                    continue
                self.bad_in_a_row = 0
            elif not self._count_nonfinite(result):
                continue
            values = self.state.expect(batch, result.e_loc)
            self.elapsed = time.perf_counter() - t_start
            row = {
                "step": self.step,
                "stage": stage_index,
                "n_samples": self.state.n_total(batch),
                "wall_time": self.elapsed,
                "lr": lr,
                "grad_norm": result.grad_norm,
                **{k: v for k, v in result.info.items() if isinstance(v, (int, float))},
                **values,
                **self._sampler_info(batch),
            }
            self.step += 1
            events = self._events()
            try:
                for callback in self.callbacks:
                    callback.on_step_end(self, row, events)
            except RollbackRequiredError as request:
                self._rollback(str(request))
                continue
            if events.stopping:
                self._stop()
            if events.at_end:
                self.stopped = self._stop_reason(self._clock(self.elapsed))
        self._mark_stopped(self.stopped)
        for callback in self.callbacks:
            callback.on_end(self, self.stopped)

    # -- pieces of a step ----------------------------------------------------------------
    def _clock(self, seconds: float) -> float:
        """Return rank 0's training clock (every rank must schedule and stop alike)."""
        if self.settings.time_budget is not None and self.runtime.world_size > 1:
            return float(distributed.broadcast_object(seconds))
        return seconds

    def _position(self, clock: float) -> float:
        """Return the fraction of the run done: of the steps, or of the time budget if further."""
        done = self.step / max(self.total_steps, 1)
        if self.settings.time_budget is not None:
            done = max(done, clock / self.settings.time_budget)
        return min(done, 1.0)

    def _budget_spent(self, clock: float) -> bool:
        budget = self.settings.time_budget
        return budget is not None and clock >= budget

    def _stop_reason(self, clock: float) -> str:
        return STOPPED_BUDGET if self._budget_spent(clock) else STOPPED_STEPS

    def _check_parameters(self) -> bool:
        """Check that the update left every parameter finite (now, or with the next step).

        Returns:
            False when the run rolled back (the step is to be repeated).
        """
        params_ok = self._params_finite()
        upcoming = self.step + 1
        settings = self.settings
        look_now = (
            self.save_due
            or upcoming == self.total_steps
            or upcoming % settings.log_every == 0
            or upcoming % settings.checkpoint_every == 0
        )
        if not look_now:
            self.params_check = params_ok  # read with the next step's flags
            return True
        if bool(params_ok):
            return True
        log.error("step %d: the update made parameters non-finite", self.step)
        self._rollback("non-finite parameters")
        return False

    def _count_nonfinite(self, result) -> bool:
        """Count a skipped (non-finite) step; roll back after `train.max_nonfinite` in a row.

        Returns:
            False when the run rolled back.
        """
        self.bad_in_a_row += 1
        limit = self.settings.max_nonfinite
        log.warning(
            "step %d: non-finite %s, update skipped (%d in a row, limit %d)",
            self.step,
            "gradient" if result.energy_finite else "local energy",
            self.bad_in_a_row,
            limit,
        )
        if self.bad_in_a_row >= limit:
            self._rollback(f"{self.bad_in_a_row} non-finite steps in a row")
            return False
        return True

    def _events(self) -> StepEvents:
        """Decide what the end of this step calls for (the same on every rank)."""
        settings = self.settings
        clock = self._clock(self.elapsed)
        at_end = self.step == self.total_steps or self._budget_spent(clock)
        stopping = distributed.any_true(self.catcher.signal_name is not None)
        self.save_due = self.save_due or self.step % settings.checkpoint_every == 0
        log_point = self.step % settings.log_every == 0 or at_end or stopping
        return StepEvents(log=log_point, at_end=at_end, stopping=stopping)

    def _params_finite(self) -> torch.Tensor:
        """Return whether every parameter is finite on every rank: a 0-dim bool device tensor.

        Nothing is read from the device here; the caller decides when to look.
        """
        flags = torch.stack([torch.isfinite(p.detach()).all() for p in self.model.parameters()])
        n_bad = (~flags).sum().to(torch.float64).reshape(1)
        if self.runtime.world_size > 1:
            n_bad = distributed.all_reduce_sum(n_bad)
        return n_bad.reshape(()) == 0

    def _sampler_info(self, batch: Samples) -> dict[str, float]:
        """Return the sampler's numeric diagnostics (acceptance), averaged over ranks."""
        info = {k: v for k, v in batch.info.items() if isinstance(v, (int, float))}
        world = self.runtime.world_size
        if info and world > 1:
            sums = distributed.all_reduce_sum(torch.tensor(list(info.values()), dtype=float))
            info = dict(zip(info, (sums / world).tolist(), strict=True))
        return info

    def save(self, name: str = "last.pt") -> bool:
        """Write checkpoints/`name` unless the state holds NaN/inf (see `checkpoint.save`)."""
        return checkpoint.save(self, name)

    def flush(self) -> None:
        """Write every callback's buffered rows (history.h5)."""
        for callback in self.callbacks:
            callback.flush(self)

    def _rollback(self, reason: str) -> None:
        self.flush()
        try:
            checkpoint.rollback(self, reason)
        except TrainingDivergedError:
            self._mark_stopped(DIVERGED)
            raise
        self.bad_in_a_row, self.save_due = 0, False
        for callback in self.callbacks:
            callback.on_rollback(self)

    def _mark_stopped(self, reason: str | None) -> None:
        """Record in history.h5 why training stopped (`stopped`: steps | time_budget | signal |
        diverged), or `running` while it trains."""

        def write() -> None:
            with self.catcher.critical():
                store.write_attrs(self.history.path, {"stopped": reason or ""})

        distributed.on_main(write, share_result=False)

    def _stop(self) -> None:
        """Raise InterruptedRunError after a signal (history flushed, checkpoint written)."""
        catcher = self.catcher
        for callback in self.callbacks:
            close = getattr(callback, "close", None)
            if close is not None:
                close()
        self._mark_stopped(STOPPED_SIGNAL)
        name = catcher.signal_name or "SIGTERM"  # a rank the signal has not reached yet
        if self.saved_step == self.step:
            where = f"checkpoint and history saved in {self.out_dir}"
        else:
            where = (
                f"the last good checkpoint is at step {self.saved_step} (the last steps had"
                f" non-finite energies or gradients), history saved in {self.out_dir}"
            )
        log.warning("%s: stopped at step %d/%d", name, self.step, self.total_steps)
        raise InterruptedRunError(
            f"{name}: stopped at step {self.step}/{self.total_steps}; {where}."
            f" Resume with: {resume_command(self.out_dir)}",
            exit_code=128 + int(catcher.signum or signal.SIGTERM),
        )


def run_catching_signals(trainer: Trainer, what: str = "") -> None:
    """Run the loop under SIGINT/SIGTERM handling: the first signal stops after the current
    step (checkpoint written); a second one stops at once.

    Args:
        what: names the run in messages (e.g. "compare training run direct: ").

    Raises:
        InterruptedRunError: a signal stopped the run; the message says where to resume.
        TrainingDivergedError: non-finite steps persisted through every rollback.
    """
    with SignalCatcher() as catcher:
        try:
            trainer.run(catcher)
        except KeyboardInterrupt:
            name = catcher.signal_name or "SIGINT"
            raise InterruptedRunError(
                f"{what}{name} twice: stopped during step {trainer.step}; the last checkpoint"
                f" is at step {trainer.saved_step} (later history rows are dropped on"
                f" resume). Resume with: {resume_command(trainer.out_dir)}",
                exit_code=128 + int(catcher.signum or signal.SIGINT),
            ) from None
