"""Natural-gradient update rules: stochastic reconfiguration (`optim=sr`) and MinSR (`optim=minsr`).

With real parameters θ, O_k(x) = ∂ ln Ψ(x)/∂θ_k (complex) and row weights w(x) (1/N_s for
samples, |Ψ|² for full sums), the centred, scaled rows Ō = √w (O − ⟨O⟩_w) and
ε = √w (E_loc − Ē) form the real system

    X = [Re Ō; Im Ō]  (2N_s × P),   f = 2 [Re ε; Im ε],   S = XᵀX = Re Cov(O),   g = Xᵀf,

g being the Eq. 4 gradient. A step is θ ← θ − lr·δθ with

    SR:     δθ = (S + λI)⁻¹ g          (S dense, P × P: P ≤ optim.max_params),
    MinSR:  δθ = Xᵀ (T + λI)⁻¹ f       (T = XXᵀ, 2N_s × 2N_s),

equal by the push-through identity (NetKet's `VMC_SR` convention: its kernel solves
(XXᵀ + λ)⁻¹ against −f, so learning rates and shifts carry over).

- Relative shift (`diag_shift_rel` = r > 0): D = λI + r·diag(S); SR solves (S + D)⁻¹ g and
  MinSR D⁻¹Xᵀ(XD⁻¹Xᵀ + I)⁻¹ f, both as the scaled problem X̃ = X D^(−1/2) with unit shift.
- Pseudo-inverse (`rcond`, `solver=eigh`): eigenvalues of S̃ (SR) or T̃ (MinSR), unshifted,
  below rcond·largest are dropped; the two nonzero spectra coincide, so SR = MinSR still.
- Shift schedule (`diag_shift_final`): λ goes geometrically from diag_shift to
  diag_shift_final as `position` (set by the loop: fraction of the run done) goes 0 → 1.
- SPRING (`spring` = μ): MinSR δθ_k = μδθ_{k−1} + Xᵀ(T̃ + κI)⁻¹(f − μXδθ_{k−1}) (scaled
  alike), SR δθ_k = μδθ_{k−1} + (S + D)⁻¹(g − μSδθ_{k−1}) = (S + D)⁻¹(g + μDδθ_{k−1}); the
  previous δθ is in `state_dict` (resume continues exactly).
- `grad_clip` clips ‖δθ‖ (the update before the learning rate).
- Trust region (`max_infidelity`): after the step the fidelity |⟨Ψ|Ψ'⟩|² with the state
  before it is estimated on the batch; while it is below 1 − max_infidelity the step is
  halved (θ restored, lr·δθ/2 tried), at most `trust_region.MAX_HALVINGS` times.

Jacobian rows stay in the model's dtype; S and T are accumulated and solved in float64
(Cholesky; when that fails, an eigendecomposition with the same shift). A failed solve
(non-finite, or not positive definite) skips the update like a non-finite gradient.

On several ranks each rank holds its rows. SR all-reduces the uncentred sums Σ w OᵀO, Σ w O
and the gradient and centres them; rank 0's δθ goes to every rank (an all-reduce with zeros
elsewhere). MinSR all-gathers the centred rows of X and f; each rank accumulates T over its
share of the parameters (all-reduced), solves, and computes its share of δθ (all-gathered),
so every rank ends with the same parameters.

History (`StepResult.info`, every step): diag_shift (λ), update_norm (‖δθ‖ before
clipping), effective_rank (exp of the entropy of the normalized eigenvalues of S̃ or T̃; only
when an eigendecomposition ran, i.e. `solver=eigh` or a Cholesky fallback, else NaN) and
solve_time (seconds to assemble and solve the system, Jacobian excluded), fidelity (the
estimated |⟨Ψ|Ψ'⟩|² of the step taken; NaN without a trust region) and step_scale (s, the
fraction of lr·δθ taken: 1, or 2^−k after k halvings).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from naqs_cli import allocator, distributed, trust_region, vmc
from naqs_cli.optim import UpdateRule
from naqs_cli.samplers import Samples
from naqs_cli.state import VariationalState
from naqs_cli.vmc import LocalEnergy, StepResult

#: The `optim` options implemented here.
KINDS = ("sr", "minsr")
#: Allowed values of `optim.solver`.
SOLVERS = ("cholesky", "eigh")
#: MinSR on full sums solves a 2·2^N system: N ≤ this.
MINSR_FULLSUM_MAX_SITES = 12
#: Float64 elements of Jacobian rows converted at a time when S, T or products are formed.
BLOCK_ELEMENTS = 2**22
#: MinSR keeps X in float64 when that takes at most this much (else float32 X, float64 blocks).
FLOAT64_ROWS_BYTES = 2**27
#: Keys of `StepResult.info` (the history columns the rules add).
INFO_KEYS = ("diag_shift", "update_norm", "effective_rank", "solve_time", "fidelity", "step_scale")


def solve_shifted(
    matrix: Tensor, rhs: Tensor, shift: float, solver: str, rcond: float | None
) -> tuple[Tensor, Tensor | None]:
    """Return ((A + shift·I)⁻¹ rhs, eigenvalues of A or None), in float64.

    `matrix` (A, symmetric positive semi-definite) is overwritten. Cholesky first (solver
    cholesky); when it fails or with solver eigh, an eigendecomposition of A: with `rcond`,
    eigenvalues below rcond·largest are dropped (a pseudo-inverse); without, an eigenvalue
    with σ + shift ≤ 0 makes the solution NaN (a failed solve).
    """
    diagonal = matrix.diagonal()
    if solver == "cholesky":
        diagonal.add_(shift)
        factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            return torch.cholesky_solve(rhs[:, None], factor)[:, 0], None
        del factor
        diagonal.sub_(shift)
    try:
        eigenvalues, vectors = torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:  # no convergence (a non-finite matrix)
        return torch.full_like(rhs, math.nan), None
    shifted = eigenvalues + shift
    projected = vectors.T @ rhs
    if rcond is None:
        if not bool((shifted > 0).all()):
            return torch.full_like(rhs, math.nan), eigenvalues
        return vectors @ (projected / shifted), eigenvalues
    keep = eigenvalues > rcond * eigenvalues.max()
    coefficients = torch.where(keep, projected / torch.where(keep, shifted, 1.0), 0.0)
    return vectors @ coefficients, eigenvalues


def effective_rank(eigenvalues: Tensor) -> Tensor:
    """Return exp(−Σ p log p) of the normalized eigenvalues p (negative ones count as 0)."""
    p = eigenvalues.clamp(min=0)
    p = p / p.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


def _add_lower_gram(gram: Tensor, b: Tensor, bands: int = 4) -> None:
    """Add the lower triangle of b bᵀ to `gram` (and some of the upper), in row bands:
    (bands + 1)/(2·bands) of the full product's work (measured: 0.11 s instead of 0.17 s for
    512 × 20,228 in float64 on 2 cores)."""
    n = b.shape[0]
    edges = [i * n // bands for i in range(bands + 1)]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        gram[lo:hi, :hi].addmm_(b[lo:hi], b[:hi].T)


def _column_blocks(n_rows: int, start: int, stop: int) -> Iterable[slice]:
    width = max(1, BLOCK_ELEMENTS // max(n_rows, 1))
    return (slice(c, min(c + width, stop)) for c in range(start, stop, width))


@dataclass
class LinearSystem:
    """One step's system, the same on every rank (see the module doc for the symbols).

    Attributes:
        e_mean: Ē, the weighted mean local energy (0-dim complex).
        gradient: g = Xᵀf, the Eq. 4 gradient: (P,) float64.
        matrix: SR: S = XᵀX, (P, P) float64 (None for MinSR).
        rows: MinSR: X of all ranks, (2N_s, P) in the model's dtype (None for SR).
        force: MinSR: f of all ranks, (2N_s,) float64 (None for SR).
    """

    e_mean: Tensor
    gradient: Tensor
    matrix: Tensor | None = None
    rows: Tensor | None = None
    force: Tensor | None = None


class NaturalGradientRule(UpdateRule):
    """The shared machinery of SR and MinSR: shift, SPRING, checks and the update.

    Args:
        params: the model's trainable parameters (the Jacobian's columns, in this order).
        lr: learning rate of θ ← θ − lr·δθ.
        diag_shift: λ, the absolute diagonal shift.
        diag_shift_rel: r, the relative shift (D = λI + r·diag(S)).
        diag_shift_final: λ at the end of the run (geometric schedule), or None.
        rcond: drop eigenvalues below rcond·largest (needs solver eigh), or None.
        spring: SPRING momentum μ (0: off).
        solver: cholesky | eigh.
        grad_clip: clip ‖δθ‖ to this value, or None.
        max_infidelity: trust region: a step whose estimated infidelity 1 − |⟨Ψ|Ψ'⟩|² with the
            state before it exceeds this is halved until it does not
            (`naqs_cli.trust_region`); None: every step is taken whole.
    """

    name = "natural"

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float = 0.02,
        diag_shift: float = 1e-3,
        diag_shift_rel: float = 0.0,
        diag_shift_final: float | None = None,
        rcond: float | None = None,
        spring: float = 0.0,
        solver: str = "cholesky",
        grad_clip: float | None = None,
        max_infidelity: float | None = None,
    ) -> None:
        self.params = list(params)
        self.n_params = sum(p.numel() for p in self.params)
        self._lr = float(lr)
        self.diag_shift = float(diag_shift)
        self.diag_shift_rel = float(diag_shift_rel)
        self.diag_shift_final = diag_shift_final
        self.rcond = rcond
        self.spring = float(spring)
        self.solver = solver
        self.grad_clip = grad_clip
        self.max_infidelity = max_infidelity
        self.previous: Tensor | None = None  # the last δθ (SPRING)

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = float(value)

    @property
    def shift(self) -> float:
        """λ at `position`: diag_shift, geometrically towards diag_shift_final if set."""
        if self.diag_shift_final is None:
            return self.diag_shift
        t = min(max(self.position, 0.0), 1.0)
        return self.diag_shift * (self.diag_shift_final / self.diag_shift) ** t

    def step(
        self,
        state: VariationalState,
        batch: Samples,
        e_loc: LocalEnergy,
        *,
        pending_check: torch.Tensor | None = None,
    ) -> StepResult:
        """Run one natural-gradient step (same skipping rules as `FirstOrderRule.step`).

        Reads the device twice: the finiteness of Ē and g (with `pending_check`) before the
        solve, then the finiteness and norm of δθ; with a trust region also the fidelity of
        each step tried.
        """
        system = self.linear_system(state, batch, e_loc)
        flags = [torch.isfinite(system.e_mean), torch.linalg.vector_norm(system.gradient)]
        if pending_check is not None:
            flags.append(pending_check)
        energy_ok, norm, *pending = torch.stack([f.to(torch.float64) for f in flags]).tolist()
        pending_ok = bool(pending[0]) if pending else True
        shift = self.shift
        info = dict.fromkeys(INFO_KEYS, math.nan) | {"diag_shift": shift}
        if not energy_ok:
            return StepResult(e_loc, math.nan, False, False, pending_ok, info=info)
        if not math.isfinite(norm) or not pending_ok:
            return StepResult(e_loc, norm, False, True, pending_ok, info=info)
        start = time.perf_counter()
        direction, eigenvalues = self._direction(system, shift)
        checks = [torch.isfinite(direction).all(), torch.linalg.vector_norm(direction)]
        rank = effective_rank(eigenvalues) if eigenvalues is not None else direction.new_tensor(0)
        ok, update_norm, rank_value = torch.stack([*checks, rank.to(torch.float64)]).tolist()
        info.update(
            update_norm=update_norm,
            effective_rank=rank_value if eigenvalues is not None else math.nan,
            solve_time=time.perf_counter() - start,
        )
        if not ok:
            return StepResult(e_loc, norm, False, True, info=info)
        if self.grad_clip is not None and update_norm > self.grad_clip:
            direction = direction * (self.grad_clip / update_norm)
        scale, fidelity = trust_region.move(
            state, batch, self.params, direction, self._lr, self.max_infidelity
        )
        info.update(fidelity=fidelity, step_scale=scale)
        if self.spring > 0:
            self.previous = direction if scale == 1.0 else direction * scale
        return StepResult(e_loc, norm, True, info=info)

    def linear_system(
        self, state: VariationalState, batch: Samples, e_loc: LocalEnergy
    ) -> LinearSystem:
        """Return the system of a batch: rows weighted 1/N_s (samples over all ranks), by
        count/N_s for one sample per orbit (`Samples.orbits`), or by the batch's |Ψ|² weights
        (full sums); centred with Ē and ⟨O⟩ over all ranks."""
        n_total = batch.n_samples * distributed.world_size()
        e_mean = vmc.weighted_mean(e_loc.total, batch, n_total)
        batch, e_total = state.per_orbit(batch, e_loc.total)  # one row per orbit
        if batch.weights is not None:
            weights = batch.weights.to(torch.float64)
        else:
            weights = torch.full(
                (batch.n_samples,), 1.0 / n_total, dtype=torch.float64, device=batch.x.device
            )
        return self._system(state, batch.x, weights, e_total - e_mean, e_mean)

    def _momentum(self) -> Tensor | None:
        """Return the previous δθ when SPRING is on and there is one."""
        return self.previous if self.spring > 0 else None

    def _system(
        self,
        state: VariationalState,
        x: Tensor,
        weights: Tensor,
        centred: Tensor,
        e_mean: Tensor,
    ) -> LinearSystem:
        raise NotImplementedError

    def _direction(self, system: LinearSystem, shift: float) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Return {"previous": the last δθ (SPRING; None when off or before the first step)}."""
        return {"previous": None if self.previous is None else self.previous.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the SPRING vector.

        Raises:
            KeyError, ValueError: not a natural-gradient rule's state, or another model size.
        """
        previous = state["previous"]
        if previous is not None:
            device = self.params[0].device
            previous = torch.as_tensor(previous, dtype=torch.float64, device=device)
            if previous.shape != (self.n_params,):
                raise ValueError(
                    f"the SPRING vector has {previous.numel()} entries, the model"
                    f" {self.n_params} parameters"
                )
        self.previous = previous


class SR(NaturalGradientRule):
    """Stochastic reconfiguration with a dense S: δθ = (S + λI)⁻¹ g (see the module doc)."""

    name = "sr"

    def _system(
        self,
        state: VariationalState,
        x: Tensor,
        weights: Tensor,
        centred: Tensor,
        e_mean: Tensor,
    ) -> LinearSystem:
        n_params = self.n_params
        device = weights.device
        second = torch.zeros(n_params, n_params, dtype=torch.float64, device=device)
        # Rows: Σ w Re O, Σ w Im O, Σ w Re[O* (E − Ē)].
        sums = torch.zeros(3, n_params, dtype=torch.float64, device=device)
        height = max(1, BLOCK_ELEMENTS // max(2 * n_params, 1))
        start = 0
        for o in state.log_derivative_rows(x):
            n_chunk = o.shape[1]
            for rows in (slice(r, min(r + height, n_chunk)) for r in range(0, n_chunk, height)):
                block = o[:, rows].to(torch.float64)  # (2, h, P): Re O, Im O
                w = weights[start + rows.start : start + rows.stop]
                e = centred[start + rows.start : start + rows.stop]
                sums[0] += w @ block[0]
                sums[1] += w @ block[1]
                sums[2] += (w * e.real) @ block[0] + (w * e.imag) @ block[1]
                scaled = (block * w.sqrt()[:, None]).reshape(-1, n_params)
                second.addmm_(scaled.T, scaled)
            start += n_chunk
        e_sum = (weights * centred).sum()
        distributed.all_reduce_sum(second)
        distributed.all_reduce_sum(sums)
        e_sum = distributed.all_reduce_sum(torch.stack([e_sum.real, e_sum.imag]))
        mean_re, mean_im = sums[0], sums[1]
        second.addr_(mean_re, mean_re, alpha=-1.0).addr_(mean_im, mean_im, alpha=-1.0)
        # g = 2 Σ w Re[(O − ⟨O⟩)* (E − Ē)]; the ⟨O⟩ term vanishes up to rounding.
        gradient = 2.0 * (sums[2] - mean_re * e_sum[0] - mean_im * e_sum[1])
        return LinearSystem(e_mean, gradient, matrix=second)

    def _direction(self, system: LinearSystem, shift: float) -> tuple[Tensor, Tensor | None]:
        matrix, rhs = system.matrix, system.gradient
        previous = self._momentum()
        if previous is not None:
            rhs = rhs - self.spring * (matrix @ previous)
        scale, kappa = None, shift
        if self.diag_shift_rel > 0:
            scale = torch.rsqrt(shift + self.diag_shift_rel * matrix.diagonal())
            matrix.mul_(scale[:, None]).mul_(scale[None, :])
            rhs, kappa = scale * rhs, 1.0
        direction, eigenvalues = solve_shifted(matrix, rhs, kappa, self.solver, self.rcond)
        if scale is not None:
            direction = scale * direction
        if previous is not None:
            direction = direction + self.spring * previous
        if distributed.world_size() > 1:  # rank 0's solution on every rank
            direction = distributed.all_reduce_sum(
                direction if distributed.is_main() else torch.zeros_like(direction)
            )
        return direction, eigenvalues


class MinSR(NaturalGradientRule):
    """MinSR: δθ = Xᵀ (XXᵀ + λI)⁻¹ f, a 2N_s × 2N_s solve (see the module doc)."""

    name = "minsr"

    def _system(
        self,
        state: VariationalState,
        x: Tensor,
        weights: Tensor,
        centred: Tensor,
        e_mean: Tensor,
    ) -> LinearSystem:
        n_batch = x.shape[0]
        like = state.parameters()[0]
        rows = like.new_empty(2, n_batch, self.n_params)
        allocator.advise_huge_pages(rows)
        for _ in state.log_derivative_rows(x, out=rows):  # the chunks are written into rows
            pass
        rows = rows.reshape(2 * n_batch, -1)
        if rows.numel() * 8 <= FLOAT64_ROWS_BYTES:  # small: one conversion, not one per use
            rows = rows.to(torch.float64)
        halves = torch.zeros(2, rows.shape[1], dtype=torch.float64, device=rows.device)
        for cols in _column_blocks(2 * n_batch, 0, rows.shape[1]):
            block = rows[:, cols].to(torch.float64)
            halves[0, cols] = weights @ block[:n_batch]
            halves[1, cols] = weights @ block[n_batch:]
        distributed.all_reduce_sum(halves)
        rows[:n_batch] -= halves[0].to(rows.dtype)
        rows[n_batch:] -= halves[1].to(rows.dtype)
        rows *= weights.sqrt().repeat(2).to(rows.dtype)[:, None]
        eps = weights.sqrt() * centred
        force = 2.0 * torch.cat([eps.real, eps.imag])
        gradient = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
        for cols in _column_blocks(2 * n_batch, 0, rows.shape[1]):
            gradient[cols] = rows[:, cols].to(torch.float64).T @ force
        distributed.all_reduce_sum(gradient)
        return LinearSystem(
            e_mean,
            gradient,
            rows=distributed.all_gather_cat(rows),
            force=distributed.all_gather_cat(force),
        )

    def _direction(self, system: LinearSystem, shift: float) -> tuple[Tensor, Tensor | None]:
        rows, force = system.rows, system.force
        n_rows = rows.shape[0]
        lo, hi = distributed.split(self.n_params)
        scale, kappa = None, shift
        if self.diag_shift_rel > 0:
            diag = torch.zeros(hi - lo, dtype=torch.float64, device=rows.device)
            for cols in _column_blocks(n_rows, lo, hi):
                diag[cols.start - lo : cols.stop - lo] = (
                    rows[:, cols].to(torch.float64).square().sum(0)
                )
            scale, kappa = torch.rsqrt(shift + self.diag_shift_rel * diag), 1.0

        def block(cols: slice) -> Tensor:
            b = rows[:, cols].to(torch.float64)
            return b if scale is None else b * scale[cols.start - lo : cols.stop - lo]

        gram = torch.zeros(n_rows, n_rows, dtype=torch.float64, device=rows.device)
        for cols in _column_blocks(n_rows, lo, hi):
            _add_lower_gram(gram, block(cols))
        gram = torch.tril(gram) + torch.tril(gram, -1).T
        distributed.all_reduce_sum(gram)
        rhs = force
        previous = self._momentum()
        if previous is not None:
            product = torch.zeros_like(force)
            for cols in _column_blocks(n_rows, lo, hi):
                product += rows[:, cols].to(torch.float64) @ previous[cols]
            rhs = force - self.spring * distributed.all_reduce_sum(product)
        alpha, eigenvalues = solve_shifted(gram, rhs, kappa, self.solver, self.rcond)
        own = torch.empty(hi - lo, dtype=torch.float64, device=rows.device)
        for cols in _column_blocks(n_rows, lo, hi):
            part = block(cols).T @ alpha
            if scale is not None:
                part = part * scale[cols.start - lo : cols.stop - lo]
            own[cols.start - lo : cols.stop - lo] = part
        if previous is not None:
            own += self.spring * previous[lo:hi]
        world = distributed.world_size()
        sizes = [
            b - a for a, b in (distributed.split(self.n_params, world, r) for r in range(world))
        ]
        return distributed.all_gather_cat(own, sizes), eigenvalues
