"""Stages and learning-rate schedules, on steps and on the elapsed fraction of a time budget."""

from __future__ import annotations

import math

import pytest

from naqs_cli.train.schedule import Schedule, Stage, make_stages

STAGES = make_stages(
    [{"steps": 10, "n_samples": 8, "lr": 0.1}, {"steps": 30, "n_samples": 32, "lr": 0.01}], 0, 0, 0
)


def test_make_stages_from_single_keys_and_lists():
    assert make_stages(None, 5, 64, 0.02) == (Stage(0, 5, 64, 0.02),)
    assert (Stage(0, 10, 8, 0.1), Stage(10, 30, 32, 0.01)) == STAGES
    assert Schedule(STAGES).total_steps == 40


@pytest.mark.parametrize("step", [0, 3, 9, 10, 25, 39, 40])
def test_cosine_on_steps_restarts_in_each_stage(step):
    index, stage, lr = Schedule(STAGES, kind="cosine").at(step, lr_scale=0.5)
    expected_stage = 0 if step < 10 else 1
    assert index == expected_stage and stage is STAGES[expected_stage]
    t, length = step - stage.start, stage.steps
    assert lr == stage.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, length) / length)) * 0.5


def test_step_decay_on_steps():
    schedule = Schedule((Stage(0, 100, 8, 1.0),), kind="step", step_every=30, step_factor=0.5)
    assert [schedule.at(s)[2] for s in (0, 29, 30, 59, 60, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.125]


def test_constant_ignores_time():
    schedule = Schedule(STAGES, time_budget=100.0)
    assert schedule.at(0, elapsed=5.0)[2] == 0.1
    assert schedule.at(0, elapsed=60.0)[2] == 0.01


@pytest.mark.parametrize(
    ("elapsed", "index", "fraction"),
    [
        (0.0, 0, 0.0),
        (12.5, 0, 0.5),
        (25.0, 1, 0.0),
        (62.5, 1, 0.5),
        (100.0, 1, 1.0),
        (150.0, 1, 1.0),
    ],
)
def test_budget_runs_stages_and_cosine_on_the_elapsed_fraction(elapsed, index, fraction):
    """Stage i holds its share of the steps as its share of the budget (10/40, then 30/40)."""
    schedule = Schedule(STAGES, kind="cosine", time_budget=100.0)
    got_index, stage, lr = schedule.at(step=7, elapsed=elapsed)
    assert got_index == index
    assert lr == pytest.approx(stage.lr * 0.5 * (1.0 + math.cos(math.pi * fraction)), abs=1e-15)


def test_budget_step_decay_uses_the_equivalent_step():
    schedule = Schedule((Stage(0, 100, 8, 1.0),), kind="step", step_every=30, time_budget=10.0)
    assert schedule.at(step=0, elapsed=2.9)[2] == 1.0  # 29 % of the stage: step 29
    assert schedule.at(step=0, elapsed=3.1)[2] == 0.5  # step 31
