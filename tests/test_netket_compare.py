"""`benchmarks/netket_compare.py`'s pure functions on fake worker results: the median-of-rounds
statistic, the ratios, the last printed line, the targets and the markdown report. No worker
runs and NetKet's venv is not needed."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import netket_compare  # noqa: E402
import race  # noqa: E402

BATCH = 64
#: NetKet's seconds for every quantity in the fake cases.
NETKET_S = 1.0


def fake_run(program: str, times: dict[str, list[float] | None]) -> dict:
    """Return a worker result of `program` with the given repetition times per quantity.

    Args:
        program: "naqs" or "netket".
        times: {quantity: repetition seconds, or None when not timed}; quantities left out
            are not timed.
    """
    run = {"program": program, "batch": BATCH, "L": 4, "layers": 4, "n_parameters": 1000}
    if program == "naqs":
        run |= {"channels": 14, "local_energy": "ratio_cache"}
    else:
        run |= {"features": 32, "n_parameters_effective": 1000, "compile_s": {"sample": 1.0}}
        run["heis_operator"] = "LocalOperatorJax"
    for quantity in netket_compare.QUANTITIES:
        values = times.get(quantity)
        run[f"{quantity}_s"] = None if values is None else min(values)  # unused by summarize
        if values is not None:
            run[f"{quantity}_all_s"] = values
    return run


def fake_case(
    size: str,
    side: int,
    sampling: float,
    log_psi: float,
    tfim: float | None = None,
    heis: float | None = None,
) -> dict:
    """Return a compared case with the given naqs/NetKet ratios (one round each side).

    Rates: naqs seconds = NetKet seconds / ratio; steps: naqs seconds = ratio × NetKet's.
    """

    def step(ratio: float | None, factor: float) -> list[float] | None:
        return None if ratio is None else [NETKET_S * factor]

    netket = {
        "sample": [NETKET_S],
        "log_psi": [NETKET_S],
        "vmc_step": step(tfim, 1.0),
        "heis_step": step(heis, 1.0),
    }
    naqs = {
        "sample": [NETKET_S / sampling],
        "log_psi": [NETKET_S / log_psi],
        "vmc_step": step(tfim, tfim or 0.0),
        "heis_step": step(heis, heis or 0.0),
    }
    runs = {"naqs": [fake_run("naqs", naqs)], "netket": [fake_run("netket", netket)]}
    return netket_compare.make_case(size, side, runs)


def full_cases() -> list[dict]:
    """Both sizes at L = 10 (with steps) and 12; the largest step ratio is 8x32's Heisenberg."""
    return [
        fake_case("4x32", 10, sampling=4.0, log_psi=1.25, tfim=0.25, heis=0.375),
        fake_case("4x32", 12, sampling=3.5, log_psi=1.5),
        fake_case("8x32", 10, sampling=5.0, log_psi=1.125, tfim=0.3125, heis=0.4375),
        fake_case("8x32", 12, sampling=6.0, log_psi=2.0),
    ]


def fake_meta(cpu: str) -> dict:
    return {
        "date": "2026-01-01T00:00:00",
        "versions": {"torch": "2.0", "netket": "3.0", "jax": "0.4"},
        "cpu": cpu,
        "threads": 2,
        "cpus": "0,1",
        "load_average_start": "1.0 1.0 1.0",
        "load_average_end": "2.0 1.5 1.0",
        "batch": BATCH,
        "rounds": 3,
        "repeats": 3,
        "learning_rate": 0.01,
        "netket_chunk_size": 256,
        "quick": False,
    }


def test_summary_is_the_median_of_the_round_medians_with_every_repetition_kept():
    sample = [[1.0, 2.0, 9.0], [3.0, 4.0, 5.0], [0.5, 6.0, 7.0]]  # round medians 2, 4, 6
    steps = [[10.0], [30.0], [20.0]]
    runs = [
        fake_run("naqs", {"sample": s, "log_psi": [1.0, 2.0], "vmc_step": v})
        for s, v in zip(sample, steps, strict=True)
    ]
    summary = netket_compare.summarize(runs)
    assert summary["sample_s"] == 4.0  # not the fastest repetition (0.5)
    assert summary["sample_rounds_s"] == [2.0, 4.0, 6.0]
    assert summary["sample_all_s"] == sample
    assert summary["samples_per_s"] == BATCH / 4.0
    assert summary["log_psi_s"] == 1.5  # an even count: the mean of the middle two
    assert summary["log_psi_per_s"] == BATCH / 1.5
    assert summary["vmc_step_s"] == 20.0 and summary["vmc_step_rounds_s"] == [10.0, 30.0, 20.0]
    assert summary["heis_step_s"] is None and summary["heis_step_rounds_s"] == [None] * 3


def test_round_value_falls_back_to_the_workers_value_without_repetitions():
    assert netket_compare.round_value({"sample_s": 0.5}, "sample") == 0.5
    assert netket_compare.round_value({"vmc_step_s": None}, "vmc_step") is None
    assert netket_compare.round_value({}, "heis_step") is None


def test_case_ratios_keep_the_conventions():
    case = fake_case("4x32", 10, sampling=4.0, log_psi=0.5, tfim=0.25, heis=0.375)
    assert case["sampling_ratio"] == 4.0  # naqs / NetKet samples per s: above 1 naqs faster
    assert case["log_psi_ratio"] == 0.5
    assert case["vmc_step_ratio"] == 0.25  # naqs / NetKet s per step: below 1 naqs faster
    assert case["heis_step_ratio"] == 0.375
    assert case["parameter_ratio"] == 1.0
    no_steps = fake_case("4x32", 12, sampling=4.0, log_psi=0.5)
    assert no_steps["vmc_step_ratio"] is None and no_steps["heis_step_ratio"] is None


def test_last_line_takes_min_rates_and_max_step_over_all_cases():
    cases = full_cases()
    assert netket_compare.ratio_line(cases) == "ratio sampling=3.5 vmc_step=0.438 log_psi=1.12"
    best = netket_compare.headline(cases)
    assert best["sampling"] == (3.5, "4x32 L=12")
    assert best["vmc_step"] == (0.4375, "8x32 L=10 Heisenberg")
    assert best["log_psi"] == (1.125, "8x32 L=10")


def test_last_line_max_step_can_be_a_tfim_step():
    cases = [fake_case("4x32", 4, sampling=0.5, log_psi=0.25, tfim=6.5, heis=6.25)]
    assert netket_compare.ratio_line(cases) == "ratio sampling=0.5 vmc_step=6.5 log_psi=0.25"
    assert netket_compare.headline(cases)["vmc_step"] == (6.5, "4x32 L=4 TFIM")


def test_last_line_without_any_step_says_none():
    cases = [fake_case("4x32", 12, sampling=4.0, log_psi=2.0)]
    assert netket_compare.ratio_line(cases) == "ratio sampling=4 vmc_step=none log_psi=2"


def _targets(cases: list[dict]) -> dict[str, dict]:
    return {t["target"].split(" ratio")[0]: t for t in netket_compare.evaluate_targets(cases)}


def test_targets_pass_when_every_required_case_meets_them():
    targets = _targets(full_cases())
    assert {name: t["status"] for name, t in targets.items()} == {
        "log_psi/s": "pass",
        "samples/s": "pass",
        "TFIM step": "pass",
        "Heisenberg step": "pass",
    }
    assert targets["log_psi/s"]["worst"] == 1.125
    assert targets["log_psi/s"]["worst_case"] == "8x32 L=10"
    assert targets["TFIM step"]["worst"] == 0.3125


def test_targets_fail_or_are_not_measured():
    cases = full_cases()
    cases[1] = fake_case("4x32", 12, sampling=2.5, log_psi=0.75)
    cases[2] = fake_case("8x32", 10, sampling=5.0, log_psi=1.125, tfim=0.375, heis=0.625)
    targets = _targets(cases)
    assert targets["log_psi/s"]["status"] == "fail"
    assert targets["log_psi/s"]["worst"] == 0.75
    assert targets["samples/s"]["status"] == "fail"
    assert targets["TFIM step"]["status"] == "fail"
    assert targets["Heisenberg step"]["status"] == "fail"
    assert targets["Heisenberg step"]["worst_case"] == "8x32 L=10"
    quick = _targets([fake_case("4x32", 4, sampling=4.0, log_psi=2.0, tfim=0.25, heis=0.25)])
    assert quick["log_psi/s"]["status"] == "not measured"
    assert quick["log_psi/s"]["missing"] == ["4x32 L=10", "8x32 L=10", "4x32 L=12", "8x32 L=12"]
    assert quick["TFIM step"]["status"] == "not measured"
    assert quick["samples/s"]["status"] == "pass"
    assert quick["Heisenberg step"]["status"] == "pass"
    partial = _targets(full_cases()[:2])  # 8x32 missing: the "both sizes" targets lack it
    assert partial["log_psi/s"]["status"] == "not measured"
    assert partial["log_psi/s"]["missing"] == ["8x32 L=10", "8x32 L=12"]


def test_heisenberg_target_without_any_heisenberg_step_is_not_measured():
    targets = _targets([fake_case("4x32", 10, sampling=4.0, log_psi=2.0)])
    assert targets["Heisenberg step"]["status"] == "not measured"
    assert targets["Heisenberg step"]["worst"] is None


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["fpu", "sse4_1", "sse4_2", "fma", "avx", "avx2"],
            "AMD EPYC (sse4_1 sse4_2 fma avx avx2; no AVX-512, no AMX)",
        ),
        (
            ["avx", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"],
            "Xeon (avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile)",
        ),
        (["avx", "avx512f"], "Xeon (avx avx512f; no AMX)"),
        (["fpu"], "old (no AVX flags; no AVX-512, no AMX)"),
    ],
)
def test_cpu_description_names_vector_extensions_and_absent_avx512(flags, expected):
    model = expected.split(" (")[0]
    assert race.describe_cpu(model, flags) == expected


def test_markdown_has_cpu_line_table_last_line_and_targets():
    cpu = race.describe_cpu("AMD EPYC", ["fma", "avx", "avx2"]) + ", 2 CPUs"
    report = netket_compare.markdown(full_cases(), fake_meta(cpu))
    lines = report.splitlines()
    cpu_line = next(line for line in lines if line.startswith("CPU: "))
    assert "AMD EPYC (fma avx avx2; no AVX-512, no AMX), 2 CPUs" in cpu_line
    assert "2 threads each, pinned to CPUs 0,1" in cpu_line
    assert "at start 1.0 1.0 1.0, at end 2.0 1.5 1.0" in cpu_line
    assert "median over 3 alternating rounds" in report
    header = next(line for line in lines if line.startswith("| size | L | params"))
    assert "s/TFIM step naqs" in header and "s/Heis. step naqs" in header
    row = next(line for line in lines if line.startswith("| 4×14 vs 4×32 | 10 |"))
    assert row.endswith("| 0.25 | 1 | 0.25 | 0.375 | 1 | 0.38 |")
    assert "`ratio sampling=3.5 vmc_step=0.438 log_psi=1.12`" in report
    assert "8x32 L=10 Heisenberg" in report
    targets = lines[lines.index("Targets:") + 2 : lines.index("Targets:") + 6]
    assert targets == [
        "- log_psi/s ratio ≥ 1.0 at both sizes and L = 10, 12: **pass**, worst 1.12 (8x32 L=10)",
        "- samples/s ratio ≥ 3 at every size and L: **pass**, worst 3.50 (4x32 L=12)",
        "- TFIM step ratio ≤ 0.35 at both sizes, L = 10: **pass**, worst 0.31 (8x32 L=10)",
        "- Heisenberg step ratio ≤ 0.5 wherever timed: **pass**, worst 0.44 (8x32 L=10)",
    ]
    assert "`LocalOperatorJax`" in report
