"""Sweeps through the launchers of naqs[cluster]: joblib on one machine, SLURM via submitit."""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

import h5py
import pytest
from conftest import ROOT, TINY_TRAIN, compose, run_cli
from hydra.types import RunMode
from omegaconf import OmegaConf

from naqs_cli import cli
from naqs_cli.callbacks import SweepSummary

#: The tiny config, as short as a run can be: 2 steps, a 64-sample final evaluation.
SWEEP_JOB = [*TINY_TRAIN, "train.steps=2", "train.final_samples=64"]


def _compose_hydra(overrides: list[str]):
    """Compose `train` with its `hydra` node (where the launcher lives)."""
    return compose("train", overrides, return_hydra_config=True)


def _check_sweep(sweep: Path) -> None:
    """Assert both Γ jobs of a sweep finished with their files and the summary has both rows."""
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"], jobs
    for job in jobs:
        for name in ("history.h5", "checkpoints/last.pt", "checkpoints/best.pt", "train.log"):
            assert (job / name).exists(), job / name
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (sweep / name).exists(), name
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["ham.gamma"]) for r in rows) == [2.0, 3.0]
    assert all(r["energy"] and r["relative_error"] for r in rows)


def test_joblib_sweep_runs_both_jobs_and_writes_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "ham.gamma=2,3",
        *SWEEP_JOB,
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr
    _check_sweep(sweep)
    launcher = OmegaConf.load(sweep / "multirun.yaml").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2
    assert "sweep summary:" in proc.stdout


def test_slurm_preset_keys_are_overridable():
    cfg = _compose_hydra(["hydra/launcher=slurm"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition is None and launcher.gpus_per_node == 1
    assert launcher.tasks_per_node == 1 and launcher.max_num_timeout == 0
    assert launcher.additional_parameters.signal == "TERM@120"  # naqs checkpoints on SIGTERM
    overrides = {
        "partition": "gpu",
        "timeout_min": 240,
        "gpus_per_node": 2,
        "cpus_per_task": 8,
        "mem_gb": 32,
        "array_parallelism": 3,
        "account": "physics",
    }
    cfg = _compose_hydra(
        ["hydra/launcher=slurm", *[f"hydra.launcher.{k}={v}" for k, v in overrides.items()]]
    )
    for key, value in overrides.items():
        assert cfg.hydra.launcher[key] == value, key


def test_slurm_preset_prints_with_cfg_hydra():
    proc = run_cli(
        "train",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=240",
        "--cfg",
        "hydra",
        "-p",
        "hydra.launcher",
    )
    assert proc.returncode == 0, proc.stderr
    launcher = OmegaConf.create(proc.stdout)
    assert launcher.partition == "gpu" and launcher.timeout_min == 240
    assert "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in launcher.setup


def test_missing_launcher_plugins_give_one_line(tmp_path):
    # A regular package named hydra_plugins ahead on the path hides the installed plugins.
    (tmp_path / "hydra_plugins").mkdir()
    (tmp_path / "hydra_plugins" / "__init__.py").write_text("")
    proc = run_cli(
        "train",
        "-m",
        "hydra/launcher=joblib",
        "ham.gamma=2,3",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'naqs[cluster]'" in lines[0], proc.stderr
    assert "hydra/launcher=joblib" in lines[0]
    assert not (tmp_path / "sweep").exists()


def test_missing_submitit_names_the_slurm_preset(monkeypatch):
    monkeypatch.setitem(cli.CLUSTER_LAUNCHERS, "slurm", "hydra_plugins.no_such_launcher")
    message = cli.check_overrides("train", ["hydra/launcher=slurm", "ham.gamma=2,3"], ["-m"])
    assert message is not None and message.startswith("hydra/launcher=slurm: ")
    assert "pip install 'naqs[cluster]'" in message
    assert cli.check_overrides("train", ["hydra/launcher=joblib"], ["-m"]) is None


def _fake_job(sweep: Path, name: str, gamma: float, energy: float | None) -> None:
    """Write a job directory as a sweep leaves it (energy None: an unreadable history.h5)."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- ham.gamma={gamma}\n")
    if energy is None:
        (job / "history.h5").write_bytes(b"not hdf5")
        return
    with h5py.File(job / "history.h5", "w") as f:
        for key, value in {"energy": energy, "energy_err": 0.01, "abs_magnetization": 0.5}.items():
            f[f"final/{key}"] = value


def test_summary_is_updated_as_jobs_end(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_job(sweep, "0_ham.gamma=2", 2.0, -2.1)
    _fake_job(sweep, "1_ham.gamma=3", 3.0, None)  # still running, or failed: skipped
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - ham.gamma=2,3\n")
    job_config = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "sweep": {"dir": str(sweep)}}})
    SweepSummary().on_job_end(job_config)
    assert not (sweep / "summary.csv").exists()  # a single run has no summary
    job_config.hydra.mode = RunMode.MULTIRUN
    SweepSummary().on_job_end(job_config)
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["ham.gamma"], r["energy"]) for r in rows] == [("2.0", "-2.1")]
    assert sorted(p.name for p in sweep.iterdir() if p.is_file()) == [
        "multirun.yaml", "summary.csv", "summary.md", "summary.png"
    ]  # fmt: skip


#: Stand-ins for sbatch, srun, sacct and scancel: sbatch answers a job id at once and runs the
#: array tasks of the script in the background, one after another, with SLURM's variables set.
FAKE_SLURM = {
    "sbatch": """#!/bin/bash
script="${@: -1}"; state="$FAKE_SLURM_STATE"
cp "$script" "$state/job.sbatch"
n=$(sed -n 's/^#SBATCH --array=0-\\([0-9]*\\)%.*/\\1/p' "$script"); echo "${n:-0}" > "$state/n"
cpus=$(sed -n 's/^#SBATCH --cpus-per-task=\\([0-9]*\\)/\\1/p' "$script")
(
for i in $(seq 0 "${n:-0}"); do
  SLURM_JOB_ID=$((500 + i)) SLURM_ARRAY_JOB_ID=42 SLURM_ARRAY_TASK_ID=$i SLURM_PROCID=0 \\
  SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=1 SLURM_JOB_NUM_NODES=1 \\
  SLURM_JOB_NODELIST=localhost SLURM_CPUS_PER_TASK=$cpus bash "$script"
  touch "$state/done_$i"
done
) > "$state/sbatch.log" 2>&1 < /dev/null &
echo "Submitted batch job 42"
""",
    "srun": """#!/bin/bash
out=/dev/null; err=/dev/null
while [[ "$1" == --* ]]; do
  case "$1" in --output) out="$2"; shift 2;; --error) err="$2"; shift 2;; *) shift;; esac
done
fill() { local s="${1//%A/$SLURM_ARRAY_JOB_ID}"; s="${s//%a/$SLURM_ARRAY_TASK_ID}";
         echo "${s//%t/$SLURM_PROCID}"; }
out=$(fill "$out"); err=$(fill "$err"); mkdir -p "$(dirname "$out")"
echo "$OMP_NUM_THREADS $MKL_NUM_THREADS" >> "$FAKE_SLURM_STATE/threads"
"$@" >> "$out" 2>> "$err"
""",
    "sacct": """#!/bin/bash
echo "JobID|State|NodeList"
for i in $(seq 0 "$(cat "$FAKE_SLURM_STATE/n")"); do
  if [ -e "$FAKE_SLURM_STATE/done_$i" ]; then s=COMPLETED; else s=RUNNING; fi
  echo "42_$i|$s|localhost"
done
""",
    "scancel": "#!/bin/bash\n",
}


@pytest.mark.slow
def test_slurm_sweep_through_fake_slurm_commands(tmp_path):
    """The SLURM preset end to end: sbatch script, job dirs, summary (no real SLURM here)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "ham.gamma=2,3",
        *SWEEP_JOB,
        f"hydra.sweep.dir={sweep}",
        env={
            "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
            "FAKE_SLURM_STATE": str(state),
        },
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr + (state / "sbatch.log").read_text()
    _check_sweep(sweep)
    script = (state / "job.sbatch").read_text()
    for flag in (
        "--partition=gpu",
        "--time=30",
        "--cpus-per-task=1",
        "--mem=16GB",
        "--array=0-1%2",
        "--signal=TERM@120",
    ):
        assert f"#SBATCH {flag}\n" in script, flag
    assert (state / "threads").read_text().split() == ["1"] * 4  # OMP and MKL threads, per job
