"""Fuzz the `train` overrides in-process with hypothesis, through the CLI's own check.

`cli.check_overrides` is exactly what `naqs` runs before Hydra starts (composition with type
checking, `build.validate`, checkpoints named by the config); it returns the one-line message
the CLI prints with exit code 2, or None. Random values of the right and wrong types must give
one or the other, never an exception; consistent valid configs must all pass and build.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from naqs_cli import build
from naqs_cli.cli import check_overrides
from naqs_cli.lattice import SquareLattice

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

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
]


def _number(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else str(value)


def _ints(low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(str)


def _floats(**kwargs) -> st.SearchStrategy[str]:
    return st.floats(**kwargs).map(_number)


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
}


@st.composite
def mixed_overrides(draw) -> list[str]:
    """Group choices plus random keys, each with a right-type or a wrong-type value."""
    overrides = [
        f"{group}={draw(st.sampled_from([*options, *options, 'null', 'nosuch', '1']))}"
        for group, options in GROUPS.items()
        if draw(st.booleans())
    ]
    keys = draw(st.lists(st.sampled_from(sorted(RIGHT_TYPE)), max_size=6, unique=True))
    for key in keys:
        wrong = draw(st.integers(0, 3)) == 0
        value = draw(st.sampled_from(WRONG)) if wrong else draw(RIGHT_TYPE[key])
        overrides.append(f"{key}={value}")
    return overrides


@FUZZ
@given(mixed_overrides())
def test_random_overrides_give_one_line_or_pass(overrides):
    torch.set_num_threads(1)
    message = check_overrides("train", overrides)
    if message is not None:
        assert isinstance(message, str) and message.strip(), overrides
        assert "\n" not in message and "Traceback" not in message, message


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


@settings(FUZZ, max_examples=15)
@given(valid_overrides())
def test_valid_overrides_pass_and_build(overrides):
    from conftest import compose

    torch.set_num_threads(1)
    assert check_overrides("train", overrides) is None, overrides
    cfg = compose("train", overrides)
    lattice = build.build_lattice(cfg)
    hamiltonian = build.build_hamiltonian(cfg, lattice)
    model = build.build_model(cfg, lattice)
    build.build_sampler(cfg, hamiltonian, torch.device("cpu"), int(cfg.seed))
    build.build_optimizer(cfg, model)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["ham=heisenberg", "model.total_sz=0", "model.symmetry=spin_flip", "sampler=mcmc"],
        ["ham.gamma=0", "model.total_sz=1", "sampler=mcmc"],
        ["lattice=chain", "lattice.Lx=10", "lattice.pbc=true", "sampler=fullsum"],
        ["ham=heisenberg", "ham.J=-1", "model.phase=false", "ham.sign_rule=false"],
    ],
)
def test_known_good_configs_pass(overrides):
    assert check_overrides("train", overrides) is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A step-0 checkpoint of a 2x2 TFIM PixelCNN (no training)."""
    from conftest import compose

    from naqs_cli import tasks

    run = tmp_path_factory.mktemp("fuzz_run")
    cfg = compose("train", ["lattice.Lx=2", "lattice.Ly=2", "model.channels=2", "device=cpu"])
    assert tasks._Trainer(cfg, run).save()
    return run / "checkpoints" / "last.pt"


EVALUATE_VALUES = {
    "n_samples": _ints(-2, 10**6),
    "sampler": st.sampled_from(["direct", "mcmc", "fullsum", "gibbs"]),
    "model.symmetry": st.sampled_from(["null", "none", "spin_flip", "lattice", "z"]),
    "device": st.sampled_from(["null", "cpu", "auto", "cuda", "tpu"]),
    "dtype": st.sampled_from(["null", "float32", "float64", "int8"]),
    "seed": _ints(-5, 2**70),
    "chunk_size": _ints(-1, 10**4),
    "lattice.Lx": _ints(1, 5),  # not an evaluate key: the stored config decides
    "model.layers": _ints(1, 3),
    "train.steps": _ints(1, 10),
}


@settings(FUZZ, max_examples=15)
@given(st.data())
def test_random_evaluate_overrides_give_one_line_or_pass(checkpoint, data):
    torch.set_num_threads(1)
    keys = data.draw(st.lists(st.sampled_from(sorted(EVALUATE_VALUES)), max_size=4, unique=True))
    overrides = [f"checkpoint={checkpoint}"]
    for key in keys:
        wrong = data.draw(st.integers(0, 3)) == 0
        value = data.draw(st.sampled_from(WRONG) if wrong else EVALUATE_VALUES[key])
        overrides.append(f"{key}={value}")
    message = check_overrides("evaluate", overrides)
    if message is not None:
        assert message.strip() and "\n" not in message, message
    if {"lattice.Lx", "model.layers", "train.steps"} & set(keys):
        assert message is not None, overrides
