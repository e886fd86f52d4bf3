"""Where the time goes: a per-phase profile of the PixelCNN's passes and of one VMC step.

Run from the repository root:

    .venv/bin/python benchmarks/bench_profile.py [--quick]

Writes `benchmarks/results/profile.json` and `benchmarks/results/profile.md`. float32,
torch.set_num_threads(2), TFIM Γ = 3 on open L × L lattices, batch 1,024 (256 with --quick),
the two NetKet-matched model sizes of `bench_models.py` (4 layers × 14 channels and
8 × 17) at L = 10.

- **Passes** (forward without gradient; forward + backward of Σ ln Ψ; per-sample
  log-derivative rows for SR/MinSR): `torch.profiler` self CPU times of the aten operators,
  grouped into convolutions (forward and backward), ReLU, padding and copies (pad, cat,
  copy, contiguous, slicing writes), the output head (log-softmax, gather, the head's 1×1
  convolution is counted with the convolutions), reductions and elementwise arithmetic
  (per-sample rows: im2col, batched products, the weight-normalization map), and the rest of
  the wall time (Python, dispatch, allocation: wall minus all operator time).
- **VMC step** (MinSR and Adam, as the trainer runs them): wall seconds of sampling, local
  energies, the per-sample rows / the gradient pass, and the update (kernel, solve).

The profile of a 2-thread run attributes each operator's main-thread time; the shares are
what to optimize first, not exact costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from bench_models import MODELS, machine_meta, meta_line  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from naqs_cli import build, jacobian  # noqa: E402
from naqs_cli.compose import compose  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: bench_models.MODELS names: the NetKet-matched sizes (4 × 14 and 8 × 17).
SIZES = ("netket-4x32-matched", "netket-8x32-matched")
SIDE = 10
CATEGORIES = {
    "convolution": ("convolution", "conv2d", "mkldnn_convolution", "_convolution"),
    "relu": ("relu", "threshold"),
    "padding, copies": (
        "pad",
        "constant_pad_nd",
        "cat",
        "copy_",
        "contiguous",
        "clone",
        "slice_scatter",
        "index_put",
        "fill_",
        "zero_",
        "empty",
        "to",
        "_to_copy",
        "stack",
    ),
    "output head": ("log_softmax", "_log_softmax", "gather", "logsumexp", "softmax"),
    "per-sample products": ("im2col", "bmm", "einsum", "mm", "addmm", "addcmul_"),
}


def categorize(name: str) -> str:
    op = name.removeprefix("aten::")
    for category, ops in CATEGORIES.items():
        if any(op == o or op.startswith(o + "_backward") for o in ops):
            return category
    if "backward" in op:
        return "other backward"
    return "elementwise, reductions"


def profile_phase(fn) -> dict:
    """Run fn once to warm up, then once under the profiler: seconds per category."""
    fn()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - start
    shares: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            shares[categorize(event.key)] += event.self_cpu_time_total / 1e6
    # Profiling inflates small-op overhead; the untimed wall time is the honest total.
    start = time.perf_counter()
    fn()
    plain = time.perf_counter() - start
    operators = sum(shares.values())
    scale = min(1.0, plain / max(operators, 1e-12))
    out = {k: v * scale for k, v in shares.items()}
    out["Python, dispatch, allocation"] = max(0.0, plain - operators * scale)
    return {"wall_s": plain, "profiled_wall_s": wall, "categories": out}


def build_setup(size: str, optim: str, n_samples: int):
    layers, channels, _ = MODELS[size]
    overrides = [
        f"lattice.Lx={SIDE}",
        f"lattice.Ly={SIDE}",
        "ham=tfim",
        "ham.gamma=3.0",
        f"model.layers={layers}",
        f"model.channels={channels}",
        "model.phase=false",
        "sampler=direct",
        f"sampler.n_samples={n_samples}",
        f"optim={optim}",
        "dtype=float32",
        "device=cpu",
        "train.chunk_size=1024",
        "seed=0",
    ]
    return build.build_training(compose("train", overrides))


def step_phases(setup, n_samples: int) -> dict:
    """Wall seconds of each phase of one step (after a warm-up step)."""
    state, rule = setup.state, setup.rule

    def once() -> dict:
        t = {}
        start = time.perf_counter()
        batch = state.sample(n_samples)
        t["sampling"] = time.perf_counter() - start
        start = time.perf_counter()
        e_loc = state.local_energy(batch)
        t["local energies"] = time.perf_counter() - start
        start = time.perf_counter()
        rule.step(state, batch, e_loc)
        t["gradient / rows and update"] = time.perf_counter() - start
        return t

    once()
    return once()


def profile_passes(model: torch.nn.Module, x: torch.Tensor, n_samples: int) -> dict:
    """Profiles of the forward pass, forward + backward, and the per-sample rows."""

    def forward() -> None:
        with torch.no_grad():
            model.log_psi(x)

    def forward_backward() -> None:
        log_psi = model.log_psi(x)
        (log_psi.real.sum() + log_psi.imag.sum()).backward()

    def rows() -> None:
        for _ in jacobian.log_derivative_rows(model, x, n_samples):
            pass

    return {
        "forward": profile_phase(forward),
        "forward + backward": profile_phase(forward_backward),
        "per-sample rows": profile_phase(rows),
    }


def run(quick: bool) -> dict:
    torch.set_num_threads(2)
    n_samples = 256 if quick else 1024
    results = {"meta": machine_meta(n_samples, 0.0, quick), "cases": []}
    for size in SIZES:
        setup = build_setup(size, "adam", n_samples)
        model = setup.state.model
        x = setup.state.sample(n_samples).x

        passes = profile_passes(model, x, n_samples)
        steps = {"adam": step_phases(setup, n_samples)}
        minsr = build_setup(size, "minsr", n_samples)
        minsr.state.model.load_state_dict(model.state_dict())
        steps["minsr"] = step_phases(minsr, n_samples)
        case = {
            "size": size,
            "L": SIDE,
            "n_params": sum(p.numel() for p in model.parameters()),
            "passes": passes,
            "steps": steps,
        }
        results["cases"].append(case)
        print(
            f"{size} L={SIDE}: forward {passes['forward']['wall_s']:.3f} s, rows/(fwd+bwd)"
            f" {passes['per-sample rows']['wall_s'] / passes['forward + backward']['wall_s']:.2f}",
            flush=True,
        )
    return results


def markdown(results: dict) -> str:
    lines = ["## Per-phase profile (`bench_profile.py`)", "", meta_line(results["meta"]), ""]
    for case in results["cases"]:
        passes = case["passes"]
        categories = sorted({k for p in passes.values() for k in p["categories"]})
        lines += [
            f"### {case['size']} (layers × channels), L = {case['L']}, "
            f"{case['n_params']:,} parameters",
            "",
            "| phase | " + " | ".join(passes) + " |",
            "|---|" + "---:|" * len(passes),
            "| wall (s) | " + " | ".join(f"{p['wall_s']:.3f}" for p in passes.values()) + " |",
        ]
        for category in categories:
            cells = []
            for p in passes.values():
                value = p["categories"].get(category, 0.0)
                cells.append(f"{100 * value / p['wall_s']:.0f}%")
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
        ratio = passes["per-sample rows"]["wall_s"] / passes["forward + backward"]["wall_s"]
        lines += ["", f"Per-sample rows cost {ratio:.2f}× one forward + backward pass.", ""]
        lines += ["| VMC step | " + " | ".join(case["steps"]) + " |"]
        lines += ["|---|" + "---:|" * len(case["steps"])]
        phases = next(iter(case["steps"].values()))
        for phase in phases:
            cells = [f"{s[phase]:.3f} s" for s in case["steps"].values()]
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
        totals = [f"{sum(s.values()):.3f} s" for s in case["steps"].values()]
        lines += ["| total | " + " | ".join(totals) + " |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 256")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    results = run(args.quick)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "profile.json").write_text(json.dumps(results, indent=1))
    (RESULTS_DIR / "profile.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
