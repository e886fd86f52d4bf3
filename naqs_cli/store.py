"""HDF5 history files and atomic checkpoints.

`history.h5` is opened, appended and closed at every flush, so a killed run leaves a valid
file holding every step up to the last flush. Checkpoints are `torch.save` dicts of tensors
and plain Python values only (so `torch.load(weights_only=True)` reads them), written to a
temporary file in the same directory, fsynced, then atomically renamed over the old one.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np
import torch

from naqs_cli.errors import CheckpointError

#: Bumped whenever the checkpoint layout changes incompatibly.
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KEYS = ("format_version", "config", "model", "step")


def non_finite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Return the names of floating-point tensors holding NaN or ±inf anywhere in `state`.

    Args:
        state: nested dicts, lists and tuples of tensors and plain values (a state dict).
        prefix: name of `state` itself, for the returned paths.
    """
    if isinstance(state, torch.Tensor):
        bad = state.is_floating_point() or state.is_complex()
        return [prefix or "tensor"] if bad and not bool(torch.isfinite(state).all()) else []
    items: Any = ()
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    names: list[str] = []
    for key, value in items:
        names += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return names


# --- checkpoints -------------------------------------------------------------------------
def state_digest(state: Any) -> str:
    """Return a BLAKE2b digest of every tensor's bytes and every plain value in `state`.

    Stored in each checkpoint under "digest": torch's zip reader does not notice flipped bytes
    inside tensor data, so corruption would otherwise load as silently wrong weights.
    """
    digest = hashlib.blake2b(digest_size=16)

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            digest.update(b"{")
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed(state)
    return digest.hexdigest()


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

    A crash or kill at any moment leaves either the previous file or the new one at `path`,
    never a partial one; a temporary file left by a killed writer is removed by the next write.

    Args:
        path: destination; its directory is created if needed.
        state: tensors and plain Python values only.

    Raises:
        OSError: with the path in the message; the previous file at `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        state = {k: v for k, v in state.items() if k != "digest"}
        state["digest"] = state_digest(state)
        with open(tmp, "wb") as f:
            _write_checkpoint_file(f, state)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = err.strerror or str(err)
        raise OSError(err.errno, f"could not write checkpoint {path}: {reason}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_checkpoint_file(file: BinaryIO, state: Mapping[str, Any]) -> None:
    """Serialize `state` into the open temporary file of `save_checkpoint` (not yet synced).

    Args:
        file: the temporary file, opened for binary writing; `file.name` is its path.
        state: the checkpoint, its digest included.
    """
    torch.save(state, file)


def load_checkpoint(
    path: Path | str,
    map_location: str | torch.device = "cpu",
    allow_unverified: bool = False,
) -> dict:
    """Read and check a checkpoint.

    Only tensors and plain Python values are unpickled (`weights_only=True`), so a crafted
    file cannot run code; the stored digest (see `state_digest`) catches flipped bytes. Every
    checkpoint naqs writes carries a digest, so a file without one was written by another
    program or edited, and is refused unless `allow_unverified`.

    Args:
        path: the checkpoint file, or a run directory (its `checkpoints/last.pt` is read).
        map_location: where tensors are loaded.
        allow_unverified: accept a checkpoint that carries no digest (the user trusts it).

    Raises:
        CheckpointError: missing, truncated/corrupted, of another format version, lacking
            the keys this version writes, or without a digest (unless `allow_unverified`);
            the message names the file.
    """
    path = resolve_checkpoint(path)
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for bad files
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated, corrupted or not a naqs checkpoint"
            f" ({_load_error_detail(err)})"
        ) from err
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} is not a naqs checkpoint (missing keys)")
    if state["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state['format_version']!r}; this naqs reads"
            f" version {CHECKPOINT_FORMAT_VERSION}"
        )
    digest = state.pop("digest", None)
    if digest is None and not allow_unverified:
        raise CheckpointError(
            f"{path} carries no checksum (naqs writes one into every checkpoint, so this file"
            " was written by another program, or edited); if you trust it, re-run with"
            " allow_unverified_checkpoint=true"
        )
    if digest is not None and digest != state_digest(state):
        raise CheckpointError(
            f"{path} is corrupted: its contents do not match the checksum written with it"
        )
    model = state["model"]
    if (
        not isinstance(state["config"], dict)
        or not isinstance(model, dict)
        or not all(isinstance(v, torch.Tensor) for v in model.values())
        or not isinstance(state["step"], int)
        or isinstance(state["step"], bool)
        or state["step"] < 0
    ):
        raise CheckpointError(f"{path} is not a naqs checkpoint (malformed config, model or step)")
    return state


def map_rng_states(
    state: Mapping[str, Any], device: torch.device | str, path: Path | str | None = None
) -> dict:
    """Return a copy of checkpoint `state` whose random states can be restored on `device`.

    `torch.set_rng_state` and `torch.Generator.set_state` take CPU byte tensors only (for a
    CUDA generator too), while a checkpoint loaded with `map_location` on a GPU holds them
    there: the torch RNG states ("rng") and the samplers' generator states go to the CPU, the
    Markov chain states ("x") to `device`. Model and optimizer tensors are left where
    `map_location` put them (their `load_state_dict` places them by the parameters).

    Call it right after `load_checkpoint`, before anything is built from the checkpoint, so
    that a run whose samplers drew on another device type is refused at once.

    Args:
        state: a checkpoint as `load_checkpoint` returns it (not modified).
        device: where training continues (the sampler generators live there).
        path: the checkpoint file, named in the error message.

    Raises:
        CheckpointError: a sampler generator state was saved on another device type (one line
            naming the `device=` to resume with).
    """
    mapped = dict(state)
    if isinstance(state.get("rng"), (list, tuple)):
        mapped["rng"] = [_to(rng, "cpu") for rng in state["rng"]]
    if isinstance(state.get("sampler"), (list, tuple)):
        samplers = []
        for sampler in state["sampler"]:
            if isinstance(sampler, Mapping):
                sampler = dict(sampler)
                if isinstance(sampler.get("generator"), torch.Tensor):
                    sampler["generator"] = sampler["generator"].cpu()
                    problem = _generator_state_problem(sampler["generator"], device, path)
                    if problem is not None:
                        raise CheckpointError(f"{path}: {problem}" if path else problem)
                if "x" in sampler:
                    sampler["x"] = _to(sampler["x"], device)
            samplers.append(sampler)
        mapped["sampler"] = samplers
    return mapped


def restore_generator(generator: torch.Generator, saved: torch.Tensor) -> None:
    """Set `generator` to a state its `get_state` returned (the tensor on any device).

    Raises:
        CheckpointError: the state belongs to a generator of another device type (one line
            naming the `device=` to resume with).
    """
    problem = _generator_state_problem(saved, generator.device)
    if problem is not None:
        raise CheckpointError(problem)
    generator.set_state(saved.cpu())


def _generator_state_problem(
    saved: torch.Tensor, device: torch.device | str, path: Path | str | None = None
) -> str | None:
    """Return why a `torch.Generator` on `device` cannot take the state `saved` (None if it can).

    `path`, the checkpoint, is named in the advice to start anew from its weights.

    A CPU generator (Mersenne Twister, 5056 bytes of state) and a CUDA one (Philox: seed and
    offset, 16 bytes) cannot continue each other's streams; `set_state` refuses the other's.
    """
    target = torch.device(device).type
    try:
        torch.Generator(device=device).set_state(saved.cpu())
    except (RuntimeError, TypeError) as err:
        cpu_size = torch.Generator().get_state().numel()
        source = "cpu" if saved.numel() == cpu_size else "cuda"
        if source == target:
            return f"the sampler's random state is malformed ({_load_error_detail(err)})"
        return (
            f"its sampler random state was drawn on {source} and a {target} generator cannot"
            f" continue it: resume with device={source}, or start a new run on {target} from"
            f" its weights with train.init_from={path or '<this checkpoint>'}"
        )
    return None


def _to(value: Any, device: torch.device | str) -> Any:
    """Return `value` on `device` if it is a tensor, else unchanged."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _load_error_detail(err: Exception) -> str:
    """Return the informative line of a torch.load error (not its weights_only=False advice)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        wanted = [ln for ln in lines if "GLOBAL" in ln or ln.startswith("Unsupported")]
        what = wanted[0] if wanted else "objects other than tensors and plain values"
        return f"{what[:160].rstrip('.')}; refused without running it"
    return lines[0][:160] if lines else type(err).__name__


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
            with self._open("w") as f:
                for key, value in (attrs or {}).items():
                    if value is not None:
                        f.attrs[key] = value
                f.create_group(self.GROUP)

    def _open(self, mode: str) -> h5py.File:
        # No HDF5 file lock: a reader holding the file open (a notebook, h5ls) must not make
        # the next flush fail; the writer is the only one that changes the file.
        try:
            return h5py.File(self.path, mode, locking=False)
        except OSError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OSError(err.errno, f"could not open history {self.path}: {reason}") from err

    def append(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append equal-length columns and close the file (so a kill leaves it valid).

        Raises:
            OSError: the file cannot be opened or written (message names it).
        """
        lengths = {len(v) for v in rows.values()}
        assert len(lengths) == 1, f"columns of unequal length: {lengths}"
        n_new = lengths.pop()
        if n_new == 0:
            return
        with self._open("a") as f:
            try:
                group = f.require_group(self.GROUP)
                n_old = _n_rows(group)
                for name, values in rows.items():
                    self._write_column(group, name, np.asarray(values), n_old)
                for name in group:  # columns absent from this flush keep equal length
                    if group[name].shape[0] != n_old + n_new:
                        group[name].resize((n_old + n_new,))
                f.flush()
            except OSError as err:
                raise OSError(err.errno, f"could not write history {self.path}: {err}") from err

    @staticmethod
    def _write_column(group: h5py.Group, name: str, values: np.ndarray, start: int) -> None:
        """Write `values` as rows `start`, `start + 1`, ... of column `name` (created if new,
        its earlier rows NaN or 0)."""
        if name not in group:
            group.create_dataset(
                name,
                shape=(start,),
                maxshape=(None,),
                dtype=values.dtype,
                chunks=(1024,),
                fillvalue=np.nan if values.dtype.kind == "f" else 0,
            )
        dset = group[name]
        dset.resize((start + len(values),))
        dset[start:] = values

    def truncate_from(self, step: int) -> int:
        """Drop rows whose `step` is ≥ `step` (a resumed run recomputes them); return kept rows.

        Columns of unequal length (a writer killed mid-append by an older version) are cut to
        the shortest, so every kept row is complete.
        """
        with self._open("a") as f:
            group = f.require_group(self.GROUP)
            if "step" not in group:
                return 0
            steps = group["step"][:]
            keep = min(
                int(np.searchsorted(steps, step, side="left")),
                *(group[name].shape[0] for name in group),
            )
            for name in group:
                group[name].resize((keep,))
            return keep

    def write_group(self, name: str, values: Mapping[str, Any], attrs: Mapping | None = None):
        """Replace group `name` with scalar or array datasets `values`."""
        write_group(self.path, name, values, attrs)


def _n_rows(group: h5py.Group) -> int:
    """Return the number of complete rows (the shortest column)."""
    return min((group[name].shape[0] for name in group), default=0)


def write_group(
    path: Path, name: str, values: Mapping[str, Any], attrs: Mapping[str, Any] | None = None
) -> None:
    """Replace group `name` in the HDF5 file `path` (created if missing) with `values`."""
    with h5py.File(path, "a", locking=False) as f:
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
    with h5py.File(path, "a", locking=False) as f:
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value


def read_history(path: Path) -> dict[str, np.ndarray]:
    """Return the `history/` columns of a history file as arrays of equal length.

    A writer killed inside an append can leave some columns longer than others; only the
    complete rows (the shortest column) are returned.
    """
    with h5py.File(path, "r", locking=False) as f:
        group = f.get(HistoryWriter.GROUP, {})
        n_rows = min((group[name].shape[0] for name in group), default=0)
        return {name: group[name][:n_rows] for name in group}


def read_group(path: Path, name: str) -> dict[str, Any]:
    """Return the datasets of group `name` (scalars as Python floats)."""
    with h5py.File(path, "r") as f:
        group = f[name]
        out: dict[str, Any] = {}
        for key in group:
            value = group[key][()]
            out[key] = value.item() if np.ndim(value) == 0 else value
        return out
