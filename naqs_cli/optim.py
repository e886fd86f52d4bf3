"""Update rules: how one step turns a batch and its local energies into new parameters.

An update rule is the `optim` config group's object. It owns whatever state it needs (Adam's
moments, a natural-gradient solver's shift) and is called once per step:

    result = rule.step(state, batch, e_loc)

Here the first-order rules wrap `torch.optim.Adam` and `torch.optim.SGD` around the Eq. 4
gradient of `VariationalState.expect_and_grad`. A rule that needs per-sample log-derivatives
(stochastic reconfiguration, MinSR) implements the same `step` with its own solve.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from naqs_cli import distributed
from naqs_cli.samplers import Samples
from naqs_cli.state import VariationalState
from naqs_cli.vmc import LocalEnergy, StepResult


class UpdateRule:
    """Base of every update rule: a learning rate, a step, and a checkpointable state."""

    #: The `optim` option this rule implements (adam, sgd, ...).
    name = "base"
    #: The fraction of the run done, in [0, 1] (steps, or the time budget when further along),
    #: set by the training loop before each step; rules with schedules of their own read it.
    position: float = 0.0

    @property
    def lr(self) -> float:
        """The learning rate of the next step (set by the schedule before each step)."""
        raise NotImplementedError

    @lr.setter
    def lr(self, value: float) -> None:
        raise NotImplementedError

    def step(
        self,
        state: VariationalState,
        batch: Samples,
        e_loc: LocalEnergy,
        *,
        pending_check: torch.Tensor | None = None,
    ) -> StepResult:
        """Update the parameters of `state` from one batch; see `FirstOrderRule.step`."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Return the rule's state for a checkpoint."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rule's state from a checkpoint."""
        raise NotImplementedError


class FirstOrderRule(UpdateRule):
    """A `torch.optim` optimizer applied to the Eq. 4 gradient, with optional norm clipping.

    Args:
        optimizer: Adam or SGD over the model's trainable parameters.
        name: the `optim` option (adam | sgd).
        grad_clip: clip the gradient norm to this value (None: no clipping).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, name: str, grad_clip: float | None = None
    ) -> None:
        self.optimizer = optimizer
        self.name = name
        self.grad_clip = grad_clip

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def step(
        self,
        state: VariationalState,
        batch: Samples,
        e_loc: LocalEnergy,
        *,
        pending_check: torch.Tensor | None = None,
    ) -> StepResult:
        """Run one VMC step: Eq. 4 gradient, all-reduce, clip, optimizer step.

        A non-finite local energy or gradient skips the update (gradients are discarded) on
        every rank alike: a non-finite local energy anywhere makes the all-reduced baseline
        non-finite, and the gradient is all-reduced before its norm is taken. The step reads
        the device once (the finiteness flags and the gradient norm, together): whether to
        call `optimizer.step` must be known on the host, because Adam's moments must not see a
        skipped step.

        Args:
            state: the variational state (its parameters are updated).
            batch: this rank's samples.
            e_loc: their local energies.
            pending_check: a 0-dim bool device tensor read in the same sync (the loop's
                deferred check that the previous update left the parameters finite); False
                skips the update.
        """
        e_mean = state.expect_and_grad(batch, e_loc.total)
        params = [p for p in state.model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        flags = [torch.isfinite(e_mean), grad_norm]
        if pending_check is not None:
            flags.append(pending_check)
        energy_ok, norm, *pending = torch.stack([f.to(torch.float64) for f in flags]).tolist()
        pending_ok = bool(pending[0]) if pending else True
        if not energy_ok:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(e_loc, math.nan, False, False, pending_ok)
        if not math.isfinite(norm) or not pending_ok:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(e_loc, norm, False, True, pending_ok)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(e_loc, norm, True)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def first_order_rule(
    name: str,
    model: torch.nn.Module,
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.99),
    momentum: float = 0.0,
    grad_clip: float | None = None,
) -> FirstOrderRule:
    """Return the Adam or SGD rule over the model's trainable parameters.

    Raises:
        ValueError: `name` is not adam or sgd.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, betas=betas)
    elif name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    else:
        raise ValueError(f"unknown first-order rule {name!r}")
    return FirstOrderRule(optimizer, name, grad_clip)


def train_step(
    model: torch.nn.Module,
    hamiltonian,
    batch: Samples,
    optimizer: torch.optim.Optimizer,
    *,
    chunk_size: int = 1024,
    grad_clip: float | None = None,
) -> StepResult:
    """Run one first-order VMC step on a batch outside a training run (benchmarks, tests).

    The same computation as a step of the training loop: `VariationalState.local_energy`,
    then `FirstOrderRule.step` with this optimizer.
    """
    state = VariationalState(
        model, None, hamiltonian, chunk_size=chunk_size, world_size=distributed.world_size()
    )
    rule = FirstOrderRule(optimizer, type(optimizer).__name__.lower(), grad_clip)
    return rule.step(state, batch, state.local_energy(batch))
