"""Fuzz the overrides in-process with hypothesis, through the CLI's own check.

`cli.check_overrides` is exactly what `naqs` runs before Hydra starts (composition with type
checking, `validation.validate`, checkpoints named by the config); it returns the one-line message
the CLI prints with exit code 2, or None. Random values of the right and wrong types must give
one or the other, never an exception; consistent valid configs must all pass and build.

The default suite is deterministic: every fuzz test there is derandomized (the same examples on
every run, no example database) and a fixed list of explicit examples covers each kind of bad
input the strategies draw. `make validate` runs the same properties on many new random examples
(`NAQS_FUZZ_EXAMPLES` per test, default 500); a failure there prints the example to add to the
fixed list.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from naqs_cli import build
from naqs_cli.cli import check_overrides
from naqs_cli.lattice import SquareLattice
from naqs_cli.reference import find_reference

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
#: Default suite: the same examples on every run (a seed derived from the test's name).
FIXED = settings(
    derandomize=True,
    database=None,
    max_examples=12,
    deadline=None,
    suppress_health_check=_HEALTH,
)
#: `make validate`: new random examples every run.
LONG = settings(
    derandomize=False,
    database=None,
    max_examples=int(os.environ.get("NAQS_FUZZ_EXAMPLES", "500")),
    deadline=None,
    suppress_health_check=_HEALTH,
)
#: A finished 2×2 TFIM run (checkpoint + history), read only.
OLD_RUN = Path(__file__).resolve().parent / "fixtures" / "old_run"

#: Values of the wrong type (or shape) for most keys, as typed on a command line.
WRONG = [
    "abc",
    "''",
    "null",
    "true",
    "1.5",
    "-1",
    "0",
    "[1,2]",
    "{a: 1}",
    "inf",
    "-inf",
    "nan",
    "1e999",
    "99999999999999999999999",
    "'3'",
    "x=y",
    "${oops}",
    "a,b",
    "[]",
]


def _number(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else str(value)


def _ints(low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(str)


def _floats(**kwargs) -> st.SearchStrategy[str]:
    return st.floats(**kwargs).map(_number)


def _hydra_list(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


@st.composite
def _stage(draw) -> str:
    """One `train.stages` entry, its fields in or out of range, some left out."""
    fields = {
        "steps": draw(_ints(-2, 50)),
        "n_samples": draw(_ints(-2, 300)),
        "lr": draw(_floats(allow_nan=True, allow_infinity=True)),
    }
    kept = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=3))
    return "{" + ",".join(f"{key}:{fields[key]}" for key in sorted(kept)) + "}"


#: key -> values of the right type, in and out of range (lattice sizes stay small: a valid
#: 10^6 × 10^6 lattice would be built, slowly, by validation itself).
RIGHT_TYPE = {
    "lattice.Lx": _ints(-2, 9),
    "lattice.Ly": _ints(-2, 9),
    "lattice.pbc": st.sampled_from(["true", "false"]),
    "ham.J": _floats(allow_nan=True, allow_infinity=True),
    "ham.gamma": _floats(allow_nan=True, allow_infinity=True),
    "ham.sign_rule": st.sampled_from(["auto", "true", "false", "maybe", "1", "no"]),
    "model.layers": _ints(-1, 4),
    "model.channels": _ints(-1, 12),
    "model.hidden": _ints(-1, 12),
    "model.kernel_size": _ints(-1, 8),
    "model.phase": st.sampled_from(["true", "false"]),
    "model.total_sz": st.one_of(st.just("null"), _floats(min_value=-10, max_value=10)),
    "model.symmetry": st.sampled_from(["none", "spin_flip", "lattice", "lattice_spin_flip", "x"]),
    "sampler.n_samples": _ints(-5, 10**9),
    "sampler.method": st.sampled_from(["cached", "reference", "magic"]),
    "sampler.n_chains": _ints(-1, 64),
    "sampler.sweeps_between_samples": _ints(-1, 20),
    "sampler.burn_in": _ints(-3, 200),
    "sampler.init": st.sampled_from(["random", "up", "down", "left"]),
    "sampler.move": st.sampled_from(["auto", "flip", "exchange", "teleport"]),
    "optim.lr": _floats(allow_nan=True, allow_infinity=True),
    "optim.betas": st.lists(st.floats(-1, 2), max_size=3).map(lambda b: str(b)),
    "optim.momentum": _floats(min_value=-1, max_value=2),
    "optim.schedule": st.sampled_from(["constant", "cosine", "step", "linear"]),
    "optim.step_every": _ints(-1, 100),
    "optim.step_factor": _floats(min_value=-1, max_value=2),
    "optim.grad_clip": st.one_of(st.just("null"), _floats(min_value=-1, max_value=10)),
    "train.steps": _ints(-3, 10**6),
    "train.chunk_size": _ints(-1, 4096),
    "train.log_every": _ints(-1, 100),
    "train.checkpoint_every": _ints(-1, 100),
    "train.final_samples": _ints(-1, 10**5),
    "train.final_symmetry": st.sampled_from(["null", "none", "spin_flip", "lattice", "y"]),
    "train.best_smoothing": _ints(-1, 50),
    "train.max_nonfinite": _ints(-1, 10),
    "train.max_rollbacks": _ints(-1, 10),
    "train.stages": st.one_of(st.just("null"), st.lists(_stage(), max_size=3).map(_hydra_list)),
    "train.init_from": st.sampled_from(["null", str(OLD_RUN), "no/such/run"]),
    "train.exact_reference": st.sampled_from(["auto", "never", "always"]),
    "train.time_budget": st.one_of(st.just("null"), _floats(allow_nan=True, allow_infinity=True)),
    "reference.energy": st.one_of(st.just("null"), _floats(allow_nan=True, allow_infinity=True)),
    "reference.table": st.one_of(
        st.just("null"),
        st.lists(st.lists(st.floats(-5, 5), max_size=6).map(str), max_size=3).map(_hydra_list),
    ),
    "resume": st.sampled_from(["null", "no/such/run"]),
    "seed": _ints(-(2**64), 2**64),
    "device": st.sampled_from(["cpu", "auto", "cuda", "tpu"]),
    "dtype": st.sampled_from(["float32", "float64", "float16"]),
}
GROUPS = {
    "lattice": ["square", "chain"],
    "ham": ["tfim", "heisenberg"],
    "model": ["pixelcnn", "dense"],
    "sampler": ["direct", "mcmc", "fullsum"],
    "optim": ["adam", "sgd"],
    "experiment": ["smoke", "fig2_tfim_small", "fig3_tfim_small"],
}
#: Values that are not one option name of a group.
BAD_GROUP_VALUES = ["null", "nosuch", "1", "[1,2]", "[]", "{a: 1}", "direct,mcmc", "x=y"]


def _assert_one_line(message: str | None, overrides: list[str]) -> None:
    """The check gave None or one non-empty line (what the CLI prints before exit 2)."""
    if message is not None:
        assert isinstance(message, str) and message.strip(), overrides
        assert "\n" not in message and "Traceback" not in message, message


@st.composite
def mixed_overrides(draw) -> list[str]:
    """Group choices plus random keys, each with a right-type or a wrong-type value."""
    overrides = [
        f"{group}={draw(st.sampled_from([*options, *options, *BAD_GROUP_VALUES]))}"
        for group, options in GROUPS.items()
        if draw(st.booleans())
    ]
    keys = draw(st.lists(st.sampled_from(sorted(RIGHT_TYPE)), max_size=6, unique=True))
    for key in keys:
        wrong = draw(st.integers(0, 3)) == 0
        value = draw(st.sampled_from(WRONG)) if wrong else draw(RIGHT_TYPE[key])
        overrides.append(f"{key}={value}")
    return overrides


def _build_accepted(overrides: list[str]) -> None:
    """Build what a run builds from an accepted config (a reference table lookup included)."""
    from conftest import compose

    cfg = compose("train", overrides)
    lattice = build.build_lattice(cfg)
    hamiltonian = build.build_hamiltonian(cfg, lattice)
    model = build.build_model(cfg, lattice)
    build.build_sampler(cfg, hamiltonian, torch.device("cpu"), int(cfg.seed))
    build.build_update_rule(cfg, model)
    find_reference(hamiltonian, build.build_literature(cfg), "never")


def _check_mixed(overrides: list[str]) -> None:
    torch.set_num_threads(1)
    message = check_overrides("train", overrides)
    _assert_one_line(message, overrides)
    if message is None:
        _build_accepted(overrides)


@FIXED
@given(mixed_overrides())
def test_random_overrides_give_one_line_or_pass(overrides):
    _check_mixed(overrides)


@pytest.mark.slow
@LONG
@given(mixed_overrides())
def test_random_overrides_give_one_line_or_pass_long(overrides):
    _check_mixed(overrides)


#: One fixed example of each kind of bad input `mixed_overrides` draws: every wrong-type
#: value, every bad group value, and out-of-range values of the right type. Each must be
#: refused in one line that names the key.
BAD_EXAMPLES = [
    # wrong-type values (WRONG), on keys of each type
    ["lattice.Lx=abc"],
    ["ham.gamma=''"],
    ["model.layers=null"],
    ["model.channels=true"],
    ["lattice.Ly=1.5"],
    ["sampler.n_samples=-1"],
    ["train.steps=-1"],
    ["lattice.pbc=[1,2]"],
    ["optim.lr={a: 1}"],
    ["optim.lr=inf"],
    ["ham.gamma=-inf"],
    ["ham.J=nan"],
    ["optim.momentum=1e999"],
    ["sampler.n_chains=99999999999999999999999"],
    ["device='3'"],
    ["dtype=x=y"],
    ["model.symmetry=${oops}"],
    ["ham.sign_rule=a,b"],
    ["optim.betas=[]"],
    ["seed=abc"],
    ["model.total_sz=[1,2]"],
    ["optim.grad_clip=abc"],
    ["train.final_symmetry=[1,2]"],
    ["train.stages=[{steps: 1}]"],
    ["reference.table=[[1,2]"],
    # bad group values (BAD_GROUP_VALUES), on each group
    ["lattice=null"],
    ["ham=nosuch"],
    ["model=1"],
    ["sampler=[1,2]"],
    ["optim=[]"],
    ["experiment={a: 1}"],
    ["sampler=direct,mcmc"],
    ["lattice=x=y"],
    ["experiment=fig3_tfim_small"],  # a `compare training` preset
    # right type, out of range or not an allowed choice
    ["lattice.Lx=-2"],
    ["lattice.Ly=0"],
    ["ham.sign_rule=maybe"],
    ["model.layers=0"],
    ["model.kernel_size=-1"],
    ["model.total_sz=0.3"],
    ["model.symmetry=x"],
    ["sampler.method=magic"],
    ["sampler=mcmc", "sampler.init=left"],
    ["sampler=mcmc", "sampler.move=teleport"],
    ["sampler=mcmc", "sampler.burn_in=-3"],
    ["optim.lr=0.0"],
    ["optim.betas=[0.9]"],
    ["optim.betas=[-1.0, 2.0]"],
    ["optim.schedule=linear"],
    ["optim=sgd", "optim.momentum=-1.0"],
    ["optim.grad_clip=-1.0"],
    ["train.chunk_size=0"],
    ["train.final_symmetry=y"],
    ["seed=-1"],
    ["seed=18446744073709551616"],
    ["device=tpu"],
    ["dtype=float16"],
    ["train.stages=[]"],
    ["train.stages=[{steps: 5, n_samples: 8, lr: nan}]"],
    ["train.time_budget=0.0"],
    ["train.exact_reference=always"],
    ["train.init_from=no/such/run"],
    ["model.layers=3", f"train.init_from={OLD_RUN}"],
    ["resume=no/such/run"],
    ["reference.energy=nan"],
    ["reference.table=[[]]"],  # accepted once, then IndexError at the end of the run
    ["reference.table=[[3.0]]"],
    ["reference.table=[[3.0, -3.2], [1.0, inf]]"],
]


def _names_key(message: str, override: str) -> bool:
    """Whether `message` names the override's key (or its group, for a group override)."""
    key = override.split("=", 1)[0]
    return key in message or key.split(".", 1)[0] + "=" in message


def _example_id(overrides: list[str]) -> str:
    return " ".join(overrides).replace(str(OLD_RUN), "OLD_RUN")


@pytest.mark.parametrize("overrides", BAD_EXAMPLES, ids=_example_id)
def test_each_kind_of_bad_input_is_one_line_naming_the_key(overrides):
    message = check_overrides("train", overrides)
    assert message is not None, overrides
    _assert_one_line(message, overrides)
    assert _names_key(message, overrides[-1]), message


@st.composite
def valid_overrides(draw) -> list[str]:
    """A consistent valid `train` config on a lattice of at most 16 sites."""
    pbc = draw(st.booleans())
    sizes = st.sampled_from([1, 3, 4] if pbc else [1, 2, 3, 4])
    lx, ly = draw(sizes), draw(sizes)
    n_sites = lx * ly
    bipartite = not pbc or (lx % 2 == 0 or lx < 3) and (ly % 2 == 0 or ly < 3)
    out = [f"lattice.Lx={lx}", f"lattice.Ly={ly}", f"lattice.pbc={str(pbc).lower()}"]
    model = draw(st.sampled_from(["pixelcnn", "dense"]))
    out += [f"model={model}", f"model.layers={draw(st.integers(1, 3))}"]
    if model == "pixelcnn":
        out += [f"model.channels={draw(st.integers(2, 6))}"]
        out += [f"model.kernel_size={draw(st.sampled_from([3, 5]))}"]
    else:
        out += [f"model.hidden={draw(st.integers(1, 12))}"]
    heisenberg = draw(st.booleans())
    total_sz = None
    symmetry = draw(st.sampled_from(["none", "spin_flip", "lattice", "lattice_spin_flip"]))
    if heisenberg:
        J = draw(st.sampled_from([1.0, 0.5, -1.0]))
        sign_rule = "auto" if not bipartite else draw(st.sampled_from(["auto", "true"]))
        out += ["ham=heisenberg", f"ham.J={J}", f"ham.sign_rule={sign_rule}"]
        if draw(st.booleans()):
            total_sz = draw(st.integers(0, n_sites)) - n_sites / 2
            out.append(f"model.total_sz={total_sz}")
        if total_sz not in (None, 0):
            symmetry = draw(st.sampled_from(["none", "lattice"]))
        positive = J > 0 and bipartite and sign_rule in ("auto", "true")
        out.append(f"model.phase={str(not positive or draw(st.booleans())).lower()}")
        if J > 0 and not bipartite:
            symmetry = "none"
    else:
        gamma = draw(st.floats(0.1, 5))
        out += ["ham=tfim", f"ham.gamma={gamma}", f"model.phase={draw(st.booleans())}".lower()]
    out.append(f"model.symmetry={symmetry}")
    sampler = draw(st.sampled_from(["direct", "mcmc", "fullsum"]))
    if sampler == "mcmc" and not SquareLattice(Lx=lx, Ly=ly, pbc=pbc).bonds:
        sampler = "direct"  # no bond to exchange along (a 1x1 lattice)
    out += [f"sampler={sampler}", f"sampler.n_samples={draw(st.integers(1, 256))}"]
    if sampler == "mcmc":
        out += [f"sampler.n_chains={draw(st.integers(1, 8))}", "sampler.init=random"]
    optim = draw(st.sampled_from(["adam", "sgd"]))
    out += [f"optim={optim}", f"optim.lr={draw(st.floats(1e-5, 1.0))}"]
    out += [f"train.steps={draw(st.integers(0, 1000))}", f"seed={draw(st.integers(0, 2**32))}"]
    out += ["device=cpu", f"dtype={draw(st.sampled_from(['float32', 'float64']))}"]
    return out


def _check_valid(overrides: list[str]) -> None:
    torch.set_num_threads(1)
    assert check_overrides("train", overrides) is None, overrides
    _build_accepted(overrides)


@settings(FIXED, max_examples=6)
@given(valid_overrides())
def test_valid_overrides_pass_and_build(overrides):
    _check_valid(overrides)


@pytest.mark.slow
@settings(LONG, max_examples=max(1, LONG.max_examples // 4))
@given(valid_overrides())
def test_valid_overrides_pass_and_build_long(overrides):
    _check_valid(overrides)


@st.composite
def perturbed_overrides(draw) -> list[str]:
    """A valid config with one or two keys set to random values of the right type.

    Most of these are accepted, so this reaches what `mixed_overrides` rarely does: configs
    the check lets through, which must then build.
    """
    keys = draw(st.lists(st.sampled_from(sorted(RIGHT_TYPE)), min_size=1, max_size=2))
    return draw(valid_overrides()) + [f"{key}={draw(RIGHT_TYPE[key])}" for key in keys]


@settings(FIXED, max_examples=8)
@given(perturbed_overrides())
def test_perturbed_valid_overrides_give_one_line_or_build(overrides):
    _check_mixed(overrides)


@pytest.mark.slow
@settings(LONG, max_examples=max(1, LONG.max_examples // 2))
@given(perturbed_overrides())
def test_perturbed_valid_overrides_give_one_line_or_build_long(overrides):
    _check_mixed(overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["ham=heisenberg", "model.total_sz=0", "model.symmetry=spin_flip", "sampler=mcmc"],
        ["ham.gamma=0", "model.total_sz=1", "sampler=mcmc"],
        ["lattice=chain", "lattice.Lx=10", "lattice.pbc=true", "sampler=fullsum"],
        ["ham=heisenberg", "ham.J=-1", "model.phase=false", "ham.sign_rule=false"],
        ["experiment=smoke", "sampler=mcmc"],
    ],
)
def test_known_good_configs_pass(overrides):
    assert check_overrides("train", overrides) is None


EVALUATE_VALUES = {
    "n_samples": _ints(-2, 10**6),
    "sampler": st.sampled_from(["direct", "mcmc", "fullsum", "gibbs", *BAD_GROUP_VALUES]),
    "model.symmetry": st.sampled_from(["null", "none", "spin_flip", "lattice", "z"]),
    "device": st.sampled_from(["null", "cpu", "auto", "cuda", "tpu"]),
    "dtype": st.sampled_from(["null", "float32", "float64", "int8"]),
    "seed": _ints(-5, 2**70),
    "chunk_size": _ints(-1, 10**4),
    "lattice.Lx": _ints(1, 5),  # not an evaluate key: the stored config decides
    "model.layers": _ints(1, 3),
    "train.steps": _ints(1, 10),
}
#: Keys evaluate refuses whatever their value.
NOT_EVALUATE_KEYS = {"lattice.Lx", "model.layers", "train.steps"}


@st.composite
def evaluate_overrides(draw) -> list[str]:
    """`evaluate` overrides of the fixture run: random keys, right- or wrong-type values."""
    keys = draw(st.lists(st.sampled_from(sorted(EVALUATE_VALUES)), max_size=4, unique=True))
    overrides = [f"checkpoint={OLD_RUN}"]
    for key in keys:
        wrong = draw(st.integers(0, 3)) == 0
        value = draw(st.sampled_from(WRONG) if wrong else EVALUATE_VALUES[key])
        overrides.append(f"{key}={value}")
    return overrides


def _check_evaluate(overrides: list[str]) -> None:
    torch.set_num_threads(1)
    message = check_overrides("evaluate", overrides)
    _assert_one_line(message, overrides)
    if NOT_EVALUATE_KEYS & {o.split("=", 1)[0] for o in overrides}:
        assert message is not None, overrides


@settings(FIXED, max_examples=6)
@given(evaluate_overrides())
def test_random_evaluate_overrides_give_one_line_or_pass(overrides):
    _check_evaluate(overrides)


@pytest.mark.slow
@settings(LONG, max_examples=max(1, LONG.max_examples // 2))
@given(evaluate_overrides())
def test_random_evaluate_overrides_give_one_line_or_pass_long(overrides):
    _check_evaluate(overrides)


@pytest.mark.parametrize(
    "override",
    [
        "sampler=[1,2]",
        "sampler=[]",
        "sampler={a: 1}",
        "sampler=null",
        "sampler=gibbs",
        "sampler=direct,mcmc",
        "n_samples=abc",
        "n_samples=-2",
        "model.symmetry=z",
        "device=tpu",
        "dtype=int8",
        "seed=-5",
        "chunk_size=0",
        "lattice.Lx=2",
        "train.steps=[1,2]",
    ],
)
def test_each_kind_of_bad_evaluate_input_is_one_line_naming_the_key(override):
    message = check_overrides("evaluate", [f"checkpoint={OLD_RUN}", override])
    assert message is not None, override
    _assert_one_line(message, [override])
    assert _names_key(message, override), message
