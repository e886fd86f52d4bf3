"""A checkpoint without a checksum is refused in one line, and loads with the key that says so."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _unsigned_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "old_run", run)
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state.pop("digest")
    torch.save(state, last)
    return run


def test_evaluate_and_resume_refuse_then_accept_an_unsigned_checkpoint(tmp_path):
    run = _unsigned_run(tmp_path)
    for args in (
        ("evaluate", str(run), "n_samples=64"),
        ("train", f"resume={run}", "train.steps=5"),
    ):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "carries no checksum" in lines[0]
        assert "allow_unverified_checkpoint=true" in lines[0]
        proc = run_cli(*args, "allow_unverified_checkpoint=true", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr


def test_evaluate_refuses_weights_that_do_not_fit_before_writing_anything(tmp_path):
    from naqs_cli import store

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "old_run", run)
    last = run / "checkpoints" / "last.pt"
    state = store.load_checkpoint(last)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3, 3)  # a tensor of the wrong shape
    store.save_checkpoint(last, state)
    out = tmp_path / "eval"
    proc = run_cli("evaluate", str(run), "n_samples=64", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "do not fit" in lines[0], proc.stderr
    assert not out.exists(), "nothing is written for a refused checkpoint"
