"""The collapse warning: a gradient of exactly 0 for `COLLAPSE_STEPS` steps in a row (every
sample the same configuration) gives one warning line naming what to change, once per run."""

from __future__ import annotations

import logging

from naqs_cli.train.callbacks import COLLAPSE_STEPS, HistoryRows


def _watch(history: HistoryRows, first_step: int, norms: list[float]) -> None:
    steps = list(range(first_step, first_step + len(norms)))
    history._watch_collapse({"step": steps, "grad_norm": norms})


def test_a_streak_of_zero_gradients_warns_once_across_log_points(caplog):
    history = HistoryRows()
    with caplog.at_level(logging.WARNING, logger="naqs_cli.train"):
        # 0.2, then zeros split over two log points: the streak carries over the flush.
        _watch(history, 0, [0.2] + [0.0] * (COLLAPSE_STEPS - 3))
        assert not caplog.records
        _watch(history, COLLAPSE_STEPS - 2, [0.0] * 2)
        assert not caplog.records  # COLLAPSE_STEPS - 1 zeros so far
        _watch(history, COLLAPSE_STEPS, [0.0] * 30)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith(f"steps 1-{COLLAPSE_STEPS}: the gradient was exactly 0")
    assert "optim.lr" in message and "optim.diag_shift" in message


def test_small_or_interrupted_gradients_do_not_warn(caplog):
    history = HistoryRows()
    norms = ([0.0] * (COLLAPSE_STEPS - 1) + [1e-12]) * 3 + [float("nan")] + [1e-30] * 50
    with caplog.at_level(logging.WARNING, logger="naqs_cli.train"):
        _watch(history, 0, norms)
    assert not caplog.records
