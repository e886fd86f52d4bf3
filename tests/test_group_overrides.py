"""A config-group override takes one option name: anything else is one line and exit code 2.

Hydra itself ends ``sampler=[1,2]`` in a TypeError traceback, merges ``sampler={...}`` as
config values and ignores a misspelt option of an optional group (evaluate's ``sampler``);
`cli.check_overrides` refuses each before composition, naming the override.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from naqs_cli.cli import check_overrides

OLD_RUN = Path(__file__).resolve().parent / "fixtures" / "old_run"
ONE_OPTION = "a config group takes one option name"

#: (group, a value that is not one option name): every group, every kind of value.
NOT_AN_OPTION = [
    ("lattice", "[1,2]"),
    ("ham", "{a: 1}"),
    ("model", "3"),
    ("sampler", "null"),
    ("optim", "[]"),
    ("experiment", "[smoke]"),
    ("sampler", "1.5"),
    ("sampler", "true"),
    ("sampler", "[direct,mcmc]"),
    ("sampler", "{n_samples: 4}"),
]


def _assert_one_line(message: str | None) -> str:
    assert message is not None
    assert message.strip() and "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize(("group", "value"), NOT_AN_OPTION)
def test_train_group_takes_one_option_name(group, value):
    message = _assert_one_line(check_overrides("train", [f"{group}={value}"]))
    assert message.startswith(f"{group}={value}: {ONE_OPTION}"), message


@pytest.mark.parametrize("value", ["[1,2]", "{a: 1}", "null", "7"])
def test_evaluate_sampler_takes_one_option_name(value):
    message = check_overrides("evaluate", [f"checkpoint={OLD_RUN}", f"sampler={value}"])
    assert _assert_one_line(message).startswith(f"sampler={value}: {ONE_OPTION}"), message


def test_compare_training_and_exact_groups_take_one_option_name():
    for task, group in (("compare_training", "sampler"), ("exact", "ham")):
        message = _assert_one_line(check_overrides(task, [f"{group}=[1,2]"]))
        assert message.startswith(f"{group}=[1,2]: {ONE_OPTION}"), message


def test_misspelt_option_of_an_optional_group_is_refused():
    """evaluate's sampler group is optional: Hydra alone would silently ignore the typo."""
    message = check_overrides("evaluate", [f"checkpoint={OLD_RUN}", "sampler=gibbs"])
    assert (
        _assert_one_line(message)
        == "sampler=gibbs: no such option; allowed: direct | fullsum | mcmc"
    )


def test_several_options_need_a_sweep():
    message = _assert_one_line(check_overrides("train", ["sampler=direct,mcmc"]))
    assert message.startswith(f"sampler=direct,mcmc: {ONE_OPTION}") and "-m" in message
    sweep = ["optim=adam", "sampler=direct,fullsum"]  # MinSR refuses full sums of 16 sites
    assert check_overrides("train", sweep, flags=["-m"]) is None
    message = check_overrides("train", ["sampler=direct,[1,2]"], flags=["-m"])
    assert _assert_one_line(message).startswith(f"sampler=[1,2]: {ONE_OPTION}"), message


def test_valid_group_choices_pass():
    assert check_overrides("train", ["sampler=mcmc", "optim=sgd", "model=dense"]) is None
    assert check_overrides("train", ["experiment=smoke", "~experiment"]) is None
    assert check_overrides("evaluate", [f"checkpoint={OLD_RUN}", "sampler=fullsum"]) is None


def test_unparsable_override_is_named():
    message = _assert_one_line(check_overrides("train", ["ham.gamma=x=y"]))
    assert message.startswith("ham.gamma=x=y: cannot be parsed"), message


def test_bad_interpolation_names_the_key():
    message = _assert_one_line(check_overrides("train", ["model.symmetry=${oops}"]))
    assert message.startswith("model.symmetry: "), message


@pytest.mark.parametrize(
    "args",
    [("train", "sampler=[1,2]"), ("evaluate", str(OLD_RUN), "sampler=[1,2]")],
    ids=["train", "evaluate"],
)
def test_cli_group_list_is_one_line_exit_2(args, tmp_path):
    result = run_cli(*args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"naqs {args[0]}: error: sampler=[1,2]: {ONE_OPTION}"), lines
    assert not (tmp_path / "outputs").exists()


def test_several_values_of_a_key_need_a_sweep():
    message = _assert_one_line(check_overrides("train", ["ham.gamma=2,3"]))
    assert message.startswith("ham.gamma=2,3: several values; add -m"), message


def test_preset_of_another_command_names_the_preset():
    message = _assert_one_line(check_overrides("train", ["experiment=fig3_tfim_small"]))
    assert message.startswith("experiment=fig3_tfim_small: Key 'compare' not in"), message
