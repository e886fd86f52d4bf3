"""The equality tests on CUDA: partial recomputation, cached sampling, gradients, Jacobian rows,
and a natural-gradient run against the same run on the CPU (all float64).

Marked `gpu`: skipped without CUDA (conftest), run by `benchmarks/gpu_check.sh`, which fails
if fewer than its `MIN_GPU_TESTS` (12 here, 3 elsewhere) passed. With NAQS_GPU_TEST_DEVICE=cpu
(`gpu_check.sh --dry-run`) this file runs with the CPU standing in for the GPU: the
comparisons are then trivial, but every test's code runs, so the file cannot rot.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from naqs_cli import jacobian, vmc
from naqs_cli.compose import compose
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.lattice import SquareLattice
from naqs_cli.models import PixelCNN
from naqs_cli.samplers import Samples

pytestmark = pytest.mark.gpu

DEVICE = torch.device(os.environ.get("NAQS_GPU_TEST_DEVICE", "cuda"))


def _model(lx: int, ly: int, seed: int, **kwargs) -> PixelCNN:
    """A float64 PixelCNN with O(1) random parameter shifts (no near-uniform Ψ)."""
    torch.manual_seed(seed)
    model = PixelCNN(lattice=SquareLattice(Lx=lx, Ly=ly), **{"layers": 3, "channels": 5, **kwargs})
    model = model.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _pair(lx: int, ly: int, seed: int, **kwargs) -> tuple[PixelCNN, PixelCNN]:
    cpu = _model(lx, ly, seed, **kwargs)
    return cpu, copy.deepcopy(cpu).to(DEVICE)


@pytest.mark.parametrize(
    "shape, kwargs",
    [((4, 4), {}), ((3, 5), {"kernel_size": 5, "phase": False}), ((4, 4), {"total_sz": 0})],
)
def test_cached_sampling_on_cuda_takes_the_reference_decisions(shape, kwargs):
    _, model = _pair(*shape, seed=1, **kwargs)
    samples = {}
    for method in ("cached", "reference"):
        generator = torch.Generator(device=DEVICE).manual_seed(3)
        x, log_psi = model.sample(64, generator, method=method)
        assert x.device.type == DEVICE.type
        torch.testing.assert_close(log_psi, model.log_psi(x).detach(), rtol=0, atol=1e-10)
        samples[method] = x
    assert torch.equal(samples["cached"], samples["reference"])


@pytest.mark.parametrize("ham", ["tfim", "heisenberg"])
def test_partial_recomputation_on_cuda_equals_full_passes(ham):
    lattice = SquareLattice(Lx=4, Ly=4)
    total_sz = 0 if ham == "heisenberg" else None
    _, model = _pair(4, 4, seed=2, layers=4, total_sz=total_sz)
    hamiltonian = (
        Heisenberg(lattice=lattice)
        if ham == "heisenberg"
        else TransverseFieldIsing(lattice=lattice, gamma=1.5)
    )
    x, _ = model.sample(9, torch.Generator(device=DEVICE).manual_seed(0))
    x_conn, mels = hamiltonian.get_conn(x)
    rows, slots = torch.nonzero(mels[:, 1:] != 0, as_tuple=True)
    connected = x_conn[:, 1:][rows, slots]
    first = hamiltonian.first_changed_site[1:].to(DEVICE)[slots]
    with torch.no_grad():
        expected = model.log_psi(connected) - model.log_psi(x)[rows]
        got = model.log_psi_ratios(model.ratio_cache(x), rows, connected, first, chunk_size=4)
    assert got.device.type == DEVICE.type
    assert (got - expected).abs().max().item() < 1e-10


@pytest.mark.parametrize("phase", [True, False])
def test_log_psi_local_energy_and_gradient_on_cuda_equal_the_cpu(phase):
    cpu, gpu = _pair(4, 4, seed=3, phase=phase)
    hamiltonian = TransverseFieldIsing(lattice=SquareLattice(4, 4), gamma=3.0)
    x, _ = cpu.sample(32, torch.Generator().manual_seed(4))
    grads = []
    for model in (cpu, gpu):
        xs = x.to(model.head.weight.device)
        batch = Samples(x=xs, log_psi=model.log_psi(xs).detach())
        e_loc = vmc.local_energy(model, hamiltonian, batch).total
        vmc.vmc_gradient(model, batch, e_loc, 16, xs.shape[0])
        grads.append((e_loc.cpu(), [p.grad.cpu() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=1e-9)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-9)


@pytest.mark.parametrize("total_sz", [None, 0])
def test_log_derivative_rows_on_cuda_equal_the_cpu(total_sz):
    cpu, gpu = _pair(4, 4, seed=5, total_sz=total_sz)
    x, _ = cpu.sample(12, torch.Generator().manual_seed(6))
    want = torch.cat(list(jacobian.log_derivative_rows(cpu, x, chunk_size=5)), dim=1)
    got = torch.cat(list(jacobian.log_derivative_rows(gpu, x.to(DEVICE), chunk_size=5)), dim=1)
    assert got.device.type == DEVICE.type
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("optim", ["minsr", "sr", "adam"])
def test_training_steps_on_cuda_equal_the_cpu(optim, tmp_path):
    """Five full-sum steps (deterministic) on each device: the same energies and parameters."""
    from naqs_cli import store, tasks

    overrides = [
        "lattice.Lx=3",
        "lattice.Ly=3",
        "model.layers=2",
        "model.channels=4",
        "sampler=fullsum",
        f"optim={optim}",
        "dtype=float64",
        "train.steps=5",
        "train.final_samples=0",
        "train.exact_reference=never",
    ]
    energies, params = [], []
    for label, device in (("reference", "cpu"), ("tested", DEVICE.type)):
        run = tmp_path / label
        tasks.train(compose("train", [*overrides, f"device={device}"]), run)
        energies.append(torch.as_tensor(store.read_history(run / "history.h5")["energy"]))
        params.append(torch.load(run / "checkpoints" / "last.pt", map_location="cpu")["model"])
    torch.testing.assert_close(energies[1], energies[0], rtol=0, atol=1e-9)
    for key, value in params[0].items():
        torch.testing.assert_close(params[1][key], value, rtol=0, atol=1e-9)
