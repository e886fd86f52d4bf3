"""Training computes exactly what it computed before: a stored fixed-seed run, and a stored
checkpoint of the previous version that must keep resuming and evaluating.

The fixtures are written by `tests/fixtures/make_fixtures.py` (run by hand, on purpose only).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from naqs_cli import store

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from conftest import compose, run_cli  # noqa: E402
from make_fixtures import REGRESSION_ARGS, read_run  # noqa: E402


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("regression") / "run"
    proc = run_cli(
        "train", *REGRESSION_ARGS, f"hydra.run.dir={run_dir}", env={"OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_fixed_seed_run_matches_the_stored_one(regression_run: Path) -> None:
    """History and final parameters of a 50-step TFIM 3×3 run equal the stored ones."""
    stored = np.load(FIXTURES / "tfim3x3_adam50.npz")
    now = read_run(regression_run)
    assert sorted(k for k in stored.files) == sorted(now), "history columns or parameters differ"
    for key in stored.files:
        if key.endswith("wall_time"):
            continue
        np.testing.assert_allclose(now[key], stored[key], rtol=1e-10, atol=0, err_msg=key)


def test_old_checkpoint_resumes(tmp_path: Path) -> None:
    """A run written by the previous version continues for two more steps."""
    run = tmp_path / "old_run"
    shutil.copytree(FIXTURES / "old_run", run)
    proc = run_cli("train", f"resume={run}", "train.steps=6")
    assert proc.returncode == 0, proc.stderr
    history = store.read_history(run / "history.h5")
    np.testing.assert_array_equal(history["step"], np.arange(6))
    state = store.load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 6


def test_old_checkpoint_evaluates(tmp_path: Path) -> None:
    """`naqs evaluate` reads the previous version's checkpoint and reports finite numbers."""
    from naqs_cli import tasks

    cfg = compose("evaluate", [f"checkpoint={FIXTURES / 'old_run'}", "n_samples=256"])
    result = tasks.evaluate(cfg, tmp_path)
    assert np.isfinite(result.values["energy"])
    assert result.values["n_samples"] == 256
    assert torch.isfinite(torch.tensor(result.values["energy_err"]))
