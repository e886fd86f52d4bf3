"""Bad input through the real CLI: one stderr line, exit code 2, no traceback, no outputs.

Most cases run through `naqs_cli.cli.main` in one subprocess (a subprocess per case would
cost seconds of imports each) with Hydra's run replaced by a stub: a case that reaches the stub
passed validation, so every rejected case was rejected before Hydra could create anything. A
few cases run as separate `python -m naqs_cli` processes and check that no run directory
appears.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, compose, make_trainer, run_cli

from naqs_cli import store

NO_CUDA = not torch.cuda.is_available()
TINY = TINY_TRAIN

#: (argv, words the one-line message must contain). Placeholders name the files of `files`.
CASES = [
    # bullet 1: every key's type and range, and the cross-key rules of `naqs_cli/build.py`
    (["train", "lattice.Lx=0"], ["lattice.Lx=0", ">= 1"]),
    (["train", "-m", "ham.gamma=2,3", "--cfg", "hydra"], ["--cfg and -m", "cannot be combined"]),
    (["train", "lattice.Ly=-3"], ["lattice.Ly=-3", ">= 1"]),
    (["train", "lattice.Lx=abc"], ["lattice.Lx=abc", "Integer"]),
    (["train", "lattice.Lx=2.5"], ["lattice.Lx=2.5", "Integer"]),
    (["train", "lattice.pbc=maybe"], ["lattice.pbc=maybe", "bool"]),
    (["train", "lattice.pbc=true", "lattice.Lx=2"], ["lattice.Lx=2", "pbc"]),
    (["exact", "lattice.pbc=true", "lattice.Ly=2"], ["lattice.Ly=2", "pbc"]),
    (["train", "ham.gamma=inf"], ["ham.gamma=inf", "finite"]),
    (["train", "ham.gamma=nan"], ["ham.gamma=nan", "finite"]),
    (["exact", "ham.gamma=abc"], ["ham.gamma=abc", "Float"]),
    (["train", "ham.J=-inf"], ["ham.J=-inf", "finite"]),
    (["train", "ham=nosuch"], ["ham=nosuch", "tfim", "heisenberg"]),
    (["train", "sampler.n_samples=0"], ["sampler.n_samples=0", ">= 1"]),
    (["train", "model.kernel_size=4"], ["model.kernel_size=4", "odd"]),
    (["train", "model.kernel_size=1"], ["model.kernel_size=1", ">= 3"]),
    (["train", "model.layers=0"], ["model.layers=0", ">= 1"]),
    (["train", "model.channels=1"], ["model.channels=1", ">= 2"]),
    (["train", "optim.lr=0"], ["optim.lr=0", "> 0"]),
    (["train", "optim.lr=-0.1"], ["optim.lr=-0.1", "> 0"]),
    (["train", "optim=adam", "optim.betas=[0.9]"], ["optim.betas", "two numbers"]),
    (["train", "train.stages=[]"], ["train.stages", "at least one"]),
    (["train", "seed=-1"], ["seed=-1", "integer"]),
    (["train", "ham=heisenberg", "model.total_sz=0.5"], ["model.total_sz=0.5", "integer"]),
    (["train", "ham=heisenberg", "model.total_sz=9"], ["model.total_sz=9", "N = 16"]),
    (["train", "model.total_sz=0"], ["model.total_sz=0", "conserve", "null"]),
    (["train", "ham=heisenberg", "model.count_feature=true"], ["model.count_feature", "total_sz"]),
    (
        ["train", "ham=heisenberg", "model.total_sz=1", "model.symmetry=spin_flip"],
        ["model.symmetry=spin_flip", "total_sz"],
    ),
    (["train", "model.symmetry=mirror"], ["model.symmetry=mirror", "spin_flip"]),
    (["train", "train.final_symmetry=bogus"], ["train.final_symmetry=bogus", "lattice"]),
    (
        ["train", "ham=heisenberg", "model.total_sz=0", "sampler=mcmc", "sampler.move=flip"],
        ["sampler.move=flip", "total_sz"],
    ),
    (["train", "sampler=mcmc", "sampler.move=exchange"], ["sampler.move=exchange", "flip"]),
    (["train", "sampler=mcmc", "sampler.init=sideways"], ["sampler.init=sideways", "random"]),
    (["train", "sampler=fullsum", "lattice.Lx=5"], ["sampler=fullsum", "FULLSUM_MAX_SITES = 16"]),
    (
        ["train", "ham=heisenberg", "lattice.pbc=true", "lattice.Lx=3", "ham.sign_rule=true"],
        ["ham.sign_rule=true", "bipartite"],
    ),
    (
        ["train", "ham=heisenberg", "ham.sign_rule=false", "model.phase=false"],
        ["model.phase=false", "signs"],
    ),
    (["train", "ham.sign_rule=true"], ["ham.sign_rule", "unknown key"]),
    (["train", "device=tpu"], ["device=tpu", "cpu"]),
    (["train", "dtype=float16"], ["dtype=float16", "float64"]),
    (["exact", "method=ed", "lattice.Lx=8", "lattice.Ly=8"], ["method=ed", "24"]),
    (["exact", "method=free_fermion"], ["method=free_fermion", "1D"]),
    (["train", "nosuchkey=1"], ["nosuchkey", "unknown key"]),
    (["train", "-m", "lattice.Lx=3,0"], ["lattice.Lx=0", ">= 1"]),
    (["train", "hydra.run.dir={good}"], ["already holds a training run", "resume="]),
    (["evaluate", "{good}", "lattice.Lx=5"], ["lattice.Lx", "evaluate", "model.symmetry"]),
    (["evaluate", "{good}", "+lattice.Lx=5"], ["lattice", "may change only"]),
    (["evaluate", "{good}", "model.layers=3"], ["model.layers", "may change only"]),
    (["evaluate", "{good}", "n_samples=0"], ["n_samples=0", ">= 1"]),
    (["evaluate", "{good}", "model.symmetry=mirror"], ["model.symmetry=mirror"]),
    (["frobnicate"], ["unknown command"]),
    (["compare", "nothing"], ["compare needs"]),
    # bullet 5: missing, truncated, corrupted, foreign, crafted and incompatible files
    (["evaluate", "/no/such/checkpoint.pt"], ["checkpoint", "no such file"]),
    (["evaluate", "{empty}"], ["{empty}", "no checkpoints/last.pt"]),
    (["evaluate", "{truncated}"], ["{truncated}", "truncated"]),
    (["evaluate", "{flipped}"], ["{flipped}", "corrupted"]),
    (["evaluate", "{garbage}"], ["{garbage}", "not a naqs checkpoint"]),
    (["evaluate", "{foreign}"], ["{foreign}", "format version 99", "version 1"]),
    (["evaluate", "{keyless}"], ["{keyless}", "not a naqs checkpoint"]),
    (["evaluate", "{crafted}"], ["{crafted}", "not a naqs checkpoint"]),
    (["evaluate", "{legacy}"], ["{legacy}", "not a naqs checkpoint"]),
    (["evaluate", "{badconfig}"], ["{badconfig}", "stored config"]),
    (["evaluate", "{big}", "sampler=fullsum"], ["sampler=fullsum", "{big}", "16"]),
    (["train", "resume={truncated}"], ["{truncated}", "truncated"]),
    (["train", "resume={empty}"], ["resume=", "no checkpoints/last.pt"]),
    (["train", "resume=/no/such/run"], ["resume=/no/such/run", "no such file"]),
    (["train", "resume={good}", "model.channels=8"], ["model.channels", "{good}"]),
    (["train", "resume={good}", "lattice=chain"], ["lattice=chain", "{good}"]),
    (["train", "resume={good}", "optim=sgd"], ["optim=sgd", "{good}"]),
    (["train", "resume={good}", "optim.lr=-1"], ["optim.lr=-1", "{good}"]),
    (["train", "resume={advanced}", "train.steps=3"], ["train.steps", "step 5", "{advanced}"]),
    (["train", "train.init_from={garbage}"], ["{garbage}", "not a naqs checkpoint"]),
    (["train", "train.init_from={good}"], ["train.init_from=", "do not fit"]),
    (["compare", "sampling", "{flipped}"], ["{flipped}", "corrupted"]),
]
if NO_CUDA:
    CASES += [
        (["train", "device=cuda"], ["device=cuda", "no CUDA"]),
        (["evaluate", "{cuda}"], ["device=cuda", "no CUDA", "{cuda}"]),
    ]

DRIVER = r"""
import contextlib, io, json, sys, traceback
import torch
torch.set_num_threads(1)
from naqs_cli import cli

def hydra_would_start(command, task, args):
    raise SystemExit(99)

cli._run_hydra = hydra_would_start
results = []
for argv in json.load(sys.stdin):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            code = "traceback"
            err.write(traceback.format_exc())
    results.append({"code": code, "stderr": err.getvalue()})
json.dump(results, sys.stdout)
"""


class _Evil:
    """Pickles to a call of os.system: a weights_only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Write good and bad checkpoints (no training: a fresh model's step-0 checkpoint)."""
    root = tmp_path_factory.mktemp("files")
    good = root / "good"
    trainer = make_trainer(compose("train", [*TINY, "train.steps=10"]), good)
    assert trainer.save()
    last = good / "checkpoints" / "last.pt"
    data = last.read_bytes()
    state = store.load_checkpoint(last)
    out = {"good": good, "empty": root / "empty", "marker": root / "pwned"}
    out["empty"].mkdir()
    for name, content in (
        ("truncated", data[: len(data) // 2]),
        ("garbage", b"not a checkpoint at all " * 50),
    ):
        out[name] = root / f"{name}.pt"
        out[name].write_bytes(content)
    flipped = bytearray(data)
    middle = len(flipped) // 2
    flipped[middle : middle + 8] = bytes(b ^ 0xFF for b in flipped[middle : middle + 8])
    out["flipped"] = root / "flipped.pt"
    out["flipped"].write_bytes(bytes(flipped))
    out["foreign"] = root / "foreign.pt"
    torch.save({**state, "format_version": 99}, out["foreign"])
    out["keyless"] = root / "keyless.pt"
    torch.save({"weights": torch.ones(3)}, out["keyless"])
    out["crafted"] = root / "crafted.pt"
    torch.save(_Evil(out["marker"]), out["crafted"])
    out["legacy"] = root / "crafted-legacy.pt"
    with open(out["legacy"], "wb") as f:
        pickle.dump(_Evil(out["marker"]), f)
    variants = {
        "big": {"config": {**state["config"], "lattice": {"Lx": 5, "Ly": 4, "pbc": False}}},
        "cuda": {"config": {**state["config"], "device": "cuda"}},
        "badconfig": {"config": {**state["config"], "lattice": "square"}},
        "advanced": {"step": 5},
    }
    for name, change in variants.items():
        out[name] = root / name / "checkpoints" / "last.pt"
        store.save_checkpoint(out[name], {**state, **change})
    return out


@pytest.fixture(scope="module")
def outcomes(files) -> list[dict]:
    """Run every case through `cli.main` in one subprocess."""
    argvs = [[a.format(**files) for a in argv] for argv, _ in CASES]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        cwd=files["empty"],
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _assert_one_line_error(code, stderr: str, *needles: str) -> None:
    assert code == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line(files, outcomes, index):
    _, needles = CASES[index]
    result = outcomes[index]
    _assert_one_line_error(result["code"], result["stderr"], *(n.format(**files) for n in needles))


def test_crafted_pickles_do_not_run(files, outcomes):
    assert not files["marker"].exists(), "a checkpoint ran code"
    for path in (files["crafted"], files["legacy"]):
        with pytest.raises(store.CheckpointError, match="not a naqs checkpoint"):
            store.load_checkpoint(path)
    assert not files["marker"].exists()


def test_valid_inputs_pass_validation(files):
    from naqs_cli.cli import check_overrides

    assert check_overrides("train", TINY) is None
    assert check_overrides("evaluate", [f"checkpoint={files['good']}", "sampler=fullsum"]) is None
    assert check_overrides("train", [f"resume={files['advanced']}", "train.steps=8"]) is None
    assert check_overrides("train", [*TINY, f"train.init_from={files['good']}"]) is None


def test_rejected_in_a_real_process_writes_nothing(tmp_path, files):
    proc = run_cli(
        "train", f"resume={files['foreign']}", "train.steps=5", "lattice.Lx=0",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    _assert_one_line_error(proc.returncode, proc.stderr, str(files["foreign"]), "version 99")
    assert not (tmp_path / "run").exists(), "a rejected config must not create its run directory"
    assert not (tmp_path / "outputs").exists()


def test_unwritable_run_directory_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("exact", "lattice.Lx=2", "lattice.Ly=2", f"hydra.run.dir={blocker / 'run'}")
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(blocker) in lines[0], lines[0]


def test_valid_override_runs(tmp_path):
    proc = run_cli(
        "exact", "lattice.Lx=3", "lattice.Ly=3", "ham.gamma=1.0", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr
    assert "E0/N" in proc.stdout
    assert (tmp_path / "exact.h5").exists()


def test_top_level_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in ("train", "evaluate", "compare sampling", "compare training", "exact"):
        assert name in proc.stdout


def test_subcommand_help_and_cfg(tmp_path):
    proc = run_cli("exact", "--help")
    assert proc.returncode == 0 and "method" in proc.stdout
    proc = run_cli("train", "--cfg", "job", "ham=heisenberg")
    assert proc.returncode == 0 and "sign_rule" in proc.stdout
