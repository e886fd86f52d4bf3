"""Local energies, VMC steps and peak memory of the PixelCNN NAQS on TFIM and Heisenberg models.

Run from the repository root:

    .venv/bin/python benchmarks/bench_vmc.py [--quick]

Writes `benchmarks/results/vmc.json` and `benchmarks/results/vmc.md`. float32 parameters,
torch.set_num_threads(2), batch 1024 (256 with --quick), open square lattices L × L, the three
model sizes of `bench_models.py`, built as the training presets do (`phase=False`; Heisenberg
with the Marshall sign rule and a fixed Σσᶻ/2 = 0, or 1/2 when N is odd). Per case:

* direct samples/s: `DirectSampler(n_samples=B, seed=0).sample(model)`;
* log_psi/s: one forward pass without gradient;
* local energy: `vmc.local_energy(model, hamiltonian, batch, chunk_size=1024)`, as connected
  configurations evaluated per second and as its time over one forward pass of the same
  configurations;
* one VMC step as the trainer runs it: sampling B configurations, then `optim.train_step` with
  Adam (lr 1e-3) and chunk_size=1024 (its local energy is timed inside the step);
* peak resident memory of each phase (Linux: VmHWM of /proc/self/status, reset per phase).

A phase whose estimated time exceeds `--case-budget` seconds (twice that for the step) is
timed on the largest power-of-two sub-batch that fits and scaled linearly to B (shown in the
table). For the paper-size model at the largest L (TFIM) the memory of a full-size step is
measured phase by phase (see `memory_at_full_size`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (see bench_models.py). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from bench_models import MODELS, machine_meta, meta_line, n_parameters  # noqa: E402

from naqs_cli import optim, vmc  # noqa: E402
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing  # noqa: E402
from naqs_cli.lattice import SquareLattice  # noqa: E402
from naqs_cli.models import PixelCNN  # noqa: E402
from naqs_cli.samplers import Samples  # noqa: E402
from naqs_cli.samplers.direct import DirectSampler  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

HAMILTONIANS = ("tfim", "heisenberg")
#: Configurations per network pass: train.chunk_size of the paper-size presets.
CHUNK_SIZE = 1024
LEARNING_RATE = 1e-3
#: Acceptance target for one VMC step of the paper-size model at L = 21, 1024 samples.
MEMORY_TARGET_BYTES = 4e9
#: Samples per gradient chunk at which the gradient's peak memory is probed (linear fit).
GRADIENT_PROBES = (32, 64)
#: The gradient is measured over the whole batch with chunks the probes' fit puts under this
#: fraction of the target (the fit is rough; the machine may be shared).
GRADIENT_MARGIN = 0.9
#: Reference configurations of the first chunk `vmc.local_energy` caches activations for.
FIRST_REFERENCE_CHUNK = 64


# --- peak memory ----------------------------------------------------------------------------
def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {key} in {_STATUS}")
    return int(match.group(1)) * 1024


def reset_peak() -> None:
    """Return freed heap pages to the OS and restart the peak RSS (VmHWM) from the current RSS.

    Raises:
        OSError: /proc/self/clear_refs cannot be written (not Linux, or not permitted).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    _CLEAR_REFS.write_text("5")


def peak_bytes() -> int:
    """Return the peak resident memory since the last `reset_peak` (bytes)."""
    return _status_bytes("VmHWM")


def peak_memory_supported() -> bool:
    """Return whether this process can reset and read its peak RSS."""
    try:
        reset_peak()
        return peak_bytes() > 0
    except (OSError, RuntimeError):
        return False


# --- timing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """A phase timed on `timed_batch` configurations and scaled to the batch.

    Attributes:
        seconds: time for the whole batch (scaled linearly when timed_batch < batch).
        timed_batch: configurations actually run.
        peak_bytes: peak RSS of the process during the timed run(s).
        record: what the timed run reported (at least "seconds", for `timed_batch`).
    """

    seconds: float
    timed_batch: int
    peak_bytes: int
    record: dict


def measure(run: Callable[[int], dict], batch: int, budget: float, probe: int) -> Timing:
    """Time run(b) on the batch, or on the largest power-of-two sub-batch within the budget.

    run(b) does the work on b configurations and returns a dict with its own "seconds" (so it
    can leave set-up out and time its parts). The first call, on `probe` configurations, warms
    up and estimates the cost; the batch size then grows to the largest that the latest timing
    says fits in `budget` seconds, as long as the runs so far and the next one stay within twice
    the budget. The cold first call is kept only when it alone took more than the budget; runs
    under a second are repeated three times (best kept).

    Args:
        run: callable taking a batch size.
        batch: the batch size to report.
        budget: seconds one timed run may take.
        probe: configurations of the first (warm-up) call.
    """
    size = min(batch, probe)
    reset_peak()
    record, peak = run(size), peak_bytes()
    is_warm, spent = False, record["seconds"]
    while size < batch:
        per_config = max(record["seconds"], 1e-6) / size
        grown = batch if per_config * batch <= budget else 2 ** int(math.log2(budget / per_config))
        grown = min(batch, grown)
        if grown <= size or spent + per_config * grown > 2 * budget:
            break
        size, is_warm = grown, True
        reset_peak()
        record, peak = run(size), peak_bytes()
        spent += record["seconds"]
    repeats = 3 if record["seconds"] < 1.0 else int(not is_warm and record["seconds"] <= budget)
    if repeats:
        reset_peak()
        record = min((run(size) for _ in range(repeats)), key=lambda r: r["seconds"])
        peak = peak_bytes()
    return Timing(record["seconds"] * batch / size, size, peak, record)


# --- cases ----------------------------------------------------------------------------------
def build_case(name: str, side: int, ham_name: str) -> tuple[PixelCNN, object]:
    """Return the float32 model and Hamiltonian of one case, as the training presets build them.

    TFIM: J = 1, gamma = 3, no Σσᶻ constraint. Heisenberg: J = 1, Marshall sign rule (auto: on,
    the open square lattice is bipartite), Σσᶻ/2 = 0, or 1/2 when N is odd. phase=False: both
    ground states are positive in this basis (fig2_tfim.yaml, table2_heisenberg.yaml).
    """
    layers, channels, _ = MODELS[name]
    lattice = SquareLattice(side, side)
    if ham_name == "tfim":
        hamiltonian = TransverseFieldIsing(lattice=lattice, J=1.0, gamma=3.0)
        total_sz = None
    else:
        hamiltonian = Heisenberg(lattice=lattice, J=1.0)
        total_sz = 0.5 * (lattice.n_sites % 2)
    torch.manual_seed(0)
    model = PixelCNN(
        lattice=lattice, layers=layers, channels=channels, phase=False, total_sz=total_sz
    ).float()
    return model, hamiltonian


def n_connected(hamiltonian, x: torch.Tensor) -> int:
    """Return the number of nonzero off-diagonal matrix elements ⟨x|H|x'⟩ over a batch."""
    return sum(int((hamiltonian.get_conn(part)[1][:, 1:] != 0).sum()) for part in x.split(64))


@contextlib.contextmanager
def timed_local_energy(record: dict) -> Iterator[None]:
    """Time `vmc.local_energy` (and its peak memory) when `optim.train_step` calls it.

    The peak RSS is restarted when local_energy returns, so a `peak_bytes` read after the step
    covers the gradient and update only.
    """
    original = vmc.local_energy

    def wrapper(*args, **kwargs):
        reset_peak()
        start = time.perf_counter()
        result = original(*args, **kwargs)
        record["local_energy_seconds"] = time.perf_counter() - start
        record["local_energy_peak_bytes"] = peak_bytes()
        reset_peak()
        return result

    vmc.local_energy = wrapper
    try:
        yield
    finally:
        vmc.local_energy = original
    if "local_energy_seconds" not in record:
        raise RuntimeError("optim.train_step no longer calls vmc.local_energy: fix bench_vmc.py")


class SamplePool:
    """Configurations drawn by the case's sampler, reused by the later phases."""

    def __init__(self, model: PixelCNN, sampler: DirectSampler) -> None:
        self.model = model
        self.sampler = sampler
        self.samples: Samples | None = None

    def keep(self, samples: Samples) -> None:
        """Remember a freshly drawn batch if it is the largest so far."""
        if self.samples is None or samples.n_samples > self.samples.n_samples:
            self.samples = samples

    def take(self, n_samples: int) -> Samples:
        """Return n_samples configurations with their log_psi (drawing more if needed)."""
        if self.samples is None or self.samples.n_samples < n_samples:
            self.keep(self.sampler.sample(self.model, n_samples))
        s = self.samples
        return Samples(x=s.x[:n_samples], log_psi=s.log_psi[:n_samples], n_chains=1)

    def configurations(self, n_samples: int) -> torch.Tensor:
        """Return (n_samples, N) configurations, repeating the pool's when it is smaller."""
        x = self.samples.x
        return x.repeat((n_samples + len(x) - 1) // len(x), 1)[:n_samples]


def bench_case(
    name: str, side: int, ham_name: str, batch: int, budget: float, sampling_budget: float
) -> tuple[dict, tuple]:
    """Benchmark sampling, log_psi, local energy and one VMC step of one case.

    The step (with its local energy) gets twice the budget: its cost per sample falls with the
    batch up to the 64 references `local_energy` processes together.

    Returns:
        the result row, and (model, hamiltonian, pool) for `memory_at_full_size`.
    """
    model, hamiltonian = build_case(name, side, ham_name)
    sampler = DirectSampler(n_samples=batch, seed=0)
    pool = SamplePool(model, sampler)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    rss_start = _status_bytes("VmRSS")

    def sample(b: int) -> dict:
        start = time.perf_counter()
        samples = sampler.sample(model, b)
        seconds = time.perf_counter() - start
        pool.keep(samples)
        return {"seconds": seconds}

    def forward(b: int) -> dict:
        x = pool.configurations(b)
        start = time.perf_counter()
        with torch.no_grad():
            model.log_psi(x)
        return {"seconds": time.perf_counter() - start}

    def step(b: int) -> dict:
        samples = pool.take(b)
        record = {"n_connected": n_connected(hamiltonian, samples.x)}
        with timed_local_energy(record):
            start = time.perf_counter()
            result = optim.train_step(model, hamiltonian, samples, optimizer, chunk_size=CHUNK_SIZE)
            record["seconds"] = time.perf_counter() - start
        if not result.is_finite:
            raise RuntimeError(f"{name} {ham_name} L={side}: non-finite VMC step")
        return record

    sampling = measure(sample, batch, sampling_budget, probe=16)
    forward_pass = measure(forward, batch, budget, probe=16)
    vmc_step = measure(step, batch, 2 * budget, probe=1)
    # The forward pass on the local energy's own sub-batch, for the same-batch ratio.
    forward_sub = measure(forward, vmc_step.timed_batch, budget, probe=vmc_step.timed_batch)
    scale = batch / vmc_step.timed_batch
    record = vmc_step.record
    local_energy_s = record["local_energy_seconds"] * scale
    n_conn = record["n_connected"] * scale
    ratio = record["local_energy_seconds"] / forward_sub.seconds
    n_sites = model.n_sites
    result = {
        "model": name,
        "layers": model.n_layers,
        "channels": model.channels,
        "n_parameters": n_parameters(model),
        "hamiltonian": ham_name,
        "L": side,
        "n_sites": n_sites,
        "total_sz": model.total_sz,
        "batch": batch,
        "rss_at_start_bytes": rss_start,
        "sampling_s": sampling.seconds,
        "sampling_timed_batch": sampling.timed_batch,
        "samples_per_s": batch / sampling.seconds,
        "sampling_peak_bytes": sampling.peak_bytes,
        "forward_s": forward_pass.seconds,
        "forward_timed_batch": forward_pass.timed_batch,
        "log_psi_per_s": batch / forward_pass.seconds,
        "step_timed_batch": vmc_step.timed_batch,
        "n_connected_per_sample": n_conn / batch,
        "local_energy_s": local_energy_s,
        "connected_per_s": n_conn / local_energy_s,
        "local_energy_over_forward": ratio,
        "local_energy_over_forward_per_site": ratio / n_sites,
        "local_energy_scaled_over_forward": local_energy_s / forward_pass.seconds,
        "local_energy_scaled_over_forward_per_site": local_energy_s
        / forward_pass.seconds
        / n_sites,
        "local_energy_peak_bytes": record["local_energy_peak_bytes"],
        "train_step_s": vmc_step.seconds,
        "update_s": vmc_step.seconds - local_energy_s,
        "update_peak_bytes": vmc_step.peak_bytes,
        "vmc_step_s": sampling.seconds + vmc_step.seconds,
    }
    result["peak_bytes"] = max(
        result["sampling_peak_bytes"], result["local_energy_peak_bytes"], vmc_step.peak_bytes
    )
    return result, (model, hamiltonian, pool)


# --- memory of a full-size step -------------------------------------------------------------
class FirstConnections:
    """A Hamiltonian that keeps only the first `n_keep` nonzero off-diagonal elements per row.

    Same `get_conn` shapes and slots (so `first_changed_site` still applies); the dropped
    elements are set to zero, which `vmc.local_energy` skips. For the TFIM the first slots flip
    the first sites, i.e. the configurations that need the most recomputation.
    """

    def __init__(self, hamiltonian, n_keep: int) -> None:
        self.hamiltonian = hamiltonian
        self.n_keep = n_keep

    def get_conn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return get_conn(x) of the wrapped Hamiltonian with later connections zeroed."""
        x_conn, mels = self.hamiltonian.get_conn(x)
        off = mels[:, 1:]
        keep = (off != 0).cumsum(dim=1) <= self.n_keep
        return x_conn, torch.cat([mels[:, :1], off * keep], dim=1)

    def __getattr__(self, name: str):
        return getattr(self.hamiltonian, name)


def largest_reference_chunk(model: PixelCNN, x: torch.Tensor, batch: int) -> int:
    """Return the most reference configurations `vmc.local_energy` caches activations for at once.

    Mirrors its chunking: the first chunk holds min(B, 64) configurations, later ones as many
    as fit `vmc.RATIO_CACHE_BYTES`. Without that fast path (full passes per connected
    configuration) it is the whole batch.
    """
    cache_bytes = getattr(vmc, "RATIO_CACHE_BYTES", None)
    if cache_bytes is None or not hasattr(model, "ratio_cache"):
        return batch
    per_reference = max(1, model.ratio_cache(x[:2]).nbytes // 2)
    return min(batch, max(FIRST_REFERENCE_CHUNK, cache_bytes // per_reference))


def _gradient_pass(model: PixelCNN, samples: Samples, chunk_size: int, optimizer) -> dict:
    """The part of `optim.train_step` after the local energies: Eq. 4 gradient and Adam update.

    The local energies are random numbers: time and memory do not depend on their values.
    """
    generator = torch.Generator().manual_seed(0)
    e_loc = torch.randn(samples.n_samples, dtype=torch.complex128, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    vmc.vmc_gradient(model, samples, e_loc, chunk_size)
    optimizer.step()
    seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    return {"seconds": seconds}


def memory_at_full_size(case: dict, model: PixelCNN, hamiltonian, pool: SamplePool) -> dict:
    """Measure the peak RSS of each phase of one VMC step at the full batch size.

    * sampling: the case's sampling phase, run on the whole batch;
    * local energy: its memory is set by `chunk_size` configurations per network pass and by
      the activations cached for a chunk of reference configurations, not by the batch; it is
      measured on as many references as the largest such chunk, keeping for each only the first
      ⌈chunk_size / references⌉ connections (`FirstConnections`), so that one full network pass
      of chunk_size configurations runs at the largest cache, in a fraction of the time;
    * gradient: probed at `GRADIENT_PROBES` samples per chunk and fitted linearly (autograd
      keeps the activations of one chunk), measured over the whole batch with the largest
      power-of-two chunk that the fit puts under `GRADIENT_MARGIN` of the target, and, if that
      chunk is smaller than 1024, extrapolated to 1024 along the line through the smallest probe
      and the measured chunk.
    """
    batch = case["batch"]
    if case["sampling_timed_batch"] != batch:
        raise RuntimeError("the memory case needs its sampling timed on the whole batch")
    samples = pool.take(batch)
    n_refs = largest_reference_chunk(model, samples.x, batch)
    # Enough connections that the first reference chunk alone fills a network pass.
    n_first = min(n_refs, FIRST_REFERENCE_CHUNK)
    n_keep = min(math.ceil(CHUNK_SIZE / n_first), round(case["n_connected_per_sample"]))
    truncated = FirstConnections(hamiltonian, n_keep)
    refs = pool.take(n_refs)
    print(f"  memory: local energy on {n_refs} references × {n_keep} connections", flush=True)
    reset_peak()
    start = time.perf_counter()
    vmc.local_energy(model, truncated, refs, chunk_size=CHUNK_SIZE)
    local_energy_seconds = time.perf_counter() - start
    local_energy_peak = peak_bytes()

    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    probes = {}
    for n in GRADIENT_PROBES:
        _gradient_pass(model, pool.take(n), n, optimizer)  # warm-up, Adam state
        reset_peak()
        _gradient_pass(model, pool.take(n), n, optimizer)
        probes[n] = peak_bytes()
    (n1, p1), (n2, p2) = sorted(probes.items())
    per_sample = (p2 - p1) / (n2 - n1)
    intercept = p1 - per_sample * n1
    chunk_fit = 1
    while (
        chunk_fit * 2 <= min(batch, CHUNK_SIZE)
        and intercept + per_sample * chunk_fit * 2 <= GRADIENT_MARGIN * MEMORY_TARGET_BYTES
    ):
        chunk_fit *= 2
    effective = vmc.backward_chunk(model, min(batch, CHUNK_SIZE))
    if effective < min(batch, CHUNK_SIZE):
        # vmc_gradient shrinks the trainer's chunk to fit vmc.BACKWARD_BYTES by itself:
        # measure that setting directly (no extrapolation needed).
        chunk_fit = min(batch, CHUNK_SIZE)
    print(
        f"  memory: gradient over {batch} samples, chunk_size={chunk_fit}"
        f" (backward chunks of {min(chunk_fit, effective)})",
        flush=True,
    )
    reset_peak()
    gradient = _gradient_pass(model, samples, chunk_fit, optimizer)
    gradient_peak = peak_bytes()
    if chunk_fit > n1:  # a longer lever for the extrapolation
        per_sample = (gradient_peak - p1) / (chunk_fit - n1)
    gradient_extrapolated = gradient_peak + per_sample * (min(batch, CHUNK_SIZE) - chunk_fit)
    measured = max(case["sampling_peak_bytes"], local_energy_peak, gradient_peak)
    return {
        "model": case["model"],
        "hamiltonian": case["hamiltonian"],
        "L": case["L"],
        "batch": batch,
        "sampling_peak_bytes": case["sampling_peak_bytes"],
        "sampling_s": case["sampling_s"],
        "local_energy_references": n_refs,
        "local_energy_connections_kept": n_keep,
        "local_energy_probe_s": local_energy_seconds,
        "local_energy_peak_bytes": local_energy_peak,
        "gradient_probe_peak_bytes": {str(n): p for n, p in probes.items()},
        "gradient_bytes_per_sample_in_chunk": per_sample,
        "gradient_chunk_size": chunk_fit,
        "gradient_backward_chunk": min(chunk_fit, effective),
        "gradient_s": gradient["seconds"],
        "gradient_peak_bytes": gradient_peak,
        "gradient_peak_bytes_at_chunk_1024_extrapolated": gradient_extrapolated,
        "step_peak_bytes_measured": measured,
        "step_peak_bytes_at_chunk_1024_extrapolated": max(measured, gradient_extrapolated),
        "target_bytes": MEMORY_TARGET_BYTES,
    }


# --- report -----------------------------------------------------------------------------------
def growth_exponents(results: list[dict], sides: list[int]) -> dict:
    """Fit t ∝ N^α of sampling, local energy and the VMC step between L = 10 and the largest L."""
    small, large = 10, max(sides)
    if small not in sides or large <= small:
        return {}
    exponents = {}
    for name in MODELS:
        for ham_name in HAMILTONIANS:
            rows = {
                r["L"]: r for r in results if (r["model"], r["hamiltonian"]) == (name, ham_name)
            }
            if small in rows and large in rows:
                a, b = rows[small], rows[large]
                log_n = math.log(b["n_sites"] / a["n_sites"])
                exponents[f"{name} {ham_name}"] = {
                    key: math.log(b[key] / a[key]) / log_n
                    for key in ("sampling_s", "forward_s", "local_energy_s", "vmc_step_s")
                }
    return exponents


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f}"


def _scaled(text: str, timed: int, batch: int) -> str:
    return text + (f" [{timed}]" if timed < batch else "")


def markdown(results: list[dict], memory: dict | None, exponents: dict, meta: dict) -> str:
    """Render the results as a markdown report."""
    lines = [
        "# Local energy and VMC step",
        "",
        meta_line(meta)
        + f" Local energy and gradient with chunk_size={CHUNK_SIZE}; Adam lr {LEARNING_RATE}.",
        "",
        "| model | H | L | N | samples/s | log_psi/s | connected / sample | E_loc connected/s "
        "| E_loc / forward / N | scaled E_loc / forward / N | VMC step s | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        batch, step_b = r["batch"], r["step_timed_batch"]
        samples = _scaled(f"{r['samples_per_s']:,.0f}", r["sampling_timed_batch"], batch)
        log_psi = _scaled(f"{r['log_psi_per_s']:,.0f}", r["forward_timed_batch"], batch)
        connected = _scaled(f"{r['connected_per_s']:,.0f}", step_b, batch)
        step = _scaled(f"{r['vmc_step_s']:.2f}", step_b, batch)
        ratio = _scaled(f"{r['local_energy_over_forward_per_site']:.2f}", step_b, batch)
        scaled_ratio = _scaled(
            f"{r['local_energy_scaled_over_forward_per_site']:.2f}", step_b, batch
        )
        peak = _scaled(_gb(r["peak_bytes"]), min(step_b, r["sampling_timed_batch"]), batch)
        lines.append(
            f"| {r['model']} | {r['hamiltonian']} | {r['L']} | {r['n_sites']} | {samples} "
            f"| {log_psi} | {r['n_connected_per_sample']:.0f} | {connected} "
            f"| {ratio} | {scaled_ratio} | {step} | {peak} |"
        )
    tfim = [r for r in results if r["hamiltonian"] == "tfim" and r["L"] >= 10]
    met = sum(r["local_energy_over_forward_per_site"] <= 0.6 for r in tfim)
    met_scaled = sum(r["local_energy_scaled_over_forward_per_site"] <= 0.6 for r in tfim)
    lines += [
        "",
        f"[b]: this phase was timed on b of the {meta['batch']} samples (the whole batch would"
        f" take more than {meta['case_budget']:.0f} s, {2 * meta['case_budget']:.0f} s for the"
        " step) and scaled linearly. This overestimates the time: per-call overhead does not"
        " shrink with the batch (sampling), and `local_energy` is fastest with 64 or more"
        " samples, whose connected configurations it evaluates together. In the peak column [b]"
        " is the smallest batch any phase ran: the gradient's memory grows with the samples per"
        " chunk (see below), so the full-batch peak is higher.",
        "",
        "connected / sample: nonzero off-diagonal ⟨x|H|x'⟩ per configuration (TFIM: N;"
        " Heisenberg: antiparallel bonds). E_loc / forward / N: time of `local_energy` over"
        " that of one log_psi forward pass (no gradient) of the same configurations (the [b]"
        " sub-batch where marked), divided by N. scaled E_loc / forward / N: the local"
        " energy's time scaled to the whole batch over the log_psi forward time of the whole"
        " batch, divided by N. The two agree where the step ran on the whole batch; on a few"
        " samples they bracket the full-batch ratio, the first from below (a forward pass of"
        " a few samples is less efficient per sample), the second from above. Target ≤ 0.6"
        f" for TFIM at L ≥ 10: met in {met} (first) and {met_scaled} (second) of {len(tfim)}"
        " cases. VMC step: sampling B configurations plus `train_step` (local energy, Eq. 4"
        " gradient, Adam), as the trainer runs it.",
    ]
    if memory is not None:
        lines += _memory_markdown(memory)
    if exponents:
        lines += [
            "",
            "Growth of the time with N = L² between L = 10 and the largest L (t ∝ N^α):",
            "",
            "| model, H | α sampling | α forward | α local energy | α VMC step |",
            "|---|---|---|---|---|",
        ]
        for key, fit in exponents.items():
            lines.append(
                f"| {key} | {fit['sampling_s']:.2f} | {fit['forward_s']:.2f} "
                f"| {fit['local_energy_s']:.2f} | {fit['vmc_step_s']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _memory_markdown(m: dict) -> list[str]:
    target = m["target_bytes"]
    chunk = m["gradient_chunk_size"]
    probes = ", ".join(f"{n} → {_gb(p)} GB" for n, p in m["gradient_probe_peak_bytes"].items())
    verdict = "meets" if m["step_peak_bytes_measured"] <= target else "misses"
    verdict_1024 = (
        "meets" if m["step_peak_bytes_at_chunk_1024_extrapolated"] <= target else "misses"
    )
    full_chunk = min(m["batch"], CHUNK_SIZE)
    lines = [
        "",
        f"## Peak memory of one VMC step: {m['model']}, {m['hamiltonian']}, L = {m['L']},"
        f" {m['batch']} samples",
        "",
        "Peak resident memory of the whole process (VmHWM, restarted per phase; includes"
        " Python and torch).",
        "",
        "| phase | how | peak GB |",
        "|---|---|---|",
        f"| sampling | measured, {m['batch']} samples ({m['sampling_s']:.0f} s)"
        f" | {_gb(m['sampling_peak_bytes'])} |",
        f"| local energy | measured on {m['local_energy_references']} samples ×"
        f" {m['local_energy_connections_kept']} connections ({m['local_energy_probe_s']:.0f} s)"
        f" | {_gb(m['local_energy_peak_bytes'])} |",
        f"| gradient + Adam, chunk_size {chunk} (backward chunks of"
        f" {m.get('gradient_backward_chunk', chunk)}) | measured, {m['batch']} samples"
        f" ({m['gradient_s']:.0f} s) | {_gb(m['gradient_peak_bytes'])} |",
    ]
    summary = (
        f"Step peak with train.chunk_size={chunk}: {_gb(m['step_peak_bytes_measured'])} GB,"
        f" measured ({verdict} the {_gb(target)} GB target)"
    )
    if chunk < full_chunk:
        lines.append(
            f"| gradient + Adam, chunk {full_chunk} | extrapolated linearly from chunks of"
            f" {probes} and {chunk} ({m['gradient_bytes_per_sample_in_chunk'] / 1e6:.1f} MB"
            " per sample)"
            f" | {_gb(m['gradient_peak_bytes_at_chunk_1024_extrapolated'])} |"
        )
        summary += (
            f"; with chunk_size={full_chunk}:"
            f" {_gb(m['step_peak_bytes_at_chunk_1024_extrapolated'])} GB, extrapolated"
            f" ({verdict_1024} it; {chunk} is the largest power of two that the fit of the"
            f" probes put under {100 * GRADIENT_MARGIN:.0f} % of the target)"
        )
    return lines + [
        "",
        summary + ".",
        "",
        "Local energy: `local_energy` evaluates connected configurations in network passes of"
        " chunk_size configurations, reusing activations cached for a chunk of reference"
        " configurations (the first min(B, 64), then as many as fit `vmc.RATIO_CACHE_BYTES`);"
        " only O(B) vectors of results grow with the batch, so its memory is bounded by the"
        " chunk size and the cache, not by the batch. Its peak is therefore measured on as"
        " many samples as the largest reference chunk, keeping per sample only its first"
        " connections (for the TFIM the flips of the first sites, which need the most"
        " recomputation), enough for the first reference chunk to fill a network pass of"
        " chunk_size configurations: the full connection list only repeats such passes, at"
        " a small fraction of the time. The gradient keeps the autograd activations of one"
        " chunk of samples, so its peak grows linearly with chunk_size, not with the batch.",
    ]


def main() -> None:
    """Run the benchmark and write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L = 4, 10 and batch 256 only")
    parser.add_argument(
        "--case-budget", type=float, help="seconds per timed phase (default 10, 2 with --quick)"
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--sides", nargs="+", type=int, help="lattice sides L")
    parser.add_argument("--hamiltonians", nargs="+", choices=HAMILTONIANS, default=HAMILTONIANS)
    parser.add_argument(
        "--memory-side",
        type=int,
        help="L of the full-size memory case (default: the largest L, the smallest with --quick)",
    )
    parser.add_argument(
        "--no-memory-case", action="store_true", help="skip the full-size memory measurement"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    sides = args.sides or ([4, 10] if args.quick else [4, 10, 12, 21])
    batch = 256 if args.quick else 1024
    budget = args.case_budget or (2.0 if args.quick else 10.0)
    if not peak_memory_supported():
        sys.exit("bench_vmc: cannot reset the peak RSS (/proc/self/clear_refs): Linux needed")
    meta = machine_meta(batch, budget, args.quick)
    memory_side = args.memory_side or (min(sides) if args.quick else max(sides))
    memory_key = ("paper-18x32", memory_side, "tfim")
    do_memory = (
        not args.no_memory_case and memory_key[0] in args.models and "tfim" in (args.hamiltonians)
    )
    print(
        f"bench_vmc: {meta['cpu_model']}, {meta['threads']} threads, load"
        f" {meta['load_average']}, batch {batch}, budget {budget:.0f} s per phase",
        flush=True,
    )
    results, memory = [], None
    start = time.perf_counter()
    for name in args.models:
        for side in sides:
            for ham_name in args.hamiltonians:
                is_memory_case = do_memory and (name, side, ham_name) == memory_key
                print(f"{name:20s} {ham_name:10s} L={side:2d} ...", flush=True)
                result, parts = bench_case(
                    name,
                    side,
                    ham_name,
                    batch,
                    budget,
                    sampling_budget=math.inf if is_memory_case else budget,
                )
                results.append(result)
                print(
                    f"{name:20s} {ham_name:10s} L={side:2d} "
                    f"samples/s={result['samples_per_s']:,.0f} "
                    f"log_psi/s={result['log_psi_per_s']:,.0f} "
                    f"E_loc/fwd={result['local_energy_over_forward_per_site']:.2f} N"
                    f" (scaled {result['local_energy_scaled_over_forward_per_site']:.2f} N) "
                    f"step={result['vmc_step_s']:.2f} s (timed on {result['step_timed_batch']})"
                    f" peak={_gb(result['peak_bytes'])} GB "
                    f"[{time.perf_counter() - start:.0f} s]",
                    flush=True,
                )
                if is_memory_case:
                    memory = memory_at_full_size(result, *parts)
                    print(
                        f"  memory: step peak {_gb(memory['step_peak_bytes_measured'])} GB"
                        f" (chunk {memory['gradient_chunk_size']}),"
                        f" {_gb(memory['step_peak_bytes_at_chunk_1024_extrapolated'])} GB"
                        f" at chunk {min(batch, CHUNK_SIZE)} (extrapolated)"
                        f" [{time.perf_counter() - start:.0f} s]",
                        flush=True,
                    )
                del parts
    exponents = growth_exponents(results, sides)
    meta["total_seconds"] = time.perf_counter() - start
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta,
        "results": results,
        "memory_full_size": memory,
        "growth_exponents": exponents,
    }
    (RESULTS_DIR / "vmc.json").write_text(json.dumps(payload, indent=2) + "\n")
    report = markdown(results, memory, exponents, meta)
    (RESULTS_DIR / "vmc.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
