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

`--keep PATH` copies the trained checkpoint to PATH; `--evaluate PATH` then draws
`--eval-samples` more samples of that state with `--eval-seed` (no training), which is how
`race.py` tightens the error bar of a median state (`TOP_UP`).

Cases: tfim4x4 (open, Γ = 3), tfim6x6 (periodic, Γ = 3), heis4x4 (open, Σσᶻ = 0, Marshall
sign). Contenders: the `optim` option (adam, sr, minsr) with the PixelCNN and exact direct
sampling; `--set key=value` adds any override (tuned hyperparameters, model size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    n_sites = 36 if args.case == "tfim6x6" else 16
    with tempfile.TemporaryDirectory(prefix="naqs-race-") as scratch:
        run_dir = Path(scratch) / "run"
        start = time.perf_counter()
        tasks.train(compose("train", overrides), run_dir)
        train_s = time.perf_counter() - start
        history = store.read_history(run_dir / "history.h5")
        if args.keep:
            keep = Path(args.keep)
            temporary = keep.with_suffix(".tmp")
            shutil.copyfile(run_dir / "checkpoints" / "last.pt", temporary)
            temporary.replace(keep)
        start = time.perf_counter()
        final = evaluate_state(run_dir, n_sites, args.eval_samples, args.eval_seed, scratch)
        eval_s = time.perf_counter() - start
    cfg = compose("train", overrides)
    model = build.build_model(cfg, build.build_lattice(cfg), "cpu", torch.float32)
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
        "eval_s": eval_s,
        "compile_s": 0.0,
        "trace": [
            [float(t), float(e) * n_sites]
            for t, e in zip(history["wall_time"], history["energy"], strict=True)
        ],
        "final": final,
        "version": _version(),
    }


def evaluate_state(
    checkpoint: Path | str, n_sites: int, n_samples: int, seed: int, scratch: Path | str
) -> dict:
    """Evaluate a trained state: exactly for 16 sites, else from `n_samples` direct samples.

    Returns energy and its error bar per site, the variance of the total energy, whether the
    evaluation was exact, and the number of samples (0 when exact)."""
    from naqs_cli import tasks
    from naqs_cli.compose import compose

    evaluate = [f"checkpoint={checkpoint}", f"seed={seed}"]
    evaluate += ["sampler=fullsum"] if n_sites <= 16 else [f"n_samples={n_samples}"]
    values = tasks.evaluate(compose("evaluate", evaluate), Path(scratch) / "eval").values
    return {
        "energy": float(values["energy"]),
        "energy_err": float(values.get("energy_err", 0.0)) if n_sites > 16 else 0.0,
        "variance": float(values["energy_variance"]) * n_sites**2,
        "exact": n_sites <= 16,
        "n_samples": 0 if n_sites <= 16 else int(values["n_samples"]),
    }


def _version() -> str:
    from importlib.metadata import version

    return f"naqs {version('naqs')}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--contender", choices=CONTENDERS, help="required unless --evaluate")
    parser.add_argument("--budget", type=float, help="seconds of training (unless --evaluate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="extra override key=value")
    parser.add_argument("--eval-samples", type=int, default=65536)
    parser.add_argument("--eval-seed", type=int, default=12345, help="seed of the evaluation")
    parser.add_argument("--keep", default="", help="copy the trained checkpoint to this file")
    parser.add_argument(
        "--evaluate", default="", help="only evaluate this checkpoint (a --keep file)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpus", default="", help="CPUs to pin to, e.g. 0,1")
    args = parser.parse_args()
    if not args.evaluate and (args.contender is None or args.budget is None):
        parser.error("--contender and --budget are required to train (or give --evaluate)")
    if args.evaluate and not Path(args.evaluate).is_file():
        parser.error(f"--evaluate {args.evaluate}: no such checkpoint file (one written by --keep)")
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    sys.argv = sys.argv[:1]  # Hydra's compose must not see the worker's arguments
    if args.evaluate:
        torch.set_num_threads(args.threads)
        n_sites = 36 if args.case == "tfim6x6" else 16
        with tempfile.TemporaryDirectory(prefix="naqs-race-") as scratch:
            start = time.perf_counter()
            final = evaluate_state(
                args.evaluate, n_sites, args.eval_samples, args.eval_seed, scratch
            )
            seconds = time.perf_counter() - start
        print(json.dumps({"side": "naqs", "final": final, "eval_s": seconds}), flush=True)
        return
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
