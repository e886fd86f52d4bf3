"""The declared dependency bounds admit only versions that have the APIs the code calls."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
#: Top-level NumPy functions that are new in NumPy 2.0.
NUMPY_2_ONLY = (
    "bitwise_count",
    "trapezoid",
    "unstack",
    "cumulative_sum",
    "cumulative_prod",
    "concat",
    "pow",
    "astype",
    "isdtype",
    "vecdot",
    "matrix_transpose",
    "permute_dims",
)


def _lower_bound(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    assert match, f"{requirement}: no >= lower bound"
    return tuple(int(part) for part in match.group(1).split("."))


def test_numpy_lower_bound_has_every_function_the_code_calls():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = [r for r in project["dependencies"] if re.match(r"numpy\b", r)]
    source = "\n".join(p.read_text() for p in sorted((ROOT / "naqs_cli").rglob("*.py")))
    used = [name for name in NUMPY_2_ONLY if re.search(rf"\bnp\.{name}\(", source)]
    needed = (2, 0) if used else (1, 0)
    assert _lower_bound(requirement) >= needed, f"{requirement}, but the code calls {used}"
