"""The naqs command with test seams patched: ``python tests/hooked_cli.py HOOKSET ARGS...``.

Subprocess tests run this script instead of ``python -m naqs_cli``: it applies the patches of
HOOKSET in this process, then runs ``naqs ARGS...``. Being a script, it also runs under
torchrun (``torchrun ... tests/hooked_cli.py HOOKSET train ...``), each rank patching itself.

Hooksets (parameters come from environment variables, so a test sets them for one
subprocess):

- batches: append "step batch-size" to NAQS_TEST_BATCHES.RANK after each sampling;
- progress: write the current step to NAQS_TEST_PROGRESS before each training step;
- slow_checkpoint: progress, and stall inside the NAQS_TEST_NTH-th write of last.pt, its
  temporary file half written;
- failing_checkpoint: progress, and fail the NAQS_TEST_NTH-th write of last.pt with ENOSPC;
- slow_history: progress, and stall inside the NAQS_TEST_NTH-th HDF5 append, after its
  `step` column is written;
- nan_energies: every local energy NaN on the training steps in NAQS_TEST_CALLS ("6-8,14-");
- nan_parameters: a parameter filled with NaN after the updates in NAQS_TEST_CALLS.

A stalling patch creates NAQS_TEST_MARKER (holding its pid) and waits to be killed. Counters
count calls in this process, so a step repeated after a rollback or a resume is a new call.

The checkpoint and history patches replace `store._write_checkpoint_file` and
`store.HistoryWriter._write_column`; the training-step hooksets add callbacks to the training
loop (tests/hooks.py).
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

from naqs_cli import cli, store

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hooks  # noqa: E402  (tests/hooks.py, beside this script)

_COUNTS: dict[str, int] = {}


def _count(name: str) -> int:
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    return _COUNTS[name]


def _nth() -> int:
    return int(os.environ.get("NAQS_TEST_NTH", "1"))


def _stall() -> None:
    """Tell the test we are inside the write, then wait to be killed."""
    marker = os.environ.get("NAQS_TEST_MARKER")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    for _ in range(600):
        time.sleep(0.1)


def _nth_last_write(file: BinaryIO) -> bool:
    """Return whether `file` is the temporary file of the NAQS_TEST_NTH-th write of last.pt."""
    return "last.pt" in Path(file.name).name and _count("last.pt") == _nth()


# --- patches ------------------------------------------------------------------------------
def stall_in_checkpoint_write() -> None:
    """Stall inside the NAQS_TEST_NTH-th write of last.pt, its temporary file half written."""
    write = store._write_checkpoint_file

    def stalling(file: BinaryIO, state: Any) -> None:
        write(file, state)
        if _nth_last_write(file):
            file.flush()
            file.truncate(max(file.tell() // 2, 1))
            _stall()

    store._write_checkpoint_file = stalling


def fail_checkpoint_write() -> None:
    """Fail the NAQS_TEST_NTH-th write of last.pt with ENOSPC (a full disk)."""
    write = store._write_checkpoint_file

    def failing(file: BinaryIO, state: Any) -> None:
        write(file, state)
        if _nth_last_write(file):
            raise OSError(errno.ENOSPC, "No space left on device")

    store._write_checkpoint_file = failing


def stall_in_history_append() -> None:
    """Stall inside the NAQS_TEST_NTH-th HDF5 append, after its `step` column is written."""
    write = store.HistoryWriter._write_column

    def stalling(group: h5py.Group, name: str, values: np.ndarray, start: int) -> None:
        write(group, name, values, start)
        if name == "step" and _count("history") == _nth():
            _stall()

    store.HistoryWriter._write_column = staticmethod(stalling)


def record_progress() -> None:
    """Write the step about to run to NAQS_TEST_PROGRESS (when set) after each sampling."""
    if os.environ.get("NAQS_TEST_PROGRESS"):
        hooks.add_callbacks(hooks.RecordProgress(os.environ["NAQS_TEST_PROGRESS"]))


def record_batches() -> None:
    """Append each sampled batch's "step size" to NAQS_TEST_BATCHES.RANK."""
    hooks.add_callbacks(hooks.RecordBatches(os.environ["NAQS_TEST_BATCHES"]))


def nan_energies() -> None:
    """Every local energy NaN on the sampled batches listed in NAQS_TEST_CALLS."""
    hooks.add_callbacks(hooks.PoisonEnergies(os.environ.get("NAQS_TEST_CALLS", "")))


def nan_parameters() -> None:
    """A parameter filled with NaN after the updates listed in NAQS_TEST_CALLS."""
    hooks.add_callbacks(hooks.PoisonParameters(os.environ.get("NAQS_TEST_CALLS", "")))


#: Each hookset is the list of patches applied before the CLI runs.
HOOKSETS: dict[str, list[Callable[[], None]]] = {
    "progress": [record_progress],
    "batches": [record_batches],
    "slow_checkpoint": [record_progress, stall_in_checkpoint_write],
    "failing_checkpoint": [record_progress, fail_checkpoint_write],
    "slow_history": [record_progress, stall_in_history_append],
    "nan_energies": [record_progress, nan_energies],
    "nan_parameters": [nan_parameters],
}


def main(argv: list[str] | None = None) -> None:
    """Apply the patches of hookset argv[0], then run the naqs CLI on argv[1:]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in HOOKSETS:
        sys.exit(f"usage: hooked_cli.py {{{','.join(HOOKSETS)}}} NAQS-ARGS...")
    for patch in HOOKSETS[argv[0]]:
        patch()
    cli.main(argv[1:])


if __name__ == "__main__":
    main()
