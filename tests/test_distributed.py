"""Data-parallel training on 2 gloo processes (CPU): equal results, one run directory, resume.

The checks share one pair of ranks (`two_ranks`, module scope, forked so that the imports are
done once): each rank runs every scenario and saves what the assertions need, ending with
`naqs train` and its resume through `cli.main` with torchrun's environment variables. Rejected
command lines are checked in-process, as each rank sees them; the real `torchrun` launcher runs
in a `slow` test (and in benchmarks/bench_distributed.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, TINY_TRAIN, compose, make_trainer

from naqs_cli import build, cli, distributed, store, vmc
from naqs_cli.compose import prepare_resume
from naqs_cli.samplers import Samples
from naqs_cli.train.checkpoint import resume_world_note
from naqs_cli.train.loop import Trainer
from naqs_cli.train.signals import SignalCatcher

WORLD = 2
TORCHRUN = Path(sys.executable).parent / "torchrun"
#: Full sums over a 3×3 basis (512 states, 256 per rank).
FULLSUM = [
    "lattice.Lx=3",
    "lattice.Ly=3",
    "model.layers=2",
    "model.channels=4",
    "sampler=fullsum",
    "dtype=float64",
    "device=cpu",
    "optim.lr=0.05",
    "train.steps=5",
    "train.log_every=2",
    "train.checkpoint_every=5",
]
#: Direct sampling, 8 samples per step (4 per rank).
DIRECT = [*TINY_TRAIN, "optim.lr=0.05", "train.log_every=1", "train.checkpoint_every=2"]
MCMC = [
    *TINY_TRAIN,
    "sampler=mcmc",
    "sampler.n_samples=16",
    "sampler.n_chains=4",
    "sampler.burn_in=2",
    "sampler.sweeps_between_samples=1",
    "train.steps=2",
]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:  # held open together, so the ports differ
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _run_trainer(cfg, out_dir: Path, checkpoint=None, path=None) -> Trainer:
    trainer = make_trainer(cfg, out_dir, checkpoint, path)
    with SignalCatcher() as catcher:
        trainer.run(catcher)  # the loop alone: no final evaluation or plot
    return trainer


def _model_and_hamiltonian(cfg):
    lattice = build.build_lattice(cfg)
    hamiltonian = build.build_hamiltonian(cfg, lattice)
    torch.manual_seed(int(cfg.seed))
    return build.build_model(cfg, lattice), hamiltonian


def _direct_gradient(rank: int) -> dict:
    """One rank's half of a 32-sample Eq. 4 gradient, all-reduced, and its statistics."""
    cfg = compose("train", [*TINY_TRAIN, "sampler.n_samples=32"])
    model, hamiltonian = _model_and_hamiltonian(cfg)
    sampler = build.build_sampler(cfg, hamiltonian, torch.device("cpu"), 0, rank, WORLD)
    batch = sampler.sample(model)
    e_loc = vmc.batch_local_energy(model, hamiltonian, batch)
    model.zero_grad(set_to_none=True)
    vmc.vmc_gradient(model, batch, e_loc.total, chunk_size=5, n_total=32)
    distributed.all_reduce_grads(model)
    return {
        "x": batch.x,
        "grads": [p.grad.clone() for p in model.parameters()],
        "stats": vmc.estimate_observables(batch, e_loc, hamiltonian),
    }


def _mcmc_stats(rank: int) -> dict:
    """One rank's 2 of 4 chains and the all-gathered chain statistics."""
    cfg = compose("train", MCMC)
    model, hamiltonian = _model_and_hamiltonian(cfg)
    sampler = build.build_sampler(cfg, hamiltonian, torch.device("cpu"), 0, rank, WORLD)
    batch = sampler.sample(model)
    e_loc = vmc.batch_local_energy(model, hamiltonian, batch)
    return {
        "n_chains": sampler.n_chains,
        "x": batch.x,
        "stats": vmc.estimate_observables(batch, e_loc, hamiltonian, n_chains=4),
    }


def _rank_main(rank: int, ports: tuple[int, int, int], out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(ports[0]),
    )
    torch.set_num_threads(1)
    out_dir = Path(out)
    distributed.init()
    try:
        result = {"direct": _direct_gradient(rank), "mcmc": _mcmc_stats(rank)}
        trainer = _run_trainer(compose("train", FULLSUM), out_dir / "fullsum")
        result["fullsum_share"] = (trainer.sampler.start, trainer.sampler.stop)
        _run_trainer(compose("train", [*DIRECT, "train.steps=4"]), out_dir / "straight")
        _run_trainer(compose("train", [*DIRECT, "train.steps=2"]), out_dir / "split")
        cfg, path, state = prepare_resume(str(out_dir / "split"), ["train.steps=4"])
        _run_trainer(cfg, out_dir / "split", state, path)
        trainer = _run_trainer(compose("train", MCMC), out_dir / "mcmc")
        result["mcmc_chains"] = trainer.sampler.x.clone()
        budget = [*DIRECT, "train.steps=1000000", "train.time_budget=1.0"]
        trainer = _run_trainer(compose("train", budget), out_dir / "budget")
        result["budget"] = (trainer.step, trainer.stopped, trainer.elapsed)
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        distributed.shutdown()
    # Last, as torchrun's ranks run it: the CLI joins and leaves the process group itself.
    _record_batches(out_dir)
    os.chdir(out_dir / "cli")
    run = out_dir / "cli" / "run"
    os.environ["MASTER_PORT"] = str(ports[1])  # a fresh rendezvous for each new group
    cli.main(["train", *CLI_RUN, f"hydra.run.dir={run}"])
    batches = out_dir / f"batches.{rank}"
    batches.rename(f"{batches}.first")
    os.environ["MASTER_PORT"] = str(ports[2])
    cli.main(["train", f"resume={run}", "train.steps=6"])


def _start_ranks(function, args: tuple) -> None:
    """Run function(rank, *args) on WORLD processes (forked: the imports are done already)."""
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(function, args=args, nprocs=WORLD, join=True, start_method=method)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ranks")
    (out / "cli").mkdir()
    _start_ranks(_rank_main, (tuple(_free_ports(3)), str(out)))
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_stats_close(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-13, err_msg=key)


def test_direct_gradient_equals_one_rank_on_both_ranks_samples(two_ranks):
    _, results = two_ranks
    parts = [r["direct"] for r in results]
    assert [p["x"].shape[0] for p in parts] == [16, 16], "each rank holds n_samples/2"
    assert not torch.equal(parts[0]["x"], parts[1]["x"]), "independent streams"
    for a, b in zip(parts[0]["grads"], parts[1]["grads"], strict=True):
        assert torch.equal(a, b), "every rank holds the same all-reduced gradient"
    cfg = compose("train", [*TINY_TRAIN, "sampler.n_samples=32"])
    model, hamiltonian = _model_and_hamiltonian(cfg)
    x = torch.cat([p["x"] for p in parts])
    with torch.no_grad():
        batch = Samples(x=x, log_psi=model.log_psi(x))
    e_loc = vmc.local_energy(model, hamiltonian, batch)
    vmc.vmc_gradient(model, batch, e_loc.total, chunk_size=7)
    for p, got in zip(model.parameters(), parts[0]["grads"], strict=True):
        torch.testing.assert_close(got, p.grad, rtol=0, atol=1e-10)
    _assert_stats_close(parts[0]["stats"], vmc.estimate_observables(batch, e_loc, hamiltonian))
    assert parts[0]["stats"] == parts[1]["stats"], "global statistics on every rank"


def test_mcmc_chains_split_and_statistics_gathered(two_ranks):
    _, results = two_ranks
    parts = [r["mcmc"] for r in results]
    assert [p["n_chains"] for p in parts] == [2, 2] and [len(p["x"]) for p in parts] == [8, 8]
    cfg = compose("train", MCMC)
    model, hamiltonian = _model_and_hamiltonian(cfg)
    x = torch.cat([p["x"] for p in parts])  # rank-major: chain-major over all 4 chains
    with torch.no_grad():
        batch = Samples(x=x, log_psi=model.log_psi(x), n_chains=4)
    e_loc = vmc.local_energy(model, hamiltonian, batch)
    want = vmc.estimate_observables(batch, e_loc, hamiltonian)
    assert "tau" in want and "r_hat" in want
    _assert_stats_close(parts[0]["stats"], want)


def test_fullsum_two_ranks_equal_one_rank(two_ranks, tmp_path):
    out, results = two_ranks
    assert [r["fullsum_share"] for r in results] == [(0, 256), (256, 512)]
    _run_trainer(compose("train", FULLSUM), tmp_path)
    one, two = store.load_checkpoint(tmp_path), store.load_checkpoint(out / "fullsum")
    assert one["step"] == two["step"] == 5 and two["world_size"] == 2
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(two["model"][key], value, rtol=1e-10, atol=1e-12)
    h1 = store.read_history(tmp_path / "history.h5")
    h2 = store.read_history(out / "fullsum" / "history.h5")
    assert list(h2["step"]) == list(range(5)) and set(h2["n_samples"]) == {512}
    for key in ("energy", "energy_variance", "abs_magnetization", "sigma_x", "grad_norm"):
        np.testing.assert_allclose(h2[key], h1[key], rtol=1e-10, err_msg=key)


def test_resume_on_two_ranks_equals_straight_run(two_ranks):
    out, _ = two_ranks
    straight, split = store.load_checkpoint(out / "straight"), store.load_checkpoint(out / "split")
    assert straight["step"] == split["step"] == 4
    assert len(split["sampler"]) == len(split["rng"]) == 2
    gens = [s["generator"] for s in split["sampler"]]
    assert not torch.equal(gens[0], gens[1]), "each rank's own stream is stored"
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), key
    a = store.read_history(out / "straight" / "history.h5")
    b = store.read_history(out / "split" / "history.h5")
    assert list(b["step"]) == list(range(4)), "no step twice, none missing"
    np.testing.assert_array_equal(a["energy"], b["energy"])


def test_time_budget_stops_both_ranks_at_rank_0s_step(two_ranks):
    """Rank 0's clock decides: both ranks stop after the same step, with the budget spent."""
    out, results = two_ranks
    steps = {r["budget"][0] for r in results}
    assert len(steps) == 1 and steps.pop() > 0
    assert all(r["budget"][1] == "time_budget" for r in results)
    assert results[0]["budget"][2] >= 1.0
    history = store.read_history(out / "budget" / "history.h5")
    assert list(history["step"]) == list(range(results[0]["budget"][0]))


def test_resume_on_one_rank_reshares_chains(two_ranks, tmp_path):
    out, results = two_ranks
    run = tmp_path / "mcmc"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("checkpoints/last.pt", "history.h5"):
        (run / name).write_bytes((out / "mcmc" / name).read_bytes())
    cfg, path, state = prepare_resume(str(run), ["train.steps=3"])
    trainer = make_trainer(cfg, run, state, path)
    chains = torch.cat([r["mcmc_chains"] for r in results])
    assert trainer.sampler.n_chains == 4 and torch.equal(trainer.sampler.x, chains)
    assert not trainer.sampler.needs_burn_in
    note = resume_world_note(2, 1)
    assert "2 rank(s)" in note and "continues on 1" in note
    with SignalCatcher() as catcher:
        trainer.run(catcher)
    assert store.load_checkpoint(run)["world_size"] == 1
    assert list(store.read_history(run / "history.h5")["step"]) == [0, 1, 2]


# --- the command line ---------------------------------------------------------------------
#: A 2-rank CLI run: 8 samples per step, 4 per rank.
CLI_RUN = [*TINY_TRAIN, "train.steps=4", "train.log_every=2", "train.checkpoint_every=2"]
CLI_RUN += ["train.final_samples=32"]
HOOKED_CLI = ROOT / "tests" / "hooked_cli.py"


def _record_batches(directory: Path) -> None:
    """Make this process record each sampled batch's (step, size) in directory/batches.RANK."""
    import hooks

    hooks.add_callbacks(hooks.RecordBatches(directory / "batches"))


def _batches(path: Path) -> list[tuple[int, int]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(int(step), int(n)) for step, n in rows]


def _check_run(run: Path, steps: int) -> None:
    """One run directory as rank 0 alone writes it: history, checkpoint, final evaluation."""
    assert sorted(p.name for p in run.iterdir()) == [
        ".hydra",
        "checkpoints",
        "history.h5",
        "train.log",
        "training.png",
    ]
    history = store.read_history(run / "history.h5")
    assert list(history["step"]) == list(range(steps)), "every step once"
    assert set(history["n_samples"]) == {8}
    assert store.read_group(run / "history.h5", "final")["n_samples"] == 32
    state = store.load_checkpoint(run)
    assert state["step"] == steps and state["world_size"] == 2 and len(state["sampler"]) == 2


def test_cli_on_two_ranks_writes_one_run_and_resumes(two_ranks):
    out, _ = two_ranks
    for rank in range(WORLD):
        first = _batches(out / f"batches.{rank}.first")
        assert first == [(step, 4) for step in range(4)], "each rank holds n_samples/2"
        assert _batches(out / f"batches.{rank}") == [(4, 4), (5, 4)], "resumed at step 4"
    assert sorted(p.name for p in (out / "cli").iterdir()) == ["run"], "rank 1 wrote nothing"
    run = out / "cli" / "run"
    _check_run(run, 6)
    assert len(list((run / ".hydra").glob("resume-*"))) == 1, "one record of the resume"


@pytest.mark.slow
def test_torchrun_trains_on_two_processes(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NAQS_TEST_BATCHES": str(tmp_path / "batches")}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [str(TORCHRUN), "--standalone", f"--nproc_per_node={WORLD}", str(HOOKED_CLI)]
    command += ["batches", "train", *CLI_RUN, f"hydra.run.dir={run}"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("naqs train:") == 1, "rank 0 alone prints the summary"
    for rank in range(WORLD):
        assert _batches(tmp_path / f"batches.{rank}") == [(step, 4) for step in range(4)]
    _check_run(run, 4)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["batches.0", "batches.1", "run"], "rank 1 wrote nothing"


def test_user_errors_under_torchrun_are_one_line_on_rank_0(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))
    for rank in range(WORLD):  # rejected before the ranks meet: each fails on its own
        monkeypatch.setenv("RANK", str(rank))
        with pytest.raises(SystemExit) as stop:
            cli.main(["train", *TINY_TRAIN, "sampler.n_samples=9"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        if rank == 0:
            assert len(err.strip().splitlines()) == 1, err
            assert "sampler.n_samples=9" in err and "WORLD_SIZE=2" in err, err
        else:
            assert err == "", "only rank 0 says why"
    monkeypatch.setenv("RANK", "0")
    for args, words in (
        (["exact"], "only `naqs train`"),
        (["train", "-m", "seed=1,2"], "-m/--multirun"),
        (["train", "sampler=mcmc", "sampler.n_chains=3"], "sampler.n_chains=3"),
    ):
        with pytest.raises(SystemExit) as stop:
            cli.main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [], "nothing written"
