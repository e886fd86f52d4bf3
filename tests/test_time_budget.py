"""`train.time_budget`: a run ends when its seconds of training are spent, like a finished run."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import TINY_TRAIN, compose

from naqs_cli import store, tasks
from naqs_cli.train import loop


class FakeClock:
    """The loop's `time` module with a clock that advances 0.1 s at every reading, so runs
    end after the same steps on every machine, however loaded."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.1
        return self.now


@pytest.fixture(autouse=True)
def _fake_clock(monkeypatch):
    monkeypatch.setattr(loop, "time", FakeClock())


BUDGET = [*TINY_TRAIN, "train.steps=1000000", "train.log_every=5", "train.final_samples=64"]


def _stopped(run) -> str:
    with h5py.File(run / "history.h5", "r") as f:
        return str(f.attrs["stopped"])


def test_budget_ends_the_run_then_resume_continues_it(tmp_path):
    run = tmp_path / "run"
    result = tasks.train(compose("train", [*BUDGET, "train.time_budget=1.5"]), run)
    state = store.load_checkpoint(run)
    history = store.read_history(run / "history.h5")
    steps = state["step"]
    assert 0 < steps < 1_000_000
    assert list(history["step"]) == list(range(steps)), "every step recorded once"
    assert state["elapsed"] >= 1.5, "stopped only once the budget was spent"
    assert history["wall_time"][-2] < 1.5 <= history["wall_time"][-1], "at the first step past it"
    assert _stopped(run) == "time_budget"
    assert "time budget spent" in result.summary
    assert store.read_group(run / "history.h5", "final")["n_samples"] == 64

    resume = [f"resume={run}"]
    again = tasks.train(compose("train", resume), tmp_path / "unused", overrides=resume)
    assert store.load_checkpoint(run)["step"] == steps, "a spent budget adds no step"
    assert np.isfinite(again.values["energy"])

    longer = [f"resume={run}", "train.time_budget=3"]
    tasks.train(compose("train", longer), tmp_path / "unused", overrides=longer)
    resumed = store.load_checkpoint(run)
    assert resumed["step"] > steps and resumed["elapsed"] >= 3
    assert list(store.read_history(run / "history.h5")["step"]) == list(range(resumed["step"]))
    assert _stopped(run) == "time_budget"


def test_steps_end_a_run_before_its_budget(tmp_path):
    tasks.train(compose("train", [*TINY_TRAIN, "train.steps=3", "train.time_budget=600"]), tmp_path)
    assert store.load_checkpoint(tmp_path)["step"] == 3
    assert _stopped(tmp_path) == "steps"


def test_budget_follows_cosine_on_elapsed_time(tmp_path):
    """With a budget the cosine learning rate follows the clock, not the step count."""
    overrides = [*BUDGET, "train.time_budget=1.5", "optim.schedule=cosine", "optim.lr=0.01"]
    tasks.train(compose("train", overrides), tmp_path)
    history = store.read_history(tmp_path / "history.h5")
    lr, wall = history["lr"], history["wall_time"]
    assert 0.0098 < lr[0] <= 0.01 and np.all(np.diff(lr) <= 0)
    # the lr of step i follows the clock at its start, which is the end of step i - 1
    expected = 0.005 * (1 + np.cos(np.pi * np.minimum(wall[:-1] / 1.5, 1)))
    assert np.all(lr[1:] <= expected + 1e-12), "each lr is set at or after the previous row"
    assert lr[-1] < 0.01 * 0.5 * (1 + np.cos(np.pi * 0.5)), "the last steps run past half-time"
