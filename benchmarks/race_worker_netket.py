"""NetKet side of `make race`: train one contender on one case under a wall-clock budget.

Runs in NetKet's own venv (`benchmarks/netket_venv/`), started by `benchmarks/race.py`, which
pins the CPUs and sets the thread environment. Prints one JSON line (the last line of stdout):

    benchmarks/netket_venv/bin/python benchmarks/race_worker_netket.py \
        --case tfim4x4 --contender rbm_sr --budget 30 --seed 0 --lr 0.02 --diag-shift 1e-3

Cases (energies in Pauli units, as NetKet writes them; `race.py` converts):
- tfim4x4: H = −Σ σᶻσᶻ − 3 Σ σˣ on the open 4×4 square (`nk.operator.IsingJax(h=3, J=−1)`);
- tfim6x6: the same on the periodic 6×6 square;
- heis4x4: H = Σ σ·σ on the open 4×4 square with the Marshall sign rule
  (`nk.operator.Heisenberg(sign_rule=True)`); the RBM works in the Σσᶻ = 0 sector with
  exchange moves, the autoregressive network without the constraint (its direct sampler
  refuses constrained Hilbert spaces).

Contenders:
- rbm_sr: `nk.models.RBM(alpha=1)` (NetKet's default float64 parameters) + Metropolis
  (local flips; exchanges for Heisenberg; 16 chains) + `VMC_SR` with `optax.sgd(lr)`;
- arnn_adam / arnn_sr: `nk.models.FastARNNConv2D` 4 layers × 16 features, 3×3 kernels, float32
  parameters, `ARDirectSampler`, trained with Adam (`nk.driver.VMC`) or `VMC_SR`.

The budget starts before the variational state is built, so it includes JIT compilation and
the Metropolis burn-in; `compile_s` reports the first step's excess over the median step.
The final state is evaluated after the budget (not counted): for 16 sites exactly (the full
normalized state vector against the sparse Hamiltonian), otherwise from `--eval-samples`
samples with NetKet's own statistics (τ-corrected error bars for Markov chains), in
`--eval-rounds` rounds of `--eval-samples` each (the chains continue from round to round; the
rounds' means are averaged and their errors combined as independent).

`--diag-shift-final`: the VMC_SR shift falls geometrically from `--diag-shift` to it as the
fraction of the budget spent goes 0 → 1 (naqs's `optim.diag_shift_final`, the same form);
NetKet's `diag_shift` accepts a callable, called with the step count once per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

CASES = ("tfim4x4", "tfim6x6", "heis4x4")
CONTENDERS = ("rbm_sr", "arnn_adam", "arnn_sr")


def _pin_cpus(cpus: str) -> None:
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def build_case(case: str, constrained: bool):
    """Return (graph, hilbert, hamiltonian, n_sites)."""
    import netket as nk

    if case == "tfim4x4":
        graph = nk.graph.Square(4, pbc=False)
        hilbert = nk.hilbert.Spin(0.5, graph.n_nodes)
        return graph, hilbert, nk.operator.IsingJax(hilbert, graph, h=3.0, J=-1.0)
    if case == "tfim6x6":
        graph = nk.graph.Square(6, pbc=True)
        hilbert = nk.hilbert.Spin(0.5, graph.n_nodes)
        return graph, hilbert, nk.operator.IsingJax(hilbert, graph, h=3.0, J=-1.0)
    if case == "heis4x4":
        graph = nk.graph.Square(4, pbc=False)
        hilbert = nk.hilbert.Spin(0.5, graph.n_nodes, total_sz=0 if constrained else None)
        return graph, hilbert, nk.operator.Heisenberg(hilbert, graph, J=1.0, sign_rule=True)
    raise SystemExit(f"unknown case {case}: one of {', '.join(CASES)}")


def build_state(args, graph, hilbert):
    """Return the MCState of a contender."""
    import jax.numpy as jnp
    import netket as nk

    if args.contender == "rbm_sr":
        if args.case.startswith("heis"):
            sampler = nk.sampler.MetropolisExchange(hilbert, graph=graph, n_chains=16)
        else:
            sampler = nk.sampler.MetropolisLocal(hilbert, n_chains=16)
        model = nk.models.RBM(alpha=1)
        return nk.vqs.MCState(
            sampler, model, n_samples=args.samples, n_discard_per_chain=16, seed=args.seed
        )
    model = nk.models.FastARNNConv2D(
        hilbert=hilbert,
        layers=4,
        features=16,
        kernel_size=(3, 3),
        param_dtype=jnp.float32,
    )
    sampler = nk.sampler.ARDirectSampler(hilbert, dtype=jnp.float32)
    return nk.vqs.MCState(sampler, model, n_samples=args.samples, seed=args.seed)


def exact_values(vstate, hamiltonian) -> dict:
    """Energy and variance of the normalized state vector (16 sites)."""
    import numpy as np

    psi = np.asarray(vstate.to_array(normalize=True), dtype=np.complex128)
    h = hamiltonian.to_sparse()
    h_psi = h @ psi
    energy = float(np.real(np.vdot(psi, h_psi)))
    variance = float(np.real(np.vdot(h_psi, h_psi))) - energy**2
    return {"energy": energy, "energy_err": 0.0, "variance": variance, "exact": True}


def sampled_values(vstate, hamiltonian, n_samples: int, rounds: int = 1) -> dict:
    """Energy, its τ-corrected error and the variance from `rounds` × n_samples samples."""
    vstate.n_samples = n_samples
    rounds_stats = []
    for _ in range(max(rounds, 1)):
        vstate.reset()
        stats = vstate.expect(hamiltonian)
        tau = float(getattr(stats, "tau_corr", float("nan")))
        rounds_stats.append(
            (float(stats.mean.real), float(stats.error_of_mean), float(stats.variance), tau)
        )
    return {**combine_rounds(rounds_stats), "samples": n_samples * len(rounds_stats)}


def combine_rounds(rounds: list[tuple[float, float, float, float]]) -> dict:
    """Combine equal-sized evaluation rounds (mean, error of the mean, variance, τ): the mean
    of the means, their errors added in quadrature over k², the mean variance, the largest τ."""
    k = len(rounds)
    means, errors, variances, taus = zip(*rounds, strict=True)
    return {
        "energy": sum(means) / k,
        "energy_err": sum(e * e for e in errors) ** 0.5 / k,
        "variance": sum(variances) / k,
        "tau": max(taus),
        "exact": False,
    }


def shift_schedule(initial: float, final: float | None, budget: float, start: float):
    """λ(t) = initial·(final/initial)^(t/budget), t the seconds since `start` (capped at the
    budget); the plain number when `final` is None."""
    if final is None:
        return initial

    def shift(_step) -> float:
        fraction = min(max((time.perf_counter() - start) / budget, 0.0), 1.0)
        return initial * (final / initial) ** fraction

    return shift


def run(args: argparse.Namespace) -> dict:
    import jax
    import netket as nk
    import optax

    constrained = args.contender == "rbm_sr"
    graph, hilbert, hamiltonian = build_case(args.case, constrained)
    start = time.perf_counter()
    vstate = build_state(args, graph, hilbert)
    if args.contender == "arnn_adam":
        driver = nk.driver.VMC(hamiltonian, optax.adam(args.lr), variational_state=vstate)
    else:
        driver = nk.driver.VMC_SR(
            hamiltonian,
            optax.sgd(args.lr),
            diag_shift=shift_schedule(args.diag_shift, args.diag_shift_final, args.budget, start),
            momentum=args.spring if args.spring > 0 else None,
            variational_state=vstate,
        )
    trace: list[tuple[float, float]] = []
    step_times: list[float] = []
    last = [start]

    def callback(step, log_data, drv) -> bool:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        energy = log_data[drv._loss_name].mean
        trace.append((now - start, float(jax.numpy.real(energy))))
        return now - start < args.budget

    driver.run(n_iter=10**9, callback=callback, out=None, show_progress=False)
    train_s = time.perf_counter() - start
    median = statistics.median(step_times[1:]) if len(step_times) > 1 else 0.0
    if graph.n_nodes <= 16:
        final = exact_values(vstate, hamiltonian)
    else:
        final = sampled_values(vstate, hamiltonian, args.eval_samples, args.eval_rounds)
    dtype = "float64" if args.contender == "rbm_sr" else "float32"
    return {
        "side": "netket",
        "case": args.case,
        "contender": args.contender,
        "seed": args.seed,
        "hyper": {
            "lr": args.lr,
            "diag_shift": args.diag_shift,
            "spring": args.spring,
            **({"diag_shift_final": args.diag_shift_final} if args.diag_shift_final else {}),
        },
        "dtype": dtype,
        "n_params": int(vstate.n_parameters),
        "n_sites": int(graph.n_nodes),
        "steps": len(step_times),
        "train_s": train_s,
        "compile_s": max(step_times[0] - median, 0.0) if step_times else 0.0,
        "trace": trace,
        "final": final,
        "version": nk.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--contender", choices=CONTENDERS, required=True)
    parser.add_argument("--budget", type=float, required=True, help="seconds of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--diag-shift", type=float, default=1e-3)
    parser.add_argument(
        "--diag-shift-final", type=float, default=None, help="shift at the end of the budget"
    )
    parser.add_argument("--spring", type=float, default=0.0, help="VMC_SR momentum (0: off)")
    parser.add_argument("--samples", type=int, default=1024, help="samples per step")
    parser.add_argument("--eval-samples", type=int, default=65536)
    parser.add_argument("--eval-rounds", type=int, default=1, help="rounds of --eval-samples")
    parser.add_argument("--cpus", default="", help="CPUs to pin to, e.g. 0,1")
    args = parser.parse_args()
    _pin_cpus(args.cpus)
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
