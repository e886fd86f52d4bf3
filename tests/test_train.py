"""Training end to end: convergence against enumeration, resume exactness, outputs, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import compose, run_cli
from omegaconf import OmegaConf

from naqs_cli import build, store, tasks
from naqs_cli.basis import enumerate_basis
from naqs_cli.errors import ConfigError
from naqs_cli.exact import ground_state, model_expectations
from naqs_cli.models import unwrap

TINY = [
    "lattice.Lx=2",
    "lattice.Ly=2",
    "model.layers=2",
    "model.channels=4",
    "sampler.n_samples=16",
    "dtype=float64",
    "train.final_samples=0",
    "train.log_every=7",
    "train.checkpoint_every=10",
]


def _enumerated_energy(checkpoint: Path) -> tuple[float, float]:
    """Return (model energy per site by enumeration, exact energy per site)."""
    state = store.load_checkpoint(checkpoint)
    cfg = OmegaConf.create(state["config"])
    lattice = build.build_lattice(cfg)
    hamiltonian = build.build_hamiltonian(cfg, lattice)
    model = build.build_model(cfg, lattice)
    unwrap(model).load_state_dict(state["model"])
    with torch.no_grad():
        log_psi = model.log_psi(enumerate_basis(lattice.n_sites))
    energy = model_expectations(log_psi, hamiltonian)["energy"]
    return energy, ground_state(hamiltonian).energy_per_site


def test_tfim_3x3_converges(tmp_path):
    cfg = compose(
        "train",
        [
            "lattice.Lx=3",
            "lattice.Ly=3",
            "ham.gamma=3.0",
            "model.layers=3",
            "model.channels=8",
            "sampler.n_samples=256",
            "optim.lr=0.02",
            "train.steps=100",
            "train.final_samples=0",
            "dtype=float64",
        ],
    )
    tasks.train(cfg, tmp_path)
    energy, exact = _enumerated_energy(tmp_path / "checkpoints" / "last.pt")
    assert energy >= exact - 1e-10  # variational
    assert (energy - exact) / abs(exact) < 1e-3


def test_heisenberg_4x2_converges(tmp_path):
    cfg = compose(
        "train",
        [
            "lattice.Lx=4",
            "lattice.Ly=2",
            "ham=heisenberg",
            "model=dense",
            "model.hidden=64",
            "model.total_sz=0",
            "model.phase=false",
            "sampler.n_samples=256",
            "optim.lr=0.01",
            "optim.schedule=cosine",
            "train.steps=400",
            "train.final_samples=0",
            "dtype=float64",
        ],
    )
    tasks.train(cfg, tmp_path)
    energy, exact = _enumerated_energy(tmp_path / "checkpoints" / "last.pt")
    assert energy >= exact - 1e-10
    assert (energy - exact) / abs(exact) < 1e-3


def test_heisenberg_recipe_4x2(tmp_path):
    """experiment=heisenberg (symmetrized PixelCNN, MinSR) on 4×2, 60 steps of 256 samples:
    2.5e-4 measured (seed 0; seeds 1, 2: 2.0e-4, 1.5e-4). Without the symmetrization the same
    run ends at 7.2e-4 (seeds 1, 2: 1.5e-3, 1.2e-3), so the bound fails if the recipe's main
    lever regresses. lr 0.02 here: the recipe's 0.05 is unstable on 8 sites (measured: 1.4e-2
    to 3.3e-1); 256 samples instead of the recipe's 2,048 keep it at ~7 s (2,048: 30 s)."""
    cfg = compose(
        "train",
        [
            "experiment=heisenberg",
            "lattice.Lx=4",
            "lattice.Ly=2",
            "sampler.n_samples=256",
            "optim.lr=0.02",
            "train.steps=60",
            "train.final_samples=0",
            "dtype=float64",
            "seed=0",
        ],
    )
    tasks.train(cfg, tmp_path)
    energy, exact = _enumerated_energy(tmp_path / "checkpoints" / "last.pt")
    assert energy >= exact - 1e-10
    assert (energy - exact) / abs(exact) < 5e-4


def test_resume_equals_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    tasks.train(compose("train", [*TINY, "train.steps=100"]), straight)
    tasks.train(compose("train", [*TINY, "train.steps=50"]), split)
    overrides = [f"resume={split}", "train.steps=100"]
    tasks.train(compose("train", [*TINY, *overrides]), tmp_path / "ignored", overrides)
    assert not (tmp_path / "ignored").exists(), "a resumed run continues in its own directory"
    a = store.load_checkpoint(straight)
    b = store.load_checkpoint(split)
    assert a["step"] == b["step"] == 100
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    ha, hb = store.read_history(straight / "history.h5"), store.read_history(split / "history.h5")
    assert list(hb["step"]) == list(range(100)), "no step twice, none missing"
    np.testing.assert_array_equal(ha["energy"], hb["energy"])


def test_resume_refuses_a_different_model(tmp_path):
    tasks.train(compose("train", [*TINY, "train.steps=3"]), tmp_path)
    overrides = [f"resume={tmp_path}", "model.channels=8"]
    with pytest.raises(ConfigError, match="model.channels"):
        tasks.train(compose("train", [*TINY, *overrides]), tmp_path, overrides)


def test_stages_schedule_and_sgd(tmp_path):
    cfg = compose(
        "train",
        [
            *TINY,
            "optim=sgd",
            "optim.schedule=step",
            "optim.step_every=2",
            "optim.step_factor=0.5",
            "train.stages=[{steps: 4, n_samples: 8, lr: 0.1}, {steps: 3, n_samples: 32, lr: 0.01}]",
            "train.log_every=1",
        ],
    )
    tasks.train(cfg, tmp_path)
    h = store.read_history(tmp_path / "history.h5")
    assert list(h["stage"]) == [0, 0, 0, 0, 1, 1, 1]
    assert list(h["n_samples"]) == [8, 8, 8, 8, 32, 32, 32]
    np.testing.assert_allclose(h["lr"], [0.1, 0.1, 0.05, 0.05, 0.01, 0.01, 0.005])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("smoke")
    proc = run_cli("train", "experiment=smoke", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert "relative error" in proc.stdout and str(run) in proc.stdout
    return run


HISTORY_DATASETS = [
    "step", "stage", "n_samples", "wall_time", "lr", "grad_norm",
    "energy", "energy_variance", "v_score", "abs_magnetization", "magnetization",
    "magnetization_sq", "sigma_x",
]  # fmt: skip


def test_history_h5_contents(smoke_run):
    with h5py.File(smoke_run / "history.h5") as f:
        for key in ("naqs_version", "config", "seed", "torch_version", "device", "created"):
            assert key in f.attrs, key
        group = f["history"]
        names = HISTORY_DATASETS + [f"{n}_err" for n in HISTORY_DATASETS[6:]]
        for name in names:
            assert name in group, name
        lengths = {group[n].shape[0] for n in group}
        assert lengths == {20}
        final = f["final"]
        for name in ("energy", "energy_err", "abs_magnetization", "relative_error"):
            assert name in final
        assert math.isfinite(float(final["relative_error"][()]))
    assert (smoke_run / "training.png").stat().st_size > 1000
    for name in ("last.pt", "best.pt"):
        state = torch.load(smoke_run / "checkpoints" / name, weights_only=True)
        assert state["format_version"] == store.CHECKPOINT_FORMAT_VERSION
    assert "step 20/20" in (smoke_run / "train.log").read_text()


def test_evaluate_fullsum_matches_enumeration(smoke_run, tmp_path):
    cfg = compose("evaluate", [f"checkpoint={smoke_run}", "sampler=fullsum"])
    result = tasks.evaluate(cfg, tmp_path)
    energy, _ = _enumerated_energy(smoke_run / "checkpoints" / "last.pt")
    assert result.values["energy_err"] == 0.0
    assert math.isclose(result.values["energy"], energy, rel_tol=1e-5)  # float32 model
    with h5py.File(tmp_path / "evaluation.h5") as f:
        assert "energy" in f["evaluation"] and f.attrs["sampler"] == "fullsum"


def test_evaluate_rejects_other_keys(smoke_run, tmp_path):
    proc = run_cli("evaluate", str(smoke_run), "lattice.Lx=5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "lattice" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_summary_and_evaluate_from_multirun_path(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train",
        "-m",
        "experiment=smoke",
        "train.steps=6",
        "train.final_samples=256",
        "ham.gamma=2.0,3.0",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "history.h5").exists())
    assert len(jobs) == 2 and "=" in jobs[0].name
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (sweep / name).exists(), name
    lines = (sweep / "summary.csv").read_text().splitlines()
    assert len(lines) == 3 and "ham.gamma" in lines[0] and "relative_error" in lines[0]
    proc = run_cli(
        "evaluate", str(jobs[0] / "checkpoints" / "last.pt"), "n_samples=512",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "energy" in proc.stdout and (tmp_path / "eval" / "evaluation.h5").exists()
