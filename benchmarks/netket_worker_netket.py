"""NetKet side of the NetKet comparison: time one autoregressive model on one lattice.

Runs in NetKet's own venv (`benchmarks/netket_venv/`, see `requirements-netket.txt`), started
by `benchmarks/netket_compare.py`, which sets the thread environment (XLA_FLAGS, OMP_*). Prints
one JSON line (the last line of stdout) with the parameter counts and the timings:

    benchmarks/netket_venv/bin/python benchmarks/netket_worker_netket.py \
        --side 10 --layers 4 --features 32 --batch 1024 --vmc --heisenberg

Model: `nk.models.FastARNNConv2D` (or `ARNNConv2D` with `--model plain`), float32 parameters,
3×3 masked kernels, on an open L × L square lattice, `nk.hilbert.Spin(0.5, N)` without a
Σσᶻ constraint. Timings exclude JIT compilation (one warm-up call first) and end with
`jax.block_until_ready`; each `*_s` is the median of its repetitions, all of which are kept in
`*_all_s`:

* sample_s: `MCState.sample()` of `batch` configurations with `nk.sampler.ARDirectSampler`.
* log_psi_s: the jitted `model.apply(variables, x)` on `batch` configurations, a freshly
  sampled x every repetition (the sampling is not timed).
* vmc_step_s: one `nk.VMC` step (`driver.run(1)`: sampling, local energies of the TFIM
  H = −J Σ σᶻσᶻ − Γ Σ σˣ as `nk.operator.IsingJax`, gradient, SGD update).
* heis_step_s (`--heisenberg`): the same step, from a fresh `MCState` (seed 0), on
  `nk.operator.Heisenberg(hilbert, graph, J, sign_rule=True)` (its default operator class,
  recorded as `heis_operator`): H = J Σ σᵢ·σⱼ in Pauli units (4× naqs's S·S units) with the
  Marshall sign rule.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

#: SGD learning rate of the VMC step (the same on the naqs side).
LEARNING_RATE = 0.01


def _pin_cpus(cpus: str) -> None:
    """Restrict this process to the given CPUs (what `taskset -c` does), before JAX starts."""
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def _median_time(
    function: Callable[..., Any], repeats: int, setup: Callable[[], Any] | None = None
) -> tuple[float, list[float]]:
    """Time `repeats` calls of function() (blocked until ready), each on a new setup() result.

    Args:
        function: the timed call; it gets setup()'s result as its argument when setup is set.
        repeats: number of timed calls.
        setup: untimed, called (and blocked until ready) before every timed call, e.g. to
            sample a fresh batch.

    Returns:
        The median wall-clock seconds of the calls, and all of them in call order.
    """
    import jax

    times = []
    for _ in range(repeats):
        arguments = () if setup is None else (jax.block_until_ready(setup()),)
        start = time.perf_counter()
        jax.block_until_ready(function(*arguments))
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _timed_once(function: Callable[[], Any]) -> float:
    """Return the wall-clock seconds of one call of function() (blocked until ready)."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(function())
    return time.perf_counter() - start


def _time_step(
    state: Any, hamiltonian: Any, repeats: int
) -> tuple[float, list[float], float, dict[str, float]]:
    """Time `nk.VMC` steps with SGD of state on hamiltonian.

    Args:
        state: the `MCState`; its parameters are updated.
        hamiltonian: the NetKet operator.
        repeats: timed steps, after one untimed warm-up step (which compiles).

    Returns:
        The median seconds per step, all timed steps' seconds, the last step's energy
        (real part of the mean) and {"vmc_step": seconds of the warm-up step}.
    """
    import netket as nk

    driver = nk.VMC(
        hamiltonian, nk.optimizer.Sgd(learning_rate=LEARNING_RATE), variational_state=state
    )

    def step() -> Any:
        driver.run(1, out=None, show_progress=False)
        return state.parameters

    compile_s = _timed_once(step)  # compiles; a full step too
    median_s, all_s = _median_time(step, repeats)
    return median_s, all_s, float(driver.energy.mean.real), {"vmc_step": compile_s}


def parameter_counts(variables: Any) -> tuple[int, int]:
    """Return (stored, effective) parameter counts of a NetKet ARNN.

    NetKet stores full K×K kernels and multiplies them by a causal mask; its initializer
    zeroes the masked taps, so the taps that can ever be nonzero are the kernel entries that
    are nonzero at initialization (biases, initialized to zero, all count).

    Args:
        variables: the model's flax variables, freshly initialized.
    """
    import jax
    import numpy as np

    stored = effective = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        array = np.asarray(leaf)
        stored += array.size
        is_kernel = "kernel" in jax.tree_util.keystr(path)
        effective += int(np.count_nonzero(array)) if is_kernel else array.size
    return stored, effective


def run(args: argparse.Namespace) -> dict:
    """Build the model, sampler and driver, and time them.

    Returns:
        The JSON-serializable result of this case.
    """
    import jax
    import jax.numpy as jnp
    import netket as nk

    graph = nk.graph.Square(args.side, pbc=False)
    hilbert = nk.hilbert.Spin(s=0.5, N=graph.n_nodes)
    model_class = nk.models.FastARNNConv2D if args.model == "fast" else nk.models.ARNNConv2D
    model = model_class(
        hilbert=hilbert,
        layers=args.layers,
        features=args.features,
        kernel_size=(args.kernel_size, args.kernel_size),
        param_dtype=jnp.float32,
    )
    sampler = nk.sampler.ARDirectSampler(hilbert, dtype=jnp.float32)

    def new_state() -> nk.vqs.MCState:
        return nk.vqs.MCState(
            sampler,
            model,
            n_samples=args.batch,
            seed=0,
            sampler_seed=0,
            chunk_size=args.chunk_size,
        )

    state = new_state()
    n_parameters, n_effective = parameter_counts(state.variables)
    if n_parameters != state.n_parameters:
        raise RuntimeError(f"parameter count {n_parameters} != NetKet's {state.n_parameters}")

    def sample() -> jax.Array:
        state.reset()  # forget the cached samples, so the next call draws new ones
        return state.sample()

    def fresh_batch() -> jax.Array:
        x = jnp.asarray(sample()).reshape(-1, hilbert.size)
        if x.shape[0] != args.batch:
            raise RuntimeError(f"sampler returned {x.shape[0]} samples, expected {args.batch}")
        return x

    compile_s = {"sample": _timed_once(sample)}
    sample_s, sample_all = _median_time(sample, args.repeats)
    apply = jax.jit(model.apply)
    variables = state.variables
    x = jax.block_until_ready(fresh_batch())
    compile_s["log_psi"] = _timed_once(lambda: apply(variables, x))
    log_psi_s, log_psi_all = _median_time(
        lambda batch: apply(variables, batch), args.repeats, setup=fresh_batch
    )
    result = {
        "program": "netket",
        "model": model_class.__name__,
        "layers": args.layers,
        "features": args.features,
        "kernel_size": args.kernel_size,
        "n_parameters": n_parameters,
        "n_parameters_effective": n_effective,
        "L": args.side,
        "batch": args.batch,
        "sample_s": sample_s,
        "sample_all_s": sample_all,
        "log_psi_s": log_psi_s,
        "log_psi_all_s": log_psi_all,
        "vmc_step_s": None,
        "heis_step_s": None,
        "chunk_size": args.chunk_size,
        "compile_s": compile_s,
        "versions": {"netket": nk.__version__, "jax": jax.__version__},
        "x64": bool(jax.config.jax_enable_x64),
        "log_psi_dtype": str(apply(variables, x[:1]).dtype),
    }
    if args.vmc or args.heisenberg:
        result["optimizer"] = f"SGD lr={LEARNING_RATE}"
    if args.vmc:
        hamiltonian = nk.operator.IsingJax(hilbert, graph, h=args.gamma, J=-args.J)
        vmc_step_s, vmc_all, energy, compiled = _time_step(state, hamiltonian, args.vmc_repeats)
        compile_s |= compiled
        result |= {
            "vmc_step_s": vmc_step_s,
            "vmc_step_all_s": vmc_all,
            "hamiltonian": f"IsingJax J={-args.J} h={args.gamma}",
            "energy": energy,
            "energy_unit": "Pauli",
        }
    if args.heisenberg:
        heisenberg = nk.operator.Heisenberg(hilbert, graph, J=args.J, sign_rule=True)
        heis_step_s, heis_all, energy, compiled = _time_step(
            new_state(), heisenberg, args.vmc_repeats
        )
        compile_s["heis_step"] = compiled["vmc_step"]
        result |= {
            "heis_step_s": heis_step_s,
            "heis_step_all_s": heis_all,
            "heis_hamiltonian": f"Heisenberg J={args.J} sign_rule=True",
            "heis_operator": type(heisenberg).__name__,
            "heis_energy": energy,
            "heis_energy_unit": "Pauli (σ·σ)",
        }
    return result


def main() -> None:
    """Parse the arguments, run the case and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, required=True, help="L of the L × L lattice")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--model", choices=("fast", "plain"), default="fast")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timings of sample, log_psi")
    parser.add_argument("--vmc", action="store_true", help="also time one TFIM VMC step")
    parser.add_argument(
        "--heisenberg", action="store_true", help="also time one Heisenberg VMC step"
    )
    parser.add_argument("--vmc-repeats", type=int, default=1, help="timed steps per Hamiltonian")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="MCState.chunk_size (default: none)"
    )
    parser.add_argument("--J", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=3.0)
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to run on")
    args = parser.parse_args()
    _pin_cpus(args.cpus)
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
