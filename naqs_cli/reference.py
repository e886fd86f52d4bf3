"""Reference energies for relative errors, with exact results cached on disk.

`find_reference` picks the exact ground state when it is computable (N ≤ ED_MAX_SITES, or a
TFIM chain with J > 0 through free fermions), else the literature value of the config's
`reference` section. Exact results come from `cached_ground_state`, which keeps one small JSON
file per (Hamiltonian, lattice, method) under `cache_dir()` — `$XDG_CACHE_HOME/naqs/exact`,
by default `~/.cache/naqs/exact` — so a 24-site ED runs once per machine, not once per run.

The cache key holds the Hamiltonian's kind and parameters (J and gamma, or the resolved sign
rule), the lattice (Lx, Ly, pbc), the requested method, `CACHE_FORMAT_VERSION` and
`solver_version()`, a digest of the source of the modules that determine the result, so a
change to the exact solvers or the Hamiltonians never serves a stale answer. Files are
written atomically; an unreadable or inconsistent file is recomputed and rewritten, and a
cache directory that cannot be written only costs the recomputation (with a warning).
Deleting the directory clears the cache.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import naqs_cli
from naqs_cli import exact, hamiltonians, lattice, limits
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.limits import ED_MAX_SITES

__all__ = [
    "CACHE_FORMAT_VERSION",
    "LiteratureReference",
    "Reference",
    "cache_dir",
    "cache_key",
    "cache_path",
    "cached_ground_state",
    "find_reference",
    "relative_error",
    "solver_version",
]

logger = logging.getLogger(__name__)

#: Version of the cache file layout; bump it when the stored fields change.
CACHE_FORMAT_VERSION = 1
#: Modules whose source determines an exact result (see `solver_version`).
_SOLVER_MODULES = (exact, hamiltonians, lattice, limits)
#: Allowed values of `train.exact_reference`.
EXACT_REFERENCE_MODES = ("auto", "never")


@dataclass(frozen=True)
class Reference:
    """A reference energy per site and where it comes from.

    Attributes:
        energy: ground-state energy per site.
        source: "exact (ed)", "exact (free_fermion)" or the literature source.
        observables: reference observables by name (per-site normalizations of `exact`).
    """

    energy: float
    source: str
    observables: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LiteratureReference:
    """The config's `reference` section: a published value to compare with.

    Attributes:
        energy: energy per site, or None.
        source: where the value comes from (e.g. "QMC (paper Table II)").
        table: rows [gamma, energy, naqs_energy, abs_magnetization, naqs_abs_magnetization]
            (paper Table I); for the TFIM the row whose gamma equals ham.gamma wins over
            `energy`.
    """

    energy: float | None = None
    source: str = ""
    table: tuple[tuple[float, ...], ...] | None = None


def find_reference(
    hamiltonian: TransverseFieldIsing | Heisenberg,
    literature: LiteratureReference | None,
    mode: str = "auto",
) -> Reference | None:
    """Return the reference energy per site to report relative errors against.

    With mode "auto", the exact ground state when it is computable (N ≤ ED_MAX_SITES, or a
    TFIM chain, lattice.Ly = 1, with J > 0), from the on-disk cache when it holds it; else,
    and always with mode "never", the literature value.

    Args:
        hamiltonian: the Hamiltonian of the run.
        literature: the config's `reference` section, typed, or None.
        mode: `train.exact_reference`, one of EXACT_REFERENCE_MODES.

    Returns:
        The reference, or None when there is none.

    Raises:
        ValueError: an unknown mode.
    """

    if mode not in EXACT_REFERENCE_MODES:
        raise ValueError(f"mode must be one of {' | '.join(EXACT_REFERENCE_MODES)}, got {mode!r}")
    lat = hamiltonian.lattice
    one_d_tfim = isinstance(hamiltonian, TransverseFieldIsing) and lat.Ly == 1 and hamiltonian.J > 0
    if mode == "auto" and (lat.n_sites <= ED_MAX_SITES or one_d_tfim):
        result = cached_ground_state(hamiltonian, method="auto")
        return Reference(result.energy_per_site, f"exact ({result.method})", result.observables)
    if literature is None:
        return None
    source = literature.source or "reference"
    if literature.table and isinstance(hamiltonian, TransverseFieldIsing):
        for row in literature.table:
            if math.isclose(row[0], hamiltonian.gamma, abs_tol=1e-9):
                observables = {"abs_magnetization": row[3]} if len(row) > 3 else {}
                return Reference(row[1], source, observables)
    if literature.energy is not None:
        return Reference(literature.energy, source)
    return None


def relative_error(energy: float, reference: Reference | None) -> float:
    """Return the signed relative error (E − E_ref)/|E_ref| (NaN without a reference)."""
    if reference is None or reference.energy == 0:
        return math.nan
    return (energy - reference.energy) / abs(reference.energy)


# --------------------------------------------------------------------------------------
# The cache


def cache_dir() -> Path:
    """Return the exact-result cache directory, `$XDG_CACHE_HOME/naqs/exact`.

    XDG_CACHE_HOME counts when it is set to an absolute path (the XDG rule); otherwise the
    base is `~/.cache`.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "naqs" / "exact"


@functools.cache
def solver_version() -> str:
    """Return a digest of the source of the exact solvers, Hamiltonians and lattices.

    Any change to those modules changes the cache key, so a fixed solver never serves a
    result computed by the old one. Without readable sources (a frozen install) the package
    version stands in.
    """
    digest = hashlib.sha256()
    try:
        for module in _SOLVER_MODULES:
            digest.update(Path(module.__file__).read_bytes())
    except (OSError, TypeError):
        return f"naqs-{naqs_cli.__version__}"
    return digest.hexdigest()[:16]


def _key_fields(hamiltonian: TransverseFieldIsing | Heisenberg, method: str) -> dict[str, Any]:
    """Return the plain fields that determine an exact result."""
    if isinstance(hamiltonian, TransverseFieldIsing):
        # + 0.0 maps −0.0 to 0.0: the same Hamiltonian, one key.
        params: dict[str, Any] = {"J": hamiltonian.J + 0.0, "gamma": hamiltonian.gamma + 0.0}
    elif isinstance(hamiltonian, Heisenberg):
        params = {"J": hamiltonian.J + 0.0, "sign_rule": hamiltonian.uses_sign_rule}
    else:
        raise TypeError(
            f"exact references need a TransverseFieldIsing or Heisenberg, got"
            f" {type(hamiltonian).__name__}"
        )
    lat = hamiltonian.lattice
    return {
        "hamiltonian": hamiltonian.name,
        **params,
        "Lx": lat.Lx,
        "Ly": lat.Ly,
        "pbc": lat.pbc,
        "method": method,
        "format": CACHE_FORMAT_VERSION,
        "solver": solver_version(),
    }


def cache_key(hamiltonian: TransverseFieldIsing | Heisenberg, method: str = "auto") -> str:
    """Return the cache key (hex SHA-256 of the key fields) of an exact result.

    Raises:
        TypeError: an unsupported Hamiltonian.
    """
    text = json.dumps(_key_fields(hamiltonian, method), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(hamiltonian: TransverseFieldIsing | Heisenberg, method: str = "auto") -> Path:
    """Return the cache file of an exact result, e.g. `tfim_4x6_obc_auto_<hash>.json`."""
    lat = hamiltonian.lattice
    bc = "pbc" if lat.pbc else "obc"
    digest = cache_key(hamiltonian, method)[:24]
    return cache_dir() / f"{hamiltonian.name}_{lat.Lx}x{lat.Ly}_{bc}_{method}_{digest}.json"


def _result_to_json(result: exact.ExactResult) -> dict[str, Any]:
    return {
        "energy": result.energy,
        "energy_per_site": result.energy_per_site,
        "observables": dict(result.observables),
        "method": result.method,
        "sector": result.sector,
        "missing": dict(result.missing),
    }


def _result_from_json(data: Any) -> exact.ExactResult:
    """Return the `ExactResult` stored in `data`; ValueError when it is malformed."""
    floats = ("energy", "energy_per_site")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), float) for k in floats):
        raise ValueError("no float energies")
    observables, missing = data.get("observables"), data.get("missing")
    if not isinstance(observables, dict) or not all(
        isinstance(v, float) for v in observables.values()
    ):
        raise ValueError("observables are not floats")
    if not isinstance(missing, dict) or not all(isinstance(v, str) for v in missing.values()):
        raise ValueError("missing is not a mapping of strings")
    if not isinstance(data.get("method"), str) or not isinstance(data.get("sector"), str):
        raise ValueError("method or sector is not a string")
    return exact.ExactResult(
        energy=data["energy"],
        energy_per_site=data["energy_per_site"],
        observables=observables,
        method=data["method"],
        sector=data["sector"],
        missing=missing,
    )


def _read(path: Path, fields: dict[str, Any]) -> exact.ExactResult | None:
    """Return the cached result at `path`, or None (absent, unreadable or another key's)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring the unreadable exact-reference cache file %s (%s)", path, err)
        return None
    try:
        if not isinstance(data, dict) or data.get("key") != fields:
            raise ValueError("its key does not match")
        return _result_from_json(data.get("result"))
    except ValueError as err:
        logger.warning("ignoring the exact-reference cache file %s: %s", path, err)
        return None


def _write(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as JSON to `path` atomically (temp file, fsync, replace).

    Raises:
        OSError: the directory or file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _announce(hamiltonian: TransverseFieldIsing | Heisenberg, method: str, where: str) -> None:
    """Say, in the log and on an interactive stderr, that an exact result is being computed."""
    n = hamiltonian.n_sites
    chain = (
        isinstance(hamiltonian, TransverseFieldIsing)
        and hamiltonian.J > 0
        and 1 in (hamiltonian.lattice.Lx, hamiltonian.lattice.Ly)
    )
    free = method == "free_fermion" or (
        method == "auto" and chain and n > exact.AUTO_FREE_FERMION_ABOVE
    )
    how = f"free fermions, L={n}" if free else f"ED, 2^{n} states"
    line = f"computing the exact reference for {hamiltonian.describe()} ({how}; {where})..."
    logger.info(line)
    if sys.stderr.isatty():
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def cached_ground_state(
    hamiltonian: TransverseFieldIsing | Heisenberg, method: str = "auto"
) -> exact.ExactResult:
    """Return `exact.ground_state(hamiltonian, method)`, from the on-disk cache when present.

    A miss computes the result, says so on one line, and stores it; the stored values are
    bit-identical to the computed ones (JSON keeps floats exactly).

    Args:
        hamiltonian: a `TransverseFieldIsing` or `Heisenberg` instance.
        method: "auto", "ed" or "free_fermion", as for `exact.ground_state`.

    Returns:
        The `ExactResult`.

    Raises:
        ValueError: an unknown method, or a problem `exact.ground_state` refuses.
        TypeError: an unsupported Hamiltonian.
    """
    if method not in exact.METHODS:
        raise ValueError(f"method must be one of {'|'.join(exact.METHODS)}, got {method!r}")
    fields = _key_fields(hamiltonian, method)
    try:
        path: Path | None = cache_path(hamiltonian, method)
    except RuntimeError as err:  # Path.home() cannot be determined
        logger.warning("no exact-reference cache (%s); computing without caching", err)
        path = None
    if path is not None:
        cached = _read(path, fields)
        if cached is not None:
            logger.info("exact reference for %s from the cache %s", hamiltonian.describe(), path)
            return cached
    _announce(hamiltonian, method, f"cached in {path.parent}" if path else "not cached")
    start = time.perf_counter()
    result = exact.ground_state(hamiltonian, method=method)
    seconds = time.perf_counter() - start
    if path is not None:
        payload = {
            "key": fields,
            "description": hamiltonian.describe(),
            "naqs_version": naqs_cli.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
            "result": _result_to_json(result),
        }
        try:
            _write(path, payload)
        except OSError as err:
            logger.warning(
                "cannot write the exact-reference cache %s (%s); the result is not cached",
                path,
                err,
            )
    return result
