"""Learning-rate schedules and stages, on steps or on the elapsed fraction of a time budget.

A run is a sequence of stages (`train.stages`, or one stage from `train.steps`,
`sampler.n_samples` and `optim.lr`); within a stage `optim.schedule` shapes the learning rate:

- ``constant``: lr;
- ``cosine``: lr · ½(1 + cos(π t/T)), t the position in the stage and T its length;
- ``step``: lr · step_factor^⌊t/step_every⌋.

Without `train.time_budget`, positions are steps. With a budget, the schedule runs on the
elapsed fraction f of the budget instead: stage i holds the fraction of the budget its share of
the steps gives it, and t/T is the fraction of that stage's time that has passed, so a cosine
reaches its end exactly when the budget is spent, however fast the machine is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Allowed values of `optim.schedule`.
SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class Stage:
    """A contiguous block of steps with one batch size and base learning rate."""

    start: int
    steps: int
    n_samples: int
    lr: float


@dataclass(frozen=True)
class Schedule:
    """Where a run is: its stage and learning rate at a step (or an elapsed time).

    Attributes:
        stages: the stages in order (`start` counts steps from 0).
        kind: constant | cosine | step.
        step_every: steps between decays (`step`).
        step_factor: factor per decay (`step`).
        time_budget: seconds of training (None: the schedule runs on steps).
    """

    stages: tuple[Stage, ...]
    kind: str = "constant"
    step_every: int = 1000
    step_factor: float = 0.5
    time_budget: float | None = None

    @property
    def total_steps(self) -> int:
        """Return the number of steps of all stages."""
        last = self.stages[-1]
        return last.start + last.steps

    def at(
        self, step: int, lr_scale: float = 1.0, elapsed: float = 0.0
    ) -> tuple[int, Stage, float]:
        """Return (stage index, stage, learning rate) of `step`, or of `elapsed` seconds.

        Args:
            step: the step about to run.
            lr_scale: the rollback factor (halved at each rollback).
            elapsed: training seconds so far (used only with a time budget).
        """
        if self.time_budget is None:
            index, stage = self._stage_of_step(step)
            position, length = step - stage.start, max(stage.steps, 1)
        else:
            fraction = min(max(elapsed / self.time_budget, 0.0), 1.0)
            index, stage, local = self._stage_of_fraction(fraction)
            length = max(stage.steps, 1)
            position = local * length
        return index, stage, stage.lr * self._factor(position, length) * lr_scale

    def _factor(self, position: float, length: float) -> float:
        """Return the schedule's factor at `position` of a stage `length` long."""
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(position, length) / length))
        if self.kind == "step":
            return self.step_factor ** (int(position) // self.step_every)
        return 1.0

    def _stage_of_step(self, step: int) -> tuple[int, Stage]:
        for i, stage in enumerate(self.stages):
            if step < stage.start + stage.steps:
                return i, stage
        return len(self.stages) - 1, self.stages[-1]

    def _stage_of_fraction(self, fraction: float) -> tuple[int, Stage, float]:
        """Return (index, stage, fraction of the stage passed) at a fraction of the budget."""
        total = max(self.total_steps, 1)
        for i, stage in enumerate(self.stages):
            begin, end = stage.start / total, (stage.start + stage.steps) / total
            if fraction < end or i == len(self.stages) - 1:
                width = end - begin
                local = (fraction - begin) / width if width > 0 else 1.0
                return i, stage, min(max(local, 0.0), 1.0)
        raise AssertionError("unreachable: the last stage ends at fraction 1")


def make_stages(
    stages: list[dict] | None, steps: int, n_samples: int, lr: float
) -> tuple[Stage, ...]:
    """Return the stages of `train.stages`, or one stage from the single keys.

    Args:
        stages: a list of {steps, n_samples, lr} (None: one stage).
        steps, n_samples, lr: `train.steps`, `sampler.n_samples`, `optim.lr`.
    """
    raw = stages if stages is not None else [{"steps": steps, "n_samples": n_samples, "lr": lr}]
    out, start = [], 0
    for s in raw:
        out.append(Stage(start, int(s["steps"]), int(s["n_samples"]), float(s["lr"])))
        start += int(s["steps"])
    return tuple(out)
