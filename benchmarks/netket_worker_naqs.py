"""naqs side of the NetKet comparison: time one PixelCNN on one lattice.

Runs in the project venv, started by `benchmarks/netket_compare.py`, which sets the thread
environment (OMP_*). Prints one JSON line (the last line of stdout) with the parameter count
and the timings:

    .venv/bin/python benchmarks/netket_worker_naqs.py \
        --side 10 --layers 4 --channels 14 --vmc --heisenberg

Model: `PixelCNN(phase=False)` in float32 on an open L × L square lattice, no Σσᶻ
constraint, 2 torch threads. Timings exclude a warm-up call; each `*_s` is the median of its
repetitions, all of which are kept in `*_all_s`:

* sample_s: `model.sample(batch, generator)` (the cached sampler).
* log_psi_s: `model.log_psi(x)` under `torch.no_grad()` on `batch` configurations, a freshly
  sampled x every repetition (the sampling is not timed).
* vmc_step_s: one training step as `naqs train` runs it, `DirectSampler.sample(model)` then
  `optim.train_step(model, hamiltonian, batch, optimizer, chunk_size=1024)` with SGD on the
  TFIM H = −J Σ σᶻσᶻ − Γ Σ σˣ (Pauli units).
* heis_step_s (`--heisenberg`): the same step, from a freshly initialized model (seed 0), on
  the Heisenberg H = J Σ Sᵢ·Sⱼ in S·S units (S = σ/2, a quarter of NetKet's Pauli units)
  with the Marshall sign rule, J = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

#: SGD learning rate of the VMC step (the same on the NetKet side).
LEARNING_RATE = 0.01


def _pin_cpus(cpus: str) -> None:
    """Restrict this process to the given CPUs (what `taskset -c` does), before torch starts."""
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def _median_time(
    function: Callable[..., Any], repeats: int, setup: Callable[[], Any] | None = None
) -> tuple[float, list[float]]:
    """Time `repeats` calls of function(), each on a new setup() result when there is a setup.

    Args:
        function: the timed call; it gets setup()'s result as its argument when setup is set.
        repeats: number of timed calls.
        setup: untimed, called before every timed call (e.g. to sample a fresh batch).

    Returns:
        The median wall-clock seconds of the calls, and all of them in call order.
    """
    times = []
    for _ in range(repeats):
        arguments = () if setup is None else (setup(),)
        start = time.perf_counter()
        function(*arguments)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _time_step(
    model: Any, hamiltonian: Any, batch: int, repeats: int
) -> tuple[float, list[float], Any]:
    """Time VMC steps (DirectSampler + SGD `train_step`) of model on hamiltonian.

    Args:
        model: the wave function; its parameters are updated.
        hamiltonian: a `naqs_cli.hamiltonians` Hamiltonian.
        batch: samples per step.
        repeats: timed steps, after one untimed warm-up step.

    Returns:
        The median seconds per step, all timed steps' seconds, and the last step's result.
    """
    import torch

    from naqs_cli.optim import train_step
    from naqs_cli.samplers.direct import DirectSampler

    sampler = DirectSampler(n_samples=batch, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    outcome: list[Any] = []

    def step() -> None:
        samples = sampler.sample(model)
        outcome.append(train_step(model, hamiltonian, samples, optimizer, chunk_size=1024))

    step()  # warm-up
    median_s, all_s = _median_time(step, repeats)
    return median_s, all_s, outcome[-1]


def run(args: argparse.Namespace) -> dict:
    """Build the model, sampler and Hamiltonian, and time them.

    Returns:
        The JSON-serializable result of this case.
    """
    import torch

    from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
    from naqs_cli.lattice import SquareLattice
    from naqs_cli.models import PixelCNN

    torch.set_num_threads(args.threads)
    lattice = SquareLattice(Lx=args.side, Ly=args.side)

    def new_model() -> PixelCNN:
        torch.manual_seed(0)
        return PixelCNN(
            lattice=lattice,
            layers=args.layers,
            channels=args.channels,
            kernel_size=args.kernel_size,
            phase=False,
            total_sz=None,
        ).float()

    model = new_model()
    generator = torch.Generator().manual_seed(0)

    def sample() -> torch.Tensor:
        return model.sample(args.batch, generator)[0]  # no graph: sample is under no_grad

    def log_psi(x: torch.Tensor) -> None:
        with torch.no_grad():
            model.log_psi(x)

    sample()  # warm-up
    sample_s, sample_all = _median_time(sample, args.repeats)
    log_psi(sample())  # warm-up
    log_psi_s, log_psi_all = _median_time(log_psi, args.repeats, setup=sample)
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
        "heis_step_s": None,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
    }
    if args.vmc or args.heisenberg:
        result |= {
            "optimizer": f"SGD lr={LEARNING_RATE}",
            # What the local energy does with this model: reuse x's activations, or full passes.
            "local_energy": (
                "ratio_cache" if hasattr(model, "log_psi_ratios") else "full log_psi passes"
            ),
        }
    if args.vmc:
        hamiltonian = TransverseFieldIsing(lattice=lattice, J=args.J, gamma=args.gamma)
        vmc_step_s, vmc_all, outcome = _time_step(model, hamiltonian, args.batch, args.vmc_repeats)
        result |= {
            "vmc_step_s": vmc_step_s,
            "vmc_step_all_s": vmc_all,
            "hamiltonian": hamiltonian.describe(),
            "energy": float(outcome.e_loc.total.real.mean()),
            "energy_unit": "Pauli",
        }
    if args.heisenberg:
        heisenberg = Heisenberg(lattice=lattice, J=args.J, sign_rule=True)
        heis_step_s, heis_all, outcome = _time_step(
            new_model(), heisenberg, args.batch, args.vmc_repeats
        )
        result |= {
            "heis_step_s": heis_step_s,
            "heis_step_all_s": heis_all,
            "heis_hamiltonian": heisenberg.describe(),
            "heis_energy": float(outcome.e_loc.total.real.mean()),
            "heis_energy_unit": "S·S (S = σ/2)",
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
    parser.add_argument("--vmc", action="store_true", help="also time one TFIM VMC step")
    parser.add_argument(
        "--heisenberg", action="store_true", help="also time one Heisenberg VMC step"
    )
    parser.add_argument("--vmc-repeats", type=int, default=1, help="timed steps per Hamiltonian")
    parser.add_argument("--J", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to run on")
    args = parser.parse_args()
    _pin_cpus(args.cpus)
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
