"""`benchmarks/gpu_check.sh --dry-run`: every GPU check at tiny sizes on the CPU, so the script
that a GPU machine runs cannot rot unseen."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

CHECKS = ("tests", "throughput L=4 B=16", "throughput L=4 B=64", "train")


def test_gpu_check_dry_run_passes_every_check():
    env = {**os.environ, "NAQS_PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=480,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for check in CHECKS:
        line = next((x for x in lines if x.startswith(f"gpu_check {check}: ")), None)
        assert line is not None, f"no summary line for {check}: {proc.stdout[-1500:]}"
        assert line.startswith(f"gpu_check {check}: ok "), line
    assert "passed=12 minimum=12" in lines[1]
    assert "samples_per_s=" in lines[2] and "minsr_step_s=" in lines[2]
    assert "steps=3 energy_per_site=-" in lines[-2]
    assert lines[-1] == "gpu_check: ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_gpu_check_without_cuda_says_so_in_one_line():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout.strip() == (
        "gpu_check: no CUDA GPU here (run with --dry-run to check the script on the CPU)"
    )
