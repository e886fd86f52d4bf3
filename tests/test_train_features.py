"""Training features checked through their outputs: learning-rate schedules, gradient
clipping, best.pt selection, the final symmetrized evaluation and train.init_from.

Every run is tiny (2×2 TFIM, one causal layer, float64 on the CPU) and is inspected through
what it writes: history.h5, checkpoints/*.pt and evaluation.h5.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, compose

from naqs_cli import store, tasks
from naqs_cli.basis import enumerate_basis
from naqs_cli.exact import model_expectations
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.lattice import SquareLattice
from naqs_cli.models import DenseNAQS, PixelCNN, SymmetrizedWaveFunction

#: Model and Hamiltonian classes by the last part of a stored config's `_target_`.
MODEL_CLASSES = {"PixelCNN": PixelCNN, "DenseNAQS": DenseNAQS}
HAMILTONIAN_CLASSES = {"TransverseFieldIsing": TransverseFieldIsing, "Heisenberg": Heisenberg}


def train_run(path: Path, overrides: list[str]) -> Path:
    """Train TINY_TRAIN plus `overrides` (no final evaluation unless asked) into `path`."""
    cfg = compose("train", [*TINY_TRAIN, "train.final_samples=0", *overrides])
    tasks.train(cfg, path)
    return path


def checkpoint_model(
    path: Path, symmetry: str | None = None
) -> tuple[torch.nn.Module, TransverseFieldIsing | Heisenberg]:
    """Rebuild a checkpoint's wave function and Hamiltonian from the classes themselves.

    Independent of the code under test (the CLI's builders): the stored config's keys go
    straight to the model and Hamiltonian constructors.

    Args:
        path: a checkpoint file.
        symmetry: wrap the network in this symmetry (default: the stored `model.symmetry`).

    Returns:
        (model in the stored dtype, Hamiltonian).
    """
    state = store.load_checkpoint(path)
    cfg = state["config"]
    lattice = SquareLattice(
        int(cfg["lattice"]["Lx"]), int(cfg["lattice"]["Ly"]), pbc=bool(cfg["lattice"]["pbc"])
    )
    kwargs = {k: v for k, v in cfg["model"].items() if k not in ("_target_", "symmetry")}
    network = MODEL_CLASSES[cfg["model"]["_target_"].rsplit(".", 1)[-1]](lattice=lattice, **kwargs)
    network = network.to(getattr(torch, cfg["dtype"]))
    network.load_state_dict(state["model"])
    symmetry = cfg["model"]["symmetry"] if symmetry is None else symmetry
    model = network if symmetry == "none" else SymmetrizedWaveFunction(network, symmetry=symmetry)
    ham = {k: v for k, v in cfg["ham"].items() if k != "_target_"}
    hamiltonian = HAMILTONIAN_CLASSES[cfg["ham"]["_target_"].rsplit(".", 1)[-1]](
        lattice=lattice, **ham
    )
    return model, hamiltonian


def exact_values(model: torch.nn.Module, hamiltonian) -> dict[str, float]:
    """Exact per-site expectations of `model` by enumerating the basis."""
    with torch.no_grad():
        log_psi = model.log_psi(enumerate_basis(hamiltonian.n_sites))
    return model_expectations(log_psi, hamiltonian)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights stored in a checkpoint."""
    return store.load_checkpoint(path)["model"]


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """All tensors of a state dict as one float64 vector (in key order)."""
    return torch.cat([state[key].double().reshape(-1) for key in sorted(state)])


# --- learning-rate schedules ---------------------------------------------------------------
STAGES = "train.stages=[{steps:3,n_samples:8,lr:0.02},{steps:4,n_samples:16,lr:0.01}]"


def expected_lr(schedule: str, t: int, steps: int, lr0: float) -> float:
    """The learning rate `t` steps into a stage of `steps` steps with base rate `lr0`."""
    if schedule == "cosine":
        return 0.5 * lr0 * (1.0 + math.cos(math.pi * t / steps))
    return lr0 * 0.5 ** (t // 2)  # step: optim.step_every=2, optim.step_factor=0.5


@pytest.mark.parametrize(
    "schedule, overrides, stages",
    [
        ("cosine", ["train.steps=7", "optim.lr=0.03"], [(7, 8, 0.03)]),
        ("step", ["train.steps=7", "optim.lr=0.03"], [(7, 8, 0.03)]),
        ("cosine", [STAGES], [(3, 8, 0.02), (4, 16, 0.01)]),
    ],
)
def test_lr_column_follows_the_schedule(tmp_path, schedule, overrides, stages):
    """History's `lr` is the scheduled rate at every step: cosine 0.5·lr0·(1 + cos(πt/T)),
    step lr0·factor^⌊t/every⌋, with t and T counted within each `train.stages` entry."""
    schedule_keys = [f"optim.schedule={schedule}", "optim.step_every=2", "optim.step_factor=0.5"]
    run = train_run(tmp_path / "run", [*schedule_keys, "train.log_every=3", *overrides])
    history = store.read_history(run / "history.h5")
    expected = {"step": [], "stage": [], "n_samples": [], "lr": []}
    start = 0
    for index, (steps, n_samples, lr0) in enumerate(stages):
        for t in range(steps):
            expected["step"].append(start + t)
            expected["stage"].append(index)
            expected["n_samples"].append(n_samples)
            expected["lr"].append(expected_lr(schedule, t, steps, lr0))
        start += steps
    for key in ("step", "stage", "n_samples"):
        np.testing.assert_array_equal(history[key], expected[key], err_msg=key)
    np.testing.assert_allclose(history["lr"], expected["lr"], rtol=1e-14, atol=0)
    assert len(set(np.round(history["lr"], 12))) >= 4  # the schedule does move the rate


# --- gradient clipping ---------------------------------------------------------------------
def test_grad_clip_bounds_the_sgd_update_and_history_keeps_the_raw_norm(tmp_path):
    """One plain-SGD step: unclipped, θ₁ − θ₀ = −lr·g with ‖g‖ the recorded `grad_norm`;
    clipped to c < ‖g‖, the step keeps its direction and shrinks to length lr·c, while the
    recorded `grad_norm` stays the norm before clipping."""
    lr = 0.05
    sgd = ["optim=sgd", f"optim.lr={lr}", "optim.momentum=0"]
    start = train_run(tmp_path / "start", [*sgd, "train.steps=0"])
    theta0 = flat(weights(start / "checkpoints/last.pt"))
    free = train_run(tmp_path / "free", [*sgd, "train.steps=1"])
    norm = float(store.read_history(free / "history.h5")["grad_norm"][0])
    step_free = flat(weights(free / "checkpoints/last.pt")) - theta0
    assert norm > 0
    assert float(step_free.norm()) == pytest.approx(lr * norm, rel=1e-9)

    clip = 0.25 * norm
    clipped = train_run(tmp_path / "clip", [*sgd, "train.steps=1", f"optim.grad_clip={clip}"])
    recorded = float(store.read_history(clipped / "history.h5")["grad_norm"][0])
    assert recorded == pytest.approx(norm, rel=1e-12)  # the norm before clipping
    step_clip = flat(weights(clipped / "checkpoints/last.pt")) - theta0
    length = float(step_clip.norm())
    assert 0.99 * lr * clip <= length <= lr * clip * (1 + 1e-9)
    torch.testing.assert_close(step_clip, step_free * (length / float(step_free.norm())))


# --- best.pt -------------------------------------------------------------------------------
def test_best_checkpoint_holds_the_lowest_smoothed_energy(tmp_path):
    """best.pt is written at the log point with the lowest running mean of the energy.

    At each log point s (every `train.log_every` steps and the last step), the smoothed
    energy is the mean of the history energies of steps max(0, s − W) … s − 1, with
    W = `train.best_smoothing` (rows between log points count); best.pt holds the weights
    after s steps at the first s where that mean is lowest, and its `best_energy`.
    """
    steps, log_every, window = 12, 2, 3
    common = [
        f"train.log_every={log_every}",
        f"train.best_smoothing={window}",
        "optim.lr=0.05",
        "ham.gamma=1.0",
    ]
    run = train_run(tmp_path / "run", [*common, f"train.steps={steps}"])
    energy = store.read_history(run / "history.h5")["energy"]
    assert energy.shape == (steps,) and np.isfinite(energy).all()
    log_points = [s for s in range(1, steps + 1) if s % log_every == 0 or s == steps]
    smoothed = [float(np.mean(energy[max(0, s - window) : s])) for s in log_points]
    best_step = log_points[int(np.argmin(smoothed))]
    best = store.load_checkpoint(run / "checkpoints/best.pt")
    assert best["best_energy"] == pytest.approx(min(smoothed), rel=1e-12)
    assert best["step"] == best_step
    assert store.load_checkpoint(run / "checkpoints/last.pt")["best_energy"] == best["best_energy"]
    # The weights are those after best_step steps: a run stopped there ends with the same ones.
    assert best_step < steps, "this run must reach its best point before its end to test it"
    short = train_run(tmp_path / "short", [*common, f"train.steps={best_step}"])
    stopped = weights(short / "checkpoints/last.pt")
    assert all(torch.equal(best["model"][k], stopped[k]) for k in stopped)
    final = weights(run / "checkpoints/last.pt")
    assert not all(torch.equal(best["model"][k], final[k]) for k in final)


# --- train.final_symmetry ------------------------------------------------------------------
def test_final_symmetry_evaluates_the_symmetrized_model(tmp_path):
    """The final group of history.h5 is the exact (full-sum) evaluation of the trained
    network wrapped in `train.final_symmetry`, and says so; the bare network's energy differs."""
    overrides = [
        "sampler=fullsum",
        "ham.gamma=0.5",  # ordered phase: symmetrizing the spin flip changes the state
        "train.steps=8",
        "optim.lr=0.05",
        "train.final_samples=1",
        "train.final_symmetry=spin_flip",
    ]
    run = train_run(tmp_path / "run", overrides)
    final = store.read_group(run / "history.h5", "final")
    with h5py.File(run / "history.h5", "r") as f:
        assert f["final"].attrs["symmetry"] == "spin_flip"
    symmetrized = exact_values(*checkpoint_model(run / "checkpoints/last.pt", "spin_flip"))
    bare = exact_values(*checkpoint_model(run / "checkpoints/last.pt", "none"))
    assert abs(symmetrized["energy"] - bare["energy"]) > 1e-6
    for key in ("energy", "abs_magnetization", "magnetization"):
        assert final[key] == pytest.approx(symmetrized[key], abs=1e-10), key
    assert final["magnetization"] == pytest.approx(0.0, abs=1e-12)  # spin-flip symmetric


# --- train.init_from -----------------------------------------------------------------------
def test_init_from_starts_from_the_source_weights(tmp_path):
    """A run with train.init_from starts from the source checkpoint's weights: with no steps
    it saves them unchanged, and its first (full-sum, exact) energy is the source's energy as
    `evaluate` finds it."""
    source = train_run(tmp_path / "source", ["seed=3", "train.steps=4", "optim.lr=0.05"])
    source_ckpt = source / "checkpoints/last.pt"
    copied = train_run(tmp_path / "copy", ["train.steps=0", f"train.init_from={source_ckpt}"])
    loaded = weights(copied / "checkpoints/last.pt")
    original = weights(source_ckpt)
    assert set(loaded) == set(original)
    assert all(torch.equal(loaded[k], original[k]) for k in original)

    continued = train_run(
        tmp_path / "continued",
        ["sampler=fullsum", "train.steps=1", f"train.init_from={source_ckpt}"],
    )
    first_energy = float(store.read_history(continued / "history.h5")["energy"][0])
    evaluation = tmp_path / "evaluation"
    evaluate_cfg = compose("evaluate", [f"checkpoint={source_ckpt}", "sampler=fullsum"])
    tasks.evaluate(evaluate_cfg, evaluation)
    evaluated = store.read_group(evaluation / "evaluation.h5", "evaluation")["energy"]
    assert first_energy == pytest.approx(evaluated, abs=1e-12)
    assert exact_values(*checkpoint_model(source_ckpt))["energy"] == pytest.approx(
        evaluated, abs=1e-12
    )
