"""Natural-gradient rules (optim=sr, optim=minsr) against an independent quantum geometric tensor.

The reference S and g come from the normalized state vector ψ = exp(ln Ψ) over the whole basis,
differentiated as one vector by `torch.autograd.functional.jacobian`, and the dense H; nothing
of the rules' own Jacobian (`naqs_cli.jacobian`) or their centring is used.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose
from torch.func import functional_call

from naqs_cli import build, jacobian, natural, validation
from naqs_cli.basis import enumerate_basis
from naqs_cli.errors import ConfigError
from naqs_cli.samplers.direct import DirectSampler
from naqs_cli.state import VariationalState

MODELS = {
    "pixelcnn": ["model=pixelcnn", "model.layers=2", "model.channels=3"],
    "dense": ["model=dense", "model.layers=2", "model.hidden=6"],
}
#: (side, model, ham): every model and Hamiltonian on 2×2; 3×3 PixelCNNs are slow to
#: differentiate as one vector (2·512 backward passes), so they run with the slow tests.
CASES = [
    (2, "pixelcnn", "tfim"),
    (2, "pixelcnn", "heisenberg"),
    (2, "dense", "tfim"),
    (2, "dense", "heisenberg"),
    (3, "dense", "tfim"),
    (3, "dense", "heisenberg"),
    pytest.param(3, "pixelcnn", "tfim", marks=pytest.mark.slow),
    pytest.param(3, "pixelcnn", "heisenberg", marks=pytest.mark.slow),
]


def _full_sum_state(side: int, model: str, ham: str, seed: int = 0) -> VariationalState:
    """A float64 state on the whole basis, its parameters perturbed away from the init."""
    cfg = compose(
        "train",
        [f"lattice.Lx={side}", f"lattice.Ly={side}", f"ham={ham}", *MODELS[model]]
        + ["model.phase=true", "sampler=fullsum", "dtype=float64", "device=cpu", f"seed={seed}"],
    )
    setup = build.build_training(cfg)
    generator = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():
        for p in setup.state.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return setup.state


def _independent_geometry(state: VariationalState) -> tuple[torch.Tensor, torch.Tensor]:
    """Return S = Re[⟨∂ψ|∂ψ⟩ − ⟨∂ψ|ψ⟩⟨ψ|∂ψ⟩] and g = 2 Re[⟨∂ψ|H|ψ⟩ − E⟨∂ψ|ψ⟩]."""
    model = state.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    basis = enumerate_basis(state.hamiltonian.n_sites)

    def psi_parts(vector: torch.Tensor) -> torch.Tensor:
        pieces = vector.split([p.numel() for _, p in named])
        tensors = {n: c.view_as(p) for (n, p), c in zip(named, pieces, strict=True)}
        return torch.view_as_real(torch.exp(functional_call(model, tensors, (basis,))))

    jac = torch.autograd.functional.jacobian(psi_parts, flat)  # (2^N, 2, P)
    d_psi = torch.complex(jac[:, 0], jac[:, 1])
    with torch.no_grad():
        psi = torch.exp(model.log_psi(basis))
    h = torch.from_numpy(state.hamiltonian.to_sparse().toarray()).to(torch.complex128)
    assert abs(torch.vdot(psi, psi).real - 1) < 1e-12, "autoregressive: ψ is normalized"
    overlap = d_psi.conj().T @ psi  # ⟨∂_k ψ|ψ⟩
    s = (d_psi.conj().T @ d_psi - torch.outer(overlap, overlap.conj())).real
    h_psi = h @ psi
    energy = torch.vdot(psi, h_psi)
    g = 2 * (d_psi.conj().T @ h_psi - energy * overlap).real
    return s, g


def _step_direction(rule, state: VariationalState, batch, e_loc) -> torch.Tensor:
    """Return δθ of one step (lr = 1), leaving the parameters as they were."""
    params = state.parameters()
    before = torch.cat([p.detach().reshape(-1) for p in params])
    rule.lr = 1.0
    result = rule.step(state, batch, e_loc)
    assert result.is_finite
    after = torch.cat([p.detach().reshape(-1) for p in params])
    with torch.no_grad():
        for p, part in zip(params, before.split([p.numel() for p in params]), strict=True):
            p.copy_(part.view_as(p))
    return before - after


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-10) -> None:
    """|got − want| ≤ tol·max(1, max|want|), elementwise."""
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize(("side", "model", "ham"), CASES)
def test_full_sum_system_and_updates_match_the_geometric_tensor(side, model, ham):
    state = _full_sum_state(side, model, ham)
    s_ref, g_ref = _independent_geometry(state)
    batch = state.sample(0)
    e_loc = state.local_energy(batch)
    o = torch.cat(list(state.log_derivatives(batch.x)))
    mean_o = (batch.weights.to(torch.complex128)[:, None] * o).sum(0)
    assert float(mean_o.real.abs().max()) < 1e-12, "Σ|Ψ|² = 1 for every θ: Re⟨O⟩ = 0"
    sr, minsr = natural.SR(state.parameters()), natural.MinSR(state.parameters())
    sr_system = sr.linear_system(state, batch, e_loc)
    _assert_close(sr_system.matrix, s_ref)
    _assert_close(sr_system.gradient, g_ref)
    minsr_system = minsr.linear_system(state, batch, e_loc)
    rows = minsr_system.rows
    _assert_close(rows.T @ rows, s_ref)
    _assert_close(rows.T @ minsr_system.force, g_ref)
    _assert_close(minsr_system.gradient, g_ref)
    state.expect_and_grad(batch, e_loc.total)  # the first-order rules' Eq. 4 gradient
    eq4 = torch.cat([p.grad.reshape(-1) for p in state.parameters()])
    _assert_close(eq4, g_ref)
    shift = 1e-2
    want = torch.linalg.solve(s_ref + shift * torch.eye(len(g_ref), dtype=s_ref.dtype), g_ref)
    for rule_class in (natural.SR, natural.MinSR):
        rule = rule_class(state.parameters(), diag_shift=shift)
        _assert_close(_step_direction(rule, state, batch, e_loc), want)


def _one_by_one(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """O(x) with one backward pass per sample and part (the definition)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        log_psi = model.log_psi(x[i : i + 1])[0]
        parts = []
        for part in (log_psi.real, log_psi.imag):
            grads = torch.autograd.grad(
                part, params, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            parts.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.complex(*parts))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=pixelcnn", "model.layers=3", "model.channels=4"],
        ["model=pixelcnn", "model.layers=2", "model.channels=3", "model.phase=false"],
        ["model=dense", "model.layers=2", "model.hidden=6"],
        [
            "model=pixelcnn",
            "model.layers=2",
            "model.channels=3",
            "model.symmetry=lattice_spin_flip",
        ],
        ["ham=heisenberg", "model=dense", "model.total_sz=0.5", "model.symmetry=lattice"],
        [
            "ham=heisenberg",
            "model=pixelcnn",
            "model.layers=2",
            "model.channels=3",
            "model.total_sz=0.5",
            "model.count_feature=true",
            "model.symmetry=lattice",
        ],
    ],
)
def test_log_derivatives_equal_one_backward_pass_per_sample(overrides, monkeypatch):
    cfg = compose("train", ["lattice.Lx=3", "lattice.Ly=3", "dtype=float64", *overrides])
    state = build.build_training(cfg).state
    state.chunk_size = 7  # several chunks, the last one short
    x, _ = state.model.sample(20, torch.Generator().manual_seed(3))

    def no_fallback(*args):
        raise AssertionError("a parameter escaped the tap: one backward pass per sample")

    monkeypatch.setattr(jacobian, "_rows_one_by_one", no_fallback)
    got = torch.cat(list(state.log_derivatives(x)))
    monkeypatch.undo()
    assert got.shape == (20, sum(p.numel() for p in state.parameters()))
    torch.testing.assert_close(got, _one_by_one(state.model, x), rtol=0, atol=1e-12)


def test_pixelcnn_rows_take_two_backward_passes_per_chunk(monkeypatch):
    """The weight-normalized convolutions map ∂/∂W to (V, g) in closed form: no batched
    vector-Jacobian product (the slow path), only the Re and Im backward passes."""
    cfg = compose("train", ["lattice.Lx=3", "lattice.Ly=3", "model.layers=2", "model.channels=4"])
    model = build.build_training(cfg).state.model
    x, _ = model.sample(6, torch.Generator().manual_seed(1))
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    rows = list(jacobian.log_derivative_rows(model, x, chunk_size=4))
    assert [r.shape[:2] for r in rows] == [(2, 4), (2, 2)]
    assert len(calls) == 4


@pytest.mark.parametrize("stride, dilation, padding", [(1, 1, (2, 1)), (2, 1, 1), (1, 2, (1, 2))])
def test_convolution_rows_for_any_stride_dilation_and_padding(stride, dilation, padding):
    """Strided-view patches (stride 1) and the im2col fallback against one pass per sample."""

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.weight = torch.nn.Parameter(torch.randn(3, 2, 3, 3, generator=generator))
            self.bias = torch.nn.Parameter(torch.randn(3, generator=generator))
            self.head = torch.nn.Linear(3, 2)

        def log_psi(self, x):
            image = (2.0 * x.double() - 1.0).view(-1, 1, 4, 5).repeat(1, 2, 1, 1)
            image = image.contiguous(memory_format=torch.channels_last)
            y = torch.nn.functional.conv2d(image, self.weight, self.bias, stride, padding, dilation)
            out = self.head(torch.tanh(y).mean(dim=(2, 3)))
            return torch.complex(out[:, 0], out[:, 1])

    model = Toy().double()
    x = (torch.rand(6, 20, generator=torch.Generator().manual_seed(1)) < 0.5).to(torch.int8)
    got = torch.cat(list(jacobian.log_derivatives(model, x, chunk_size=4)))
    torch.testing.assert_close(got, _one_by_one(model, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("in_place", [False, True])
def test_rows_of_outputs_changed_in_place_use_probes(in_place, monkeypatch):
    """Gradients are taken with respect to each call's output; a model that then changes an
    output in place is rerun with probes (one extra forward pass), with the same rows."""

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(2)
            self.weight = torch.nn.Parameter(torch.randn(3, 1, 3, 3, generator=generator))
            self.bias = torch.nn.Parameter(torch.randn(3, generator=generator))
            self.head = torch.nn.Linear(3, 2)

        def log_psi(self, x):
            image = (2.0 * x.double() - 1.0).view(-1, 1, 4, 4)
            y = torch.nn.functional.conv2d(image, self.weight, self.bias, padding=1)
            y = y.mul_(2.0).tanh_() if in_place else torch.tanh(2.0 * y)
            out = self.head(y.mean(dim=(2, 3)))
            return torch.complex(out[:, 0], out[:, 1])

    model = Toy().double()
    x = (torch.rand(5, 16, generator=torch.Generator().manual_seed(3)) < 0.5).to(torch.int8)
    passes = []
    forward = model.log_psi
    monkeypatch.setattr(model, "log_psi", lambda x: passes.append(1) or forward(x))
    got = torch.cat(list(jacobian.log_derivatives(model, x, chunk_size=8)))
    assert len(passes) == (2 if in_place else 1)
    torch.testing.assert_close(got, _one_by_one(model, x), rtol=0, atol=1e-12)


def test_log_derivatives_of_an_untapped_model_fall_back_to_one_pass_per_sample():
    class Scaled(torch.nn.Module):  # a parameter outside conv2d / linear
        def __init__(self, base):
            super().__init__()
            self.base, self.scale = base, torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

        def log_psi(self, x):
            return self.scale * self.base.log_psi(x)

    cfg = compose("train", ["lattice.Lx=2", "lattice.Ly=2", "model=dense", "dtype=float64"])
    model = Scaled(build.build_training(cfg).state.model)
    x, _ = model.base.sample(5, torch.Generator().manual_seed(0))
    got = torch.cat(list(jacobian.log_derivatives(model, x, chunk_size=4)))
    torch.testing.assert_close(got, _one_by_one(model, x), rtol=0, atol=1e-12)


def _spectral_gap_cutoff(eigenvalues: torch.Tensor) -> float:
    """Return an rcond in the widest gap of the nonzero spectrum within [1e-8, 1e-1]·max (the
    eigenvalues next to the cutoff then differ far more than rounding could move them)."""
    top = float(eigenvalues.max())
    values = sorted(float(v) / top for v in eigenvalues if 1e-8 < v / top < 1e-1)
    assert len(values) >= 2, "the test needs nonzero eigenvalues on both sides of the cutoff"
    ratio, low, high = max((b / a, a, b) for a, b in zip(values, values[1:], strict=False))
    assert ratio > 1.5, f"no clear spectral gap (widest ratio {ratio:.2f})"
    return math.sqrt(low * high)


@pytest.mark.parametrize(
    ("side", "model", "ham"), [(2, "pixelcnn", "tfim"), (3, "dense", "heisenberg")]
)
def test_minsr_equals_sr_for_every_kind_of_shift(side, model, ham):
    state = _full_sum_state(side, model, ham)
    s_ref, g_ref = _independent_geometry(state)
    batch = state.sample(0)
    e_loc = state.local_energy(batch)
    eye = torch.eye(len(g_ref), dtype=s_ref.dtype)
    shift, rel = 1e-3, 0.1
    d_matrix = torch.diag(shift + rel * s_ref.diagonal())
    eigenvalues, vectors = torch.linalg.eigh(s_ref)
    rcond = _spectral_gap_cutoff(eigenvalues)
    keep = eigenvalues > rcond * eigenvalues.max()
    pinv_shift = 1e-6
    cases = [
        ({"diag_shift": shift}, torch.linalg.solve(s_ref + shift * eye, g_ref)),
        (
            {"diag_shift": shift, "diag_shift_rel": rel},
            torch.linalg.solve(s_ref + d_matrix, g_ref),
        ),
        (
            {"diag_shift": pinv_shift, "rcond": rcond, "solver": "eigh"},
            vectors[:, keep] @ (vectors[:, keep].T @ g_ref / (eigenvalues[keep] + pinv_shift)),
        ),
    ]
    for options, want in cases:
        got = {}
        for rule_class in (natural.SR, natural.MinSR):
            rule = rule_class(state.parameters(), **options)
            got[rule_class.name] = _step_direction(rule, state, batch, e_loc)
            _assert_close(got[rule_class.name], want)
        _assert_close(got["minsr"], got["sr"])


def test_grad_clip_limits_the_norm_of_the_update_direction():
    state = _full_sum_state(2, "dense", "tfim")
    batch = state.sample(0)
    e_loc = state.local_energy(batch)
    free = _step_direction(natural.SR(state.parameters()), state, batch, e_loc)
    limit = 0.5 * float(torch.linalg.vector_norm(free))
    clipped = natural.MinSR(state.parameters(), grad_clip=limit)
    _assert_close(_step_direction(clipped, state, batch, e_loc), 0.5 * free)


def _state_vector(state: VariationalState) -> torch.Tensor:
    with torch.no_grad():
        return torch.exp(state.model.log_psi(enumerate_basis(state.hamiltonian.n_sites)))


@pytest.mark.parametrize("rule_class", [natural.SR, natural.MinSR])
def test_trust_region_halves_a_step_until_the_exact_fidelity_holds(rule_class):
    state = _full_sum_state(2, "pixelcnn", "tfim")
    params = state.parameters()
    batch = state.sample(0)
    e_loc = state.local_energy(batch)
    plain = rule_class(params)
    direction = _step_direction(plain, state, batch, e_loc)
    before = torch.cat([p.detach().reshape(-1) for p in params])
    psi = _state_vector(state)
    lr, limit = 2.0, 0.1  # fidelity 6e-5 at lr 1, 0.84 at 0.1: a few halvings
    rule = rule_class(params, lr=lr, spring=0.5, max_infidelity=limit)
    result = rule.step(state, batch, e_loc)
    scale, fidelity = result.info["step_scale"], result.info["fidelity"]
    after = torch.cat([p.detach().reshape(-1) for p in params])
    _assert_close(before - after, scale * lr * direction)
    exact = float(torch.vdot(psi, _state_vector(state)).abs().square())
    assert abs(fidelity - exact) < 1e-12  # a full sum: the estimate is exact
    assert fidelity >= 1 - limit and scale < 1 and math.log2(scale).is_integer()
    _assert_close(rule.previous, scale * direction)  # SPRING continues from the step taken
    # the step twice as long (the last one refused) was outside the region
    with torch.no_grad():
        for p, part in zip(
            params,
            (before - 2 * scale * lr * direction).split([p.numel() for p in params]),
            strict=True,
        ):
            p.copy_(part.view_as(p))
    assert float(torch.vdot(psi, _state_vector(state)).abs().square()) < 1 - limit


def test_without_a_trust_region_the_whole_step_is_taken():
    state = _full_sum_state(2, "dense", "tfim")
    batch = state.sample(0)
    result = natural.MinSR(state.parameters(), lr=40.0).step(
        state, batch, state.local_energy(batch)
    )
    assert result.info["step_scale"] == 1.0 and math.isnan(result.info["fidelity"])


def test_spring_trajectories_of_sr_and_minsr_agree():
    final = {}
    for rule_class in (natural.SR, natural.MinSR):
        state = _full_sum_state(2, "pixelcnn", "heisenberg")
        rule = rule_class(state.parameters(), lr=0.1, diag_shift=1e-2, spring=0.7)
        directions = []
        for _ in range(3):
            batch = state.sample(0)
            assert rule.step(state, batch, state.local_energy(batch)).is_finite
            directions.append(rule.previous.clone())
        final[rule_class.name] = torch.cat([p.detach().reshape(-1) for p in state.parameters()])
        assert not torch.allclose(directions[1], directions[2]), "SPRING moves on each step"
    _assert_close(final["minsr"], final["sr"])


def test_sampled_geometry_converges_to_the_full_sum():
    state = _full_sum_state(2, "dense", "tfim", seed=2)
    state.chunk_size = 2**14  # fewer, larger network passes
    rule = natural.SR(state.parameters())
    exact_batch = state.sample(0)
    exact = rule.linear_system(state, exact_batch, state.local_energy(exact_batch))
    sampler = DirectSampler(seed=11)
    sizes, repeats = (2**10, 2**12, 2**14), 3
    log_n, log_err = [], []
    for n in sizes:
        for _ in range(repeats):
            batch = sampler.sample(state.model, n)
            e_loc = state.local_energy(batch)
            system = rule.linear_system(state, batch, e_loc)
            error = torch.linalg.matrix_norm(
                system.matrix - exact.matrix
            ) / torch.linalg.matrix_norm(exact.matrix)
            log_n.append(math.log(n))
            log_err.append(math.log(float(error)))
    slope, intercept = np.polyfit(log_n, log_err, 1)
    residuals = np.asarray(log_err) - (slope * np.asarray(log_n) + intercept)
    spread = np.sqrt((residuals**2).sum() / (len(log_n) - 2))
    slope_error = spread / np.sqrt(((np.asarray(log_n) - np.mean(log_n)) ** 2).sum())
    assert abs(slope + 0.5) < 4 * slope_error + 0.02, (slope, slope_error)
    # Each gradient component within 4σ of the full sum (the last, largest batch).
    o = torch.cat(list(state.log_derivatives(batch.x)))
    centred_e = e_loc.total - e_loc.total.mean()
    per_sample = 2 * ((o - o.mean(0)).conj() * centred_e[:, None]).real
    sigma = per_sample.std(0) / math.sqrt(batch.n_samples)
    deviation = (system.gradient - exact.gradient).abs()
    assert bool((deviation <= 4 * sigma + 1e-12).all()), float((deviation / sigma).max())


# --- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim=sr"], "optim=sr: the model has 20228 trainable parameters"),
        (["optim=minsr", "sampler=fullsum"], "sampler=fullsum: optim=minsr solves"),
        (["optim=sr", "model.channels=4", "optim.rcond=1e-6"], "optim.rcond=1e-06: a pseudo"),
        (["optim=minsr", "optim.diag_shift=0"], "optim.diag_shift=0: must be > 0"),
        (["optim=minsr", "optim.diag_shift=-1"], "optim.diag_shift=-1.0: must be a finite"),
        (["optim=minsr", "optim.spring=1"], "optim.spring=1.0: must be a finite number >= 0"),
        (["optim=minsr", "optim.solver=lu"], "optim.solver=lu: allowed: cholesky | eigh"),
        (["optim=minsr", "optim.diag_shift_final=0"], "optim.diag_shift_final=0.0: must be"),
        (["optim=sr", "model.channels=4", "optim.max_params=0"], "optim.max_params=0: must"),
        (["optim=minsr", "optim.max_infidelity=0"], "optim.max_infidelity=0.0: must be a finite"),
        (["optim=minsr", "optim.max_infidelity=1.5"], "optim.max_infidelity=1.5: must be"),
    ],
)
def test_bad_natural_gradient_options_are_refused_in_one_line(overrides, message):
    cfg = compose("train", overrides)
    with pytest.raises(ConfigError) as err:
        validation.validate(cfg, "train")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_pure_pseudo_inverse_and_small_models_pass_validation():
    validation.validate(compose("train", ["optim=sr", "model.channels=4"]), "train")
    overrides = ["optim=minsr", "optim.diag_shift=0", "optim.rcond=1e-8", "optim.solver=eigh"]
    validation.validate(compose("train", overrides), "train")


def test_a_minsr_model_can_be_evaluated_by_full_sums_it_could_not_train_with():
    cfg = compose("train", ["optim=minsr", "sampler=fullsum", "model.channels=4"])
    with pytest.raises(ConfigError, match="sampler=fullsum: optim=minsr solves"):
        validation.validate(cfg, "train")
    validation.validate(cfg, "stored")  # `naqs evaluate CHECKPOINT sampler=fullsum`
