"""Partial recomputation of ln Ψ(x') − ln Ψ(x): equal to full network passes, in float64."""

from __future__ import annotations

import pytest
import torch

from naqs_cli import vmc
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.lattice import SquareLattice
from naqs_cli.models import DenseNAQS, PixelCNN, SymmetrizedWaveFunction
from naqs_cli.samplers import Samples

TOLERANCE = 1e-10


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Return the model in float64 with O(1) random parameter shifts (no near-uniform Ψ)."""
    generator = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _connected(hamiltonian, x: torch.Tensor):
    """Non-zero off-diagonal connected configurations: (index, x', first changed site)."""
    x_conn, mels = hamiltonian.get_conn(x)
    rows, slots = torch.nonzero(mels[:, 1:] != 0, as_tuple=True)
    first = hamiltonian.first_changed_site[1:][slots]
    return rows, x_conn[:, 1:][rows, slots], first


CASES = [
    # (Lx, Ly, layers, kernel, phase, total_sz)
    (4, 4, 4, 3, True, None),
    (4, 4, 5, 3, False, None),
    (5, 3, 3, 5, True, None),
    (3, 5, 2, 3, False, None),
    (4, 4, 4, 3, True, 0.0),
    (6, 1, 3, 3, True, None),
    (3, 3, 1, 3, False, None),
    (4, 4, 4, 3, False, "0+count"),
]


@pytest.mark.parametrize(("lx", "ly", "layers", "kernel", "phase", "total_sz"), CASES)
def test_pixelcnn_ratios_equal_full_passes(lx, ly, layers, kernel, phase, total_sz):
    lattice = SquareLattice(Lx=lx, Ly=ly)
    count_feature = total_sz == "0+count"  # Σσᶻ = 0 with `count_feature`
    total_sz = 0.0 if count_feature else total_sz
    model = PixelCNN(
        lattice=lattice,
        layers=layers,
        channels=6,
        kernel_size=kernel,
        phase=phase,
        total_sz=total_sz,
        count_feature=count_feature,
    )
    model = _perturbed(model, seed=lx * 100 + ly * 10 + layers)
    x, _ = model.sample(9, torch.Generator().manual_seed(3))
    if total_sz is None:
        hamiltonian = TransverseFieldIsing(lattice=lattice, gamma=1.5)
    else:
        hamiltonian = Heisenberg(lattice=lattice)
    index, x_conn, first = _connected(hamiltonian, x)
    assert x_conn.shape[0] > 0
    cache = model.ratio_cache(x)
    expected = model.log_psi(x_conn) - model.log_psi(x)[index]
    for first_site in (first, None):
        # A chunk size of 4 splits every row group into several passes.
        got = model.log_psi_ratios(cache, index, x_conn, first_site, chunk_size=4)
        assert got.dtype == torch.complex128
        assert (got - expected).abs().max().item() < TOLERANCE


def test_pixelcnn_ratios_for_arbitrary_changes_and_unchanged_configurations():
    lattice = SquareLattice(Lx=4, Ly=4)
    model = _perturbed(PixelCNN(lattice=lattice, layers=4, channels=5, phase=True), seed=7)
    x, _ = model.sample(6, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    index = torch.arange(6).repeat(5)
    x_new = x[index].clone()
    # Randomize everything from a random site on (several changes, any rows), keep one copy.
    for k in range(x_new.shape[0]):
        start = int(torch.randint(0, 17, (1,), generator=generator))
        x_new[k, start:] = torch.randint(0, 2, (16 - start,), generator=generator).to(torch.int8)
    x_new[0] = x[index[0]]
    cache = model.ratio_cache(x)
    got = model.log_psi_ratios(cache, index, x_new)
    expected = model.log_psi(x_new) - model.log_psi(x)[index]
    assert (got - expected).abs().max().item() < TOLERANCE
    assert got[0].abs().item() == 0.0


def test_ratio_cache_log_psi_equals_log_psi():
    lattice = SquareLattice(Lx=5, Ly=4)
    model = _perturbed(PixelCNN(lattice=lattice, layers=3, channels=4), seed=2)
    x, log_psi = model.sample(8, torch.Generator().manual_seed(0))
    cache = model.ratio_cache(x)
    assert (cache.log_psi - model.log_psi(x)).abs().max().item() < 1e-12
    assert cache.site_log_psi.shape == (8, 20)
    assert cache.nbytes > 0


@pytest.mark.parametrize("ham_name", ["tfim", "heisenberg"])
def test_local_energy_partial_path_equals_full_passes(ham_name, monkeypatch):
    lattice = SquareLattice(Lx=4, Ly=3)
    total_sz = 0.0 if ham_name == "heisenberg" else None
    model = PixelCNN(lattice=lattice, layers=4, channels=6, total_sz=total_sz)
    model = _perturbed(model, seed=11)
    if ham_name == "tfim":
        hamiltonian = TransverseFieldIsing(lattice=lattice, gamma=2.0)
    else:
        hamiltonian = Heisenberg(lattice=lattice)
    x, log_psi = model.sample(40, torch.Generator().manual_seed(5))
    batch = Samples(x=x, weights=None, log_psi=log_psi, n_chains=1)
    reference = vmc._local_energy_full_passes(model, hamiltonian, batch, chunk_size=64)
    # A tiny cache budget: one reference configuration per cache chunk after the first.
    monkeypatch.setattr(vmc, "RATIO_CACHE_BYTES", 1)
    fast = vmc.local_energy(model, hamiltonian, batch, chunk_size=16)
    assert (fast.total - reference.total).abs().max().item() < TOLERANCE
    assert (fast.off_diagonal - reference.off_diagonal).abs().max().item() < TOLERANCE


def test_generic_ratios_for_other_models():
    lattice = SquareLattice(Lx=3, Ly=3)
    hamiltonian = TransverseFieldIsing(lattice=lattice, gamma=1.0)
    dense = _perturbed(DenseNAQS(lattice=lattice, hidden=8), seed=4)
    x, log_psi = dense.sample(5, torch.Generator().manual_seed(0))
    index, x_conn, first = _connected(hamiltonian, x)
    cache = dense.ratio_cache(x)
    got = dense.log_psi_ratios(cache, index, x_conn, first)
    assert (got - (dense.log_psi(x_conn) - log_psi[index])).abs().max().item() < TOLERANCE
    # The symmetrized wrapper's ratios (from its images' ratios) against full passes.
    wrapped = SymmetrizedWaveFunction(
        PixelCNN(lattice=lattice, layers=2, channels=4), symmetry="lattice"
    )
    wrapped = wrapped.double()
    x, log_psi = wrapped.sample(5, torch.Generator().manual_seed(0))
    batch = Samples(x=x, weights=None, log_psi=log_psi, n_chains=1)
    e_loc = vmc.local_energy(wrapped, hamiltonian, batch)
    reference = vmc._local_energy_full_passes(wrapped, hamiltonian, batch, chunk_size=64)
    assert (e_loc.total - reference.total).abs().max().item() < TOLERANCE


@pytest.mark.parametrize(
    "symmetry, phase, ham_name",
    [
        ("lattice_spin_flip", True, "tfim"),
        ("lattice", False, "heisenberg"),
        ("spin_flip", True, "heisenberg"),
    ],
)
def test_symmetrized_ratios_equal_full_passes(symmetry, phase, ham_name):
    lattice = SquareLattice(Lx=4, Ly=4)
    total_sz = 0 if ham_name == "heisenberg" else None
    base = PixelCNN(lattice=lattice, layers=3, channels=5, phase=phase, total_sz=total_sz)
    model = SymmetrizedWaveFunction(_perturbed(base, seed=11), symmetry=symmetry)
    hamiltonian = (
        Heisenberg(lattice=lattice)
        if ham_name == "heisenberg"
        else TransverseFieldIsing(lattice=lattice, gamma=1.5)
    )
    x, _ = model.sample(7, torch.Generator().manual_seed(2))
    index, x_conn, first = _connected(hamiltonian, x)
    cache = model.ratio_cache(x)
    torch.testing.assert_close(cache.log_psi, model.log_psi(x).detach(), rtol=0, atol=TOLERANCE)
    expected = model.log_psi(x_conn) - model.log_psi(x)[index]
    got = model.log_psi_ratios(cache, index, x_conn, first, chunk_size=5)
    assert got.dtype == torch.complex128
    assert (got - expected).abs().max().item() < TOLERANCE
    assert model.log_psi_ratios(cache, index[:0], x_conn[:0]).shape == (0,)


class _FullPasses(torch.nn.Module):
    """The same wave function without the ratio API (MCMC then runs full passes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.lattice = model.lattice
        self.n_sites = model.n_sites
        self.n_up = model.n_up

    def log_psi(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.log_psi(x)


@pytest.mark.parametrize("ham_name", ["tfim", "heisenberg"])
def test_mcmc_with_ratio_cache_follows_the_full_pass_chain(ham_name):
    from naqs_cli.samplers.metropolis import MetropolisSampler

    lattice = SquareLattice(Lx=4, Ly=3)
    total_sz = 0.0 if ham_name == "heisenberg" else None
    model = PixelCNN(lattice=lattice, layers=3, channels=5, total_sz=total_sz)
    model = _perturbed(model, seed=21)
    if ham_name == "tfim":
        hamiltonian = TransverseFieldIsing(lattice=lattice, gamma=1.0)
    else:
        hamiltonian = Heisenberg(lattice=lattice)
    runs = []
    for wave_function in (model, _FullPasses(model)):
        sampler = MetropolisSampler(
            hamiltonian=hamiltonian,
            n_samples=24,
            n_chains=8,
            sweeps_between_samples=1,
            burn_in=2,
            seed=5,
        )
        runs.append(sampler.sample(wave_function))
    fast, full = runs
    assert torch.equal(fast.x, full.x)
    assert 0 < fast.info["acceptance"] == full.info["acceptance"] < 1
    assert (fast.log_psi - full.log_psi).abs().max().item() < TOLERANCE
    assert (fast.log_psi - model.log_psi(fast.x)).abs().max().item() < TOLERANCE


def test_thread_split_gives_the_same_samples_and_local_energies():
    """Cached sampling and local energies shared over 2 CPU threads equal the 1-thread run."""
    lattice = SquareLattice(Lx=4, Ly=4)
    model = _perturbed(PixelCNN(lattice=lattice, layers=3, channels=6), seed=8)
    hamiltonian = TransverseFieldIsing(lattice=lattice, gamma=1.0)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            x, log_psi = model.sample(600, torch.Generator().manual_seed(4))
            batch = Samples(x=x, weights=None, log_psi=log_psi, n_chains=1)
            results.append((x, log_psi, vmc.local_energy(model, hamiltonian, batch).total))
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(1)
    (x1, lp1, e1), (x2, lp2, e2) = results
    assert torch.equal(x1, x2)
    assert (lp1 - lp2).abs().max().item() < TOLERANCE
    assert (e1 - e2).abs().max().item() < TOLERANCE


def test_padded_channel_counts():
    from naqs_cli.models.layers import padded_channels

    rounded = {1: 1, 2: 2, 5: 5, 6: 8, 7: 8, 8: 8, 9: 9, 14: 16, 15: 16, 17: 17, 30: 32, 32: 32}
    assert {c: padded_channels(c) for c in rounded} == rounded


@pytest.mark.parametrize("channels", [14, 7, 15])
def test_float32_passes_with_padded_channels_equal_unpadded(channels, monkeypatch):
    """No-grad float32 CPU passes compute zero-padded channels: same ln Ψ, ratios and chain."""
    from naqs_cli.models import layers
    from naqs_cli.samplers.metropolis import MetropolisSampler

    lattice = SquareLattice(Lx=4, Ly=4)
    model = _perturbed(PixelCNN(lattice=lattice, layers=4, channels=channels), seed=channels)
    model = model.float()
    x, _ = model.sample(32, torch.Generator().manual_seed(1))
    cache = model.ratio_cache(x)
    padded = layers.padded_channels
    assert cache.layers[1].relu_v.shape[1] == padded(channels) > channels
    assert cache.layers[1].ab.shape[1] == padded(channels // 2) + padded(channels - channels // 2)
    unpadded_log_psi = model.log_psi(x).detach()  # with autograd: never padded
    assert (cache.log_psi - unpadded_log_psi).abs().max().item() < 1e-5
    with torch.no_grad():
        assert (model.log_psi(x) - unpadded_log_psi).abs().max().item() < 1e-5
    batch = Samples(x=x, weights=None, log_psi=None, n_chains=1)
    hamiltonian = TransverseFieldIsing(lattice=lattice, gamma=1.5)
    fast = vmc.local_energy(model, hamiltonian, batch, chunk_size=16).total
    monkeypatch.setattr(layers, "PAD_CHANNELS", False)
    assert model.ratio_cache(x).layers[1].relu_v.shape[1] == channels
    plain = vmc.local_energy(model, hamiltonian, batch, chunk_size=16).total
    assert (fast - plain).abs().max().item() < 1e-5 * plain.abs().max().item()
    monkeypatch.setattr(layers, "PAD_CHANNELS", True)
    # Metropolis with proposals and accepted rows copied into the padded cache.
    sampler = MetropolisSampler(
        hamiltonian=hamiltonian,
        n_samples=24,
        n_chains=8,
        sweeps_between_samples=1,
        burn_in=2,
        seed=5,
    )
    chain = sampler.sample(model)
    assert 0 < chain.info["acceptance"] < 1
    assert (chain.log_psi - model.log_psi(chain.x).detach()).abs().max().item() < 1e-5
