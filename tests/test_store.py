"""HDF5 history and checkpoint round trips, atomic writes and clear errors on bad files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from naqs_cli import store
from naqs_cli.hamiltonians import TransverseFieldIsing
from naqs_cli.lattice import SquareLattice
from naqs_cli.samplers.direct import DirectSampler
from naqs_cli.samplers.metropolis import MetropolisSampler

#: A run written by the previous version of naqs.
OLD_RUN = Path(__file__).resolve().parent / "fixtures" / "old_run"


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


def _checkpoint(**extra) -> dict:
    """Return a minimal checkpoint state (what `load_checkpoint` requires, plus `extra`)."""
    return {
        "format_version": store.CHECKPOINT_FORMAT_VERSION,
        "config": {"a": 1},
        "model": {"w": torch.arange(3.0)},
        "step": 2,
        **extra,
    }


def test_every_written_checkpoint_carries_a_digest(tmp_path):
    path = tmp_path / "last.pt"
    store.save_checkpoint(path, _checkpoint())
    assert torch.load(path, weights_only=True)["digest"] == store.state_digest(_checkpoint())
    # Written by the previous version: it has a digest, so it keeps loading.
    old = torch.load(OLD_RUN / "checkpoints" / "last.pt", weights_only=True)
    assert isinstance(old.get("digest"), str)
    assert store.load_checkpoint(OLD_RUN)["step"] == old["step"]


def test_checkpoint_without_digest_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save(_checkpoint(), path)  # another program: a valid layout, but no digest
    with pytest.raises(store.CheckpointError) as refused:
        store.load_checkpoint(path)
    message = str(refused.value)
    assert "\n" not in message
    assert str(path) in message and "carries no checksum" in message
    assert "another program, or edited" in message
    assert " allow_unverified_checkpoint=true" in message
    state = store.load_checkpoint(path, allow_unverified=True)
    assert state["step"] == 2 and torch.equal(state["model"]["w"], torch.arange(3.0))


def test_tampered_checkpoint_is_refused_even_when_unverified_is_allowed(tmp_path):
    path = tmp_path / "last.pt"
    store.save_checkpoint(path, _checkpoint())
    state = torch.load(path, weights_only=True)
    state["model"]["w"][0] = 5.0  # edited, the old digest kept
    torch.save(state, path)
    for allow in (False, True):
        with pytest.raises(store.CheckpointError, match="last.pt is corrupted"):
            store.load_checkpoint(path, allow_unverified=allow)


def test_checkpoint_write_seam_failure_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    store.save_checkpoint(path, _checkpoint())
    write = store._write_checkpoint_file

    def half_then_full_disk(file, state):
        write(file, state)
        file.truncate(file.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write_checkpoint_file", half_then_full_disk)
    with pytest.raises(OSError, match=f"could not write checkpoint {path}: No space left"):
        store.save_checkpoint(path, _checkpoint(step=3))
    assert store.load_checkpoint(path)["step"] == 2
    assert not list(tmp_path.glob(".*tmp*"))


def test_history_column_seam_failure_keeps_complete_rows(tmp_path, monkeypatch):
    path = tmp_path / "history.h5"
    writer = store.HistoryWriter(path)
    writer.append({"step": np.arange(3), "energy": np.zeros(3)})
    write = store.HistoryWriter._write_column

    def fail_after_step(group, name, values, start):
        write(group, name, values, start)
        if name == "step":
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(store.HistoryWriter, "_write_column", staticmethod(fail_after_step))
    with pytest.raises(OSError, match=f"could not write history {path}"):
        writer.append({"step": np.arange(3, 5), "energy": np.ones(2)})
    monkeypatch.undo()
    assert list(store.read_history(path)["step"]) == [0, 1, 2]
    writer.truncate_from(3)
    writer.append({"step": np.arange(3, 5), "energy": np.ones(2)})
    history = store.read_history(path)
    assert list(history["step"]) == list(range(5)) and list(history["energy"]) == [0] * 3 + [1] * 2


# --- random states across devices ---------------------------------------------------------
def _metropolis(seed: int) -> MetropolisSampler:
    lattice = SquareLattice(Lx=2, Ly=2, pbc=False)
    hamiltonian = TransverseFieldIsing(lattice=lattice, J=1.0, gamma=1.0)
    return MetropolisSampler(hamiltonian=hamiltonian, n_chains=2, seed=seed)


def _cuda_generator_state(seed: int = 7, offset: int = 12) -> torch.Tensor:
    """The state layout `torch.Generator("cuda").get_state()` returns (Philox seed, offset)."""
    return torch.tensor([seed, offset], dtype=torch.int64).view(torch.uint8)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    direct, chains = DirectSampler(seed=3), _metropolis(seed=4)
    chains.set_chains(torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.int8), burn_in=False)
    torch.rand(5, generator=direct.generator)
    path = tmp_path / "last.pt"
    streams = {"sampler": [direct.state_dict(), chains.state_dict()]}
    store.save_checkpoint(path, _checkpoint(rng=[torch.get_rng_state()], **streams))
    loaded = store.load_checkpoint(path)
    mapped = store.map_rng_states(loaded, "cpu", path)
    assert mapped is not loaded and mapped["sampler"] is not loaded["sampler"]
    assert mapped["rng"][0].device.type == "cpu" and mapped["model"] is loaded["model"]
    again, chains_again = DirectSampler(seed=99), _metropolis(seed=99)
    again.load_state_dict(mapped["sampler"][0])
    chains_again.load_state_dict(mapped["sampler"][1])
    torch.set_rng_state(mapped["rng"][0])
    expected = torch.rand(4, generator=direct.generator)
    assert torch.equal(torch.rand(4, generator=again.generator), expected)
    expected = torch.rand(4, generator=chains.generator)
    assert torch.equal(torch.rand(4, generator=chains_again.generator), expected)
    assert torch.equal(chains_again.x, chains.x)
    assert chains_again.needs_burn_in == chains.needs_burn_in


def test_generator_state_from_another_device_is_refused_naming_device(tmp_path):
    path = tmp_path / "last.pt"
    state = _checkpoint(
        rng=[torch.get_rng_state()], sampler=[{"generator": _cuda_generator_state()}]
    )
    with pytest.raises(store.CheckpointError) as refused:
        store.map_rng_states(state, torch.device("cpu"), path)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert "drawn on cuda" in message and "resume with device=cuda" in message
    assert f"train.init_from={path}" in message
    for sampler in (DirectSampler(seed=1), _metropolis(seed=1)):
        before = sampler.generator.get_state()
        with pytest.raises(store.CheckpointError, match="resume with device=cuda"):
            sampler.load_state_dict({"generator": _cuda_generator_state(), "x": None})
        assert torch.equal(sampler.generator.get_state(), before), "left untouched"
    with pytest.raises(store.CheckpointError, match="random state is malformed"):
        store.restore_generator(torch.Generator(), torch.zeros(5056))


@pytest.mark.gpu
def test_generator_states_between_cpu_and_cuda(tmp_path):
    cuda = torch.device("cuda")
    on_gpu = DirectSampler(seed=5, device=cuda)
    path = tmp_path / "last.pt"
    store.save_checkpoint(
        path, _checkpoint(rng=[torch.get_rng_state()], sampler=[on_gpu.state_dict()])
    )
    # Rolled back on the GPU: every tensor loads there; the random states go back to the CPU.
    mapped = store.map_rng_states(store.load_checkpoint(path, map_location=cuda), cuda, path)
    assert mapped["rng"][0].device.type == "cpu"
    torch.set_rng_state(mapped["rng"][0])
    again = DirectSampler(seed=0, device=cuda)
    again.load_state_dict(mapped["sampler"][0])
    expected = torch.rand(4, generator=on_gpu.generator, device=cuda)
    assert torch.equal(torch.rand(4, generator=again.generator, device=cuda), expected)
    # Resumed on the CPU (or a CPU run on the GPU): refused at once, naming the device.
    with pytest.raises(store.CheckpointError, match="resume with device=cuda"):
        store.map_rng_states(store.load_checkpoint(path), "cpu", path)
    on_cpu = {"generator": DirectSampler(seed=5).state_dict()["generator"]}
    with pytest.raises(store.CheckpointError, match="resume with device=cpu"):
        store.map_rng_states(_checkpoint(sampler=[on_cpu]), cuda, path)
