"""Bad input through the real CLI: one stderr line, exit code 2, no traceback, no outputs."""

from __future__ import annotations

import pytest
from conftest import run_cli


def _assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["exact", "lattice.Lx=0"], ["lattice.Lx=0", ">= 1"]),
        (["exact", "ham=nosuch"], ["ham=nosuch", "tfim", "heisenberg"]),
        (["exact", "ham.gamma=abc"], ["ham.gamma=abc", "Float"]),
        (["exact", "method=ed", "lattice.Lx=8", "lattice.Ly=8"], ["method=ed", "24"]),
        (["exact", "nosuchkey=1"], ["nosuchkey", "unknown key"]),
        (["exact", "lattice.pbc=true", "lattice.Lx=2"], ["lattice.Lx=2", "pbc"]),
        (["train", "model.kernel_size=4"], ["model.kernel_size=4", "odd"]),
        (["train", "sampler=fullsum", "lattice.Lx=5"], ["sampler=fullsum", "16"]),
        (["train", "model.total_sz=0"], ["model.total_sz", "heisenberg"]),
        (["evaluate", "/no/such/checkpoint.pt"], ["checkpoint", "no such file"]),
        (["frobnicate"], ["unknown command"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, needles):
    proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    _assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists(), "a rejected config must not create its run directory"


def test_valid_override_runs(tmp_path):
    proc = run_cli(
        "exact", "lattice.Lx=3", "lattice.Ly=3", "ham.gamma=1.0", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr
    assert "E0/N" in proc.stdout
    assert (tmp_path / "exact.h5").exists()


def test_top_level_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in ("train", "evaluate", "compare sampling", "compare training", "exact"):
        assert name in proc.stdout


def test_subcommand_help_and_cfg(tmp_path):
    proc = run_cli("exact", "--help")
    assert proc.returncode == 0 and "method" in proc.stdout
    proc = run_cli("train", "--cfg", "job", "ham=heisenberg")
    assert proc.returncode == 0 and "sign_rule" in proc.stdout
