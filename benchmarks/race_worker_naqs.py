"""naqs side of `make race`: train one contender on one case under a wall-clock budget.

Started by `benchmarks/race.py` (this venv), which pins the CPUs and sets the thread
environment. Prints one JSON line (the last line of stdout):

    .venv/bin/python benchmarks/race_worker_naqs.py --case tfim4x4 --contender minsr \
        --budget 30 --seed 0 --set optim.lr=0.05 --set optim.diag_shift=1e-3

Runs `naqs train` in-process (`tasks.train`, the real training loop) with
`train.time_budget=--budget`, in a scratch run directory, then evaluates the last checkpoint
with `naqs evaluate` (`tasks.evaluate`, not counted in the budget): for 16 sites exactly
(`sampler=fullsum`, in the Σσᶻ = 0 sector for Heisenberg), otherwise from `--eval-samples`
i.i.d. direct samples. Energies are written per site in the units naqs writes (Pauli for the
TFIM, S·S for Heisenberg); `race.py` converts. The trace is history.h5's (wall_time, energy).

Cases: tfim4x4 (open, Γ = 3), tfim6x6 (periodic, Γ = 3), heis4x4 (open, Σσᶻ = 0, Marshall
sign). Contenders: the `optim` option (adam, sr, minsr) with the PixelCNN and exact direct
sampling; `--set key=value` adds any override (tuned hyperparameters, model size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = {
    "tfim4x4": ["lattice.Lx=4", "lattice.Ly=4", "ham=tfim", "ham.gamma=3.0"],
    "tfim6x6": ["lattice.Lx=6", "lattice.Ly=6", "lattice.pbc=true", "ham=tfim", "ham.gamma=3.0"],
    "heis4x4": ["lattice.Lx=4", "lattice.Ly=4", "ham=heisenberg", "model.total_sz=0"]
    + ["model.phase=false"],  # Marshall sign: positive amplitudes, as NetKet's real models
}
CONTENDERS = ("adam", "sr", "minsr")


def run(args: argparse.Namespace) -> dict:
    from naqs_cli import build, store, tasks
    from naqs_cli.compose import compose

    torch.set_num_threads(args.threads)
    overrides = [
        *CASES[args.case],
        f"optim={args.contender}",
        "sampler=direct",
        "dtype=float32",
        "device=cpu",
        f"seed={args.seed}",
        f"train.time_budget={args.budget}",
        "train.steps=1000000",
        "train.final_samples=0",
        "train.exact_reference=never",
        "train.log_every=1000000",
        *args.set,
    ]
    with tempfile.TemporaryDirectory(prefix="naqs-race-") as scratch:
        run_dir = Path(scratch) / "run"
        start = time.perf_counter()
        tasks.train(compose("train", overrides), run_dir)
        train_s = time.perf_counter() - start
        history = store.read_history(run_dir / "history.h5")
        n_sites = 36 if args.case == "tfim6x6" else 16
        evaluate = [f"checkpoint={run_dir}", "seed=12345"]
        evaluate += ["sampler=fullsum"] if n_sites <= 16 else [f"n_samples={args.eval_samples}"]
        result = tasks.evaluate(compose("evaluate", evaluate), Path(scratch) / "eval")
        values = result.values
    cfg = compose("train", overrides)
    model = build.build_model(cfg, build.build_lattice(cfg), "cpu", torch.float32)
    final = {
        "energy": float(values["energy"]),
        "energy_err": float(values.get("energy_err", 0.0)) if n_sites > 16 else 0.0,
        "variance": float(values["energy_variance"]) * n_sites**2,
        "exact": n_sites <= 16,
    }
    return {
        "side": "naqs",
        "case": args.case,
        "contender": args.contender,
        "seed": args.seed,
        "hyper": dict(s.split("=", 1) for s in args.set),
        "dtype": "float32",
        "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "n_sites": n_sites,
        "steps": int(len(history["energy"])),
        "train_s": train_s,
        "compile_s": 0.0,
        "trace": [
            [float(t), float(e) * n_sites]
            for t, e in zip(history["wall_time"], history["energy"], strict=True)
        ],
        "final": final,
        "version": _version(),
    }


def _version() -> str:
    from importlib.metadata import version

    return f"naqs {version('naqs')}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--contender", choices=CONTENDERS, required=True)
    parser.add_argument("--budget", type=float, required=True, help="seconds of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="extra override key=value")
    parser.add_argument("--eval-samples", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpus", default="", help="CPUs to pin to, e.g. 0,1")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    sys.argv = sys.argv[:1]  # Hydra's compose must not see the worker's arguments
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
