"""`benchmarks/race.py` and the NetKet worker's pure parts on fake worker results: the verdict
(ratio of medians, or a tie when its relative uncertainty is above 0.25), the per-case
evaluation arguments, `--tune --only` keeping the other contenders' tuned entries, the NetKet
worker's falling shift and its combination of evaluation rounds. No worker runs and NetKet's
venv is not needed."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import race  # noqa: E402
import race_worker_netket  # noqa: E402


def fake_runs(label: str, errors: list[float], bars: list[float]) -> list[dict]:
    return [
        {"label": label, "relative_error": e, "relative_error_err": b, "v_score": 1e-4}
        | {"steps": 10, "compile_s": 0.0, "dtype": "float32", "n_params": 5, "hyper": {}}
        for e, b in zip(errors, bars, strict=True)
    ]


def test_verdict_is_the_ratio_of_medians_when_precise_enough():
    runs = fake_runs("naqs_minsr", [3e-6, 1e-6, 2e-6], [0.1e-6] * 3)
    runs += fake_runs("rbm_sr", [4e-6, 8e-6, 5e-6], [0.5e-6] * 3)
    summary = race.summarize_case(race.CASES["tfim6x6"], runs, "naqs_minsr")
    assert summary["best_netket"] == "rbm_sr"
    assert summary["ratio"] == pytest.approx(2e-6 / 5e-6)
    assert summary["ratio_uncertainty"] == pytest.approx(math.hypot(0.05, 0.1))
    assert summary["verdict"] == "0.4"


def test_verdict_is_a_tie_when_the_ratio_is_uncertain():
    # The median runs' error bars: 0.2 and 0.2 relative, 0.28 together (> 0.25).
    runs = fake_runs("naqs_minsr", [2e-6, 1e-6, 3e-6], [0.4e-6] * 3)
    runs += fake_runs("rbm_sr", [5e-6, 4e-6, 6e-6], [1e-6] * 3)
    summary = race.summarize_case(race.CASES["tfim6x6"], runs, "naqs_minsr")
    assert summary["ratio_uncertainty"] == pytest.approx(math.hypot(0.2, 0.2))
    assert summary["verdict"] == "tie"


def test_each_side_gets_its_evaluation_arguments(monkeypatch):
    seen = {}

    def fake_worker(side, arguments, env, timeout):
        seen[side] = arguments
        return {"failed": "not run"}

    monkeypatch.setattr(race, "run_worker", fake_worker)
    args = SimpleNamespace(cpus="0,1", threads=2)
    race.run_one(race.CASES["tfim6x6"], "naqs_minsr", "naqs", {}, 0, args, keep=Path("s.pt"))
    assert seen["naqs"][-4:] == ["--keep", "s.pt", "--eval-samples", "65536"]
    race.run_one(race.CASES["tfim6x6"], "rbm_sr", "netket", {}, 0, args)
    assert seen["netket"][-2:] == ["--eval-rounds", "8"]
    race.run_one(race.CASES["tfim4x4"], "naqs_minsr", "naqs", {}, 0, args)
    race.run_one(race.CASES["tfim4x4"], "rbm_sr", "netket", {}, 0, args)
    assert "--eval-samples" not in seen["naqs"]  # 16 sites: evaluated exactly
    assert "--eval-rounds" not in seen["netket"]


def test_tune_only_keeps_the_other_contenders(monkeypatch, tmp_path):
    tuned_path = tmp_path / "race_tuned.json"
    tuned_path.write_text(json.dumps({"tfim4x4": {"arnn_adam": {"lr": 0.005}}}))
    monkeypatch.setattr(race, "TUNED", tuned_path)
    monkeypatch.setattr(race, "TRIALS", tmp_path / "trials.json")
    calls = []

    def fake_run_one(case, label, side, hyper, seed, args, evaluation=None):
        calls.append(label)
        # The best trial: lr 0.05, shift 1e-4, SPRING 0.8 (errors are smallest there).
        error = 1.0 + (hyper["lr"] != 0.05) + (hyper["diag_shift"] != 1e-4) + (hyper["spring"] == 0)
        return {"relative_error": error * (1 + seed / 1000)}

    monkeypatch.setattr(race, "run_one", fake_run_one)
    args = SimpleNamespace(naqs_optim="minsr", all_contenders=False, only="rbm_sr")
    race.tune(args, [race.CASES["tfim4x4"]])
    assert set(calls) == {"rbm_sr"}
    assert len(calls) == 8 * len(race.TUNE_SEEDS)  # the same trials for every contender
    tuned = json.loads(tuned_path.read_text())["tfim4x4"]
    assert tuned["arnn_adam"] == {"lr": 0.005}
    # The grid's values win; keys outside the grid (the falling shift) are kept.
    best = {"lr": 0.05, "diag_shift": 1e-4, "diag_shift_final": 1e-5, "spring": 0.8}
    assert tuned["rbm_sr"] == best
    note = race.tuning_note(json.loads(tuned_path.read_text()), "tfim4x4")
    assert note.startswith("arnn_adam, rbm_sr from `make race-tune`")
    assert race.tuning_note({}, "tfim4x4").startswith("no race-tune run for this case")


def test_all_contenders_tunes_a_contender_the_race_leaves_out(monkeypatch, tmp_path):
    monkeypatch.setattr(race, "TUNED", tmp_path / "race_tuned.json")
    monkeypatch.setattr(race, "TRIALS", tmp_path / "trials.json")
    calls = []

    def fake_run_one(case, label, side, hyper, seed, args, evaluation=None):
        calls.append(label)
        return {"relative_error": 1e-2 * (1 + (hyper["lr"] != 0.01))}

    monkeypatch.setattr(race, "run_one", fake_run_one)
    heis = [race.CASES["heis4x4"]]
    race.tune(SimpleNamespace(naqs_optim="minsr", all_contenders=False, only="arnn_sr"), heis)
    assert calls == []  # left out of heis4x4 (main() refuses this in one line)
    race.tune(SimpleNamespace(naqs_optim="minsr", all_contenders=True, only="arnn_sr"), heis)
    assert calls == ["arnn_sr"] * 8 * len(race.tune_seeds("heis4x4"))
    assert (
        json.loads((tmp_path / "race_tuned.json").read_text())["heis4x4"]["arnn_sr"]["lr"] == 0.01
    )


def test_heis4x4_is_tuned_on_a_grid_holding_both_sides_starting_points(monkeypatch, tmp_path):
    monkeypatch.setattr(race, "TUNED", tmp_path / "race_tuned.json")
    monkeypatch.setattr(race, "TRIALS", tmp_path / "trials.json")
    seen = []

    def fake_run_one(case, label, side, hyper, seed, args, evaluation=None):
        seen.append((label, hyper["lr"], hyper["diag_shift"], hyper["spring"]))
        return {"relative_error": 1e-3 * (1 + (hyper["lr"] != 0.01) + (hyper["spring"] != 0))}

    monkeypatch.setattr(race, "run_one", fake_run_one)
    race.tune(
        SimpleNamespace(naqs_optim="minsr", all_contenders=False, only="naqs_minsr,rbm_sr"),
        [race.CASES["heis4x4"]],
    )
    grid = race.CASE_SR_GRID["heis4x4"]
    for label in ("naqs_minsr", "rbm_sr"):
        points = {p[1:] for p in seen if p[0] == label}
        assert points == set(itertools.product(*grid.values()))  # 8 points, the same for both
        start = race.CASE_DEFAULT_HYPER["heis4x4"][label]
        assert (start["lr"], start["diag_shift"], start["spring"]) in points
    assert len(seen) == 2 * 8 * len(race.tune_seeds("heis4x4"))
    tuned = json.loads((tmp_path / "race_tuned.json").read_text())["heis4x4"]
    assert (tuned["rbm_sr"]["lr"], tuned["rbm_sr"]["spring"]) == (0.01, 0.0)
    # naqs keeps its recipe's schedule keys, which lie outside the grid.
    assert tuned["naqs_minsr"]["optim.schedule"] == "step"
    assert race.sr_grid("tfim6x6") is race.SR_GRID


def test_a_diverged_seed_counts_as_the_worst_in_the_tuning(monkeypatch, tmp_path):
    monkeypatch.setattr(race, "TUNED", tmp_path / "race_tuned.json")
    monkeypatch.setattr(race, "TRIALS", tmp_path / "trials.json")
    monkeypatch.setattr(race, "TUNE_SEEDS", (100, 101, 102))

    def fake_run_one(case, label, side, hyper, seed, args, evaluation=None):
        # The first grid point: one seed diverged (NaN), the others 1e-9 and 5e-9, so its
        # median is 5e-9 (NaN sorts last); every other point gives 3e-9 on every seed.
        if (hyper["lr"], hyper["diag_shift"], hyper["spring"]) == (0.02, 1e-4, 0.0):
            return {"relative_error": {100: math.nan, 101: 1e-9, 102: 5e-9}[seed]}
        return {"relative_error": 3e-9}

    monkeypatch.setattr(race, "run_one", fake_run_one)
    race.tune(
        SimpleNamespace(naqs_optim="minsr", all_contenders=False, only="rbm_sr"),
        [race.CASES["tfim4x4"]],
    )
    tuned = json.loads((tmp_path / "race_tuned.json").read_text())["tfim4x4"]["rbm_sr"]
    assert (tuned["lr"], tuned["diag_shift"], tuned["spring"]) != (0.02, 1e-4, 0.0)


def test_tfim6x6_is_tuned_on_one_seed_with_cheaper_evaluations(monkeypatch, tmp_path):
    monkeypatch.setattr(race, "TUNED", tmp_path / "race_tuned.json")
    monkeypatch.setattr(race, "TRIALS", tmp_path / "trials.json")
    seen = []

    def fake_worker(side, arguments, env, timeout):
        seen.append((side, arguments))
        return {"failed": "not run"}

    monkeypatch.setattr(race, "run_worker", fake_worker)
    args = SimpleNamespace(
        naqs_optim="minsr", all_contenders=False, only="naqs_minsr,rbm_sr", cpus="0,1", threads=2
    )
    race.tune(args, [race.CASES["tfim6x6"]])
    assert len(seen) == 2 * 8  # both sides: the same 8 trials, one seed each
    assert {a[a.index("--seed") + 1] for _, a in seen} == {"100"}
    for side, arguments in seen:
        expected = race.TUNE_EVALUATION["tfim6x6"][side]
        assert arguments[-2:] == expected != race.EVALUATION["tfim6x6"][side]
    assert race.tune_seeds("tfim4x4") == race.TUNE_SEEDS
    note = race.tuning_note({"tfim6x6": {"rbm_sr": {}}}, "tfim6x6")
    assert "seeds 100, evaluated with naqs 16,384 samples, NetKet 2 rounds of 65,536)" in note


def test_an_interrupted_tuning_resumes_from_its_finished_trials(monkeypatch, tmp_path):
    monkeypatch.setattr(race, "TUNED", tmp_path / "race_tuned.json")
    monkeypatch.setattr(race, "TRIALS", tmp_path / "trials.json")
    calls, crash = [], [True]

    def crashing_run_one(case, label, side, hyper, seed, args, evaluation=None):
        if len(calls) == 5 and crash and crash.pop():
            raise RuntimeError("killed")
        calls.append((hyper["lr"], hyper["diag_shift"], hyper["spring"], seed))
        return {"relative_error": hyper["lr"] * hyper["diag_shift"] * (1 + hyper["spring"])}

    monkeypatch.setattr(race, "run_one", crashing_run_one)
    args = SimpleNamespace(naqs_optim="minsr", all_contenders=False, only="rbm_sr")
    with pytest.raises(RuntimeError):
        race.tune(args, [race.CASES["tfim4x4"]])
    assert len(json.loads((tmp_path / "trials.json").read_text())) == 5
    done = list(calls)
    race.tune(args, [race.CASES["tfim4x4"]])
    assert len(calls) == 8 * len(race.TUNE_SEEDS)  # the 5 finished trials were not rerun
    assert calls[:5] == done and len(set(calls)) == len(calls)
    tuned = json.loads((tmp_path / "race_tuned.json").read_text())["tfim4x4"]["rbm_sr"]
    assert (tuned["lr"], tuned["diag_shift"], tuned["spring"]) == (0.02, 1e-4, 0.0)


def test_a_damaged_trials_file_is_one_error_line(monkeypatch, tmp_path):
    monkeypatch.setattr(race, "TUNED", tmp_path / "race_tuned.json")
    monkeypatch.setattr(race, "TRIALS", tmp_path / "trials.json")
    (tmp_path / "trials.json").write_text('{"half')
    monkeypatch.setattr(race, "run_one", lambda *a: pytest.fail("must not train"))
    with pytest.raises(SystemExit, match="trials.json is not readable JSON .*move it away"):
        race.tune(
            SimpleNamespace(naqs_optim="minsr", all_contenders=False, only="rbm_sr"),
            [race.CASES["tfim4x4"]],
        )


def test_a_state_with_zero_energy_has_no_v_score(monkeypatch):
    final = {"energy": 0.0, "energy_err": 0.0, "variance": 0.0, "exact": False}
    monkeypatch.setattr(
        race, "run_worker", lambda *a: {"final": final, "trace": [], "steps": 3, "compile_s": 0}
    )
    args = SimpleNamespace(cpus="0,1", threads=2)
    result = race.run_one(race.CASES["tfim6x6"], "rbm_sr", "netket", {}, 0, args)
    assert result["relative_error"] == pytest.approx(1.0)
    assert math.isnan(result["v_score"])


def test_the_report_says_how_final_states_were_evaluated():
    text = race.evaluation_text(race.CASES["tfim6x6"])
    assert text == (
        "naqs 65,536 i.i.d. samples, NetKet 8 rounds of 65,536 Markov-chain samples; on a tie"
        " naqs's median state draws up to 163,840 more (race.py TOP_UP)"
    )
    assert race.evaluation_text(race.CASES["heis4x4"]) == "exact full sums"


def test_netket_shift_falls_geometrically_over_the_budget(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(race_worker_netket.time, "perf_counter", lambda: clock[0])
    shift = race_worker_netket.shift_schedule(1e-3, 1e-5, budget=30.0, start=100.0)
    assert shift(0) == pytest.approx(1e-3)
    clock[0] = 115.0
    assert shift(7) == pytest.approx(1e-4)
    clock[0] = 130.0
    assert shift(9) == pytest.approx(1e-5)
    clock[0] = 200.0  # past the budget: stays at the final value
    assert shift(11) == pytest.approx(1e-5)
    assert race_worker_netket.shift_schedule(1e-3, None, 30.0, 0.0) == 1e-3


def test_netket_evaluation_rounds_combine_as_independent():
    rounds = [(-1.0, 0.02, 4.0, 1.0), (-1.2, 0.02, 6.0, 3.0)]
    combined = race_worker_netket.combine_rounds(rounds)
    assert combined["energy"] == pytest.approx(-1.1)
    assert combined["energy_err"] == pytest.approx(0.02 / math.sqrt(2))
    assert combined["variance"] == pytest.approx(5.0)
    assert combined["tau"] == 3.0
    one = race_worker_netket.combine_rounds(rounds[:1])
    assert (one["energy"], one["energy_err"]) == (-1.0, 0.02)


def test_a_diverged_run_ranks_last_in_the_median_and_is_reported():
    runs = fake_runs("naqs_minsr", [math.nan, 1.9e-6, 1.5e-6], [0.0] * 3)
    runs += fake_runs("rbm_sr", [8.6e-7, 5.0e-7, 5.5e-7], [0.0] * 3)
    summary = race.summarize_case(race.CASES["tfim4x4"], runs, "naqs_minsr")
    row = summary["contenders"]["naqs_minsr"]
    assert row["median"] == 1.9e-6  # [1.5e-6, 1.9e-6, NaN → last]
    assert row["worst"] == math.inf and row["diverged"] == 1
    assert summary["ratio"] == pytest.approx(1.9e-6 / 5.5e-7)
    meta = {"date": "d", "cpu": "c", "threads": 2, "cpus": "0,1", "load_before": "1"}
    meta |= {"load_after": "1", "versions": "v"}
    report = race.markdown([summary | {"meta": meta}], meta)
    assert "| naqs_minsr (1 diverged: NaN) |" in report


def test_report_is_rebuilt_from_the_runs(tmp_path, capsys):
    runs = fake_runs("naqs_minsr", [math.nan, 1.9e-6, 1.5e-6], [0.0] * 3)
    runs += fake_runs("rbm_sr", [8.6e-7, 5.0e-7, 5.5e-7], [0.0] * 3)
    for r in runs:
        r["case"] = "tfim4x4"
    meta = {"date": "d", "cpu": "c", "threads": 2, "cpus": "0,1", "load_before": "1"}
    meta |= {"load_after": "1", "versions": "v"}
    stale = {"case": "tfim4x4", "verdict": "0.1", "meta": meta, "tuned": "by hand"}
    data = {"meta": meta, "summaries": [stale], "runs": runs}
    (tmp_path / "race.json").write_text(json.dumps(data))
    assert race.rebuild_report(tmp_path, "naqs_minsr") == 0
    assert capsys.readouterr().out.strip() == "race tfim4x4=3.45 tfim6x6=n/a heis4x4=n/a"
    summary = json.loads((tmp_path / "race.json").read_text())["summaries"][0]
    assert summary["tuned"] == "by hand" and summary["verdict"] == "3.45"
    assert "hyperparameters: by hand." in (tmp_path / "race.md").read_text()


def _main_error_line(monkeypatch, capsys, *argv: str) -> str:
    """The last stderr line of race.main() with `argv`; it must exit with code 2."""
    monkeypatch.setattr(sys, "argv", ["race.py", *argv])
    with pytest.raises(SystemExit) as stop:
        race.main()
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_unknown_case_is_one_error_line(monkeypatch, capsys):
    error = _main_error_line(monkeypatch, capsys, "--cases", "tfim4x4,tfim9x9")
    assert error == "race.py: error: --cases: unknown tfim9x9; choose from tfim4x4,tfim6x6,heis4x4"


def test_an_unknown_contender_is_one_error_line(monkeypatch, capsys):
    error = _main_error_line(monkeypatch, capsys, "--tune", "--only", "rbm_sr,nosuch")
    expected = "--only: unknown nosuch; choose from naqs_minsr,rbm_sr,arnn_adam,arnn_sr"
    assert error == f"race.py: error: {expected}"


def test_only_a_contender_left_out_of_every_chosen_case_is_one_error_line(monkeypatch, capsys):
    args = ("--cases", "tfim6x6,heis4x4", "--only", "naqs_minsr,arnn_sr")
    error = _main_error_line(monkeypatch, capsys, *args)
    expected = (
        "--only: arnn_sr not raced on tfim6x6,heis4x4 (race.py NOT_RACED);"
        " add --all-contenders to race them"
    )
    assert error == f"race.py: error: {expected}"


def test_bad_seeds_are_one_error_line(monkeypatch, capsys):
    error = _main_error_line(monkeypatch, capsys, "--seeds", "0,one")
    assert (
        error
        == "race.py: error: --seeds: '0,one' is not a comma-separated list of integers, e.g. 0,1,2"
    )


def test_contenders_left_out_of_a_case_are_not_run_and_are_named_in_the_report():
    everyone = ["naqs_minsr", "rbm_sr", "arnn_adam", "arnn_sr"]
    for case in ("tfim6x6", "heis4x4"):
        labels = [label for label, _, _ in race.contenders("minsr", {}, case)]
        assert labels == ["naqs_minsr", "rbm_sr"]
        labels = [label for label, _, _ in race.contenders("minsr", {}, case, everyone=True)]
        assert labels == everyone
    labels = [label for label, _, _ in race.contenders("minsr", {}, "tfim4x4")]
    assert labels == everyone
    runs = fake_runs("naqs_minsr", [3e-6], [0.1e-6]) + fake_runs("rbm_sr", [4e-6], [0.1e-6])
    summary = race.summarize_case(race.CASES["tfim6x6"], runs, "naqs_minsr")
    meta = {"date": "d", "cpu": "c", "threads": 2, "cpus": "0,1", "load_before": "1"}
    meta = {**meta, "load_after": "1", "versions": "v"}
    text = race.markdown([summary], meta)
    assert "Not raced on this case: arnn_adam, arnn_sr (" in text
    # raced anyway (--all-contenders): the report does not call them left out
    runs += fake_runs("arnn_adam", [4e-4], [0.0]) + fake_runs("arnn_sr", [2e-4], [0.0])
    summary = race.summarize_case(race.CASES["heis4x4"], runs, "naqs_minsr")
    assert "Not raced" not in race.markdown([summary], meta)


def _trial(error: float, bar: float, v_score: float, **hyper) -> tuple[dict, list[dict]]:
    run = {"relative_error": error, "relative_error_err": bar, "v_score": v_score}
    return hyper, [run]


def test_tuning_ranks_exact_evaluations_by_energy_alone():
    trials = [_trial(2e-6, 0.0, 1e-5, pick="low V"), _trial(1e-6, 0.0, 5e-5, pick="low E")]
    assert race.pick_tuned(trials) == {"pick": "low E"}


def test_tuning_breaks_a_statistical_tie_in_energy_by_the_v_score():
    # The race-tune of tfim6x6 (seed 100, 2026-12-06), naqs's trials at lr 0.02:
    # (shift, SPRING) -> rel. error ± bar, V-score. 1e-4/0.8 had the lowest sampled error
    # and failed on two of three race seeds; its error is within 1σ of 1e-3/0.8's.
    trials = [
        _trial(7.337e-05, 1.4e-05, 1.21e-04, shift=1e-4, spring=0.0),
        _trial(7.701e-06, 1.2e-05, 8.21e-05, shift=1e-4, spring=0.8),
        _trial(9.177e-06, 1.3e-05, 1.04e-04, shift=1e-3, spring=0.0),
        _trial(1.663e-05, 1.1e-05, 7.34e-05, shift=1e-3, spring=0.8),
    ]
    assert race.pick_tuned(trials) == {"shift": 1e-3, "spring": 0.8}
    # A trial outside 2σ of the best is not a candidate, however low its V-score.
    trials.append(_trial(7.0e-05, 1.0e-05, 1e-06, shift=1e-2, spring=0.0))
    assert race.pick_tuned(trials) == {"shift": 1e-3, "spring": 0.8}
    # Without V-scores (trials recorded before they were kept) the lowest error wins.
    bare = [(h, [{k: v for k, v in r.items() if k != "v_score"} for r in rs]) for h, rs in trials]
    assert race.pick_tuned(bare) == {"shift": 1e-4, "spring": 0.8}


def test_tuning_never_picks_a_collapsed_or_diverged_state():
    trials = [
        _trial(0.30, 8.5e-07, 6.1e-06, pick="collapsed"),  # one configuration: V = 0
        _trial(1.0, math.nan, math.nan, pick="diverged"),  # E = 0
        _trial(3.9e-05, 6.8e-06, 2.12e-04, pick="good"),
        (dict(pick="failed"), [{"failed": "worker crashed"}]),
    ]
    assert race.pick_tuned(trials) == {"pick": "good"}
    # On two seeds the mean decides: one seed in a wrong state sinks a trial.
    mixed = (
        {"pick": "fragile"},
        [
            {"relative_error": 1e-6, "relative_error_err": 1e-6, "v_score": 1e-5},
            {"relative_error": 1.4e-2, "relative_error_err": 1e-4, "v_score": 2e-2},
        ],
    )
    steady = (
        {"pick": "steady"},
        [{"relative_error": 2e-5, "relative_error_err": 1e-5, "v_score": 8e-5}] * 2,
    )
    assert race.pick_tuned([mixed, steady]) == {"pick": "steady"}


def test_top_up_plans_the_samples_the_ratio_needs():
    # Race of 2026-12-06: naqs's median ±40 % at 65,536 samples, NetKet's ±7.4 %.
    need = math.sqrt(0.22**2 - 0.074**2)
    extra = race.planned_extra(65536, 0.30, 0.074, 0.22, 163840, 16384)
    assert extra == 81920 and extra >= 65536 * ((0.30 / need) ** 2 - 1) > extra - 16384
    assert race.planned_extra(65536, 0.39, 0.074, 0.22, 163840, 16384) == 163840  # capped
    assert race.planned_extra(65536, 0.39, 0.074, 0.22, 10000, 16384) == 0  # cap below 1 quantum
    assert race.planned_extra(65536, 0.15, 0.074, 0.22, 163840, 16384) == 0  # already enough
    assert race.planned_extra(65536, 0.39, 0.23, 0.22, 163840, 16384) == 0  # the other side's bar
    assert race.planned_extra(65536, math.nan, 0.07, 0.22, 163840, 16384) == 0


def test_pooled_evaluations_equal_one_evaluation_of_all_samples():
    rng = np.random.default_rng(7)
    totals = -115.2 + rng.normal(size=3000) * np.linspace(0.5, 1.5, 3000)  # two different halves

    def evaluation(part):
        per_site = part / 36
        return {
            "energy": per_site.mean(),
            "energy_err": per_site.std() / math.sqrt(len(part)),
            "variance": part.var(),
            "n_samples": len(part),
            "exact": False,
        }

    merged = race.pooled(evaluation(totals[:1000]), evaluation(totals[1000:]), 36)
    whole = evaluation(totals)
    assert merged["n_samples"] == 3000
    assert merged["energy"] == pytest.approx(whole["energy"], rel=1e-13)
    assert merged["variance"] == pytest.approx(whole["variance"], rel=1e-12)
    # The pooled bar leaves out the spread between the two means (one of many sample draws).
    assert merged["energy_err"] == pytest.approx(whole["energy_err"], rel=0.02)
    assert merged["energy_err"] < whole["energy_err"]


def _sampled_run(label: str, seed: int, error: float, bar: float, n_samples: int) -> dict:
    reference = race.CASES["tfim6x6"].reference("naqs")
    final = {
        "energy": (reference + error * abs(reference)) / 36,
        "energy_err": bar * abs(reference) / 36,
        "variance": 13.0 * error * abs(reference),
        "exact": False,
        "n_samples": n_samples,
    }
    run = {"label": label, "seed": seed, "final": final, "steps": 10, "compile_s": 0.0}
    run |= {"dtype": "float32", "n_params": 5, "hyper": {}}
    race.score(race.CASES["tfim6x6"], "naqs", run)
    return run


def test_a_tie_tops_up_the_median_naqs_state_until_the_ratio_counts(monkeypatch, tmp_path):
    case = race.CASES["tfim6x6"]
    runs = [
        _sampled_run("naqs_minsr", seed, error, 0.7e-5, 65536)
        for seed, error in ((0, 1.74e-5), (1, 2.07e-5), (2, 1.12e-5))
    ]
    runs += fake_runs("rbm_sr", [5.14e-5, 4.87e-5, 4.87e-5], [0.36e-5] * 3)
    assert race.summarize_case(case, runs, "naqs_minsr")["verdict"] == "tie"
    for seed in (0, 1, 2):
        race.state_file(tmp_path, case, "naqs_minsr", seed).write_bytes(b"state")
    calls = []

    def fake_worker(side, arguments, env, timeout):
        calls.append(arguments)
        extra = int(arguments[arguments.index("--eval-samples") + 1])
        bar = 0.7e-5 * math.sqrt(65536 / extra)  # the same state: the bar falls as 1/sqrt(N)
        return {"final": _sampled_run("naqs_minsr", 0, 1.60e-5, bar, extra)["final"], "eval_s": 1}

    monkeypatch.setattr(race, "run_worker", fake_worker)
    args = SimpleNamespace(cpus="0,1", threads=2)
    race.top_up(case, runs, "naqs_minsr", args, tmp_path)
    assert len(calls) == 1
    state = calls[0][calls[0].index("--evaluate") + 1]
    assert state == str(race.state_file(tmp_path, case, "naqs_minsr", 0))  # the median seed
    assert calls[0][calls[0].index("--eval-seed") + 1] != "12345"  # not the first stage's draw
    median = runs[0]
    extra = median["top_ups"][0]["samples"]
    assert median["final"]["n_samples"] == 65536 + extra
    expected = (65536 * 1.74e-5 + extra * 1.60e-5) / (65536 + extra)
    assert median["relative_error"] == pytest.approx(expected, rel=1e-9)
    summary = race.summarize_case(case, runs, "naqs_minsr")
    assert summary["ratio_uncertainty"] <= race.MAX_RATIO_UNCERTAINTY
    assert summary["verdict"] == f"{summary['ratio']:.3g}"
    assert summary["contenders"]["naqs_minsr"]["samples"] == [65536 + extra, 65536, 65536]
    race.top_up(case, runs, "naqs_minsr", args, tmp_path)  # no longer a tie: nothing drawn
    assert len(calls) == 1
