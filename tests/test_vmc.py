"""Local energies and the Eq. 4 gradient against exact enumeration."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from naqs_cli import vmc
from naqs_cli.basis import enumerate_basis
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.lattice import SquareLattice
from naqs_cli.models.dense import DenseNAQS
from naqs_cli.models.pixelcnn import PixelCNN
from naqs_cli.models.symmetry import SymmetrizedWaveFunction
from naqs_cli.optim import train_step
from naqs_cli.samplers import Samples
from naqs_cli.samplers.direct import DirectSampler
from naqs_cli.samplers.fullsum import FullSumSampler
from naqs_cli.vmc import backward_chunk, local_energy, vmc_gradient


def _randomize(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _exact_energy(model: torch.nn.Module, hamiltonian) -> torch.Tensor:
    """⟨Ψ|H|Ψ⟩/⟨Ψ|Ψ⟩ (total) from the dense matrix, differentiable in the parameters."""
    basis = enumerate_basis(hamiltonian.n_sites)
    psi = torch.exp(model.log_psi(basis))
    h = torch.tensor(hamiltonian.to_sparse().toarray(), dtype=torch.complex128)
    return ((psi.conj() @ (h @ psi)) / (psi.conj() @ psi)).real


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _models(lattice):
    torch.manual_seed(0)
    return {
        "pixelcnn": _randomize(PixelCNN(lattice=lattice, layers=2, channels=4).double(), 0.3, 1),
        "dense": _randomize(DenseNAQS(lattice=lattice, hidden=16).double(), 0.3, 2),
    }


class _PeakedState(torch.nn.Module):
    """ln Ψ: 0 on the all-up state, `depth` (very negative) everywhere else."""

    def __init__(self, depth: float) -> None:
        super().__init__()
        self.depth = depth

    def log_psi(self, x: torch.Tensor) -> torch.Tensor:
        up = (x == 1).all(dim=1)
        real = torch.where(up, 0.0, self.depth).to(torch.float64)
        return torch.complex(real, torch.zeros_like(real))


@pytest.mark.parametrize("depth", [-300.0, -700.0, -745.0, -1e4])
def test_fullsum_energy_of_a_state_peaked_on_one_configuration_is_finite(depth):
    # A state collapsed onto |↑↑↑↑⟩ (what a diverged natural-gradient step leaves): at
    # ln Ψ = −700 the neighbours' Ψ is 1e-304 and (HΨ)/Ψ = 1e304 overflowed weight × E_loc² to
    # NaN; −745 is float64's smallest subnormal; −1e4 underflows to exactly 0. At −300 the
    # neighbours still count, and the variance is the exact Var(H) = Γ²N of the product state;
    # deeper they are Ψ = 0 and the variance is what a sampler sees (0).
    lattice = SquareLattice(2, 2)
    hamiltonian = TransverseFieldIsing(lattice=lattice, J=1.0, gamma=3.0)
    model = _PeakedState(depth)
    batch = FullSumSampler(hamiltonian=hamiltonian).sample(model)
    e_loc = local_energy(model, hamiltonian, batch)
    values = vmc.estimate_observables(batch, e_loc, hamiltonian)
    # ⟨↑↑↑↑|H|↑↑↑↑⟩ = −J × 4 bonds on the open 2×2; the Γ part has no diagonal.
    assert values["energy"] == pytest.approx(-4.0 / 4, abs=1e-12)
    expected = 3.0**2 * 4 / 4**2 if depth > -345 else 0.0  # Var(H)/N²
    assert values["energy_variance"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("shape", [(2, 2), (3, 3)])
@pytest.mark.parametrize("kind", ["pixelcnn", "dense"])
def test_fullsum_step_gradient_is_exact(shape, kind):
    lattice = SquareLattice(*shape)
    hamiltonian = TransverseFieldIsing(lattice=lattice, J=1.0, gamma=1.5)
    model = _models(lattice)[kind]
    batch = FullSumSampler(hamiltonian=hamiltonian).sample(model)
    e_loc = local_energy(model, hamiltonian, batch)
    model.zero_grad()
    vmc_gradient(model, batch, e_loc.total, chunk_size=100)
    ours = _flat_grad(model).clone()
    model.zero_grad()
    energy = _exact_energy(model, hamiltonian)
    energy.backward()
    exact = _flat_grad(model)
    torch.testing.assert_close(ours, exact, atol=1e-8, rtol=1e-8)
    # the weighted mean of the local energies is the exact energy
    assert math.isclose(
        float((batch.weights * e_loc.total.real).sum()), energy.item(), abs_tol=1e-10
    )


@pytest.mark.parametrize("phase", [True, False])
def test_local_energy_paths_agree_and_are_real_for_real_states(phase):
    """Sparse-matrix and connected-element local energies agree; with a real wave function
    (phase=false) and a real Hamiltonian they are exactly real, with a phase they are not."""
    lattice = SquareLattice(2, 3)
    hamiltonian = Heisenberg(lattice=lattice, J=1.0, sign_rule="true" if not phase else "false")
    torch.manual_seed(0)
    model = _randomize(
        PixelCNN(lattice=lattice, layers=2, channels=4, phase=phase).double(), 0.3, 1
    )
    full = FullSumSampler(hamiltonian=hamiltonian).sample(model)
    sampled = Samples(x=full.x, log_psi=full.log_psi)
    via_sparse = local_energy(model, hamiltonian, full)
    via_conn = local_energy(model, hamiltonian, sampled)
    torch.testing.assert_close(via_sparse.total, via_conn.total, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(via_sparse.off_diagonal, via_conn.off_diagonal, atol=1e-9, rtol=1e-9)
    for e_loc in (via_sparse, via_conn):
        if phase:
            assert e_loc.total.imag.abs().max() > 1e-3, "a phased state has complex E_loc"
        else:
            assert (e_loc.total.imag == 0).all() and (e_loc.off_diagonal.imag == 0).all()


def _group_gradients(model, hamiltonian, batch_size, n_batches, n_groups, seed):
    """Return the mean B-sample gradient estimate of each of n_groups groups of batches.

    All n_batches·B samples are drawn at once; each batch keeps its own baseline (its mean
    local energy), and one backward pass per group averages that group's batch gradients.
    """
    batch = DirectSampler(seed=seed).sample(model, batch_size * n_batches)
    e_loc = local_energy(model, hamiltonian, batch).total.reshape(n_batches, batch_size)
    centred = (e_loc - e_loc.mean(dim=1, keepdim=True)).conj().reshape(-1)
    per_group = n_batches // n_groups * batch_size
    grads = []
    for g in range(n_groups):
        rows = slice(g * per_group, (g + 1) * per_group)
        model.zero_grad()
        log_psi = model.log_psi(batch.x[rows])
        weight = batch_size / per_group / batch_size  # mean over the group's batches of 1/B sums
        loss = 2.0 * (weight * centred[rows] * log_psi).real.sum()
        loss.backward()
        grads.append(_flat_grad(model).clone())
    return torch.stack(grads)


@pytest.mark.parametrize("symmetry", ["none", "lattice_spin_flip"])
def test_direct_gradient_is_unbiased_up_to_batch_factor(symmetry):
    """E[g_B] = (1 − 1/B)·∇E exactly with the batch-mean baseline (B = 8)."""
    lattice = SquareLattice(2, 2)
    hamiltonian = TransverseFieldIsing(lattice=lattice, J=1.0, gamma=1.0)
    torch.manual_seed(3)
    model = _randomize(DenseNAQS(lattice=lattice, hidden=4, phase=True).double(), 0.5, 4)
    if symmetry != "none":
        model = SymmetrizedWaveFunction(model, symmetry=symmetry)
    model.zero_grad()
    _exact_energy(model, hamiltonian).backward()
    exact = _flat_grad(model).clone()
    batch_size, n_batches, n_groups = 8, 6000, 60
    grads = _group_gradients(model, hamiltonian, batch_size, n_batches, n_groups, seed=11)
    mean = grads.mean(0)
    err = grads.std(0) / math.sqrt(n_groups)
    keep = err > 1e-12
    expected = (1 - 1 / batch_size) * exact
    z_right = ((mean - expected)[keep] / err[keep]).abs()
    z_wrong = ((mean - exact)[keep] / err[keep]).abs()
    # every component within 4.5σ of (1 − 1/B)∇E (fixed seed; P(any > 4.5σ) ≈ P·7e-6)
    assert z_right.max() < 4.5, z_right.max()
    # and the test can tell the factor apart: the unscaled gradient is far off overall
    assert (z_wrong**2).mean() > 2 * (z_right**2).mean()


def test_train_step_uses_the_given_chunk_size(monkeypatch):
    """An 8-sample chunk reaches the local energies and gives the gradient of one big chunk."""
    lattice = SquareLattice(3, 3)
    hamiltonian = TransverseFieldIsing(lattice=lattice, J=1.0, gamma=1.5)
    model = _models(lattice)["pixelcnn"]
    batch = DirectSampler(seed=5).sample(model, 16)
    chunks: list[int] = []

    def spy(*args, chunk_size: int, **kwargs):
        chunks.append(chunk_size)
        return local_energy(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(vmc, "local_energy", spy)
    steps = {}
    for chunk_size in (8, 4096):
        copy_ = copy.deepcopy(model)
        before = torch.cat([p.detach().reshape(-1).clone() for p in copy_.parameters()])
        optimizer = torch.optim.SGD(copy_.parameters(), lr=1.0)
        result = train_step(copy_, hamiltonian, batch, optimizer, chunk_size=chunk_size)
        assert result.is_finite
        after = torch.cat([p.detach().reshape(-1) for p in copy_.parameters()])
        steps[chunk_size] = before - after  # the gradient (SGD, lr = 1)
    assert chunks == [8, 4096]
    assert float(steps[4096].abs().max()) > 1e-3
    torch.testing.assert_close(steps[8], steps[4096], rtol=0.0, atol=1e-12)


def test_backward_chunk_of_a_symmetrized_model_is_smaller_by_the_group_size():
    """Each sample of Ψ_G runs the network on |G| images: |G| times fewer samples fit."""
    lattice = SquareLattice(4, 4)
    base = PixelCNN(lattice=lattice, layers=2, channels=4).double()
    model = SymmetrizedWaveFunction(base, symmetry="lattice_spin_flip")
    assert model.group_size == 16
    large = 10**9
    base_chunk = backward_chunk(base, large)
    assert base_chunk < large
    assert backward_chunk(model, large) == base_chunk // model.group_size
    assert backward_chunk(model, 7) == 7
    dense = SymmetrizedWaveFunction(DenseNAQS(lattice=lattice, hidden=4), symmetry="spin_flip")
    assert backward_chunk(dense, large) == large  # no memory estimate: no bound
