"""Shared fixtures: config composition, CLI runner, small helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from naqs_cli.compose import compose  # noqa: F401  (the CLI's own composition, for tests)

ROOT = Path(__file__).resolve().parent.parent
#: The smallest training config: 2×2, one causal layer, float64 on the CPU.
TINY_TRAIN = [
    "lattice.Lx=2",
    "lattice.Ly=2",
    "model.layers=1",
    "model.channels=2",
    "sampler.n_samples=8",
    "dtype=float64",
    "device=cpu",
]


def make_trainer(cfg, out_dir: Path, checkpoint: dict | None = None, path: Path | None = None):
    """Return the `Trainer` of a composed train config (the loop alone, as `tasks.train` uses)."""
    from naqs_cli.build import build_training
    from naqs_cli.train.loop import Trainer

    return Trainer(build_training(cfg), Path(out_dir), checkpoint, path)


_SCRATCH: list[str] = []


def _scratch_dir() -> str:
    """Return a new temporary directory, removed at the end of the session."""
    _SCRATCH.append(tempfile.mkdtemp(prefix="naqs-cli-"))
    return _SCRATCH[-1]


@pytest.fixture(autouse=True, scope="session")
def _remove_scratch_dirs():
    yield
    for path in _SCRATCH:
        shutil.rmtree(path, ignore_errors=True)


def run_cli(
    *args: str,
    cwd: Path | None = None,
    check: bool = False,
    env: dict | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run `python -m naqs_cli ARGS` in a subprocess and return the completed process.

    Without `cwd` it runs in a fresh temporary directory, so Hydra's default run directories
    (outputs/<task>/<date>/<time>) never land in the repository or collide between tests.
    """
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "naqs_cli", *args],
        cwd=cwd or _scratch_dir(),
        capture_output=True,
        text=True,
        check=check,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache_home(tmp_path_factory):
    # Exact references are cached under $XDG_CACHE_HOME: keep the user's cache out of the
    # tests (os.environ, so CLI subprocesses inherit it).
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(autouse=True)
def _cpu_threads():
    # Test tensors are small: one thread avoids OpenMP spin-waiting when CPUs are shared.
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    # gpu_check.sh --dry-run: tests/test_gpu.py runs with the CPU standing in for the GPU.
    stand_in = os.environ.get("NAQS_GPU_TEST_DEVICE") == "cpu"
    for item in items:
        if "gpu" in item.keywords and not (stand_in and item.path.name == "test_gpu.py"):
            item.add_marker(skip_gpu)
