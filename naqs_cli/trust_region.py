"""The natural-gradient trust region (`optim.max_infidelity`): halve a step that moves too far.

A step θ ← θ − lr·δθ is taken, then the fidelity |⟨Ψ|Ψ'⟩|² between the state before (Ψ,
which drew the batch) and after it (Ψ') is estimated on the batch's rows,

    F = |Σ_x w(x) Ψ'(x)/Ψ(x)|²,

with the weights of the step's own estimators: 1/N_s per sample (count/N_s per symmetry
orbit), or |Ψ(x)|² for a full sum, where F is exact. Every naqs model is normalized, so weight
that Ψ' moves onto configurations the batch never drew lowers F instead of hiding: the
collapse of an autoregressive state onto one product state after a large first step (Ψ' ≈ 0
on every sample; seen on the 4×4 TFIM with a small shift, where the run then stays there
with a gradient of exactly 0) reads as F ≈ 0. While F < 1 − max_infidelity the parameters
are restored and half the step is tried, at most `MAX_HALVINGS` times (the last try is kept).
One network pass over the rows per try; on several ranks the overlap is all-reduced, so
every rank takes the same step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from naqs_cli import distributed
from naqs_cli.samplers import Samples
from naqs_cli.state import VariationalState

#: A step is halved at most this many times (then taken as it is).
MAX_HALVINGS = 8


def move(
    state: VariationalState,
    batch: Samples,
    params: list[torch.nn.Parameter],
    direction: Tensor,
    lr: float,
    max_infidelity: float | None,
) -> tuple[float, float]:
    """θ ← θ − s·lr·δθ with s = 1, halved while 1 − F exceeds `max_infidelity`.

    Args:
        state: the variational state the batch was drawn from (its parameters are `params`).
        batch: this rank's batch of the step.
        params: the parameters, in the order of `direction`'s entries.
        direction: δθ, (P,) float64.
        lr: the learning rate.
        max_infidelity: the trust region's radius in 1 − F, or None (the whole step, no F).

    Returns:
        (s, the estimated F of the step taken; NaN without a trust region).
    """
    sizes = [p.numel() for p in params]

    def shift_by(factor: float) -> None:
        with torch.no_grad():
            for p, part in zip(params, direction.split(sizes), strict=True):
                p.sub_((factor * part).view_as(p).to(p.dtype))

    if max_infidelity is None:
        shift_by(lr)
        return 1.0, math.nan
    x, log_psi, weights = overlap_rows(state, batch)
    saved = [p.detach().clone() for p in params]
    scale = 1.0
    for halvings in range(MAX_HALVINGS + 1):
        shift_by(lr * scale)
        fidelity = estimate_fidelity(state, x, log_psi, weights)
        if fidelity >= 1.0 - max_infidelity or halvings == MAX_HALVINGS:
            break
        with torch.no_grad():
            for p, before in zip(params, saved, strict=True):
                p.copy_(before)
        scale *= 0.5
    return scale, fidelity


def overlap_rows(state: VariationalState, batch: Samples) -> tuple[Tensor, Tensor, Tensor]:
    """Return (x, ln Ψ(x), w(x)) of this rank's rows: the step's own rows and weights
    (`VariationalState.per_orbit`: one per orbit, else per sample; a full sum's |Ψ|²)."""
    log_psi = batch.log_psi if batch.log_psi is not None else state.log_psi(batch.x)
    rows, log_psi = state.per_orbit(batch, log_psi)
    if rows.weights is not None:
        return rows.x, log_psi, rows.weights.to(torch.float64)
    n_total = state.n_total(rows)
    return rows.x, log_psi, torch.full_like(log_psi.real, 1.0 / n_total, dtype=torch.float64)


def estimate_fidelity(
    state: VariationalState, x: Tensor, log_psi: Tensor, weights: Tensor
) -> float:
    """|Σ w Ψ'(x)/Ψ(x)|² over every rank's rows, Ψ' the state's parameters now."""
    ratio = torch.exp(state.log_psi(x) - log_psi)
    overlap = (weights * ratio).sum()
    parts = distributed.all_reduce_sum(torch.stack([overlap.real, overlap.imag]))
    return float(parts.square().sum())
