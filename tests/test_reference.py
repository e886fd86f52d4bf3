"""Reference energies and the on-disk cache of exact results (`naqs_cli.reference`)."""

from __future__ import annotations

import json
import logging
import math

import pytest
from conftest import compose

from naqs_cli import build, exact, reference, validation
from naqs_cli.errors import ConfigError
from naqs_cli.hamiltonians import Heisenberg, TransverseFieldIsing
from naqs_cli.lattice import SquareLattice
from naqs_cli.reference import LiteratureReference, Reference

REAL_GROUND_STATE = exact.ground_state


def tfim(Lx: int = 3, Ly: int = 3, pbc: bool = False, J: float = 1.0, gamma: float = 2.5):
    return TransverseFieldIsing(lattice=SquareLattice(Lx, Ly, pbc), J=J, gamma=gamma)


def heisenberg(Lx: int = 3, Ly: int = 3, pbc: bool = False, J: float = 1.0, sign_rule="auto"):
    return Heisenberg(lattice=SquareLattice(Lx, Ly, pbc), J=J, sign_rule=sign_rule)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """A fresh XDG_CACHE_HOME per test."""
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture
def solver_calls(monkeypatch):
    """Count the calls of `exact.ground_state` (each one a real computation)."""
    calls = []

    def counting(hamiltonian, method="auto"):
        calls.append((hamiltonian.describe(), method))
        return REAL_GROUND_STATE(hamiltonian, method=method)

    monkeypatch.setattr(exact, "ground_state", counting)
    return calls


@pytest.fixture
def no_solver(monkeypatch):
    """Fail the test if anything computes an exact result."""

    def forbidden(hamiltonian, method="auto"):
        raise AssertionError(f"exact.ground_state called for {hamiltonian.describe()}")

    monkeypatch.setattr(exact, "ground_state", forbidden)


def cache_files(home):
    return sorted((home / "naqs" / "exact").glob("*"))


# --- the cache ----------------------------------------------------------------------------


def test_cache_hit_avoids_recomputation(cache_home, solver_calls):
    ham = tfim()
    first = reference.cached_ground_state(ham)
    second = reference.cached_ground_state(tfim())  # an equal Hamiltonian, a new instance
    assert len(solver_calls) == 1
    assert second == first
    (path,) = cache_files(cache_home)
    assert path == reference.cache_path(ham)


@pytest.mark.parametrize(
    ("ham", "method", "expected_method"),
    [
        (tfim(3, 3, gamma=2.5), "auto", "ed"),
        (tfim(4, 1, pbc=False, gamma=0.0), "ed", "ed"),  # the classical mixture branch
        (heisenberg(3, 3), "auto", "ed"),
        (heisenberg(5, 1, pbc=True, sign_rule="false"), "ed", "ed"),
        (tfim(20, 1, pbc=True, gamma=0.9), "auto", "free_fermion"),
    ],
    ids=lambda v: v.describe() if hasattr(v, "describe") else str(v),
)
def test_cached_values_equal_direct_values_bitwise(
    cache_home, solver_calls, ham, method, expected_method
):
    direct = REAL_GROUND_STATE(ham, method=method)
    reference.cached_ground_state(ham, method)  # computes and writes
    from_disk = reference.cached_ground_state(ham, method)
    assert len(solver_calls) == 1  # the second came from the file
    assert direct.method == expected_method
    assert from_disk == direct  # float == float: every bit, observables and missing included
    for name, value in direct.observables.items():
        assert math.copysign(1.0, from_disk.observables[name]) == math.copysign(1.0, value)


def test_cache_file_is_readable_json_with_the_key_fields(cache_home, solver_calls):
    ham = heisenberg(2, 3, J=0.7)
    result = reference.cached_ground_state(ham)
    (path,) = cache_files(cache_home)  # no temp file left behind
    data = json.loads(path.read_text())
    key = data["key"]
    assert (key["hamiltonian"], key["J"], key["sign_rule"]) == ("heisenberg", 0.7, True)
    assert (key["Lx"], key["Ly"], key["pbc"], key["method"]) == (2, 3, False, "auto")
    assert key["format"] == reference.CACHE_FORMAT_VERSION
    assert data["description"] == ham.describe()
    assert data["result"]["energy_per_site"] == result.energy_per_site
    assert data["result"]["sector"] == result.sector


def test_different_parameters_and_lattices_give_different_keys():
    variants = [
        tfim(3, 3, gamma=3.0),
        tfim(3, 3, gamma=3.0 + 1e-12),
        tfim(3, 3, gamma=-3.0),
        tfim(3, 3, J=2.0, gamma=3.0),
        tfim(3, 3, pbc=True, gamma=3.0),
        tfim(9, 1, gamma=3.0),
        tfim(1, 9, gamma=3.0),
        tfim(3, 4, gamma=3.0),
        tfim(4, 3, gamma=3.0),
        heisenberg(3, 3, sign_rule="true"),
        heisenberg(3, 3, sign_rule="false"),
        heisenberg(3, 3, J=-1.0, sign_rule="false"),
        heisenberg(3, 3, pbc=True, sign_rule="false"),
    ]
    keys = [reference.cache_key(ham) for ham in variants]
    keys.append(reference.cache_key(tfim(3, 3, gamma=3.0), "ed"))
    assert len(set(keys)) == len(keys)
    paths = {reference.cache_path(ham) for ham in variants}
    assert len(paths) == len(variants)


def test_equal_hamiltonians_share_a_key():
    assert reference.cache_key(tfim(gamma=3)) == reference.cache_key(tfim(gamma=3.0))
    assert reference.cache_key(tfim(gamma=-0.0)) == reference.cache_key(tfim(gamma=0.0))
    # sign_rule=auto resolves to on for J > 0 on a bipartite lattice: the same Hamiltonian.
    assert reference.cache_key(heisenberg(sign_rule="auto")) == reference.cache_key(
        heisenberg(sign_rule="true")
    )


def test_format_version_is_part_of_the_key(cache_home, solver_calls, monkeypatch):
    ham = tfim(2, 3)
    key = reference.cache_key(ham)
    reference.cached_ground_state(ham)
    monkeypatch.setattr(reference, "CACHE_FORMAT_VERSION", reference.CACHE_FORMAT_VERSION + 1)
    assert reference.cache_key(ham) != key
    reference.cached_ground_state(ham)
    assert len(solver_calls) == 2
    assert len(cache_files(cache_home)) == 2


def test_solver_version_is_part_of_the_key(monkeypatch):
    ham = tfim(2, 3)
    key = reference.cache_key(ham)
    monkeypatch.setattr(reference, "solver_version", lambda: "another-solver")
    assert reference.cache_key(ham) != key


def test_xdg_cache_home_is_respected(cache_home, solver_calls):
    assert reference.cache_dir() == cache_home / "naqs" / "exact"
    reference.cached_ground_state(tfim(2, 2))
    assert len(cache_files(cache_home)) == 1


@pytest.mark.parametrize("value", [None, "", "relative/cache"])
def test_default_cache_dir_is_under_home(value, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert reference.cache_dir() == tmp_path / ".cache" / "naqs" / "exact"


@pytest.mark.parametrize(
    "corrupt",
    [
        "",
        '{"key": ',
        "null",
        "\udcff not utf-8",
        '{"key": {}, "result": {}}',
        "wrong key",
        "energy is a string",
        "no observables",
    ],
)
def test_corrupt_cache_file_is_recomputed_and_rewritten(cache_home, solver_calls, corrupt, caplog):
    ham = tfim(2, 3)
    good = reference.cached_ground_state(ham)
    path = reference.cache_path(ham)
    data = json.loads(path.read_text())
    if corrupt == "wrong key":
        data["key"]["gamma"] = 1.0
        path.write_text(json.dumps(data))
    elif corrupt == "energy is a string":
        data["result"]["energy_per_site"] = str(data["result"]["energy_per_site"])
        path.write_text(json.dumps(data))
    elif corrupt == "no observables":
        del data["result"]["observables"]
        path.write_text(json.dumps(data))
    else:
        path.write_bytes(corrupt.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="naqs_cli.reference"):
        again = reference.cached_ground_state(ham)
    assert again == good
    assert len(solver_calls) == 2
    assert "ignoring" in caplog.text and str(path) in caplog.text
    assert reference.cached_ground_state(ham) == good  # rewritten: a hit again
    assert len(solver_calls) == 2


def test_unwritable_cache_dir_still_returns_the_right_answer(
    tmp_path, monkeypatch, solver_calls, caplog
):
    # A regular file where the cache directory's parent should be: nothing can be created
    # under it, whatever the user's privileges.
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    ham = heisenberg(2, 3)
    with caplog.at_level(logging.WARNING, logger="naqs_cli.reference"):
        result = reference.cached_ground_state(ham)
        ref = reference.find_reference(ham, None)
    assert result == REAL_GROUND_STATE(ham)
    assert ref == Reference(result.energy_per_site, "exact (ed)", result.observables)
    assert len(solver_calls) == 2  # nothing was cached
    assert "cannot write the exact-reference cache" in caplog.text


def test_progress_line_on_a_miss_only(cache_home, solver_calls, caplog):
    ham = tfim(3, 2)
    with caplog.at_level(logging.INFO, logger="naqs_cli.reference"):
        reference.cached_ground_state(ham)
    assert f"computing the exact reference for {ham.describe()} (ED, 2^6 states" in caplog.text
    assert str(cache_home / "naqs" / "exact") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="naqs_cli.reference"):
        reference.cached_ground_state(ham)
    assert "computing" not in caplog.text


def test_bad_method_and_hamiltonian_are_refused(cache_home, no_solver):
    with pytest.raises(ValueError, match="method must be one of"):
        reference.cached_ground_state(tfim(), "dmrg")
    with pytest.raises(TypeError, match="TransverseFieldIsing or Heisenberg"):
        reference.cached_ground_state(object())
    assert cache_files(cache_home) == []


# --- find_reference -----------------------------------------------------------------------

TABLE = LiteratureReference(
    energy=-9.0,
    source="QMC",
    table=((2.0, -2.4096, -2.40960, 0.78277, 0.78326), (3.0, -3.17388, -3.17390, 0.16207)),
)


def test_find_reference_exact_when_computable(cache_home, solver_calls):
    ham = tfim(3, 3, gamma=3.0)
    ref = reference.find_reference(ham, TABLE)
    direct = REAL_GROUND_STATE(ham)
    assert ref == Reference(direct.energy_per_site, "exact (ed)", direct.observables)
    chain = tfim(30, 1, gamma=1.0)  # N > ED_MAX_SITES, but free fermions apply
    assert reference.find_reference(chain, None).source == "exact (free_fermion)"
    assert len(solver_calls) == 2


def test_find_reference_never_skips_exact(cache_home, no_solver):
    ham = tfim(3, 3, gamma=3.0)
    assert reference.find_reference(ham, TABLE, mode="never") == Reference(
        -3.17388, "QMC", {"abs_magnetization": 0.16207}
    )
    assert reference.find_reference(tfim(30, 1), None, mode="never") is None
    energy_only = LiteratureReference(energy=-0.5)
    assert reference.find_reference(heisenberg(), energy_only, mode="never") == Reference(
        -0.5, "reference"
    )
    assert cache_files(cache_home) == []


def test_find_reference_literature_beyond_exact_reach(no_solver):
    big = tfim(5, 5, gamma=2.0)  # 25 sites, 2D
    assert reference.find_reference(big, TABLE).energy == -2.4096
    # No matching gamma row: the plain energy; the table is for the TFIM only.
    assert reference.find_reference(tfim(5, 5, gamma=2.5), TABLE) == Reference(-9.0, "QMC")
    assert reference.find_reference(heisenberg(5, 5), TABLE) == Reference(-9.0, "QMC")
    assert reference.find_reference(big, LiteratureReference()) is None
    assert reference.find_reference(big, None) is None


def test_find_reference_refuses_an_unknown_mode(no_solver):
    with pytest.raises(ValueError, match="auto | never"):
        reference.find_reference(tfim(), None, mode="sometimes")


def test_relative_error():
    ref = Reference(-2.0, "x")
    assert reference.relative_error(-1.9, ref) == pytest.approx(0.05)
    assert reference.relative_error(-2.1, ref) == pytest.approx(-0.05)
    assert math.isnan(reference.relative_error(-1.0, None))
    assert math.isnan(reference.relative_error(-1.0, Reference(0.0, "x")))


# --- configuration ------------------------------------------------------------------------


def test_literature_from_the_table1_config():
    cfg = compose("train", ["experiment=table1_tfim"])
    literature = build.build_literature(cfg)
    assert isinstance(literature, LiteratureReference)
    assert literature.source.startswith("QMC")
    assert literature.energy is None
    assert literature.table[2][:2] == (3.0, -3.17388)


def test_exact_reference_key_is_validated():
    cfg = compose("train", ["train.exact_reference=never"])
    validation.validate(cfg, "train")
    cfg = compose("train", ["train.exact_reference=sometimes"])
    with pytest.raises(ConfigError, match=r"train.exact_reference=sometimes: allowed: auto \|"):
        validation.validate(cfg, "train")


def test_the_test_session_never_uses_the_users_cache(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    assert reference.cache_dir().is_relative_to(base)
