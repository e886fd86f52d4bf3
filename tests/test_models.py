"""Models: normalization (Claim 1), autoregressive property, sampling paths, dtypes, symmetry."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from naqs_cli.basis import basis_index, enumerate_basis
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.lattice import SquareLattice
from naqs_cli.models import (
    SYMMETRIES,
    DenseNAQS,
    PixelCNN,
    SymmetrizedWaveFunction,
    symmetry_group,
)
from naqs_cli.models.base import SAMPLING_METHODS
from naqs_cli.models.constraints import MASK_LOG_MAGNITUDE
from naqs_cli.models.pixelcnn import residual_sources
from naqs_cli.samplers import Samples
from naqs_cli.vmc import local_energy

CHUNK = 8192


def perturb(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Add scale·N(0, 1) noise to every parameter (away from the near-uniform init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.add_(scale * noise.to(parameter.dtype))
    return model


def make_model(kind: str, lattice: SquareLattice, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A float64 model with random weights; small PixelCNNs keep enumeration cheap."""
    torch.manual_seed(seed)
    if kind == "pixelcnn":
        kwargs.setdefault("channels", 4)
        model = PixelCNN(lattice=lattice, **kwargs)
    else:
        kwargs.setdefault("hidden", 32)
        model = DenseNAQS(lattice=lattice, **kwargs)
    return perturb(model.double(), seed=seed)


def log_psi_all(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ln Ψ on many configurations, in chunks, without a graph."""
    with torch.no_grad():
        return torch.cat([model.log_psi(chunk) for chunk in x.split(CHUNK)])


def random_configurations(n_batch: int, n_sites: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n_batch, n_sites), generator=generator).to(torch.int8)


# --- Claim 1: normalization by enumeration -------------------------------------------------


class Tabulated(torch.nn.Module):
    """A wave function given by a table of ln Ψ over the basis (cheap base for wrappers)."""

    def __init__(self, model: torch.nn.Module, log_psi: torch.Tensor) -> None:
        super().__init__()
        self.lattice, self.n_sites, self.has_phase = model.lattice, model.n_sites, model.has_phase
        self.table = log_psi

    def log_psi(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[basis_index(x)]


def enumeration_model(kind: str, lattice: SquareLattice, **kwargs) -> torch.nn.Module:
    """Models for enumeration; float64 convolutions are slow on CPU, so 4×4 gets 2 channels."""
    if kind == "pixelcnn" and lattice.n_sites > 9:
        kwargs.setdefault("channels", 2)
    return make_model(kind, lattice, **kwargs)


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (4, 4)])
@pytest.mark.parametrize("kind", ["pixelcnn", "dense"])
@pytest.mark.parametrize("phase", [True, False])
def test_normalized_for_every_symmetry(shape, kind, phase):
    lattice = SquareLattice(*shape)
    model = enumeration_model(kind, lattice, phase=phase)
    basis = enumerate_basis(lattice.n_sites)
    log_psi = log_psi_all(model, basis)
    prob = torch.exp(2 * log_psi.real)
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-10)
    assert prob.max() / prob.min() > 2  # a real test, not the uniform distribution
    # On 4×4 the wrapper reads Ψ from a table instead of re-running the network |G| times.
    base = Tabulated(model, log_psi) if lattice.n_sites > 9 else model
    for symmetry in SYMMETRIES:
        wrapped = SymmetrizedWaveFunction(base, symmetry=symmetry)
        log_psi_g = log_psi_all(wrapped, basis)
        prob_g = torch.exp(2 * log_psi_g.real)
        assert prob_g.sum().item() == pytest.approx(1.0, abs=1e-10), symmetry
        for perm, flip in symmetry_group(lattice, symmetry):
            images = basis[:, perm]
            images = 1 - images if flip else images
            index = basis_index(images)
            torch.testing.assert_close(prob_g[index], prob_g, rtol=1e-10, atol=0)
            torch.testing.assert_close(log_psi_g.imag[index], log_psi_g.imag, rtol=0, atol=1e-10)
        if not phase:
            assert (log_psi_g.imag == 0).all()


@pytest.mark.parametrize("shape", [(2, 2), (4, 3), (4, 4)])
@pytest.mark.parametrize("kind", ["pixelcnn", "dense"])
def test_total_sz_sector_carries_the_norm(shape, kind):
    lattice = SquareLattice(*shape)
    model = enumeration_model(kind, lattice, total_sz=0)
    basis = enumerate_basis(lattice.n_sites)
    log_psi = log_psi_all(model, basis)
    prob = torch.exp(2 * log_psi.real)
    in_sector = basis.sum(dim=1) == lattice.n_sites // 2
    assert prob[in_sector].sum().item() == pytest.approx(1.0, abs=1e-10)
    assert (prob[~in_sector] == 0).all()
    assert log_psi.real[~in_sector].max() < -MASK_LOG_MAGNITUDE / 2  # finite, not −inf
    assert torch.isfinite(log_psi).all()


@pytest.mark.parametrize("kind", ["pixelcnn", "dense"])
def test_count_feature_keeps_the_sector_normalized(kind):
    lattice = SquareLattice(4, 3)
    model = enumeration_model(kind, lattice, total_sz=0, count_feature=True)
    assert model.count_weight is not None
    basis = enumerate_basis(lattice.n_sites)
    prob = torch.exp(2 * log_psi_all(model, basis).real)
    in_sector = basis.sum(dim=1) == lattice.n_sites // 2
    assert prob[in_sector].sum().item() == pytest.approx(1.0, abs=1e-10)
    assert (prob[~in_sector] == 0).all()
    # The feature changes the state: the same weights without it give other amplitudes.
    plain = enumeration_model(kind, lattice, total_sz=0)
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k != "count_weight"}, strict=True
    )
    assert (log_psi_all(plain, basis) - log_psi_all(model, basis))[in_sector].abs().max() > 1e-3


def test_count_feature_starts_from_the_uniform_state_of_the_sector():
    # With the rest of the head at zero, ℓ_i alone gives the conditionals of filling the
    # sector at random: every configuration with N/2 + total_sz ups has 1/C(N, n_up).
    lattice = SquareLattice(4, 4)
    for total_sz, n_up in ((0, 8), (-2, 6)):
        model = PixelCNN(
            lattice=lattice,
            layers=2,
            channels=2,
            phase=False,
            total_sz=total_sz,
            count_feature=True,
        ).double()
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
        basis = enumerate_basis(16)
        sector = basis[basis.sum(dim=1) == n_up]
        prob = torch.exp(2 * log_psi_all(model, sector).real)
        torch.testing.assert_close(
            prob, torch.full_like(prob, 1 / math.comb(16, n_up)), rtol=1e-12, atol=0
        )


def test_count_feature_needs_a_sector():
    with pytest.raises(ValueError, match="model.count_feature=true needs .*model.total_sz"):
        PixelCNN(lattice=SquareLattice(4, 4), count_feature=True)


def test_total_sz_gradients_are_finite():
    lattice = SquareLattice(4, 2)
    model = make_model("pixelcnn", lattice, total_sz=1)
    model.log_psi(enumerate_basis(lattice.n_sites)).real.sum().backward()
    for parameter in model.parameters():
        assert torch.isfinite(parameter.grad).all()


@pytest.mark.parametrize("n_sites, total_sz", [(9, 0), (4, 3), (4, -2.5), (4, 0.5)])
def test_bad_total_sz_is_refused(n_sites, total_sz):
    with pytest.raises(ValueError, match="model.total_sz"):
        PixelCNN(lattice=SquareLattice(n_sites), total_sz=total_sz)


def test_chain_is_normalized():
    lattice = SquareLattice(8)
    model = make_model("pixelcnn", lattice, channels=6)
    prob = torch.exp(2 * log_psi_all(model, enumerate_basis(8)).real)
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-10)


# --- autoregressive property ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 3), (4, 5), (5, 4)])
@pytest.mark.parametrize("kind", ["pixelcnn", "dense"])
def test_autoregressive_without_blind_spot(shape, kind):
    lattice = SquareLattice(*shape)
    n_sites = lattice.n_sites
    torch.manual_seed(3)
    model = PixelCNN(lattice=lattice) if kind == "pixelcnn" else DenseNAQS(lattice=lattice)
    model = perturb(model.double(), seed=3)
    x = random_configurations(64, n_sites)
    with torch.no_grad():
        reference = model.conditionals(x)
        changed = torch.zeros(n_sites, n_sites, dtype=torch.bool)  # [j, i]
        for j in range(n_sites):
            flipped = x.clone()
            flipped[:, j] = 1 - flipped[:, j]
            delta = (model.conditionals(flipped) - reference).abs().amax(dim=(0, 2))  # (N,)
            assert (delta[: j + 1] <= 1e-12).all(), f"conditional i <= {j} sees x_{j}"
            changed[j] = delta > 1e-9
    expected = torch.ones(n_sites, n_sites, dtype=torch.bool).triu(diagonal=1)
    missing = (expected & ~changed).nonzero().tolist()
    assert not missing, f"blind spot: conditional i never depends on x_j for (j, i) in {missing}"


@pytest.mark.parametrize("kind", ["pixelcnn", "dense"])
def test_count_feature_reads_only_earlier_sites(kind):
    # ℓ_i counts the ups before site i: flipping x_j changes conditionals after j only.
    lattice = SquareLattice(4, 4)
    model = make_model(kind, lattice, total_sz=0, count_feature=True)
    x = random_configurations(64, lattice.n_sites)
    with torch.no_grad():
        reference = model.conditionals(x)
        for j in range(lattice.n_sites):
            flipped = x.clone()
            flipped[:, j] = 1 - flipped[:, j]
            delta = (model.conditionals(flipped) - reference).abs().amax(dim=(0, 2))
            assert (delta[: j + 1] <= 1e-12).all(), f"conditional i <= {j} sees x_{j}"
            if j < lattice.n_sites - 1:
                assert delta[j + 1 :].max() > 1e-6


def test_conditionals_are_normalized_per_site():
    lattice = SquareLattice(4, 4)
    for kind in ("pixelcnn", "dense"):
        model = make_model(kind, lattice, total_sz=0)
        cond = model.conditionals(random_configurations(32, lattice.n_sites))
        assert cond.shape == (32, 16, 2) and cond.dtype == torch.complex128
        torch.testing.assert_close(
            torch.exp(2 * cond.real).sum(-1), torch.ones(32, 16, dtype=torch.float64)
        )


# --- sampling ------------------------------------------------------------------------------


SAMPLING_CASES = [
    ("pixelcnn", (3, 3), {}),
    ("pixelcnn", (4, 5), {}),
    ("pixelcnn", (5, 4), {"kernel_size": 5, "layers": 3}),
    ("pixelcnn", (4, 4), {"total_sz": 0}),
    ("pixelcnn", (10, 1), {}),
    ("pixelcnn", (10, 1), {"total_sz": 2, "phase": False}),
    ("pixelcnn", (3, 4), {"layers": 1}),
    ("pixelcnn", (3, 4), {"layers": 7}),
    ("dense", (3, 3), {}),
    ("dense", (4, 3), {"total_sz": -1}),
    ("pixelcnn", (4, 4), {"total_sz": 0, "count_feature": True}),
    ("dense", (4, 3), {"total_sz": -1, "count_feature": True}),
]


def assert_decisions_follow_the_conditionals(
    model: torch.nn.Module, x: torch.Tensor, uniforms: torch.Tensor
) -> None:
    """Check x_i = [u_i < |ψ_i(up | x_<i)|²] with ψ_i from one full forward pass on the samples.

    An independent statement of ancestral sampling: it does not use `sample_site` or either
    sampling loop, only `conditionals` (the network run once on the finished configurations).
    """
    with torch.no_grad():
        p_up = torch.exp(2 * model.conditionals(x).real[..., 1])
    decided = (uniforms - p_up).abs() > 1e-9  # leave out float ties at the threshold
    assert decided.float().mean() > 0.99
    assert torch.equal(x.bool()[decided], (uniforms < p_up)[decided])


@pytest.mark.parametrize("kind, shape, kwargs", SAMPLING_CASES)
def test_sampling_paths_agree(kind, shape, kwargs):
    """Both sampling paths draw from the forward pass's conditionals with the same uniforms.

    `sample` draws all uniforms up front (one `torch.rand` of shape (B, N) in float64), so the
    same seed gives the test the uniforms each path used. For the dense model "cached" is the
    reference loop itself; the check against `conditionals` is what tests its sampling.
    """
    lattice = SquareLattice(*shape)
    kwargs = {"channels": 8, **kwargs} if kind == "pixelcnn" else kwargs
    model = make_model(kind, lattice, **kwargs)
    uniforms = torch.rand(
        256, lattice.n_sites, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    samples = {}
    for method in SAMPLING_METHODS:
        generator = torch.Generator().manual_seed(7)
        x, log_psi = model.sample(256, generator, method=method)
        assert x.dtype == torch.int8 and x.shape == (256, lattice.n_sites)
        assert log_psi.dtype == torch.complex128 and not log_psi.requires_grad
        torch.testing.assert_close(log_psi, log_psi_all(model, x), rtol=0, atol=1e-10)
        assert_decisions_follow_the_conditionals(model, x, uniforms)
        samples[method] = x
    assert torch.equal(samples["cached"], samples["reference"])
    assert 0 < samples["cached"].float().mean() < 1
    if "total_sz" in kwargs:
        n_up = lattice.n_sites // 2 + kwargs["total_sz"]
        assert (samples["cached"].sum(dim=1) == n_up).all()


@pytest.mark.parametrize("symmetry", ["spin_flip", "lattice_spin_flip"])
def test_symmetrized_sampling(symmetry):
    lattice = SquareLattice(4, 3)
    wrapped = SymmetrizedWaveFunction(make_model("pixelcnn", lattice), symmetry=symmetry)
    samples = []
    for method in ("cached", "reference"):
        x, log_psi = wrapped.sample(128, torch.Generator().manual_seed(5), method=method)
        torch.testing.assert_close(log_psi, log_psi_all(wrapped, x), rtol=0, atol=1e-10)
        samples.append(x)
    assert torch.equal(*samples)


def test_same_seed_same_samples_different_seed_different_samples():
    model = make_model("pixelcnn", SquareLattice(4, 4))
    x1, _ = model.sample(64, torch.Generator().manual_seed(1))
    x2, _ = model.sample(64, torch.Generator().manual_seed(1))
    x3, _ = model.sample(64, torch.Generator().manual_seed(2))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    with pytest.raises(ValueError, match="method"):
        model.sample(4, method="mcmc")


def _flops(function) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        function()
    return counter.get_total_flops()


@pytest.mark.parametrize("side, layers, channels", [(10, 4, 16), (6, 18, 32), (5, 4, 16)])
def test_cached_sampling_costs_about_one_forward_pass(side, layers, channels):
    lattice = SquareLattice(side, side)
    model = PixelCNN(lattice=lattice, layers=layers, channels=channels)
    n_batch = 4
    x = random_configurations(n_batch, lattice.n_sites)
    forward = _flops(lambda: model.raw_outputs(x))
    cached = _flops(lambda: model.sample(n_batch, torch.Generator().manual_seed(0)))
    assert 0.8 * forward <= cached <= 1.2 * forward  # at most 2 required; ≈ 1.05 by design
    if side == 5:
        reference = _flops(
            lambda: model.sample(n_batch, torch.Generator().manual_seed(0), method="reference")
        )
        assert reference >= 0.9 * lattice.n_sites * forward


# --- initialization, dtypes, phases, state -------------------------------------------------


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("pixelcnn", {}),
        ("pixelcnn", {"layers": 18, "channels": 32}),
        ("pixelcnn", {"layers": 38, "channels": 32, "kernel_size": 5}),
        ("dense", {}),
    ],
)
def test_init_is_near_uniform(kind, kwargs):
    torch.manual_seed(0)
    lattice = SquareLattice(10, 10)
    cls = PixelCNN if kind == "pixelcnn" else DenseNAQS
    model = cls(lattice=lattice, **kwargs)
    with torch.no_grad():
        cond = model.conditionals(random_configurations(16, lattice.n_sites))
    p_up = torch.exp(2 * cond.real[..., 1])
    assert (p_up - 0.5).abs().max() < 0.03
    assert cond.imag.abs().max() < 0.1


def _log_amplitudes_on_every_path(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ln Ψ (or a quantity built from it) from every code path that computes it."""
    n_sites = model.n_sites
    x = random_configurations(32, n_sites)
    changed = x.clone()
    changed[:, 4:] = 1 - changed[:, 4:]  # x' = x before site 4: a partial pass in the PixelCNN
    cache = model.ratio_cache(x)
    hamiltonians = {
        "tfim": TransverseFieldIsing(lattice=model.lattice, J=1.0, gamma=1.5),
        "heisenberg": Heisenberg(lattice=model.lattice, J=1.0, sign_rule="true"),
    }
    with torch.no_grad():
        paths = {
            "log_psi": model.log_psi(x),
            "conditionals": model.conditionals(x),
            "ratio_cache": cache.log_psi,
            "log_psi_ratios": model.log_psi_ratios(cache, torch.arange(32), changed),
            "symmetrized": SymmetrizedWaveFunction(model, symmetry="lattice_spin_flip").log_psi(x),
        }
    for method in SAMPLING_METHODS:
        _, paths[f"sample ({method})"] = model.sample(
            64, torch.Generator().manual_seed(0), method=method
        )
    for name, hamiltonian in hamiltonians.items():
        batch = Samples(x=x, log_psi=paths["log_psi"])
        paths[f"local energy ({name})"] = local_energy(model, hamiltonian, batch).total
    return paths


@pytest.mark.parametrize("kind", ["pixelcnn", "dense"])
def test_without_phase_log_psi_is_exactly_real_on_every_path(kind):
    """phase=false: Im ln Ψ is exactly 0 wherever it is computed (and so are local energies of a
    real Hamiltonian); the same paths of a phased model do carry an imaginary part."""
    lattice = SquareLattice(3, 3)
    real_model = make_model(kind, lattice, phase=False)
    assert not real_model.has_phase
    for name, value in _log_amplitudes_on_every_path(real_model).items():
        assert value.is_complex() and (value.imag == 0).all(), name
        assert (value.real != 0).any(), name
    probabilities = torch.exp(2 * log_psi_all(real_model, enumerate_basis(lattice.n_sites)).real)
    assert (probabilities > 0).all()
    phased = make_model(kind, lattice, phase=True)
    assert phased.has_phase
    for name, value in _log_amplitudes_on_every_path(phased).items():
        assert (value.imag.abs() > 1e-6).any(), name


@pytest.mark.parametrize("kind", ["pixelcnn", "dense"])
def test_float32_model(kind):
    lattice = SquareLattice(4, 3)
    model64 = make_model(kind, lattice, total_sz=1)
    model32 = make_model(kind, lattice, total_sz=1).float()
    x = random_configurations(32, lattice.n_sites)
    log_psi32 = model32.log_psi(x)
    assert log_psi32.dtype == torch.complex128
    torch.testing.assert_close(log_psi32, model64.log_psi(x), rtol=0, atol=1e-4)
    samples, log_psi = model32.sample(64, torch.Generator().manual_seed(0))
    assert log_psi.dtype == torch.complex128
    torch.testing.assert_close(log_psi, log_psi_all(model32, samples), rtol=0, atol=1e-4)
    assert (samples.sum(dim=1) == 7).all()


def test_log_psi_keeps_the_graph_and_state_dict_round_trips():
    lattice = SquareLattice(3, 3)
    model = make_model("pixelcnn", lattice, channels=16)
    x = random_configurations(16, lattice.n_sites)
    log_psi = model.log_psi(x)
    (log_psi.real + log_psi.imag).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = make_model("pixelcnn", lattice, seed=9, channels=16)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(clone.log_psi(x), model.log_psi(x), rtol=0, atol=0)
    wrapped = SymmetrizedWaveFunction(clone, symmetry="lattice_spin_flip")
    assert wrapped.base is clone and set(wrapped.state_dict()) == {
        f"base.{key}" for key in clone.state_dict()
    }
    clone.zero_grad()
    log_psi_g = wrapped.log_psi(x)
    assert log_psi_g.requires_grad
    (log_psi_g.real + log_psi_g.imag).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in clone.parameters())


# --- symmetry groups and validation --------------------------------------------------------


@pytest.mark.parametrize(
    "shape, symmetry, size",
    [
        ((4, 4), "none", 1),
        ((4, 4), "spin_flip", 2),
        ((4, 4), "lattice", 8),
        ((4, 4), "lattice_spin_flip", 16),
        ((4, 3), "lattice", 4),
        ((6, 1), "lattice", 2),
        ((1, 5), "lattice_spin_flip", 4),
        ((2, 2), "lattice", 8),
    ],
)
def test_symmetry_group_is_a_group(shape, symmetry, size):
    lattice = SquareLattice(*shape)
    group = symmetry_group(lattice, symmetry)
    assert len(group) == size
    assert torch.equal(group[0][0], torch.arange(lattice.n_sites)) and not group[0][1]
    elements = {(tuple(perm.tolist()), flip) for perm, flip in group}
    assert len(elements) == size
    for perm_a, flip_a in group:  # closed under composition: (a∘b)·x = a·(b·x)
        for perm_b, flip_b in group:
            assert (tuple(perm_b[perm_a].tolist()), flip_a != flip_b) in elements
    bonds = set(lattice.bonds)
    for perm, _ in group:  # lattice symmetries map bonds to bonds
        assert {tuple(sorted((int(perm[i]), int(perm[j])))) for i, j in bonds} == bonds


def test_bad_arguments_are_refused():
    lattice = SquareLattice(3, 3)
    with pytest.raises(ValueError, match="model.symmetry"):
        symmetry_group(lattice, "translation")
    with pytest.raises(ValueError, match="model.kernel_size"):
        PixelCNN(lattice=lattice, kernel_size=4)
    with pytest.raises(ValueError, match="model.layers"):
        PixelCNN(lattice=lattice, layers=0)
    with pytest.raises(ValueError, match="model.channels"):
        PixelCNN(lattice=lattice, channels=1)
    with pytest.raises(ValueError, match="model.hidden"):
        DenseNAQS(lattice=lattice, hidden=0)
    with pytest.raises(TypeError, match="SquareLattice"):
        PixelCNN(lattice=(3, 3))


def test_parameter_counts_match_the_paper():
    lattice = SquareLattice(21, 21)
    counts = {
        layers: sum(
            p.numel() for p in PixelCNN(lattice=lattice, layers=layers, channels=32).parameters()
        )
        for layers in (18, 38)
    }
    assert 0.38e6 < counts[18] < 0.42e6
    assert 0.82e6 < counts[38] < 0.88e6
    assert residual_sources(4) == [None, None, 1, None]
    assert residual_sources(7) == [None, None, 1, None, 3, None, None]


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((3, 5), {}),
        ((4, 6), {"kernel_size": 5, "phase": False}),
        ((6, 1), {"total_sz": 0}),
        ((2, 2), {"kernel_size": 5, "total_sz": 0}),
        ((4, 6), {"total_sz": 0, "count_feature": True}),
    ],
)
def test_cached_sampling_takes_the_reference_decisions(layers, shape, kwargs):
    # Residual patterns of 1–5 layers, kernels 3 and 5 with more rows than K (the row rings
    # wrap), chains and Lx ≠ Ly, float64 and float32, down to a batch of one; the cached path
    # leaves the thread count as it was.
    lattice = SquareLattice(*shape)
    model = make_model("pixelcnn", lattice, layers=layers, channels=5, **kwargs)
    n_threads = torch.get_num_threads()
    for dtype, n_samples, atol in [
        (torch.float64, 64, 1e-10),
        (torch.float64, 1, 1e-10),
        (torch.float32, 64, 1e-4),
    ]:
        model = model.to(dtype)
        samples = {}
        for method in ("cached", "reference"):
            x, log_psi = model.sample(n_samples, torch.Generator().manual_seed(3), method=method)
            torch.testing.assert_close(log_psi, log_psi_all(model, x), rtol=0, atol=atol)
            samples[method] = x
        assert torch.equal(samples["cached"], samples["reference"])
        if "total_sz" in kwargs:
            assert (samples["cached"].sum(dim=1) == lattice.n_sites // 2).all()
    assert torch.get_num_threads() == n_threads
