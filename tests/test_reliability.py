"""Interruption, kills, non-finite numbers and failed writes, through the real CLI.

Slow or failing writes and NaNs come from tests/hooked_cli.py, which patches the write
functions of `naqs_cli.store` (and adds the training-loop test callbacks of tests/hooks.py) before
it runs the CLI; production code has no sleeps. Every subprocess costs a few seconds of
imports, so each test strings several runs together on one run directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hooks
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_TRAIN, compose, make_trainer, run_cli

from naqs_cli import store
from naqs_cli.train import callbacks as callbacks_module
from naqs_cli.train.signals import SignalCatcher

#: Runs the CLI with the patches of a hookset: python tests/hooked_cli.py HOOKSET ARGS...
HOOKED_CLI = str(ROOT / "tests" / "hooked_cli.py")
TINY = [*TINY_TRAIN, "train.final_samples=0"]
#: Seconds to wait for a subprocess to reach a point (imports are slow on loaded CPUs).
WAIT = 180


def _params(**values: object) -> dict[str, str]:
    """Return the environment that passes `values` to the hooks (NAQS_TEST_<NAME>)."""
    env = {"OMP_NUM_THREADS": "1"}
    env.update({f"NAQS_TEST_{k.upper()}": str(v) for k, v in values.items()})
    return env


def _spawn(hookset: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    """Start `naqs ARGS` with the patches of `hookset` (see tests/hooked_cli.py)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, HOOKED_CLI, hookset, *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_hooked(hookset: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `naqs ARGS` with the patches of `hookset` to the end."""
    proc = _spawn(hookset, *args, env=env)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _progress_at_least(path: Path, step: int):
    def ready() -> bool:
        try:
            return int(path.read_text()) >= step
        except (OSError, ValueError):
            return False

    return ready


def _history_steps(run: Path, complete: bool = False) -> np.ndarray:
    """Read the `step` column of history.h5 with h5py, up to the last complete row.

    A kill inside an append may leave some columns longer than others (only the shortest
    counts); with `complete`, every column must have the same length.
    """
    with h5py.File(run / "history.h5", "r", locking=False) as f:
        group = f["history"]
        lengths = {group[name].shape[0] for name in group} or {0}
        assert not complete or len(lengths) == 1, f"columns of unequal length: {lengths}"
        return group["step"][: min(lengths)] if "step" in group else np.zeros(0, dtype=int)


def _checkpoint_step(run: Path, name: str = "last.pt") -> int:
    state = torch.load(run / "checkpoints" / name, weights_only=True)
    assert not store.non_finite_tensors(state["model"]), f"{name} holds NaN weights"
    return int(state["step"])


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# --- signals and kills, one run directory -------------------------------------------------
def _stop_with(sig: signal.Signals, run: Path, progress: Path, steps_on: int) -> int:
    """Resume the run, send `sig` after `steps_on` more steps; return the step it stopped at."""
    start = int(progress.read_text())
    proc = _spawn("progress", "train", f"resume={run}", env=_params(progress=progress))
    _wait_for(proc, _progress_at_least(progress, start + steps_on), "more training steps")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 128 + sig, err
    line = _one_line(err)
    step = _checkpoint_step(run)
    assert f"{sig.name}: stopped at step {step}/100000" in line, line
    assert f"checkpoint and history saved in {run}" in line, line
    assert line.endswith(f"Resume with: naqs train resume={run}"), line
    assert list(_history_steps(run, complete=True)) == list(range(step)), "each step once"
    return step


def test_kills_and_signals_then_resume_without_duplicates(tmp_path):
    run, progress, marker = tmp_path / "run", tmp_path / "progress", tmp_path / "marker"
    args = [*TINY, "train.steps=100000", "train.log_every=2", "train.checkpoint_every=4"]

    # SIGKILL during the third write of last.pt (steps 0, 4, then 8), its temp file half done.
    env = _params(progress=progress, marker=marker, nth=3)
    proc = _spawn("slow_checkpoint", "train", *args, f"hydra.run.dir={run}", env=env)
    _wait_for(proc, marker.exists, "the slow checkpoint write")
    proc.kill()
    proc.wait()
    assert _checkpoint_step(run) == 4, "the previous last.pt survives a kill during a write"
    assert list(_history_steps(run)) == list(range(8)), "flushed before the checkpoint"
    assert list((run / "checkpoints").glob(".last.pt.tmp-*")), "the kill hit the write"

    # Resumed at step 4; SIGKILL inside its second HDF5 append (steps 6 and 7).
    marker.unlink()
    env = _params(progress=progress, marker=marker, nth=2)
    proc = _spawn("slow_history", "train", f"resume={run}", env=env)
    _wait_for(proc, marker.exists, "the slow HDF5 append")
    proc.kill()
    proc.wait()
    assert list(_history_steps(run)) == list(range(6)), "only the append in progress is lost"
    assert _checkpoint_step(run) == 4

    # SIGINT, then SIGTERM: checkpoint, flush, one line with the step and the resume command.
    first = _stop_with(signal.SIGINT, run, progress, 6)
    second = _stop_with(signal.SIGTERM, run, progress, 3)
    assert second > first > 4

    # Resume to the end: every step exactly once, no temporary file left behind.
    total = second + 10
    proc = run_cli("train", f"resume={run}", f"train.steps={total}", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert list(_history_steps(run, complete=True)) == list(range(total))
    assert _checkpoint_step(run) == total
    assert not list((run / "checkpoints").glob(".*tmp*"))


def test_second_signal_waits_for_a_write_in_progress():
    with SignalCatcher() as catcher:
        os.kill(os.getpid(), signal.SIGINT)
        assert catcher.signal_name == "SIGINT" and catcher.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt), catcher.critical():
            os.kill(os.getpid(), signal.SIGINT)  # deferred until the block ends
            finished = True
        assert finished
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs before this returns


# --- non-finite numbers ---------------------------------------------------------------------
def test_nan_energies_roll_back_then_persistent_nan_stops(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "train.steps=40", "train.log_every=2", "train.checkpoint_every=4"]
    args += ["train.max_nonfinite=3", "train.max_rollbacks=2", f"hydra.run.dir={run}"]
    args += ["optim.lr=0.01"]
    # Steps 5-7 fail: back to step 4 at half the lr, recovered by step 8 (checkpoint); from
    # step 9 on everything fails: back to 8 twice, then a clear stop.
    proc = _run_hooked("nan_energies", "train", *args, env=_params(calls="6-8,14-"))
    assert proc.returncode == 3, proc.stderr
    line = _one_line(proc.stderr)
    assert "training diverged at step 10 (3 non-finite steps in a row)" in line, line
    assert "after 2 rollbacks" in line and "train.max_rollbacks=2" in line, line
    assert "lower optim.lr" in line and str(run / "checkpoints" / "last.pt") in line, line
    log = (run / "train.log").read_text()
    assert log.count("non-finite local energy, update skipped") == 3 + 9
    assert log.count("rolled back to step 4") == 1 and log.count("rolled back to step 8") == 2
    history = store.read_history(run / "history.h5")
    assert list(history["step"]) == list(range(10)), "no step twice after rollbacks"
    np.testing.assert_allclose(history["lr"][:8], [0.01] * 4 + [0.005] * 4)
    assert np.isfinite(history["energy"][:8]).all(), "rolled-back NaN rows are gone"
    state = store.load_checkpoint(run)
    assert state["step"] == 8 and state["scheduler"]["lr_scale"] == 0.5
    with h5py.File(run / "history.h5", "r") as f:
        assert f.attrs["stopped"] == "diverged"
    for name in ("last.pt", "best.pt"):
        _checkpoint_step(run, name)


def test_nan_parameters_are_never_saved(tmp_path, monkeypatch):
    defaults = callbacks_module.default_callbacks
    poison = hooks.PoisonParameters("3,7")
    monkeypatch.setattr(callbacks_module, "default_callbacks", lambda: [*defaults(), poison])
    overrides = [*TINY, "train.steps=8", "train.log_every=1", "train.checkpoint_every=2"]
    trainer = make_trainer(compose("train", overrides), tmp_path)
    with SignalCatcher() as catcher:
        trainer.run(catcher)  # the loop alone: no final evaluation or plot
    state = store.load_checkpoint(tmp_path)
    assert state["step"] == 8 and state["scheduler"]["lr_scale"] == 0.25
    assert not store.non_finite_tensors({"m": state["model"], "o": state["optimizer"]})
    best = store.load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert not store.non_finite_tensors(best["model"])
    assert list(store.read_history(tmp_path / "history.h5")["step"]) == list(range(8))


def test_save_refuses_non_finite_state(tmp_path):
    cfg = compose("train", [*TINY, "train.steps=1"])
    trainer = make_trainer(cfg, tmp_path)
    assert trainer.save() and trainer.saved_step == 0
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    assert not trainer.save("best.pt")
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    assert _checkpoint_step(tmp_path) == 0


# --- failed writes --------------------------------------------------------------------------
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "train.steps=20", "train.log_every=2", "train.checkpoint_every=4"]
    env = _params(nth=2)
    proc = _run_hooked("failing_checkpoint", "train", *args, f"hydra.run.dir={run}", env=env)
    assert proc.returncode == 1, proc.stderr
    line = _one_line(proc.stderr)
    assert f"could not write checkpoint {run / 'checkpoints' / 'last.pt'}" in line, line
    assert "No space left on device" in line and "previous checkpoint (step 0) is kept" in line
    assert f"naqs train resume={run}" in line
    assert _checkpoint_step(run) == 0
    assert not list((run / "checkpoints").glob(".*tmp*"))
    assert list(_history_steps(run)) == list(range(4))


# --- history file ---------------------------------------------------------------------------
def test_history_survives_a_reader_and_unequal_columns(tmp_path):
    path = tmp_path / "history.h5"
    writer = store.HistoryWriter(path, {"seed": 1})
    writer.append({"step": np.arange(4), "energy": np.zeros(4)})
    reader = subprocess.Popen(  # holds the file open (and HDF5-locked) like a notebook would
        [sys.executable, "-c", f"import h5py,sys,time; f=h5py.File({str(path)!r}); print(1)"
         "; sys.stdout.flush(); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert reader.stdout.readline().strip() == "1"
        writer.append({"step": np.arange(4, 6), "energy": np.ones(2)})
    finally:
        reader.kill()
        reader.wait()
    # A writer killed mid-append can leave columns of unequal length: only complete rows count.
    with h5py.File(path, "a") as f:
        f["history/step"].resize((7,))
        f["history/step"][6] = 6
    assert list(store.read_history(path)["step"]) == list(range(6))
    writer.append({"step": np.array([6]), "energy": np.array([2.0])})
    history = store.read_history(path)
    assert list(history["step"]) == list(range(7)) and history["energy"][-1] == 2.0
    assert writer.truncate_from(5) == 5
    assert {len(v) for v in store.read_history(path).values()} == {5}
