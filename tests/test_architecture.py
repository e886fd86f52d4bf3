"""The shape of the code: module sizes, where configs are read, no import cycles.

These guard the layering described in README.md ("Architecture"): the command line, the
config composition (`compose`), the one place that turns configs into objects (`build` with
its validation) and the task functions read configs; everything below them works with the
objects `build` returns.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "naqs_cli"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))
MAX_LINES = 500

#: Modules allowed over MAX_LINES, each with its reason.
LONG_MODULES = {
    "cli.py": "the command line: argv parsing, Hydra launch, torchrun ranks and the one-line"
    " error translation of every Hydra/OmegaConf failure, which belong together",
    "exact.py": "exact diagonalization: two symmetry sectors with their matrix-free operators"
    " and the free-fermion solution, each needing the others' normalizations",
    "models/pixelcnn.py": "one network with its three views of the same weights (full pass,"
    " cached per-site sampler, partial recomputation), kept together so they stay equal",
}
#: Modules that may read a config (`cfg`, DictConfig, OmegaConf), each with its role.
CONFIG_READERS = {
    "cli.py": "the command line",
    "compose.py": "composition: command line and stored configs",
    "config.py": "the schemas",
    "build.py": "the one place that turns a config into objects",
    "validation.py": "the rules `build` checks before building",
    "natural_config.py": "the rules of optim=sr|minsr (validation calls them)",
    "tasks.py": "the task functions",
    "callbacks.py": "Hydra's sweep callback (runs in the CLI process, reads job configs)",
    "compare/__init__.py": "the comparison task functions",
    "compare/sampling.py": "the comparison task functions",
    "compare/training.py": "the comparison task functions",
}
CONFIG_WORDS = re.compile(r"\bcfg\b|\bDictConfig\b|\bOmegaConf\b|\bomegaconf\b")


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_size(path):
    lines = len(path.read_text().splitlines())
    if _name(path) in LONG_MODULES:
        return
    assert lines <= MAX_LINES, f"{_name(path)} has {lines} lines (> {MAX_LINES}): split it"


def test_long_module_allowlist_is_current():
    for name in LONG_MODULES:
        lines = len((PACKAGE / name).read_text().splitlines())
        assert lines > MAX_LINES, f"{name} is {lines} lines now: drop it from LONG_MODULES"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_configs_are_read_only_above_build(path):
    if _name(path) in CONFIG_READERS:
        return
    hits = [
        f"{i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if CONFIG_WORDS.search(line)
    ]
    assert not hits, f"{_name(path)} reads configs below build:\n" + "\n".join(hits)


def _module_name(path: Path) -> str:
    parts = ["naqs_cli", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_import_cycles():
    """Function-level (lazy) imports count too: a cycle hidden in a function is still one."""
    names = {_module_name(p): p for p in MODULES}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text())
        for block in ast.walk(tree):  # type-only imports are not imports at run time
            if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING":
                block.body = []
        targets = set()
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("naqs_cli")
            ):
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("naqs_cli"))
        graph[name] = {t for t in targets if t in names and t != name}
    # a package imports its submodules by design; only cycles between modules count
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}

    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_test_hooks_in_production_code():
    for path in MODULES:
        text = path.read_text()
        assert "NAQS_TEST" not in text and "_test_hook" not in text, _name(path)


#: Documents outside the repository that no comment may cite (spelled in pieces, so that this
#: file does not cite them either).
OUTSIDE = [stem + ".md" for stem in ("DESIGN", "STYLE")] + [".." + "/" + "shared"]


def test_comments_cite_only_files_in_the_repository():
    for path in [*MODULES, *Path(__file__).parent.glob("*.py")]:
        text = path.read_text()
        for name in OUTSIDE:
            assert name not in text, f"{path.name} cites {name}"


#: Code that was dead (defined, never used) and was removed: it must not come back unused.
REMOVED = [
    ("naqs_cli.distributed", "env_rank"),
    ("naqs_cli.models.layers", "LayerHalo.select"),
    ("naqs_cli.models.layers", "TwoStreamCausalLayer.forward"),
    ("naqs_cli.config", "ReferenceConfig.naqs_energy"),
    ("naqs_cli.tasks", "NotImplementedYetError"),
    ("naqs_cli.tasks", "BOOK_KEEPING"),
    ("naqs_cli.tasks", "OBSERVABLES"),
]


@pytest.mark.parametrize(("module", "name"), REMOVED)
def test_removed_dead_code_stays_removed(module, name):
    import dataclasses
    import importlib

    owner = importlib.import_module(module)
    *path, last = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    if dataclasses.is_dataclass(owner):
        assert last not in {f.name for f in dataclasses.fields(owner)}, name
    else:
        assert last not in vars(owner), name


def test_restoring_threads_takes_no_unused_argument():
    import inspect

    from naqs_cli import parallel

    assert not inspect.signature(parallel._restoring_threads).parameters
