"""Throughput of the PixelCNN NAQS: cached and reference sampling, log_psi, on square lattices.

Run from the repository root:

    .venv/bin/python benchmarks/bench_models.py [--quick]

Writes `benchmarks/results/models.json` and `benchmarks/results/models.md`. float32 parameters,
torch.set_num_threads(2), batch 1024 (256 with --quick), open square lattices L × L. Model sizes:
two matched by parameter count to NetKet's ARNNConv2D with 4 layers × 32 features (≈ 17 k
parameters) and 8 × 32 (≈ 50 k), and the paper's 18 layers × 32 channels (≈ 0.4 M). A case whose
estimated time exceeds `--case-budget` seconds is timed on a sub-batch and scaled linearly to the
full batch (marked in the table); for the per-site sampling loop this overestimates the cost,
since per-call overhead does not shrink with the batch.

The achieved GFLOP/s of the forward pass divides the analytic convolution FLOP count
(`forward_flops`, cross-checked against torch's FlopCounterMode) by the measured time, and is
compared with this machine's fp32 peak (`cpu_info`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: with other jobs on the same cores, spinning
# threads wait for descheduled peers and small ops get up to ~50× slower. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from naqs_cli.lattice import SquareLattice  # noqa: E402
from naqs_cli.models import PixelCNN  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: name → (layers, channels, reference parameter count)
MODELS = {
    "netket-4x32-matched": (4, 14, 17_000),
    "netket-8x32-matched": (8, 17, 50_000),
    "paper-18x32": (18, 32, 400_000),
}


#: fp32 FLOP per cycle per core by vector extension, assuming two FMA units per core
#: (2 units × lanes × 2 FLOP per fused multiply-add).
FLOP_PER_CYCLE = (("avx512f", 64), ("avx2+fma", 32), ("avx", 16), ("sse", 8))


def cpu_info() -> dict:
    """Return the CPU model, clock and fp32 peak of the cores this process computes on.

    Peak = cores × fp32 FLOP/cycle × clock, with cores = min(logical CPUs, torch threads),
    FLOP/cycle from the /proc/cpuinfo flags (`FLOP_PER_CYCLE`: two FMA units per core
    assumed) and the clock from the `cpu MHz` field (the reported, not the boost, clock).
    """
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.exists() else ""

    def field(name: str) -> str:
        match = re.search(rf"^{name}\s*:\s*(.*)$", text, re.MULTILINE)
        return match.group(1).strip() if match else ""

    flags = set(field("flags").split())
    if "avx512f" in flags:
        extension = "avx512f"
    elif {"avx2", "fma"} <= flags:
        extension = "avx2+fma"
    elif "avx" in flags:
        extension = "avx"
    else:
        extension = "sse"
    per_cycle = dict(FLOP_PER_CYCLE)[extension]
    mhz = float(field("cpu MHz") or "nan")
    cores = min(os.cpu_count() or 1, torch.get_num_threads())
    return {
        "cpu_model": field("model name") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "vector_extension": extension,
        "flop_per_cycle_per_core": per_cycle,
        "clock_mhz": mhz,
        "peak_cores": cores,
        "peak_gflops": cores * per_cycle * mhz * 1e-3,
    }


def machine_meta(batch: int, case_budget: float, quick: bool) -> dict:
    """Return what every benchmark records about its run: date, versions, threads, machine."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "dtype": "float32",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "case_budget": case_budget,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "quick": quick,
    } | cpu_info()


def meta_line(meta: dict) -> str:
    """Render the run conditions as one markdown paragraph."""
    return (
        f"{meta['date']}, torch {meta['torch']}, {meta['threads']} threads, float32, batch "
        f"{meta['batch']}, open L × L lattices, {meta['cpu_model']} ({meta['machine']}; load"
        f" average at start {meta['load_average']}; OMP_WAIT_POLICY="
        f"{meta['omp_wait_policy']}). Other jobs may share the CPU."
    )


def forward_flops(model: PixelCNN) -> int:
    """Return the convolution FLOPs (2 × multiply-adds) of log_psi for one configuration.

    Per `TwoStreamCausalLayer` with C_in input and C output channels and kernel K, at each of
    the N = Ly·Lx output positions: vertical K×K conv C_in → C, horizontal 1×K conv C_in → C,
    1×1 convs C → C_a and C → C_b (C_a + C_b = C), output K×K conv C → C; plus the 1×1 head
    C → n_outputs. Biases, ReLUs, padding and the weight normalization are not counted.
    """
    k = model.kernel_size
    c = model.channels
    macs = c * model.n_outputs
    for i, layer in enumerate(model.causal_layers):
        c_in = 1 if i == 0 else c
        macs += k * k * c_in * c + k * c_in * c + c * layer.channels_a + c * layer.channels_b
        macs += k * k * c * c
    return 2 * macs * model.n_sites


def counted_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Return torch's FlopCounterMode count of one log_psi pass per configuration of x."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.log_psi(x)
    return counter.get_total_flops() // x.shape[0]


def n_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())


def best_time(function, repeats: int) -> float:
    """Return the fastest of `repeats` wall-clock timings of function()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def time_case(run, batch: int, budget: float) -> tuple[float, int]:
    """Time run(b) for the full batch, or for a sub-batch scaled up when that would be slow.

    Args:
        run: callable taking a batch size.
        batch: the batch size to report.
        budget: seconds a full-batch case may take.

    Returns:
        (seconds for `batch`, batch actually timed).
    """
    probe = min(batch, 64)
    run(4)  # warm-up
    t_probe = best_time(lambda: run(probe), 1)
    estimate = t_probe * batch / probe
    if estimate > budget:
        sub = max(probe, 2 ** int(math.log2(batch * budget / estimate / 2)))
        if sub == probe:
            return estimate, probe
        if sub < batch:
            return best_time(lambda: run(sub), 1) * batch / sub, sub
    if estimate > 2:  # long enough for one timing
        return best_time(lambda: run(batch), 1), batch
    run(batch)
    return best_time(lambda: run(batch), 3), batch


def bench_case(
    name: str, side: int, batch: int, budget: float, reference: bool, peak_gflops: float
) -> dict:
    """Benchmark one model size on an L × L open lattice."""
    layers, channels, reference_count = MODELS[name]
    torch.manual_seed(0)
    lattice = SquareLattice(side, side)
    model = PixelCNN(lattice=lattice, layers=layers, channels=channels).float()
    generator = torch.Generator().manual_seed(0)
    x_all, _ = model.sample(min(batch, 64), generator)
    x = x_all[torch.randint(len(x_all), (batch,), generator=generator)]

    def forward(b: int) -> None:
        with torch.no_grad():
            model.log_psi(x[:b])

    def cached(b: int) -> None:
        model.sample(b, generator, method="cached")

    def reference_path(b: int) -> None:
        model.sample(b, generator, method="reference")

    flops = forward_flops(model)
    flops_counted = counted_flops(model, x[:1])
    t_forward, b_forward = time_case(forward, batch, budget)
    t_cached, b_cached = time_case(cached, batch, budget)
    gflops = flops * batch / t_forward * 1e-9
    result = {
        "model": name,
        "layers": layers,
        "channels": channels,
        "n_parameters": n_parameters(model),
        "reference_parameters": reference_count,
        "L": side,
        "n_sites": lattice.n_sites,
        "batch": batch,
        "forward_s": t_forward,
        "forward_timed_batch": b_forward,
        "log_psi_per_s": batch / t_forward,
        "forward_flops_per_sample": flops,
        "forward_flops_counted_per_sample": flops_counted,
        "forward_gflops": gflops,
        "forward_percent_of_peak": 100 * gflops / peak_gflops,
        "cached_s": t_cached,
        "cached_timed_batch": b_cached,
        "cached_samples_per_s": batch / t_cached,
        "cached_over_forward": t_cached / t_forward,
    }
    if reference:
        t_reference, b_reference = time_case(reference_path, batch, budget)
        result |= {
            "reference_s": t_reference,
            "reference_timed_batch": b_reference,
            "reference_samples_per_s": batch / t_reference,
        }
    return result


def growth_exponents(results: list[dict], sides: list[int]) -> dict:
    """Fit t ∝ N^α of cached sampling between L = 10 and the largest L, per model."""
    exponents = {}
    small, large = 10, max(sides)
    if small not in sides or large <= small:
        return exponents
    for name in MODELS:
        times = {r["L"]: r for r in results if r["model"] == name}
        if small in times and large in times:
            a, b = times[small], times[large]
            ratio = math.log(b["cached_s"] / a["cached_s"]) / math.log(b["n_sites"] / a["n_sites"])
            forward = math.log(b["forward_s"] / a["forward_s"]) / math.log(
                b["n_sites"] / a["n_sites"]
            )
            exponents[name] = {"cached_sampling": ratio, "forward": forward}
    return exponents


def _flop_check(results: list[dict]) -> str:
    ratios = [
        r["forward_flops_counted_per_sample"] / r["forward_flops_per_sample"] for r in results
    ]
    if max(abs(1 - q) for q in ratios) < 1e-3:
        return "identical to torch's FlopCounterMode count of the convolutions run"
    return (
        "torch's FlopCounterMode count of the convolutions actually run is"
        f" {100 * min(ratios):.0f}–{100 * max(ratios):.0f} % of it: the implementation skips"
        " or adds work that does not change the output"
    )


def markdown(results: list[dict], exponents: dict, meta: dict) -> str:
    """Render the results as a markdown report."""

    def rate(value: float, timed: int, batch: int) -> str:
        return f"{value:,.0f}" + ("*" if timed < batch else "")

    lines = [
        "# PixelCNN NAQS throughput",
        "",
        meta_line(meta),
        "",
        "| model | layers × channels | params (target) | L | log_psi/s | forward GFLOP/s "
        "(% peak) | cached samples/s | reference samples/s | cached / forward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reference = (
            rate(r["reference_samples_per_s"], r["reference_timed_batch"], r["batch"])
            if "reference_s" in r
            else "—"
        )
        lines.append(
            f"| {r['model']} | {r['layers']} × {r['channels']} | {r['n_parameters']:,}"
            f" ({r['reference_parameters']:,}) | {r['L']} "
            f"| {rate(r['log_psi_per_s'], r['forward_timed_batch'], r['batch'])} "
            f"| {r['forward_gflops']:.1f} ({r['forward_percent_of_peak']:.0f} %) "
            f"| {rate(r['cached_samples_per_s'], r['cached_timed_batch'], r['batch'])} "
            f"| {reference} | {r['cached_over_forward']:.2f} |"
        )
    lines += [
        "",
        "\\* timed on a sub-batch and scaled linearly to the full batch (the case would take"
        f" more than {meta['case_budget']:.0f} s); for sampling this overestimates the time.",
        "",
        "cached / forward: time of one cached sampling pass of the batch over the time of one"
        " log_psi forward pass of the same batch (no gradient).",
        "",
        "forward GFLOP/s: convolution FLOPs of one log_psi pass (2 × multiply-adds of the five"
        " convolutions of each causal layer and the 1×1 head over the L × L positions; biases,"
        " ReLUs and weight normalization not counted; " + _flop_check(results) + ") times the"
        " batch, over the measured forward time. Peak: "
        f"{meta['peak_cores']} cores × {meta['flop_per_cycle_per_core']} fp32 FLOP/cycle"
        f" ({meta['vector_extension']}, assuming two FMA units per core) ×"
        f" {meta['clock_mhz'] / 1000:.2f} GHz (`cpu MHz` of /proc/cpuinfo) ="
        f" {meta['peak_gflops']:.0f} GFLOP/s.",
    ]
    if exponents:
        lines += [
            "",
            "Growth of the time with N = L² between L = 10 and the largest L (t ∝ N^α):",
            "",
            "| model | α cached sampling | α forward |",
            "|---|---|---|",
        ]
        for name, fit in exponents.items():
            lines.append(f"| {name} | {fit['cached_sampling']:.2f} | {fit['forward']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark and write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L = 4, 10 and batch 256 only")
    parser.add_argument(
        "--case-budget", type=float, help="seconds per case (default 30, 3 with --quick)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    sides = [4, 10] if args.quick else [4, 10, 12, 21]
    batch = 256 if args.quick else 1024
    budget = args.case_budget or (3.0 if args.quick else 30.0)
    meta = machine_meta(batch, budget, args.quick)
    print(
        f"bench_models: {meta['cpu_model']}, {meta['threads']} threads, load"
        f" {meta['load_average']}, fp32 peak {meta['peak_gflops']:.0f} GFLOP/s",
        flush=True,
    )
    results = []
    start = time.perf_counter()
    for name in MODELS:
        for side in sides:
            result = bench_case(
                name, side, batch, budget, reference=side <= 10, peak_gflops=meta["peak_gflops"]
            )
            results.append(result)
            print(
                f"{name:22s} L={side:2d} params={result['n_parameters']:,} "
                f"log_psi/s={result['log_psi_per_s']:,.0f} "
                f"GFLOP/s={result['forward_gflops']:.1f} "
                f"cached/s={result['cached_samples_per_s']:,.0f} "
                f"ratio={result['cached_over_forward']:.2f} "
                f"[{time.perf_counter() - start:.0f} s]",
                flush=True,
            )
    exponents = growth_exponents(results, sides)
    meta["total_seconds"] = time.perf_counter() - start
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": results, "growth_exponents": exponents}
    (RESULTS_DIR / "models.json").write_text(json.dumps(payload, indent=2) + "\n")
    report = markdown(results, exponents, meta)
    (RESULTS_DIR / "models.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
