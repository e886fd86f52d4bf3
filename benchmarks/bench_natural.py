"""Natural-gradient costs: per-sample log-derivatives against a gradient pass, and MinSR memory.

Run from the repository root (`make bench` runs every bench_*.py):

    .venv/bin/python benchmarks/bench_natural.py [--quick]

Model: the paper's TFIM PixelCNN, 18 layers × 32 channels, `phase=true`, float32, TFIM Γ = 3
on an open L × L square, exact direct samples. Each case runs in a fresh process (so its peak
resident memory is its own) with 2 threads:

- `jacobian` (L = 10, 1,024 samples): seconds of `VariationalState.log_derivative_rows`
  (every sample's row of ∂ ln Ψ/∂θ as SR and MinSR use it: [Re O; Im O] written into one
  (2, B, P) tensor, its allocation included) against one forward + backward pass of the same
  batch (the Eq. 4 gradient of Adam), best of 2 after a warm-up; the ratio is the cost of
  the rows in gradient passes. Also timed into a buffer touched beforehand: the first touch
  of the 3.3 GB of fresh rows costs seconds on some machines (VMs), which is memory, not
  derivative work.
- `minsr_step` (L = 12, 1,024 samples): one whole `optim=minsr` step after a warm-up step;
  seconds per phase and the resident-memory high-water mark (VmHWM, reset before each phase)
  of the update (Jacobian, kernel T = XXᵀ in float64, Cholesky solve), against the 4 GB it may
  take; the child runs with a fixed glibc mmap threshold so freed buffers are returned.

`--quick`: 4 layers × 8 channels, L = 4, 64 samples (a smoke run). Writes
`benchmarks/results/natural.json` and `natural.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
#: Peak resident memory a MinSR step of the paper's model at L = 12 may take.
MEMORY_LIMIT_GB = 4.0


def _setup(side: int, layers: int, channels: int, n_samples: int, optim: str):
    sys.path.insert(0, str(ROOT))
    from naqs_cli import build
    from naqs_cli.compose import compose

    cfg = compose(
        "train",
        [
            f"lattice.Lx={side}",
            f"lattice.Ly={side}",
            "ham=tfim",
            "ham.gamma=3.0",
            f"model.layers={layers}",
            f"model.channels={channels}",
            "model.phase=true",
            f"sampler.n_samples={n_samples}",
            "dtype=float32",
            "device=cpu",
            f"optim={optim}",
        ],
    )
    return build.build_training(cfg)


def case_jacobian(side: int, layers: int, channels: int, n_samples: int) -> dict:
    """Seconds of the per-sample rows against one forward + backward pass."""
    import torch

    from naqs_cli import allocator

    setup = _setup(side, layers, channels, n_samples, "adam")
    state = setup.state
    batch = state.sample(n_samples)
    n_params = sum(p.numel() for p in state.parameters())

    def gradient_pass() -> None:
        state.model.zero_grad(set_to_none=True)
        for chunk in batch.x.split(state.chunk_size):
            state.model.log_psi(chunk).real.sum().backward()

    def rows(out=None) -> None:  # as MinSR gets them: (2, B, P) rows, chunks written in place
        if out is None:
            out = state.parameters()[0].new_empty(2, n_samples, n_params)
            allocator.advise_huge_pages(out)
        for _ in state.log_derivative_rows(batch.x, out=out):
            pass

    # The same rows into a buffer touched before the timing: without the first-touch cost of
    # 2·B·P fresh floats (3.3 GB here), which on a VM can take seconds.
    touched = state.parameters()[0].new_zeros(2, n_samples, n_params)
    timings = {}
    for name, fn in (
        ("gradient_pass_s", gradient_pass),
        ("log_derivatives_s", rows),
        ("log_derivatives_touched_s", lambda: rows(touched)),
    ):
        fn()  # warm-up
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    del torch
    return {
        "side": side,
        "n_samples": n_samples,
        "n_params": n_params,
        **timings,
        "ratio": timings["log_derivatives_s"] / timings["gradient_pass_s"],
        "ratio_touched": timings["log_derivatives_touched_s"] / timings["gradient_pass_s"],
    }


def case_minsr_step(side: int, layers: int, channels: int, n_samples: int) -> dict:
    """One MinSR step's phases and the process's peak resident memory."""
    from naqs_cli import natural

    setup = _setup(side, layers, channels, n_samples, "minsr")
    state, rule = setup.state, setup.rule
    n_params = sum(p.numel() for p in state.parameters())
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times: dict[str, float] = {}
    peaks: dict[str, float] = {}
    for _ in range(2):  # the first step warms up; the second is timed
        _reset_peak()
        start = time.perf_counter()
        batch = state.sample(n_samples)
        times["sample_s"] = time.perf_counter() - start
        start = time.perf_counter()
        e_loc = state.local_energy(batch)
        times["local_energy_s"] = time.perf_counter() - start
        peaks["sample_and_local_energy_gb"] = _peak_gb()
        _reset_peak()
        start = time.perf_counter()
        result = rule.step(state, batch, e_loc)
        times["step_s"] = time.perf_counter() - start
        times["solve_s"] = float(result.info["solve_time"])
        peaks["update_gb"] = _peak_gb()
        assert result.is_finite, "the MinSR step failed"
        del batch, e_loc, result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows_gb = 2 * n_samples * n_params * 4 / 2**30
    del natural
    return {
        "side": side,
        "n_samples": n_samples,
        "n_params": n_params,
        **times,
        "rows_gb": rows_gb,
        "baseline_rss_gb": baseline,
        "peak_rss_gb": peak,
        **peaks,
        "within_limit": peaks["update_gb"] <= MEMORY_LIMIT_GB,
    }


def _reset_peak() -> None:
    """Reset this process's resident-memory high-water mark (Linux: clear_refs 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_gb() -> float:
    """The resident-memory high-water mark since the last reset (VmHWM), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


CASES = {"jacobian": case_jacobian, "minsr_step": case_minsr_step}


def run_child(name: str, arguments: list[int]) -> dict:
    """Run one case in a fresh process (2 threads) and return its result."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    if name == "minsr_step":
        # A fixed mmap threshold: glibc otherwise keeps freed blocks in the heap, so the
        # resident high-water mark would count the previous step's freed buffers (measured:
        # 6.4 GB instead of the step's own peak). The timing case runs as naqs normally does.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, __file__, "--child", name, *map(str, arguments)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[-1])


def cpu_description() -> str:
    """The CPU model and its vector extensions (shared with the race report)."""
    from race import cpu_description as describe  # benchmarks/ is on sys.path

    return describe()


def write_results(results: dict, meta: dict) -> None:
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "natural.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    jac, step = results["jacobian"], results["minsr_step"]
    lines = [
        "# Natural gradient: per-sample log-derivatives and MinSR memory",
        "",
        f"{meta['date']}, torch {meta['torch']}, CPU {meta['cpu']}, 2 threads; load average"
        f" at start {meta['load_start']}, at end {meta['load_end']}. PixelCNN"
        f" {meta['layers']} layers × {meta['channels']} channels, `phase=true`, float32,"
        " TFIM Γ = 3, open lattice, exact direct samples; each case in a fresh process."
        + (" **--quick (smoke sizes)**." if meta["quick"] else ""),
        "",
        "| case | L | samples | parameters | result |",
        "|---|---|---|---|---|",
        f"| per-sample rows vs one forward + backward | {jac['side']} | {jac['n_samples']} |"
        f" {jac['n_params']:,} | {jac['log_derivatives_s']:.2f} s vs"
        f" {jac['gradient_pass_s']:.2f} s = **{jac['ratio']:.2f}×** (into a fresh buffer, as a"
        f" MinSR step; into an already touched one {jac['log_derivatives_touched_s']:.2f} s ="
        f" **{jac['ratio_touched']:.2f}×**) |",
        f"| MinSR update (Jacobian, kernel, solve), peak resident memory | {step['side']} |"
        f" {step['n_samples']} | {step['n_params']:,} | **{step['update_gb']:.2f} GB** (limit"
        f" {MEMORY_LIMIT_GB:g} GB; rows X alone {step['rows_gb']:.2f} GB; after model build"
        f" {step['baseline_rss_gb']:.2f} GB; sampling + local energies"
        f" {step['sample_and_local_energy_gb']:.2f} GB; whole process {step['peak_rss_gb']:.2f}"
        " GB) |",
        f"| MinSR step, seconds | {step['side']} | {step['n_samples']} | |"
        f" step {step['step_s']:.1f} s (solve {step['solve_s']:.2f} s); sampling"
        f" {step['sample_s']:.1f} s, local energies {step['local_energy_s']:.1f} s |",
    ]
    (RESULTS_DIR / "natural.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=sorted(CASES), help="run one case (others: kept)")
    args = parser.parse_args()
    if args.child:
        name, *numbers = args.child
        import torch

        torch.set_num_threads(2)
        print(json.dumps(CASES[name](*map(int, numbers))), flush=True)
        return 0
    import torch

    layers, channels = (4, 8) if args.quick else (18, 32)
    sizes = {
        "jacobian": [4, layers, channels, 64] if args.quick else [10, layers, channels, 1024],
        "minsr_step": [4, layers, channels, 64] if args.quick else [12, layers, channels, 1024],
    }
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu": cpu_description(),
        "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "layers": layers,
        "channels": channels,
        "quick": args.quick,
    }
    results = {}
    previous = RESULTS_DIR / "natural.json"
    if args.only and previous.exists():
        results = json.loads(previous.read_text())["results"]
    for name, arguments in sizes.items():
        if args.only and name != args.only:
            continue
        results[name] = run_child(name, arguments)
        print(f"{name}: {results[name]}", flush=True)
    meta["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    write_results(results, meta)
    print(f"results: {RESULTS_DIR / 'natural.md'}")
    return 0 if results["minsr_step"]["within_limit"] or args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
