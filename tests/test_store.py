"""HDF5 history and checkpoint round trips, atomic writes and clear errors on bad files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from naqs_cli import store


def test_history_append_truncate_round_trip(tmp_path):
    path = tmp_path / "history.h5"
    writer = store.HistoryWriter(path, {"seed": 3, "config": "a: 1"})
    writer.append({"step": np.arange(5), "energy": np.linspace(0, 1, 5)})
    writer.append({"step": np.arange(5, 8), "energy": np.ones(3), "tau": np.ones(3)})
    h = store.read_history(path)
    assert list(h["step"]) == list(range(8))
    assert len(h["tau"]) == 8 and np.isnan(h["tau"][0])
    assert writer.truncate_from(6) == 6
    writer.append({"step": np.array([6]), "energy": np.array([2.0])})
    h = store.read_history(path)
    assert list(h["step"]) == [0, 1, 2, 3, 4, 5, 6]
    with h5py.File(path) as f:
        assert f.attrs["seed"] == 3


def test_checkpoint_round_trip_weights_only(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    state = {
        "format_version": store.CHECKPOINT_FORMAT_VERSION,
        "config": {"a": 1},
        "model": {"w": torch.ones(3)},
        "step": 7,
    }
    store.save_checkpoint(path, state)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert store.load_checkpoint(tmp_path)["step"] == 7  # a run directory works too
    assert not list(path.parent.glob(".*tmp*"))


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(store.CheckpointError, match="not found"):
        store.load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(store.CheckpointError, match="bad.pt"):
        store.load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"format_version": 99, "config": {}, "model": {}, "step": 0}, other)
    with pytest.raises(store.CheckpointError, match="version 99"):
        store.load_checkpoint(other)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    good = {"format_version": 1, "config": {}, "model": {}, "step": 1}
    store.save_checkpoint(path, good)

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="could not write checkpoint"):
        store.save_checkpoint(path, {**good, "step": 2})
    monkeypatch.undo()
    assert store.load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".*tmp*"))
