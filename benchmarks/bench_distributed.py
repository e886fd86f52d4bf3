"""Data-parallel training throughput: training steps per second on 1 and 2 processes.

Run from the repository root:

    .venv/bin/python benchmarks/bench_distributed.py [--quick]

Writes `benchmarks/results/distributed.json` and `benchmarks/results/distributed.md`. Each case
is one `naqs train` run launched by `torchrun --standalone --nproc_per_node=P` (P = 1 or 2) on
a 6×6 open TFIM (Γ = 3) with PixelCNN 4 layers × 16 channels, float32, direct sampling of 1024
samples per step in all (1024/P per process), no final evaluation. Steps per second come from the
`wall_time` column of `history.h5` (the training loop alone, not start-up), over the steps after
the first `WARMUP`. Cases: one process with one thread, one process with two threads, and two
processes with one thread each (torchrun's default OMP_NUM_THREADS=1). The machine may be shared
with other jobs: the load average is recorded and the numbers are indicative.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
TORCHRUN = Path(sys.executable).parent / "torchrun"
#: Steps left out of the rate (first passes allocate and warm up).
WARMUP = 2
SIZE = [
    "lattice.Lx=6",
    "lattice.Ly=6",
    "ham=tfim",
    "ham.gamma=3",
    "model=pixelcnn",
    "model.layers=4",
    "model.channels=16",
    "sampler=direct",
    "sampler.n_samples=1024",
    "dtype=float32",
    "device=cpu",
    "train.final_samples=0",
]
#: name → (processes, threads per process)
CASES = {
    "1 process × 1 thread": (1, 1),
    "1 process × 2 threads": (1, 2),
    "2 processes × 1 thread": (2, 1),
}


def run_case(processes: int, threads: int, steps: int, workdir: Path) -> dict:
    """Train `steps` steps under torchrun and return the measured rates."""
    run = workdir / f"p{processes}-t{threads}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("HYDRA_FULL_ERROR", None)
    command = [str(TORCHRUN), "--standalone", f"--nproc_per_node={processes}", "-m", "naqs_cli"]
    command += ["train", *SIZE, f"train.steps={steps}", f"train.log_every={steps}"]
    command += [f"train.checkpoint_every={steps}", f"hydra.run.dir={run}"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    with h5py.File(run / "history.h5", "r") as f:
        wall = np.asarray(f["history/wall_time"][:])
        n_samples = int(f["history/n_samples"][0])
    timed = wall[-1] - wall[WARMUP - 1]
    return {
        "processes": processes,
        "threads_per_process": threads,
        "steps": steps,
        "samples_per_step": n_samples,
        "samples_per_process": n_samples // processes,
        "timed_steps": steps - WARMUP,
        "timed_s": float(timed),
        "steps_per_s": float((steps - WARMUP) / timed),
        "run_s_including_startup": total,
    }


def write_results(results: dict, meta: dict) -> None:
    """Write distributed.json and distributed.md."""
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "distributed.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    base = results["1 process × 1 thread"]["steps_per_s"]
    lines = [
        "# Data-parallel training (torchrun)",
        "",
        f"{meta['date']}, torch {meta['torch']}, {meta['machine']}; load average at start"
        f" {meta['load_average_start']}, at end {meta['load_average_end']}. 6×6 open TFIM"
        " (Γ = 3), PixelCNN 4 layers × 16 channels, float32, direct sampling, 1024 samples per"
        f" step in all; {meta['steps']} steps per run, the first {WARMUP} not timed. Other jobs"
        " may share the CPU: the numbers are indicative.",
        "",
        "| case | samples per process | steps/s | vs 1 process × 1 thread |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['samples_per_process']} | {r['steps_per_s']:.3f}"
            f" | {r['steps_per_s'] / base:.2f}× |"
        )
    lines += [
        "",
        "steps/s: training steps (sampling, local energies, gradient, all-reduce, Adam) per"
        " second of the loop, from `wall_time` in history.h5; start-up (imports, rendezvous)"
        " and the end-of-run plot are not included.",
    ]
    (RESULTS_DIR / "distributed.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 steps per run instead of 20")
    args = parser.parse_args()
    steps = 6 if args.quick else 20
    import torch

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_start": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "steps": steps,
        "quick": args.quick,
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="naqs-bench-") as tmp:
        for name, (processes, threads) in CASES.items():
            results[name] = run_case(processes, threads, steps, Path(tmp))
            print(f"{name}: {results[name]['steps_per_s']:.3f} steps/s", flush=True)
    meta["load_average_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    write_results(results, meta)
    print(f"results: {RESULTS_DIR / 'distributed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
