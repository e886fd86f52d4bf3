"""Direct sampling vs Markov chains: the paper's Fig. 2 effect, and both compare subcommands."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, compose, run_cli
from test_train_features import checkpoint_model, exact_values

from naqs_cli import tasks, validation
from naqs_cli.basis import enumerate_basis
from naqs_cli.compare import principal_components, sampling_verdict
from naqs_cli.errors import ConfigError
from naqs_cli.exact import model_expectations
from naqs_cli.hamiltonians import TransverseFieldIsing
from naqs_cli.lattice import SquareLattice
from naqs_cli.models.dense import DenseNAQS
from naqs_cli.models.symmetry import SymmetrizedWaveFunction
from naqs_cli.optim import train_step
from naqs_cli.samplers.direct import DirectSampler
from naqs_cli.samplers.metropolis import MetropolisSampler
from naqs_cli.stats import Stats

#: Keys every method group of compare_sampling.h5 holds.
SAMPLING_KEYS = (
    "magnetization",
    "magnetization_err",
    "abs_magnetization",
    "abs_magnetization_err",
    "energy",
    "energy_err",
)
#: Per-step datasets of every run group of compare_training.h5.
TRAINING_KEYS = ("wall_time", "step", "energy", "energy_err", "energy_variance", "relative_error")
#: Threads for CLI subprocesses (OpenMP spin-waiting is slow on shared CPUs).
CLI_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: Agreement threshold of a sampled mean with its exact value, in reported standard errors
#: (fixed seeds; a correct sampler exceeds it with probability 6e-5 per observable).
N_SIGMA = 4.0


def assert_direct_matches_exact(direct: h5py.Group, exact: dict[str, float], keys) -> None:
    """Check the direct-sampling means of `keys` against exact expectations of the same state.

    Each mean lies within N_SIGMA reported errors of its exact value, and the reported energy
    error is the i.i.d. standard error sqrt(Var/n) of the exact variance (within 30 %), so an
    inflated error bar cannot hide a biased mean.
    """
    for key in keys:
        mean, err = float(direct[key][()]), float(direct[f"{key}_err"][()])
        assert abs(mean - exact[key]) <= N_SIGMA * err + 1e-12, (key, mean, err, exact[key])
    n_samples = int(direct["n_samples"][()])
    sigma = math.sqrt(exact["energy_variance"] / n_samples)
    assert 0.7 * sigma < float(direct["energy_err"][()]) < 1.3 * sigma


def test_chains_started_all_up_miss_the_second_mode():
    """Paper Fig. 2 on 4×4: direct sampling sees both modes, chains started all-up do not.

    Γ = 1.25 rather than 2: on 4×4 the Γ = 2 ground state has P(Σσᶻ = 0) ≈ 4 % and chains
    tunnel within tens of sweeps (measured; even Γ = 1.5 tunnels within a few hundred), while
    at Γ = 1.25 no crossing was seen in 32 chains × 500 sweeps. The trained network settles in
    one mode; its spin-flip symmetrization (as the paper's evaluations) holds both.
    """
    lattice = SquareLattice(4, 4)
    hamiltonian = TransverseFieldIsing(lattice=lattice, J=1.0, gamma=1.25)
    torch.manual_seed(0)
    base = DenseNAQS(lattice=lattice, layers=1, hidden=32, phase=False).double()
    sampler = DirectSampler(seed=0)
    optimizer = torch.optim.Adam(base.parameters(), lr=0.02)
    for _ in range(60):
        train_step(base, hamiltonian, sampler.sample(base, 512), optimizer, chunk_size=4096)
    model = SymmetrizedWaveFunction(base, symmetry="spin_flip")

    basis = enumerate_basis(16)
    with torch.no_grad():
        log_psi = model.log_psi(basis)
    exact = model_expectations(log_psi, hamiltonian)
    probabilities = torch.softmax(2.0 * log_psi.real, dim=0)
    total_sz = 2 * basis.long().sum(dim=1) - 16
    p_positive = float(probabilities[total_sz > 0].sum())
    assert 0.4 <= p_positive <= 0.6
    assert exact["energy"] < -1.77  # trained: exact ground state −1.7797 per site
    abs_m = exact["abs_magnetization"]
    assert abs_m > 0.8

    direct = DirectSampler(seed=1).sample(model, 4096)
    m_direct = (2.0 * direct.x.double() - 1.0).mean(dim=1).numpy()
    m = Stats.iid(m_direct)
    m_abs = Stats.iid(np.abs(m_direct))
    assert abs(m.mean) < 3 * m.error
    assert abs(m_abs.mean - abs_m) < 3 * m_abs.error

    chains = MetropolisSampler(
        hamiltonian=hamiltonian,
        n_chains=8,
        sweeps_between_samples=1,
        burn_in=10,
        init="up",
        seed=2,
    )
    batch = chains.sample(model, 8 * 64)
    m_chains = (2.0 * batch.x.double() - 1.0).mean(dim=1).numpy().reshape(8, -1)
    per_chain = m_chains.mean(axis=1)
    print(f"P(Σσᶻ>0)={p_positive:.3f} ⟨|m|⟩={abs_m:.4f} direct ⟨m⟩={m.mean:.4f}±{m.error:.4f}")
    print(f"⟨|m|⟩={m_abs.mean:.4f}±{m_abs.error:.4f} chains: {np.round(per_chain, 3)}")
    print(f"acceptance {batch.info['acceptance']:.3f}")
    assert bool(np.all(np.abs(per_chain) >= 0.8 * abs_m))
    pooled = Stats.markov(m_chains)
    pooled_abs = Stats.markov(np.abs(m_chains))
    verdict = sampling_verdict(
        {
            "magnetization": m.mean,
            "magnetization_err": m.error,
            "abs_magnetization": m_abs.mean,
            "abs_magnetization_err": m_abs.error,
        },
        {
            "magnetization": pooled.mean,
            "magnetization_err": pooled.error,
            "abs_magnetization": pooled_abs.mean,
            "abs_magnetization_err": pooled_abs.error,
        },
        list(m_chains),
    )
    print(verdict)
    assert verdict.startswith("MCMC chains stayed in one mode")
    assert "m does not" in verdict


def test_principal_components_are_signed_and_orthonormal():
    generator = torch.Generator().manual_seed(0)
    up = torch.rand(200, 9, generator=generator) < 0.9
    spins = torch.cat([up, ~up]).double().numpy() * 2 - 1
    pca = principal_components(spins)
    components = pca["components"]
    np.testing.assert_allclose(components @ components.T, np.eye(2), atol=1e-12)
    assert components[0].sum() > 0 and pca["explained_variance_ratio"][0] > 0.5


def test_presets_compose_for_their_commands():
    for name in ("fig2_tfim", "fig2_tfim_small"):
        cfg = compose("train", [f"experiment={name}"])
        validation.validate(cfg, "train")
        assert cfg.ham.gamma == 2.0 and cfg.model.symmetry == "spin_flip"
    for name, ks in (("fig3_tfim", [10, 50, 100, 300]), ("fig3_tfim_small", [1, 10])):
        cfg = compose("compare_training", [f"experiment={name}"])
        validation.validate(cfg, "compare_training")
        assert list(cfg.compare.ks) == ks and cfg.ham.gamma == 3.0
    bad = compose("compare_training", ["ham=heisenberg", "compare.init=up"])
    with pytest.raises(ConfigError, match="compare.init"):
        validation.validate(bad, "compare_training")
    bad = compose("compare_training", ["sampler=mcmc"])
    with pytest.raises(ConfigError, match="sampler=mcmc"):
        validation.validate(bad, "compare_training")


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    """A few-step smoke run's checkpoint, trained in-process (saves a subprocess start)."""
    run = tmp_path_factory.mktemp("smoke")
    torch.set_num_threads(1)
    cfg = compose("train", ["experiment=smoke", "train.steps=5", "train.final_samples=0"])
    tasks.train(cfg, run)
    return run / "checkpoints" / "last.pt"


def test_compare_sampling_cli(smoke_checkpoint, tmp_path):
    out = tmp_path / "sampling"
    proc = run_cli(
        "compare",
        "sampling",
        str(smoke_checkpoint),
        "n_samples=2048",
        "n_chains=3",
        "samples_per_chain=16",
        "burn_in=2",
        f"hydra.run.dir={out}",
        env=CLI_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verdict:" in proc.stdout
    assert (out / "compare_sampling.png").stat().st_size > 10_000
    with h5py.File(out / "compare_sampling.h5", "r") as f:
        for group in ("direct", "mcmc", "mcmc/chain_0", "mcmc/chain_1", "mcmc/chain_2"):
            for key in SAMPLING_KEYS:
                assert np.isfinite(f[group][key][()]), (group, key)
        assert f["direct/pca"].shape == (2048, 2)
        assert f["mcmc/chain_2/pca"].shape == (16, 2)
        assert "magnetization_r_hat" in f["mcmc"] and "acceptance" in f["mcmc"]
        for attr in ("config", "naqs_version", "checkpoint", "verdict"):
            assert attr in f.attrs
        # 9 sites: the state is enumerated; the test enumerates it too, independently.
        exact = exact_values(*checkpoint_model(smoke_checkpoint))
        for key, value in f["model_exact"].items():
            assert value[()] == pytest.approx(exact[key], rel=1e-5, abs=1e-6), key
        assert_direct_matches_exact(
            f["direct"], exact, ("energy", "magnetization", "abs_magnetization")
        )


def test_compare_training_cli(tmp_path):
    out = tmp_path / "training"
    proc = run_cli(
        "compare",
        "training",
        "experiment=smoke",
        "sampler.n_samples=16",
        "compare.ks=[1,2]",
        "compare.n_chains=4",
        "compare.burn_in=1",
        "compare.wall_time=1",
        "compare.max_steps=3",
        f"hydra.run.dir={out}",
        env=CLI_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mcmc_k2" in proc.stdout
    assert (out / "compare_training.png").stat().st_size > 10_000
    with h5py.File(out / "compare_training.h5", "r") as f:
        assert set(f) == {"direct", "mcmc_k1", "mcmc_k2"}
        for group in f.values():
            n = group["step"].shape[0]
            assert 1 <= n <= 3
            for key in TRAINING_KEYS:
                assert group[key].shape == (n,)
        assert "acceptance" in f["mcmc_k1"] and f["mcmc_k2"].attrs["k"] == 2
        assert f.attrs["reference_source"].startswith("exact")
        np.testing.assert_allclose(f.attrs["reference_energy"], -3.11935543, atol=1e-7)


def test_compare_sampling_heisenberg(tmp_path):
    """`compare sampling` on a Σσᶻ = 0 Heisenberg state (2×4, trained a few exact steps): the
    chains move by bond exchanges from a Néel state, every sample stays in the sector, and
    both methods agree with the enumerated expectations of the same state."""
    run = tmp_path / "train"
    train_overrides = [
        *TINY_TRAIN,
        "lattice.Lx=4",
        "ham=heisenberg",
        "model.total_sz=0",
        "sampler=fullsum",
        "train.steps=10",
        "optim.lr=0.05",
        "train.final_samples=0",
    ]
    tasks.train(compose("train", train_overrides), run)
    checkpoint = run / "checkpoints" / "last.pt"
    out = tmp_path / "sampling"
    overrides = [
        f"checkpoint={checkpoint}",
        "n_samples=4096",
        "n_chains=4",
        "samples_per_chain=64",
        "burn_in=5",
    ]
    result = tasks.compare_sampling(compose("compare_sampling", overrides), out)
    assert "verdict:" in result.summary
    assert (out / "compare_sampling.png").stat().st_size > 10_000
    exact = exact_values(*checkpoint_model(checkpoint))
    assert exact["energy_variance"] > 1e-4  # not an eigenstate: the sampled energy fluctuates
    keys = (*SAMPLING_KEYS, "staggered_magnetization", "staggered_magnetization_err")
    chains = [f"mcmc/chain_{k}" for k in range(4)]
    with h5py.File(out / "compare_sampling.h5", "r") as f:
        assert "Néel" in f["mcmc"].attrs["start"]
        for group in ("direct", "mcmc", *chains):
            for key in keys:
                assert np.isfinite(f[group][key][()]), (group, key)
        for group in ("direct", *chains):
            assert (f[group]["samples_magnetization"][()] == 0).all(), group  # Σσᶻ = 0
        for key, value in f["model_exact"].items():
            assert value[()] == pytest.approx(exact[key], abs=1e-10), key
        assert_direct_matches_exact(f["direct"], exact, ("energy", "staggered_magnetization"))
        mcmc = f["mcmc"]  # τ-corrected errors
        assert abs(mcmc["energy"][()] - exact["energy"]) <= N_SIGMA * mcmc["energy_err"][()]
