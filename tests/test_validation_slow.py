"""Slow physics validation (`make validate`): VMC with direct sampling against exact answers.

TFIM 4×4 OBC at Γ = 2, 3, 4 must reach a relative energy error ≤ 1e-4 and ⟨|σᶻ|⟩ within 1e-2
of ED (PixelCNN, 4 layers × 16 channels); Heisenberg 4×4 OBC (sign rule, Σσᶻ = 0; dense NAQS,
which trains ~10× faster per step at this size) ≤ 1e-3, and with the PixelCNN recipe
`experiment=heisenberg` ≤ 1e-4 in 120 steps. Energies of the final model are
computed by enumeration of all 2^16 states, not estimated from samples.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf

from naqs_cli import build, store, tasks
from naqs_cli.basis import enumerate_basis
from naqs_cli.exact import ground_state, model_expectations
from naqs_cli.models import unwrap

pytestmark = pytest.mark.slow


def _train_and_enumerate(tmp_path, overrides: list[str]) -> tuple[dict, object, float]:
    torch.set_num_threads(2)
    started = time.process_time()
    tasks.train(compose("train", overrides), tmp_path)
    cpu_seconds = time.process_time() - started
    state = store.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    cfg = OmegaConf.create(state["config"])
    lattice = build.build_lattice(cfg)
    hamiltonian = build.build_hamiltonian(cfg, lattice)
    model = build.build_model(cfg, lattice, dtype=torch.float64)
    weights = {k: v.double() if v.is_floating_point() else v for k, v in state["model"].items()}
    unwrap(model).load_state_dict(weights)
    with torch.no_grad():  # in chunks: a symmetrized model runs |G| images of each state
        basis = enumerate_basis(lattice.n_sites)
        log_psi = torch.cat([model.log_psi(chunk) for chunk in basis.split(4096)])
    return model_expectations(log_psi, hamiltonian), ground_state(hamiltonian), cpu_seconds


@pytest.mark.parametrize(("gamma", "steps"), [(2.0, 1000), (3.0, 600), (4.0, 400)])
def test_tfim_4x4_obc(tmp_path, gamma, steps):
    values, exact, cpu = _train_and_enumerate(
        tmp_path,
        [
            "lattice.Lx=4",
            "lattice.Ly=4",
            f"ham.gamma={gamma}",
            "sampler.n_samples=1024",
            f"train.steps={steps}",
            "optim.lr=0.01",
            "optim.schedule=cosine",
            "train.final_samples=0",
            "train.log_every=50",
        ],
    )
    rel = (values["energy"] - exact.energy_per_site) / abs(exact.energy_per_site)
    d_m = abs(values["abs_magnetization"] - exact.observables["abs_magnetization"])
    print(
        f"TFIM 4x4 obc gamma={gamma}: {steps} steps, {cpu:.0f} s CPU, rel {rel:.2e}, d|m| {d_m:.1e}"
    )
    assert -1e-12 <= rel <= 1e-4
    assert d_m <= 1e-2


def test_heisenberg_4x4_obc(tmp_path):
    values, exact, cpu = _train_and_enumerate(
        tmp_path,
        [
            "lattice.Lx=4",
            "lattice.Ly=4",
            "ham=heisenberg",
            "model=dense",
            "model.hidden=256",
            "model.total_sz=0",
            "model.phase=false",
            "sampler.n_samples=1024",
            "train.steps=1500",
            "optim.lr=0.005",
            "optim.schedule=cosine",
            "train.final_samples=0",
            "train.log_every=50",
        ],
    )
    rel = (values["energy"] - exact.energy_per_site) / abs(exact.energy_per_site)
    print(f"Heisenberg 4x4 obc: {cpu:.0f} s CPU, rel {rel:.2e}")
    assert -1e-12 <= rel <= 1e-3


def test_heisenberg_4x4_obc_pixelcnn_recipe(tmp_path):
    """experiment=heisenberg on 4×4 for the steps 180 s give on 2 cores (120: the budgeted runs
    of seeds 0, 1, 2 took 117, 117, 120 steps and ended at 6.5e-5, 6.3e-5, 5.8e-5), lr 0.05
    then 0.01 for the last 30 % as in the budgeted run. Measured: 6.1e-5 (327 s CPU). Before samples
    were grouped by orbit (256 samples per step) the same budget gave 1.6e-4 to 3.5e-4."""
    values, exact, cpu = _train_and_enumerate(
        tmp_path,
        [
            "experiment=heisenberg",
            "lattice.Lx=4",
            "lattice.Ly=4",
            "train.steps=120",
            "optim.step_every=84",
            "train.final_samples=0",
            "seed=0",
        ],
    )
    rel = (values["energy"] - exact.energy_per_site) / abs(exact.energy_per_site)
    print(f"Heisenberg 4x4 obc, experiment=heisenberg: {cpu:.0f} s CPU, rel {rel:.2e}")
    assert -1e-12 <= rel <= 1e-4
