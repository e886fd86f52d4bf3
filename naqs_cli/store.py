"""HDF5 history files and atomic checkpoints.

`history.h5` is opened, appended and closed at every flush, so a killed run leaves a valid
file holding every step up to the last flush. Checkpoints are `torch.save` dicts of tensors
and plain Python values only (so `torch.load(weights_only=True)` reads them), written to a
temporary file in the same directory, fsynced, then atomically renamed over the old one.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

#: Bumped whenever the checkpoint layout changes incompatibly.
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KEYS = ("format_version", "config", "model", "step")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another format or incompatible."""


def _test_hook(name: str) -> Callable[..., None] | None:
    """Return the test hook `name` named by NAQS_TEST_HOOKS=module:function, if any.

    Production code calls hooks at fixed points (e.g. in the middle of a checkpoint write);
    only tests set the variable.
    """
    spec = os.environ.get("NAQS_TEST_HOOKS")
    if not spec:
        return None
    module_name, _, function_name = spec.partition(":")
    hooks = getattr(importlib.import_module(module_name), function_name)()
    return hooks.get(name)


# --- checkpoints -------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write `state` to `path` atomically (temp file + fsync + rename).

    Args:
        path: destination; its directory is created if needed.
        state: tensors and plain Python values only.

    Raises:
        OSError: with the path in the message; the previous file at `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    hook = _test_hook("checkpoint_write")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            if hook is not None:
                hook(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, f"could not write checkpoint {path}: {err.strerror}") from err


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint.

    Args:
        path: the checkpoint file, or a run directory (its `checkpoints/last.pt` is read).
        map_location: where tensors are loaded.

    Raises:
        CheckpointError: missing, truncated/corrupted, of another format version, or lacking
            the keys this version writes; the message names the file.
    """
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated, corrupted or not a naqs checkpoint"
            f" ({first[:160]})"
        ) from err
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} is not a naqs checkpoint (missing keys)")
    if state["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state['format_version']!r}; this naqs reads"
            f" version {CHECKPOINT_FORMAT_VERSION}"
        )
    return state


def resolve_checkpoint(path: Path | str) -> Path:
    """Return the checkpoint file for a checkpoint path or a run directory.

    Raises:
        CheckpointError: nothing there.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pt"
        if not candidate.is_file():
            raise CheckpointError(f"run directory {path} holds no checkpoints/last.pt")
        return candidate.resolve()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path.resolve()


def run_dir_of(checkpoint: Path) -> Path:
    """Return the run directory that holds `checkpoint` (…/run/checkpoints/last.pt → …/run)."""
    checkpoint = Path(checkpoint).resolve()
    return (
        checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    )


# --- HDF5 ---------------------------------------------------------------------------------
class HistoryWriter:
    """Append-only per-step history in an HDF5 file, opened and closed at every flush.

    Args:
        path: the HDF5 file (created if missing).
        attrs: root attributes written when the file is created (config, seed, versions, ...).
    """

    GROUP = "history"

    def __init__(self, path: Path, attrs: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            with h5py.File(self.path, "w") as f:
                for key, value in (attrs or {}).items():
                    if value is not None:
                        f.attrs[key] = value
                f.create_group(self.GROUP)

    def append(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append equal-length columns and close the file (so a kill leaves it valid)."""
        lengths = {len(v) for v in rows.values()}
        assert len(lengths) == 1, f"columns of unequal length: {lengths}"
        n_new = lengths.pop()
        if n_new == 0:
            return
        with h5py.File(self.path, "a") as f:
            group = f.require_group(self.GROUP)
            n_old = _n_rows(group)
            for name, values in rows.items():
                values = np.asarray(values)
                if name not in group:
                    dset = group.create_dataset(
                        name,
                        shape=(n_old,),
                        maxshape=(None,),
                        dtype=values.dtype,
                        chunks=(1024,),
                        fillvalue=np.nan if values.dtype.kind == "f" else 0,
                    )
                dset = group[name]
                dset.resize((n_old + n_new,))
                dset[n_old:] = values
            for name in group:  # columns absent from this flush keep equal length
                if group[name].shape[0] < n_old + n_new:
                    group[name].resize((n_old + n_new,))
            f.flush()

    def truncate_from(self, step: int) -> int:
        """Drop rows whose `step` is ≥ `step` (a resumed run recomputes them); return kept rows."""
        with h5py.File(self.path, "a") as f:
            group = f.require_group(self.GROUP)
            if "step" not in group:
                return 0
            steps = group["step"][:]
            keep = int(np.searchsorted(steps, step, side="left"))
            for name in group:
                group[name].resize((keep,))
            return keep

    def write_group(self, name: str, values: Mapping[str, Any], attrs: Mapping | None = None):
        """Replace group `name` with scalar or array datasets `values`."""
        write_group(self.path, name, values, attrs)


def _n_rows(group: h5py.Group) -> int:
    return group["step"].shape[0] if "step" in group else 0


def write_group(
    path: Path, name: str, values: Mapping[str, Any], attrs: Mapping[str, Any] | None = None
) -> None:
    """Replace group `name` in the HDF5 file `path` (created if missing) with `values`."""
    with h5py.File(path, "a") as f:
        if name in f:
            del f[name]
        group = f.create_group(name)
        for key, value in values.items():
            if value is None:
                continue
            group.create_dataset(key, data=np.asarray(value))
        for key, value in (attrs or {}).items():
            if value is not None:
                group.attrs[key] = value
        f.flush()


def write_attrs(path: Path, attrs: Mapping[str, Any]) -> None:
    """Set root attributes of the HDF5 file `path` (created if missing)."""
    with h5py.File(path, "a") as f:
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value


def read_history(path: Path) -> dict[str, np.ndarray]:
    """Return the `history/` columns of a history file as arrays."""
    with h5py.File(path, "r") as f:
        group = f.get(HistoryWriter.GROUP, {})
        return {name: group[name][:] for name in group}


def read_group(path: Path, name: str) -> dict[str, Any]:
    """Return the datasets of group `name` (scalars as Python floats)."""
    with h5py.File(path, "r") as f:
        group = f[name]
        out: dict[str, Any] = {}
        for key in group:
            value = group[key][()]
            out[key] = value.item() if np.ndim(value) == 0 else value
        return out
