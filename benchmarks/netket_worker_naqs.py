"""naqs side of the NetKet comparison: time one PixelCNN on one lattice.

Runs in the project venv, started by `benchmarks/netket_compare.py`, which sets the thread
environment (OMP_*). Prints one JSON line (the last line of stdout) with the parameter count
and the timings:

    .venv/bin/python benchmarks/netket_worker_naqs.py --side 10 --layers 4 --channels 14 --vmc

Model: `PixelCNN(phase=False)` in float32 on an open L × L square lattice, 2 torch threads.
Timings exclude a warm-up call:

* sample_s: `model.sample(batch, generator)` (the cached sampler).
* log_psi_s: `model.log_psi(x)` under `torch.no_grad()` on `batch` configurations.
* vmc_step_s: one training step as `naqs train` runs it, `DirectSampler.sample(model)` then
  `optim.train_step(model, hamiltonian, batch, optimizer, chunk_size=1024)` with SGD on the
  TFIM H = −J Σ σᶻσᶻ − Γ Σ σˣ.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

#: SGD learning rate of the VMC step (the same on the NetKet side).
LEARNING_RATE = 0.01


def _pin_cpus(cpus: str) -> None:
    """Restrict this process to the given CPUs (what `taskset -c` does), before torch starts."""
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def _best_time(function: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Return the fastest of `repeats` wall-clock timings of function(), and all of them."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times), times


def run(args: argparse.Namespace) -> dict:
    """Build the model, sampler and Hamiltonian, and time them.

    Returns:
        The JSON-serializable result of this case.
    """
    import torch

    from naqs_cli.hamiltonians import TransverseFieldIsing
    from naqs_cli.lattice import SquareLattice
    from naqs_cli.models import PixelCNN
    from naqs_cli.optim import train_step
    from naqs_cli.samplers.direct import DirectSampler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lattice = SquareLattice(Lx=args.side, Ly=args.side)
    model = PixelCNN(
        lattice=lattice,
        layers=args.layers,
        channels=args.channels,
        kernel_size=args.kernel_size,
        phase=False,
    ).float()
    generator = torch.Generator().manual_seed(0)

    def sample() -> None:
        model.sample(args.batch, generator)

    sample()  # warm-up
    sample_s, sample_all = _best_time(sample, args.repeats)
    x, _ = model.sample(args.batch, generator)

    def log_psi() -> None:
        with torch.no_grad():
            model.log_psi(x)

    log_psi()  # warm-up
    log_psi_s, log_psi_all = _best_time(log_psi, args.repeats)
    result = {
        "program": "naqs",
        "model": "PixelCNN",
        "layers": args.layers,
        "channels": args.channels,
        "kernel_size": args.kernel_size,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "L": args.side,
        "batch": args.batch,
        "sample_s": sample_s,
        "sample_all_s": sample_all,
        "log_psi_s": log_psi_s,
        "log_psi_all_s": log_psi_all,
        "vmc_step_s": None,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
    }
    if args.vmc:
        hamiltonian = TransverseFieldIsing(lattice=lattice, J=args.J, gamma=args.gamma)
        sampler = DirectSampler(n_samples=args.batch, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        outcome: list[Any] = []

        def step() -> None:
            batch = sampler.sample(model)
            outcome.append(train_step(model, hamiltonian, batch, optimizer, chunk_size=1024))

        step()  # warm-up
        vmc_step_s, vmc_all = _best_time(step, args.vmc_repeats)
        result |= {
            "vmc_step_s": vmc_step_s,
            "vmc_step_all_s": vmc_all,
            "optimizer": f"SGD lr={LEARNING_RATE}",
            "hamiltonian": hamiltonian.describe(),
            # What vmc.local_energy does with this model: reuse x's activations, or full passes.
            "local_energy": (
                "ratio_cache" if hasattr(model, "log_psi_ratios") else "full log_psi passes"
            ),
            "energy": float(outcome[-1].e_loc.total.real.mean()),
        }
    return result


def main() -> None:
    """Parse the arguments, run the case and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, required=True, help="L of the L × L lattice")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timings of sample, log_psi")
    parser.add_argument("--vmc", action="store_true", help="also time one VMC step")
    parser.add_argument("--vmc-repeats", type=int, default=1)
    parser.add_argument("--J", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to run on")
    args = parser.parse_args()
    _pin_cpus(args.cpus)
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
