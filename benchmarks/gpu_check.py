"""The GPU check: the CUDA tests, throughput of the paper's TFIM model, and a 10×10 training run.

Started by `benchmarks/gpu_check.sh` (run it from anywhere; it uses the repository's .venv):

    benchmarks/gpu_check.sh              # on a machine with a CUDA GPU, under 8 minutes
    benchmarks/gpu_check.sh --dry-run    # every check at tiny sizes on the CPU (default suite)

Prints one summary line per check, `gpu_check <check>: ok|FAIL key=value ...`, and a last line
`gpu_check: ok` or `gpu_check: FAIL (<checks>)`; exits 1 if any check failed. On a GPU the lines
also go to `benchmarks/results/gpu.md` (with the device name) and `gpu.json`.

Checks:
- `tests`: `pytest -m gpu` (the equality tests of tests/test_gpu.py on CUDA, and the other gpu
  tests); fails if any fails or fewer than `MIN_GPU_TESTS` pass. Dry run: tests/test_gpu.py with
  the CPU standing in for the GPU (NAQS_GPU_TEST_DEVICE=cpu).
- `throughput L=.. B=..`: the paper's TFIM model (PixelCNN 18 layers × 32 channels, float32,
  phase=true, Γ = 3, open L × L) at L = 10 and 12 with 1,024 and 8,192 samples: direct samples/s,
  log_psi/s (forward without gradient), seconds of one VMC step (sampling, local energies, and
  the update) with Adam and, at 1,024 samples, with MinSR; peak GPU memory
  (`torch.cuda.max_memory_allocated`) over the case. Dry run: 2 layers × 4 channels, L = 4,
  B = 16 and 64.
- `train`: `naqs train` on the 10×10 open TFIM at Γ = 3 with that model, 1,024 samples, 200
  steps of the default optimizer (MinSR), `train.time_budget` as a guard; the energy per site
  reached and the seconds per step. Dry run: 4×4, 2 × 4, 16 samples, 3 steps.

On CUDA the CPU-only parts are off by construction: the worker threads of sampling and local
energies run only on the CPU (`naqs_cli.parallel.n_workers`), and this script does not change
torch's intra-op threads.

A check that would run past the time left (`--deadline`, seconds from the start) is reported as
`skipped (time)` rather than started, so the script ends in time on a slower GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from naqs_cli import build, store, tasks  # noqa: E402
from naqs_cli.compose import compose  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
#: gpu tests that must pass on a GPU (tests/test_gpu.py's and the others), and in a dry run
#: (tests/test_gpu.py's alone).
MIN_GPU_TESTS = 15
MIN_DRY_RUN_TESTS = 12

FULL = {
    "model": ["model.layers=18", "model.channels=32", "model.phase=true"],
    "sizes": (10, 12),
    "batches": (1024, 8192),
    "minsr_batch": 1024,
    "train": {"side": 10, "samples": 1024, "steps": 200, "budget": 240},
}
DRY = {
    "model": ["model.layers=2", "model.channels=4", "model.phase=true"],
    "sizes": (4,),
    "batches": (16, 64),
    "minsr_batch": 16,
    "train": {"side": 4, "samples": 16, "steps": 3, "budget": 60},
}


def log(line: str) -> None:
    print(line, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 2) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_tests(dry_run: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if dry_run:
        env["NAQS_GPU_TEST_DEVICE"] = "cpu"
        target, minimum = ["tests/test_gpu.py"], MIN_DRY_RUN_TESTS
    else:
        target, minimum = ["tests"], MIN_GPU_TESTS
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        [*command, *target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-200:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    passed = counts.get("passed", 0)
    ok = proc.returncode == 0 and passed >= minimum
    return {"ok": ok, "passed": passed, "minimum": minimum, "summary": tail.strip("= ")}


def _tfim_overrides(side: int, model: list[str], device: str, n_samples: int) -> list[str]:
    """The paper's TFIM case (Γ = 3, open side × side) with direct sampling, float32."""
    return [
        f"lattice.Lx={side}",
        f"lattice.Ly={side}",
        "ham=tfim",
        "ham.gamma=3.0",
        *model,
        "sampler=direct",
        f"sampler.n_samples={n_samples}",
        "dtype=float32",
        f"device={device}",
        "train.chunk_size=1024",
        "seed=0",
    ]


def _setup(side: int, model: list[str], device: str, optim: str, n_samples: int):
    overrides = [*_tfim_overrides(side, model, device, n_samples), f"optim={optim}"]
    return build.build_training(compose("train", overrides))


def check_throughput(side: int, n_samples: int, sizes: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    setup = _setup(side, sizes["model"], device.type, "adam", n_samples)
    state = setup.state
    batch = state.sample(n_samples)
    with torch.no_grad():
        forward_s = timed(lambda: state.model.log_psi(batch.x), device)
    sample_s = timed(lambda: state.sample(n_samples), device)

    def step(run) -> None:
        b = run.state.sample(n_samples)
        run.rule.step(run.state, b, run.state.local_energy(b))

    out = {
        "samples_per_s": n_samples / sample_s,
        "log_psi_per_s": n_samples / forward_s,
        "adam_step_s": timed(lambda: step(setup), device, repeats=1),
    }
    if n_samples == sizes["minsr_batch"]:
        minsr = _setup(side, sizes["model"], device.type, "minsr", n_samples)
        minsr.state.model.load_state_dict(state.model.state_dict())
        out["minsr_step_s"] = timed(lambda: step(minsr), device, repeats=1)
    if device.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["ok"] = all(v > 0 for k, v in out.items() if k.endswith("_s") or k.endswith("per_s"))
    return out


def check_train(sizes: dict, device: torch.device) -> dict:
    t = sizes["train"]
    overrides = [
        *_tfim_overrides(t["side"], sizes["model"], device.type, t["samples"]),
        f"train.steps={t['steps']}",
        f"train.time_budget={t['budget']}",
        "train.final_samples=0",
        "train.exact_reference=never",
    ]
    with tempfile.TemporaryDirectory(prefix="naqs-gpu-check-") as scratch:
        run = Path(scratch) / "run"
        start = time.perf_counter()
        tasks.train(compose("train", overrides), run)
        elapsed = time.perf_counter() - start
        history = store.read_history(run / "history.h5")
    energies = [float(e) for e in history["energy"]]
    steps = len(energies)
    last = energies[-10:]
    return {
        "ok": steps > 0 and all(math.isfinite(e) for e in last),
        "steps": steps,
        "energy_per_site": sum(last) / len(last),
        "first_energy_per_site": energies[0],
        "s_per_step": elapsed / max(steps, 1),
    }


def _format(values: dict) -> str:
    parts = []
    for key, value in values.items():
        if key == "ok":
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--deadline", type=float, default=460.0, help="seconds for all checks")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # Hydra's compose must not see this script's arguments
    start = time.perf_counter()
    if args.dry_run:
        device, sizes = torch.device("cpu"), DRY
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), FULL
    else:
        log("gpu_check: no CUDA GPU here (run with --dry-run to check the script on the CPU)")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    log(f"gpu_check device: {name}, torch {torch.__version__}")
    results: dict[str, dict] = {}

    def run(check: str, fn, estimate: float) -> None:
        left = args.deadline - (time.perf_counter() - start)
        if left < estimate:
            results[check] = {"ok": False, "skipped": "time"}
            log(f"gpu_check {check}: FAIL skipped (time: {left:.0f} s left)")
            return
        try:
            results[check] = fn()
        except Exception as error:  # one line per failed check, the others still run
            results[check] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
        status = "ok" if results[check]["ok"] else "FAIL"
        log(f"gpu_check {check}: {status} {_format(results[check])}")

    run("tests", lambda: check_tests(args.dry_run), 5)
    for side in sizes["sizes"]:
        for n_samples in sizes["batches"]:
            run(
                f"throughput L={side} B={n_samples}",
                lambda side=side, n=n_samples: check_throughput(side, n, sizes, device),
                5,
            )
    run("train", lambda: check_train(sizes, device), 30 if args.dry_run else 120)
    failed = [k for k, v in results.items() if not v["ok"]]
    log("gpu_check: ok" if not failed else f"gpu_check: FAIL ({', '.join(failed)})")
    if device.type == "cuda":
        _write(name, results)
    return 1 if failed else 0


def _write(name: str, results: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "gpu.json").write_text(json.dumps({"device": name, "checks": results}, indent=1))
    lines = [f"# GPU check on {name}", "", "`benchmarks/gpu_check.sh`, torch " + torch.__version__]
    lines += ["", "```"]
    lines += [f"{k}: {'ok' if v['ok'] else 'FAIL'} {_format(v)}" for k, v in results.items()]
    lines += ["```", ""]
    (RESULTS_DIR / "gpu.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
