"""Side-by-side throughput of naqs and NetKet autoregressive wave functions on the same lattice.

Run from the repository root (`make bench-netket` installs NetKet's venv first):

    .venv/bin/python benchmarks/netket_compare.py [--quick]

For each model size and lattice, runs the NetKet worker (`netket_worker_netket.py`, in
`benchmarks/netket_venv/`) and the naqs worker (`netket_worker_naqs.py`, in this venv) as
subprocesses, alternating: netket, naqs, netket, naqs, ... (`--rounds` each). Both are pinned
to the same CPUs with the same thread count (XLA: `XLA_FLAGS`; torch: `set_num_threads`;
OpenMP: `OMP_NUM_THREADS`, `OMP_WAIT_POLICY=PASSIVE`), float32 parameters, batch 1024, open
L × L square lattices, TFIM H = −J Σ σᶻσᶻ − Γ Σ σˣ with J = 1, Γ = 3. Each quantity is the best
(fastest) timing over all repetitions of all rounds.

Models: NetKet's `FastARNNConv2D` (3×3 masked kernels, `features=32`) against a naqs
`PixelCNN(phase=False)` with as many layers and the channel count that matches NetKet's
parameter count within 20% (checked). Writes `benchmarks/results/netket.json` and
`benchmarks/results/netket.md`; the last line printed is

    ratio sampling=<naqs/NetKet samples per s> vmc_step=<naqs/NetKet seconds per step>

for the 4-layer size at L = 10 (L = 4 with `--quick`).

This file is not named `bench_*.py` on purpose: `run_all.py` (`make bench`) does not run it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
NETKET_PYTHON = HERE / "netket_venv" / "bin" / "python"
NETKET_WORKER = HERE / "netket_worker_netket.py"
NAQS_WORKER = HERE / "netket_worker_naqs.py"

#: Largest relative difference allowed between the compared parameter counts.
MAX_PARAMETER_MISMATCH = 0.20
#: Seconds one worker may run before the comparison gives up.
WORKER_TIMEOUT_S = 1800


@dataclass(frozen=True)
class ModelSize:
    """One compared pair: NetKet ARNN layers × features against naqs PixelCNN layers × channels.

    Attributes:
        name: label of the pair, after NetKet's size.
        layers: causal layers of both models.
        netket_features: NetKet's `features`.
        naqs_channels: naqs `channels`, chosen to match NetKet's parameter count.
    """

    name: str
    layers: int
    netket_features: int
    naqs_channels: int


SIZES = (
    ModelSize("4x32", layers=4, netket_features=32, naqs_channels=14),
    ModelSize("8x32", layers=8, netket_features=32, naqs_channels=17),
)
#: The size whose L = 10 (quick: L = 4) ratios make the last printed line.
HEADLINE_SIZE = "4x32"


@dataclass(frozen=True)
class Plan:
    """What to run.

    Attributes:
        sides: L of the L × L lattices timed for sampling and log_psi.
        vmc_sides: the sides where one VMC step is timed too.
        batch: configurations per call (samples per step).
        rounds: times each worker runs per case, alternating NetKet and naqs.
        repeats: timings of sampling and log_psi per worker run.
        headline_side: L of the last printed line.
        plain_arnn: also time NetKet's `ARNNConv2D` (sampling and log_psi only).
        netket_chunk_size: NetKet's `MCState.chunk_size` (samples per local-energy and
            gradient pass), or None for none.
    """

    sides: tuple[int, ...]
    vmc_sides: tuple[int, ...]
    batch: int
    rounds: int
    repeats: int
    headline_side: int
    plain_arnn: bool
    netket_chunk_size: int | None


def worker_environment(threads: int) -> dict[str, str]:
    """Return the environment of both workers: the same thread settings for XLA and OpenMP."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads),
            "NUMBA_NUM_THREADS": str(threads),
            # Idle OpenMP threads sleep instead of spinning, which matters on shared cores.
            "OMP_WAIT_POLICY": "PASSIVE",
            "XLA_FLAGS": (
                f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
            ),
            "JAX_PLATFORMS": "cpu",
        }
    )
    return env


def run_worker(command: list[str], env: dict[str, str]) -> dict:
    """Run one worker and return the JSON object of its last stdout line.

    Raises:
        RuntimeError: the worker failed, timed out or printed no JSON line.
    """
    try:
        proc = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"worker timed out after {WORKER_TIMEOUT_S} s: {command}") from error
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"worker failed (exit {proc.returncode}): {command}\n{tail}")
    return json.loads(lines[-1])


def netket_command(
    python: Path, size: ModelSize, side: int, plan: Plan, cpus: str, model: str, vmc: bool
) -> list[str]:
    """Return the command line of one NetKet worker run."""
    command = [str(python), str(NETKET_WORKER), "--model", model, "--features"]
    command += [str(size.netket_features), *_common_arguments(size, side, plan, cpus)]
    if plan.netket_chunk_size is not None:
        command += ["--chunk-size", str(plan.netket_chunk_size)]
    return command + (["--vmc"] if vmc else [])


def naqs_command(
    python: Path, size: ModelSize, side: int, plan: Plan, cpus: str, threads: int, vmc: bool
) -> list[str]:
    """Return the command line of one naqs worker run."""
    command = [str(python), str(NAQS_WORKER), "--channels", str(size.naqs_channels)]
    command += [*_common_arguments(size, side, plan, cpus), "--threads", str(threads)]
    return command + (["--vmc"] if vmc else [])


def _common_arguments(size: ModelSize, side: int, plan: Plan, cpus: str) -> list[str]:
    return [
        "--side",
        str(side),
        "--layers",
        str(size.layers),
        "--batch",
        str(plan.batch),
        "--repeats",
        str(plan.repeats),
        "--cpus",
        cpus,
    ]


def check_parameter_counts(naqs: dict, netket: dict) -> float:
    """Return naqs / NetKet parameters (NetKet's unmasked ones), if within 20%.

    Raises:
        ValueError: the counts differ by more than `MAX_PARAMETER_MISMATCH`.
    """
    ratio = naqs["n_parameters"] / netket["n_parameters_effective"]
    if abs(ratio - 1) > MAX_PARAMETER_MISMATCH:
        raise ValueError(
            f"naqs {naqs['layers']}x{naqs['channels']} has {naqs['n_parameters']:,} parameters,"
            f" NetKet {netket['layers']}x{netket['features']} {netket['n_parameters_effective']:,}"
            f" unmasked ({ratio:.2f}x): change naqs_channels in SIZES"
        )
    return ratio


def best_of(runs: list[dict], key: str) -> float | None:
    """Return the smallest `key` over the runs (None when no run timed it)."""
    values = [run[key] for run in runs if run.get(key) is not None]
    return min(values) if values else None


def summarize(runs: list[dict]) -> dict:
    """Merge the rounds of one program on one case: best timings, per-round values kept."""
    first = runs[0]
    summary = {k: v for k, v in first.items() if not k.endswith("_s") and k != "compile_s"}
    batch = first["batch"]
    for key in ("sample_s", "log_psi_s", "vmc_step_s"):
        summary[key] = best_of(runs, key)
        stem = key.removesuffix("_s")
        summary[f"{stem}_median_s"] = (
            statistics.median(r[key] for r in runs) if summary[key] is not None else None
        )
        summary[f"{stem}_rounds_s"] = [r[key] for r in runs]
    summary["samples_per_s"] = batch / summary["sample_s"]
    summary["log_psi_per_s"] = batch / summary["log_psi_s"]
    if "compile_s" in first:
        summary["compile_s"] = [r["compile_s"] for r in runs]
    return summary


def compare_case(
    size: ModelSize, side: int, plan: Plan, pythons: dict[str, Path], cpus: str, threads: int
) -> dict:
    """Time one model size on one lattice, alternating NetKet and naqs, and compare them."""
    env = worker_environment(threads)
    vmc = side in plan.vmc_sides
    runs: dict[str, list[dict]] = {"netket": [], "naqs": [], "netket_plain": []}
    for round_index in range(plan.rounds):
        for program in ("netket", "naqs"):
            started = time.perf_counter()
            if program == "netket":
                command = netket_command(pythons["netket"], size, side, plan, cpus, "fast", vmc)
            else:
                command = naqs_command(pythons["naqs"], size, side, plan, cpus, threads, vmc)
            result = run_worker(command, env)
            runs[program].append(result)
            print(
                f"  {size.name} L={side} round {round_index + 1}/{plan.rounds} {program}:"
                f" {_describe_run(result)} [{time.perf_counter() - started:.0f} s]",
                flush=True,
            )
        if round_index == 0:
            check_parameter_counts(runs["naqs"][0], runs["netket"][0])
        if plan.plain_arnn:
            command = netket_command(pythons["netket"], size, side, plan, cpus, "plain", False)
            runs["netket_plain"].append(run_worker(command, env))
            print(f"  {size.name} L={side} ARNNConv2D: {_describe_run(runs['netket_plain'][-1])}")
    naqs, netket = summarize(runs["naqs"]), summarize(runs["netket"])
    case = {
        "size": size.name,
        "L": side,
        "naqs": naqs,
        "netket": netket,
        "parameter_ratio": naqs["n_parameters"] / netket["n_parameters_effective"],
        "sampling_ratio": naqs["samples_per_s"] / netket["samples_per_s"],
        "log_psi_ratio": naqs["log_psi_per_s"] / netket["log_psi_per_s"],
        "vmc_step_ratio": (
            naqs["vmc_step_s"] / netket["vmc_step_s"] if naqs["vmc_step_s"] is not None else None
        ),
    }
    if runs["netket_plain"]:
        plain = summarize(runs["netket_plain"])
        case["netket_plain"] = plain
        case["sampling_ratio_plain"] = naqs["samples_per_s"] / plain["samples_per_s"]
    return case


def _describe_run(result: dict) -> str:
    text = (
        f"{result['n_parameters']:,} params, {result['batch'] / result['sample_s']:,.0f} samples/s,"
        f" {result['batch'] / result['log_psi_s']:,.0f} log_psi/s"
    )
    if result.get("vmc_step_s") is not None:
        text += f", {result['vmc_step_s']:.2f} s/VMC step"
    return text


def cpu_model() -> str:
    """Return the CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages as text."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def markdown(cases: list[dict], meta: dict) -> str:
    """Render the comparison as a markdown report."""
    lines = [
        "# naqs vs NetKet: autoregressive sampling, log_psi and VMC step",
        "",
        f"{meta['date']}; naqs with torch {meta['versions']['torch']}, NetKet"
        f" {meta['versions']['netket']} with jax {meta['versions']['jax']};"
        f" {meta['threads']} threads each (CPUs {meta['cpus']}), float32 parameters, batch"
        f" {meta['batch']}, open L × L lattices, TFIM J = 1, Γ = 3; {meta['cpu']}, load average"
        f" at start {meta['load_average_start']}, at end {meta['load_average_end']}. Best of"
        f" {meta['rounds']} alternating rounds (× {meta['repeats']} repetitions for sampling and"
        " log_psi, 1 VMC step per round after a warm-up one). Other jobs may share the CPU.",
        "",
        "Compared: NetKet `FastARNNConv2D` (layers × features, 3×3 masked kernels, sampled by"
        " `ARDirectSampler` with its cached fast path) against naqs `PixelCNN(phase=False)`"
        " (layers × channels, cached sampler). ratio = naqs / NetKet: above 1 is naqs faster for"
        " rates (samples/s, log_psi/s), below 1 is naqs faster for s per VMC step.",
        "",
        "| size | L | params naqs / NetKet | samples/s naqs | NetKet | ratio | log_psi/s naqs"
        " | NetKet | ratio | s/VMC step naqs | NetKet | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        naqs, netket = case["naqs"], case["netket"]
        lines.append(
            f"| {naqs['layers']}×{naqs['channels']} vs {netket['layers']}×{netket['features']}"
            f" | {case['L']} | {naqs['n_parameters']:,} / {netket['n_parameters_effective']:,}"
            f" ({netket['n_parameters']:,})"
            f" | {_rate(naqs['samples_per_s'])} | {_rate(netket['samples_per_s'])}"
            f" | {_ratio(case['sampling_ratio'])}"
            f" | {_rate(naqs['log_psi_per_s'])} | {_rate(netket['log_psi_per_s'])}"
            f" | {_ratio(case['log_psi_ratio'])}"
            f" | {_seconds(naqs['vmc_step_s'])} | {_seconds(netket['vmc_step_s'])}"
            f" | {_ratio(case['vmc_step_ratio'])} |"
        )
    plain = [case for case in cases if "netket_plain" in case]
    if plain:
        lines += [
            "",
            "NetKet's `ARNNConv2D` (one full forward pass per site when sampling):",
            "",
            "| size | L | samples/s NetKet ARNNConv2D | naqs / it |",
            "|---|---|---|---|",
        ]
        for case in plain:
            lines.append(
                f"| {case['size']} | {case['L']} | {_rate(case['netket_plain']['samples_per_s'])}"
                f" | {_ratio(case['sampling_ratio_plain'])} |"
            )
    lines += [
        "",
        "params: naqs / NetKet's unmasked parameters (NetKet's stored count, full 3×3 kernels"
        " including the taps its causal mask zeroes, in brackets); the pairs are matched within"
        " 20% on the unmasked count.",
        "",
        "What is timed. Sampling: naqs `model.sample(batch, generator)`; NetKet"
        " `MCState.sample()` with `ARDirectSampler`. log_psi: naqs `model.log_psi(x)` under"
        " `torch.no_grad()`; NetKet jitted `model.apply(variables, x)`. VMC step: naqs"
        " `DirectSampler.sample(model)` + `optim.train_step(..., chunk_size=1024)`; NetKet"
        f" `nk.VMC(...).run(1)` with `nk.operator.IsingJax` and `MCState(chunk_size="
        f"{meta['netket_chunk_size']})` (chunking cuts its peak memory from about 5 GB at L = 10"
        f" and was not slower), both with plain SGD (lr {meta['learning_rate']}); NetKet's JIT"
        " compilation is excluded (warm-up step first), every NetKet timing ends with"
        " `jax.block_until_ready` (torch runs synchronously on the CPU). NetKet evaluates"
        " ln Ψ of every connected configuration in full for the local energy; naqs"
        f" {_local_energy_note(cases)}.",
    ]
    return "\n".join(lines) + "\n"


def _local_energy_note(cases: list[dict]) -> str:
    methods = {c["naqs"].get("local_energy") for c in cases} - {None}
    if methods == {"ratio_cache"}:
        return (
            "reuses the activations of the sampled configuration (`ratio_cache`) and recomputes"
            " only what a spin flip changes"
        )
    return "uses " + (", ".join(sorted(methods)) or "no VMC step here")


def versions(pythons: dict[str, Path]) -> dict[str, str]:
    """Return the package versions of both venvs."""
    script = (
        "import importlib.metadata as m, json, sys; names = sys.argv[1:]; "
        "print(json.dumps({n: m.version(n) for n in names}))"
    )
    found: dict[str, str] = {}
    for key, names in (
        ("naqs", ["torch", "numpy"]),
        ("netket", ["netket", "jax", "jaxlib", "flax"]),
    ):
        proc = subprocess.run(
            [str(pythons[key]), "-c", script, *names], capture_output=True, text=True, check=True
        )
        found |= json.loads(proc.stdout)
    found["python"] = platform.python_version()
    return found


def make_plan(args: argparse.Namespace) -> Plan:
    """Return the plan of a full or quick run from the command line."""
    if args.quick:
        return Plan(
            sides=(4,),
            vmc_sides=(4,),
            batch=64,
            rounds=1,
            repeats=2,
            headline_side=4,
            plain_arnn=args.plain_arnn,
            netket_chunk_size=args.netket_chunk_size or None,
        )
    return Plan(
        sides=tuple(args.sides),
        vmc_sides=tuple(args.vmc_sides),
        batch=args.batch,
        rounds=args.rounds,
        repeats=args.repeats,
        headline_side=10,
        plain_arnn=args.plain_arnn,
        netket_chunk_size=args.netket_chunk_size or None,
    )


def default_cpus(threads: int) -> str:
    """Return the first `threads` CPUs this process may run on, comma-separated."""
    allowed = sorted(os.sched_getaffinity(0))
    return ",".join(str(c) for c in allowed[:threads])


def parse_arguments() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L = 4, batch 64, one round")
    parser.add_argument("--sides", type=int, nargs="+", default=[10, 12])
    parser.add_argument("--vmc-sides", type=int, nargs="*", default=[10])
    parser.add_argument(
        "--sizes", nargs="+", default=[s.name for s in SIZES], choices=[s.name for s in SIZES]
    )
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="sampling/log_psi per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpus", default=None, help="CPUs for both (default: the first ones)")
    parser.add_argument(
        "--plain-arnn", action="store_true", help="also time NetKet's ARNNConv2D sampling"
    )
    parser.add_argument(
        "--netket-chunk-size",
        type=int,
        default=256,
        help="NetKet's MCState.chunk_size for the VMC step (0: no chunking)",
    )
    parser.add_argument("--netket-python", type=Path, default=NETKET_PYTHON)
    return parser.parse_args()


def main() -> int:
    """Run the comparison, write the JSON and markdown results and print the ratios."""
    args = parse_arguments()
    plan = make_plan(args)
    if not args.netket_python.exists():
        raise SystemExit(f"no NetKet venv at {args.netket_python}: run `make bench-netket`")
    pythons = {"netket": args.netket_python, "naqs": Path(sys.executable)}
    cpus = args.cpus or default_cpus(args.threads)
    sizes = [s for s in SIZES if s.name in args.sizes]
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": versions(pythons),
        "threads": args.threads,
        "cpus": cpus,
        "cpu": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "load_average_start": load_average(),
        "batch": plan.batch,
        "rounds": plan.rounds,
        "repeats": plan.repeats,
        "statistic": "best (minimum time) over all repetitions of all rounds",
        "learning_rate": 0.01,
        "netket_chunk_size": plan.netket_chunk_size,
        "xla_flags": worker_environment(args.threads)["XLA_FLAGS"],
        "omp_wait_policy": "PASSIVE",
        "quick": args.quick,
    }
    print(f"naqs vs NetKet, CPUs {cpus}, load average {meta['load_average_start']}", flush=True)
    start = time.perf_counter()
    cases = []
    try:
        for size in sizes:
            for side in plan.sides:
                cases.append(compare_case(size, side, plan, pythons, cpus, args.threads))
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    meta["load_average_end"] = load_average()
    meta["total_seconds"] = time.perf_counter() - start
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "cases": cases}
    (RESULTS_DIR / "netket.json").write_text(json.dumps(payload, indent=2) + "\n")
    report = markdown(cases, meta)
    (RESULTS_DIR / "netket.md").write_text(report)
    print(report)
    print(f"total {meta['total_seconds']:.0f} s")
    headline = [c for c in cases if c["size"] == HEADLINE_SIZE and c["L"] == plan.headline_side]
    if not headline or headline[0]["vmc_step_ratio"] is None:
        print(f"ratio: no {HEADLINE_SIZE} case with a VMC step at L={plan.headline_side}")
        return 1
    case = headline[0]
    print(f"ratio sampling={case['sampling_ratio']:.3g} vmc_step={case['vmc_step_ratio']:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
