"""Side-by-side throughput of naqs and NetKet autoregressive wave functions on the same lattice.

Run from the repository root (`make bench-netket` installs NetKet's venv first):

    .venv/bin/python benchmarks/netket_compare.py [--quick]

For each model size and lattice, runs the NetKet worker (`netket_worker_netket.py`, in
`benchmarks/netket_venv/`) and the naqs worker (`netket_worker_naqs.py`, in this venv) as
subprocesses, alternating: netket, naqs, netket, naqs, ... (`--rounds` each, default 3). Both
are pinned to the same CPUs with the same thread count (XLA: `XLA_FLAGS`; torch:
`set_num_threads`; OpenMP: `OMP_NUM_THREADS`, `OMP_WAIT_POLICY=PASSIVE`), float32
parameters, batch 1024, open L × L square lattices without a Σσᶻ constraint. Timed: sampling,
log_psi (a freshly sampled batch every repetition, the sampling not timed) and, at the VMC
sides (default L = 10), one SGD VMC step on the TFIM H = −J Σ σᶻσᶻ − Γ Σ σˣ (J = 1, Γ = 3)
and one on the Heisenberg H = J Σ S·S (J = 1, Marshall sign rule on both sides; naqs in S·S
units, NetKet in Pauli units), each after an untimed warm-up step. Statistic: each round's
value is the median of its repetitions; each reported value is the median of the round values.

Models: NetKet's `FastARNNConv2D` (3×3 masked kernels, `features=32`) against a naqs
`PixelCNN(phase=False)` with as many layers and the channel count that matches NetKet's
parameter count within 20% (checked). Writes `benchmarks/results/netket.json` and
`benchmarks/results/netket.md` (with pass/fail against `TARGETS`); the last line printed is

    ratio sampling=<x> vmc_step=<y> log_psi=<z>

x: the smallest naqs/NetKet samples per s over all cases (sizes and L; above 1: naqs
faster), y: the largest naqs/NetKet seconds per VMC step over all cases with steps, TFIM and
Heisenberg (below 1: naqs faster), z: the smallest naqs/NetKet log_psi per s over all cases.
With `--quick` (L = 4, batch 64, one round) the line comes from the quick cases.

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
#: The timed quantities: each worker reports `<name>_s` (median of its repetitions, None when
#: not timed) and `<name>_all_s` (every repetition).
QUANTITIES = ("sample", "log_psi", "vmc_step", "heis_step")
#: The VMC steps: quantity, case ratio key and label.
STEPS = (("vmc_step", "vmc_step_ratio", "TFIM"), ("heis_step", "heis_step_ratio", "Heisenberg"))
#: How the reported values are made from the repetitions (also `meta["statistic"]`).
STATISTIC = (
    "median over the alternating rounds of each round's median over its repetitions"
    " (log_psi: a freshly sampled batch every repetition, the sampling not timed;"
    " VMC steps: one timed step per round and Hamiltonian after an untimed warm-up step)"
)


@dataclass(frozen=True)
class Target:
    """A goal for one naqs/NetKet ratio.

    Attributes:
        text: the goal as the report states it.
        ratio: the case key of the ratio.
        bound: the ratio's limit.
        at_least: True when the ratio must be ≥ bound (rates), False when ≤ bound (seconds).
        sides: the L at which every size must meet it; None: every case that has the ratio
            (at least one).
    """

    text: str
    ratio: str
    bound: float
    at_least: bool
    sides: tuple[int, ...] | None

    def met(self, value: float) -> bool:
        """Return whether one ratio meets the target."""
        return value >= self.bound if self.at_least else value <= self.bound


TARGETS = (
    Target(
        "log_psi/s ratio ≥ 1.0 at both sizes and L = 10, 12", "log_psi_ratio", 1.0, True, (10, 12)
    ),
    Target("samples/s ratio ≥ 3 at every size and L", "sampling_ratio", 3.0, True, None),
    Target("TFIM step ratio ≤ 0.35 at both sizes, L = 10", "vmc_step_ratio", 0.35, False, (10,)),
    Target("Heisenberg step ratio ≤ 0.5 wherever timed", "heis_step_ratio", 0.5, False, None),
)


@dataclass(frozen=True)
class Plan:
    """What to run.

    Attributes:
        sides: L of the L × L lattices timed for sampling and log_psi.
        vmc_sides: the sides where one TFIM and one Heisenberg VMC step are timed too.
        batch: configurations per call (samples per step).
        rounds: times each worker runs per case, alternating NetKet and naqs.
        repeats: timings of sampling and log_psi per worker run.
        plain_arnn: also time NetKet's `ARNNConv2D` (sampling and log_psi only).
        netket_chunk_size: NetKet's `MCState.chunk_size` (samples per local-energy and
            gradient pass), or None for none.
    """

    sides: tuple[int, ...]
    vmc_sides: tuple[int, ...]
    batch: int
    rounds: int
    repeats: int
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
    return command + (["--vmc", "--heisenberg"] if vmc else [])


def naqs_command(
    python: Path, size: ModelSize, side: int, plan: Plan, cpus: str, threads: int, vmc: bool
) -> list[str]:
    """Return the command line of one naqs worker run."""
    command = [str(python), str(NAQS_WORKER), "--channels", str(size.naqs_channels)]
    command += [*_common_arguments(size, side, plan, cpus), "--threads", str(threads)]
    return command + (["--vmc", "--heisenberg"] if vmc else [])


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


def round_value(run: dict, quantity: str) -> float | None:
    """Return one round's value of a quantity: the median of its repetitions.

    Args:
        run: one worker's result.
        quantity: one of `QUANTITIES`.

    Returns:
        The median of `<quantity>_all_s` (the worker's `<quantity>_s` when it kept no
        repetitions), or None when the run did not time it.
    """
    times = run.get(f"{quantity}_all_s")
    if times:
        return statistics.median(times)
    return run.get(f"{quantity}_s")


def summarize(runs: list[dict]) -> dict:
    """Merge the rounds of one program on one case.

    Args:
        runs: the worker results of the rounds, in order.

    Returns:
        The first round's descriptive fields, and for each quantity q: `q_s`, the median of
        the round values (`round_value`; None when not timed), `q_rounds_s`, the round
        values, and `q_all_s`, every round's repetition times; `samples_per_s` and
        `log_psi_per_s` (batch / median seconds) and NetKet's `compile_s` per round.
    """
    first = runs[0]
    summary = {k: v for k, v in first.items() if not k.endswith("_s") and k != "compile_s"}
    batch = first["batch"]
    for quantity in QUANTITIES:
        per_round = [round_value(run, quantity) for run in runs]
        timed = [value for value in per_round if value is not None]
        summary[f"{quantity}_s"] = statistics.median(timed) if timed else None
        summary[f"{quantity}_rounds_s"] = per_round
        summary[f"{quantity}_all_s"] = [run.get(f"{quantity}_all_s") for run in runs]
    summary["samples_per_s"] = batch / summary["sample_s"]
    summary["log_psi_per_s"] = batch / summary["log_psi_s"]
    if "compile_s" in first:
        summary["compile_s"] = [r["compile_s"] for r in runs]
    return summary


def _seconds_ratio(naqs: dict, netket: dict, quantity: str) -> float | None:
    """Return naqs / NetKet seconds of a quantity, or None when either did not time it."""
    if naqs[f"{quantity}_s"] is None or netket[f"{quantity}_s"] is None:
        return None
    return naqs[f"{quantity}_s"] / netket[f"{quantity}_s"]


def make_case(size: str, side: int, runs: dict[str, list[dict]]) -> dict:
    """Summarize both programs' rounds on one case and compare them.

    Args:
        size: the `ModelSize` name.
        side: L of the lattice.
        runs: the worker results per program ("naqs", "netket" and optionally
            "netket_plain"), one per round.

    Returns:
        The case: both summaries and the naqs/NetKet ratios (rates: above 1 is naqs faster;
        seconds per step: below 1 is naqs faster; None where a step was not timed).
    """
    naqs, netket = summarize(runs["naqs"]), summarize(runs["netket"])
    case = {
        "size": size,
        "L": side,
        "naqs": naqs,
        "netket": netket,
        "parameter_ratio": naqs["n_parameters"] / netket["n_parameters_effective"],
        "sampling_ratio": naqs["samples_per_s"] / netket["samples_per_s"],
        "log_psi_ratio": naqs["log_psi_per_s"] / netket["log_psi_per_s"],
    }
    for quantity, key, _ in STEPS:
        case[key] = _seconds_ratio(naqs, netket, quantity)
    if runs.get("netket_plain"):
        plain = summarize(runs["netket_plain"])
        case["netket_plain"] = plain
        case["sampling_ratio_plain"] = naqs["samples_per_s"] / plain["samples_per_s"]
    return case


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
    return make_case(size.name, side, runs)


def case_label(case: dict) -> str:
    """Return e.g. '4x32 L=10', the size and lattice of a case."""
    return f"{case['size']} L={case['L']}"


def headline(cases: list[dict]) -> dict[str, tuple[float, str] | None]:
    """Return the ratios of the last printed line with the case each comes from.

    Args:
        cases: the compared cases (`make_case`).

    Returns:
        {"sampling": (smallest sampling ratio, case), "vmc_step": (largest step ratio over
        the TFIM and Heisenberg steps of every case, case and step), "log_psi": (smallest
        log_psi ratio, case)}; an entry is None when no case has that ratio.
    """
    rates = {
        name: [(c[key], case_label(c)) for c in cases if c.get(key) is not None]
        for name, key in (("sampling", "sampling_ratio"), ("log_psi", "log_psi_ratio"))
    }
    steps = [
        (c[key], f"{case_label(c)} {label}")
        for c in cases
        for _, key, label in STEPS
        if c.get(key) is not None
    ]
    return {
        "sampling": min(rates["sampling"], default=None),
        "vmc_step": max(steps, default=None),
        "log_psi": min(rates["log_psi"], default=None),
    }


def ratio_line(cases: list[dict]) -> str:
    """Return the last printed line, `ratio sampling=<x> vmc_step=<y> log_psi=<z>`.

    Args:
        cases: the compared cases (`make_case`).

    Returns:
        x: the smallest naqs/NetKet sampling rate ratio, y: the largest naqs/NetKet seconds
        per VMC step (TFIM or Heisenberg), z: the smallest log_psi rate ratio, over all cases,
        to 3 significant digits; `none` for a ratio that no case has.
    """
    best = headline(cases)
    values = {name: "none" if pair is None else f"{pair[0]:.3g}" for name, pair in best.items()}
    return (
        f"ratio sampling={values['sampling']} vmc_step={values['vmc_step']}"
        f" log_psi={values['log_psi']}"
    )


def evaluate_targets(cases: list[dict]) -> list[dict]:
    """Check the cases against `TARGETS`.

    Args:
        cases: the compared cases (`make_case`).

    Returns:
        One entry per target: "target" (its text), "status" ("pass", "fail" or "not
        measured": no failure, but a required size and L lacks the ratio, or no case has
        it), "worst" (the ratio farthest from passing, None when none was measured),
        "worst_case" and "missing" (the required size and L labels without the ratio).
    """
    evaluated = []
    for target in TARGETS:
        measured = {
            case_label(c): c[target.ratio]
            for c in cases
            if c.get(target.ratio) is not None and (target.sides is None or c["L"] in target.sides)
        }
        required = [f"{s.name} L={side}" for side in target.sides or () for s in SIZES]
        missing = [label for label in required if label not in measured]
        worst_case = (min if target.at_least else max)(measured, key=measured.get, default=None)
        if any(not target.met(value) for value in measured.values()):
            status = "fail"
        else:
            status = "not measured" if missing or not measured else "pass"
        evaluated.append(
            {
                "target": target.text,
                "status": status,
                "worst": None if worst_case is None else measured[worst_case],
                "worst_case": worst_case,
                "missing": missing,
            }
        )
    return evaluated


def _describe_run(result: dict) -> str:
    text = (
        f"{result['n_parameters']:,} params, {result['batch'] / result['sample_s']:,.0f} samples/s,"
        f" {result['batch'] / result['log_psi_s']:,.0f} log_psi/s"
    )
    if result.get("vmc_step_s") is not None:
        text += f", {result['vmc_step_s']:.2f} s/TFIM step"
    if result.get("heis_step_s") is not None:
        text += f", {result['heis_step_s']:.2f} s/Heisenberg step"
    return text


def cpu_description() -> str:
    """Return the CPU model and its vector extensions (shared with the race report)."""
    from race import cpu_description as describe  # benchmarks/ is on sys.path

    return describe()


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages as text."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _energy(value: float | None, factor: float = 1.0) -> str:
    return "—" if value is None else f"{factor * value:.4g}"


def markdown(cases: list[dict], meta: dict) -> str:
    """Render the comparison as a markdown report.

    Args:
        cases: the compared cases (`make_case`).
        meta: the run's settings (`main`): date, versions, cpu, threads, cpus, load averages,
            batch, rounds, repeats, learning_rate, netket_chunk_size, quick.

    Returns:
        The report: settings, the table, the last line's ratios with their cases, the
        targets with pass/fail, and what is timed.
    """
    lines = [
        "# naqs vs NetKet: autoregressive sampling, log_psi and VMC steps",
        "",
        f"{meta['date']}; naqs with torch {meta['versions']['torch']}, NetKet"
        f" {meta['versions']['netket']} with jax {meta['versions']['jax']}."
        + (" **--quick (smoke sizes)**." if meta.get("quick") else ""),
        "",
        f"CPU: {meta['cpu']}; {meta['threads']} threads each, pinned to CPUs {meta['cpus']};"
        f" load average (1, 5, 15 min) at start {meta['load_average_start']}, at end"
        f" {meta['load_average_end']}. Other jobs may share the CPU.",
        "",
        f"Float32 parameters, batch {meta['batch']}, open L × L lattices without a Σσᶻ"
        " constraint; TFIM J = 1, Γ = 3; Heisenberg J = 1 with the Marshall sign rule on both"
        f" sides. Each value is the median over {_count(meta['rounds'], 'alternating round')}"
        " (NetKet, naqs, NetKet, naqs, ...) of the round's median over its"
        f" {meta['repeats']} repetitions for sampling and log_psi (a freshly sampled batch"
        " every log_psi repetition, the sampling not timed); a VMC step is one timed step per"
        " round and Hamiltonian after an untimed warm-up one. Every repetition's time is in the"
        " JSON.",
        "",
        "Compared: NetKet `FastARNNConv2D` (layers × features, 3×3 masked kernels, sampled by"
        " `ARDirectSampler` with its cached fast path) against naqs `PixelCNN(phase=False)`"
        " (layers × channels, cached sampler). ratio = naqs / NetKet: above 1 is naqs faster for"
        " rates (samples/s, log_psi/s), below 1 is naqs faster for seconds per TFIM or"
        " Heisenberg (Heis.) VMC step.",
        "",
        "| size | L | params naqs / NetKet | samples/s naqs | NetKet | ratio | log_psi/s naqs"
        " | NetKet | ratio | s/TFIM step naqs | NetKet | ratio | s/Heis. step naqs | NetKet"
        " | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            f" | {_ratio(case['vmc_step_ratio'])}"
            f" | {_seconds(naqs['heis_step_s'])} | {_seconds(netket['heis_step_s'])}"
            f" | {_ratio(case['heis_step_ratio'])} |"
        )
    best = headline(cases)
    described = {
        name: "none" if pair is None else f"{pair[0]:.3g} ({pair[1]})"
        for name, pair in best.items()
    }
    lines += [
        "",
        f"Last printed line (`{ratio_line(cases)}`): smallest samples/s ratio"
        f" {described['sampling']}, largest seconds-per-step ratio (TFIM and Heisenberg)"
        f" {described['vmc_step']}, smallest log_psi/s ratio {described['log_psi']}.",
        "",
        "Targets"
        + (
            " (from the --quick cases; the targets are set for the full run's sizes):"
            if meta.get("quick")
            else ":"
        ),
        "",
    ]
    for target in evaluate_targets(cases):
        found = (
            []
            if target["worst"] is None
            else [f"worst {target['worst']:.2f} ({target['worst_case']})"]
        )
        missing = [f"missing {', '.join(target['missing'])}"] if target["missing"] else []
        text = "; ".join(found + missing) or "no case timed it"
        lines.append(f"- {target['target']}: **{target['status']}**, {text}")
    stepped = [c for c in cases if any(c[key] is not None for _, key, _ in STEPS)]
    if stepped:
        lines += [
            "",
            "Total energy of the last timed step (first round; the two sides start from"
            " different random parameters, so only the scale is comparable): TFIM in Pauli"
            " units on both sides; Heisenberg naqs in S·S units (S = σ/2), × 4 in Pauli units,"
            " NetKet in Pauli units.",
            "",
            "| size | L | TFIM naqs | NetKet | Heis. naqs (S·S) | naqs × 4 (Pauli) | NetKet |",
            "|---|---|---|---|---|---|---|",
        ]
        for case in stepped:
            naqs, netket = case["naqs"], case["netket"]
            lines.append(
                f"| {case['size']} | {case['L']} | {_energy(naqs.get('energy'))}"
                f" | {_energy(netket.get('energy'))} | {_energy(naqs.get('heis_energy'))}"
                f" | {_energy(naqs.get('heis_energy'), 4.0)}"
                f" | {_energy(netket.get('heis_energy'))} |"
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
        " `torch.no_grad()`; NetKet jitted `model.apply(variables, x)`; x is a new sample of"
        " `batch` configurations every repetition. VMC step: naqs `DirectSampler.sample(model)`"
        " + `optim.train_step(..., chunk_size=1024)`; NetKet `nk.VMC(...).run(1)` with"
        f" `MCState(chunk_size={meta['netket_chunk_size']})` (chunking cuts its peak memory"
        " from about 5 GB at L = 10 and was not slower), both with plain SGD (lr"
        f" {meta['learning_rate']}). TFIM step: naqs `TransverseFieldIsing`, NetKet"
        " `nk.operator.IsingJax`. Heisenberg step, from freshly initialized parameters (seed 0)"
        " on each side: naqs `Heisenberg(J=1, sign_rule=True)` with a PixelCNN without"
        " `total_sz`; NetKet `nk.operator.Heisenberg(hilbert, graph, J=1.0, sign_rule=True)`"
        f" ({_netket_operator_note(cases)}) on `nk.hilbert.Spin(0.5, N)` without `total_sz`."
        " NetKet's JIT compilation is excluded (warm-up step first), every NetKet timing ends"
        " with `jax.block_until_ready` (torch runs synchronously on the CPU). NetKet evaluates"
        " ln Ψ of every connected configuration in full for the local energy; naqs"
        f" {_local_energy_note(cases)}.",
    ]
    return "\n".join(lines) + "\n"


def _netket_operator_note(cases: list[dict]) -> str:
    classes = {c["netket"].get("heis_operator") for c in cases} - {None}
    return "its default class, " + (", ".join(f"`{c}`" for c in sorted(classes)) or "not run")


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
            plain_arnn=args.plain_arnn,
            netket_chunk_size=args.netket_chunk_size or None,
        )
    return Plan(
        sides=tuple(args.sides),
        vmc_sides=tuple(args.vmc_sides),
        batch=args.batch,
        rounds=args.rounds,
        repeats=args.repeats,
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
    parser.add_argument(
        "--vmc-sides",
        type=int,
        nargs="*",
        default=[10],
        help="L where one TFIM and one Heisenberg VMC step are timed",
    )
    parser.add_argument(
        "--sizes", nargs="+", default=[s.name for s in SIZES], choices=[s.name for s in SIZES]
    )
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument(
        "--rounds", type=int, default=3, help="worker runs per program and case, alternating"
    )
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
        "cpu": f"{cpu_description()}, {os.cpu_count()} CPUs",
        "load_average_start": load_average(),
        "batch": plan.batch,
        "rounds": plan.rounds,
        "repeats": plan.repeats,
        "statistic": STATISTIC,
        "learning_rate": 0.01,
        "netket_chunk_size": plan.netket_chunk_size,
        "hamiltonians": {
            "tfim": "H = -J sum sz sz - gamma sum sx, J = 1, gamma = 3, Pauli units on both sides",
            "heisenberg": (
                "H = J sum S.S, J = 1, Marshall sign rule on both sides, no total_sz"
                " constraint; naqs in S.S units (S = sigma/2), NetKet in Pauli units (4x)"
            ),
        },
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
    payload = {"meta": meta, "cases": cases, "targets": evaluate_targets(cases)}
    (RESULTS_DIR / "netket.json").write_text(json.dumps(payload, indent=2) + "\n")
    report = markdown(cases, meta)
    (RESULTS_DIR / "netket.md").write_text(report)
    print(report)
    print(f"total {meta['total_seconds']:.0f} s")
    print(ratio_line(cases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
