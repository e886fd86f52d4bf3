"""`naqs_cli.compare`: compare training on the real training loop; compare sampling's checkpoint
loading with the checks of `naqs evaluate`."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, compose, make_trainer, run_cli

from naqs_cli import build, cli, store, tasks, validation, vmc
from naqs_cli.compare import training
from naqs_cli.compose import prepare_resume
from naqs_cli.errors import CheckpointError, ConfigError
from naqs_cli.models import unwrap

#: A 2×3 TFIM comparison: direct and MCMC (k = 1), 3 steps each; the wall time (generous on a
#: loaded machine) never ends a run first, so every run has exactly MAX_STEPS rows.
MAX_STEPS = 3
COMPARE = [
    *TINY_TRAIN,
    "lattice.Ly=3",
    "sampler.n_samples=16",
    "compare.ks=[1]",
    "compare.n_chains=4",
    "compare.burn_in=1",
    "compare.wall_time=600",
    f"compare.max_steps={MAX_STEPS}",
]
#: Columns of a run group that come from its history.h5 (relative_error is computed).
HISTORY_COLUMNS = training.RUN_COLUMNS


@pytest.fixture
def no_plot(monkeypatch):
    """Skip the PNG (matplotlib start-up is most of a tiny comparison's time)."""
    from naqs_cli import plots

    monkeypatch.setattr(plots, "compare_training_plot", lambda h5, png: png)


@pytest.fixture
def initial_weights(monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """Record every run's weights as its training starts, by run directory name."""
    seen: dict[str, dict[str, torch.Tensor]] = {}

    class Recording(training.Trainer):
        def run(self, catcher):
            state = unwrap(self.model).state_dict()
            seen[self.out_dir.name] = {k: v.detach().clone() for k, v in state.items()}
            return super().run(catcher)

    monkeypatch.setattr(training, "Trainer", Recording)
    return seen


def test_compare_training_runs_the_training_loop(tmp_path, no_plot, initial_weights):
    cfg = compose("compare_training", COMPARE)
    result = training.compare_training(cfg, tmp_path)
    runs = tmp_path / training.RUNS_DIR
    assert str(runs) in result.summary.splitlines()[-1]
    assert set(initial_weights) == {"direct", "mcmc_k1"}
    for name, tensor in initial_weights["direct"].items():
        assert torch.equal(tensor, initial_weights["mcmc_k1"][name]), name
    with h5py.File(tmp_path / "compare_training.h5", "r") as f:
        assert set(f) == {"direct", "mcmc_k1"}
        for name, group in f.items():
            history = store.read_history(runs / name / "history.h5")
            np.testing.assert_array_equal(group["step"][:], np.arange(MAX_STEPS))
            for column in HISTORY_COLUMNS:
                np.testing.assert_array_equal(group[column][:], history[column], err_msg=column)
            assert (history["lr"] == cfg.optim.lr).all()  # constant, no schedule
            assert (history["n_samples"] == cfg.sampler.n_samples).all()
            assert np.isfinite(group["energy"][:]).all()
            assert group.attrs["steps"] == MAX_STEPS
            last = store.load_checkpoint(runs / name / "checkpoints" / "last.pt")
            assert last["step"] == MAX_STEPS
            assert last["config"]["train"]["time_budget"] == cfg.compare.wall_time
            assert "compare" not in last["config"]
        chains = f["mcmc_k1"]
        history = store.read_history(runs / "mcmc_k1" / "history.h5")
        for column in training.CHAIN_COLUMNS:
            np.testing.assert_array_equal(chains[column][:], history[column], err_msg=column)
        assert chains.attrs["move"] == "flip" and chains.attrs["k"] == 1
        assert "acceptance" not in f["direct"]
    stored = store.load_checkpoint(runs / "mcmc_k1" / "checkpoints" / "last.pt")["config"]
    assert stored["sampler"]["sweeps_between_samples"] == 1
    assert stored["sampler"]["n_chains"] == cfg.compare.n_chains
    # Each run is an ordinary training run: `naqs train resume=<run>` accepts it.
    resumed, _, state = prepare_resume(str(runs / "direct"), [f"train.steps={MAX_STEPS + 2}"])
    assert state["step"] == MAX_STEPS and resumed.train.steps == MAX_STEPS + 2


def test_runs_of_one_config_are_identical(tmp_path, no_plot):
    """Same seed, same weights, same samples: the comparison's direct run and a second direct
    run of the same config agree step for step."""
    cfg = compose("compare_training", COMPARE)
    training.compare_training(cfg, tmp_path / "compare")
    setup = build.build_training(training.run_config(cfg))
    training._train(setup, tmp_path / "again", "direct")
    first = store.read_history(tmp_path / "compare" / training.RUNS_DIR / "direct" / "history.h5")
    again = store.read_history(tmp_path / "again" / "history.h5")
    assert first["energy"][0] == again["energy"][0]
    np.testing.assert_array_equal(first["energy"], again["energy"])


def test_nonfinite_energies_roll_back_instead_of_crashing(tmp_path, no_plot, monkeypatch):
    """A NaN local energy in the direct run's second step: the loop skips the update and rolls
    back to the step-0 checkpoint with the learning rate halved (train.max_nonfinite=1); the
    run still ends with MAX_STEPS finite rows."""
    real = vmc.local_energy
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        energy = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            return vmc.LocalEnergy(torch.full_like(energy.total, float("nan")), energy.off_diagonal)
        return energy

    monkeypatch.setattr(vmc, "local_energy", sometimes_nan)
    cfg = compose("compare_training", [*COMPARE, "train.max_nonfinite=1"])
    training.compare_training(cfg, tmp_path)
    history = store.read_history(tmp_path / training.RUNS_DIR / "direct" / "history.h5")
    np.testing.assert_array_equal(history["step"], np.arange(MAX_STEPS))
    assert np.isfinite(history["energy"]).all()
    assert (history["lr"] == 0.5 * cfg.optim.lr).all()  # every kept row is after the rollback
    with h5py.File(tmp_path / "compare_training.h5", "r") as f:
        np.testing.assert_array_equal(f["direct/energy"][:], history["energy"])
        mcmc = store.read_history(tmp_path / training.RUNS_DIR / "mcmc_k1" / "history.h5")
        assert (mcmc["lr"] == cfg.optim.lr).all()  # the next run starts afresh


def test_mcmc_runs_pass_train_validation():
    """The MCMC options built from compare.* are valid train configs (Heisenberg: exchanges
    from random states in the fixed-Σσᶻ model's sector; TFIM: flips)."""
    heisenberg = compose(
        "compare_training",
        [*COMPARE, "lattice.Lx=4", "lattice.Ly=2", "ham=heisenberg", "model.total_sz=0"],
    )
    validation.validate(heisenberg, "compare_training")
    configs = training.run_configs(heisenberg)
    assert list(configs) == ["direct", "mcmc_k1"]
    assert build.build_training(configs["mcmc_k1"]).state.sampler.move == "exchange"
    tfim = training.run_configs(compose("compare_training", [*COMPARE, "compare.ks=[2,5]"]))
    assert [c.sampler.sweeps_between_samples for c in list(tfim.values())[1:]] == [2, 5]
    assert tfim["direct"].sampler == compose("compare_training", COMPARE).sampler


def test_a_directory_with_runs_is_refused(tmp_path, no_plot):
    (tmp_path / training.RUNS_DIR / "direct").mkdir(parents=True)
    (tmp_path / training.RUNS_DIR / "direct" / "history.h5").touch()
    with pytest.raises(ConfigError, match="already holds compare training runs"):
        training.compare_training(compose("compare_training", COMPARE), tmp_path)


# --- compare sampling: a checkpoint is checked as `naqs evaluate` checks it ----------------
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> dict[str, object]:
    """A tiny step-0 checkpoint and copies whose config or weights are broken (with digests)."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.set_num_threads(1)
    trainer = make_trainer(compose("train", [*TINY_TRAIN, "train.steps=5"]), root / "good")
    assert trainer.save()
    good = root / "good" / "checkpoints" / "last.pt"
    state = torch.load(good, weights_only=True)
    model = dict(state["model"])
    name = next(iter(model))
    model[name] = torch.zeros(*model[name].shape[:-1], model[name].shape[-1] + 1)
    variants = {
        "badconfig": {"config": {**state["config"], "lattice": "square"}},
        "misfit": {"model": model},
        "cuda": {"config": {**state["config"], "device": "cuda"}},
    }
    out: dict[str, object] = {"good": good, "root": root}
    for key, change in variants.items():
        out[key] = root / key / "checkpoints" / "last.pt"
        store.save_checkpoint(out[key], {**state, **change})
    return out


CASES = [
    ("badconfig", CheckpointError, ["stored config cannot be used"]),
    ("misfit", CheckpointError, ["weights do not fit"]),
    pytest.param(
        "cuda",
        ConfigError,
        ["device=cuda: no CUDA device is available here; use device=cpu or auto"],
        marks=pytest.mark.skipif(not NO_CUDA, reason="CUDA is present"),
    ),
]


@pytest.mark.parametrize(("name", "error", "needles"), CASES)
def test_bad_checkpoint_is_one_line_before_any_output(
    bad_checkpoints, tmp_path, monkeypatch, capsys, name, error, needles
):
    path = bad_checkpoints[name]

    def hydra_would_start(*args, **kwargs):
        raise AssertionError("pre-validation passed: Hydra would create the run directory")

    monkeypatch.setattr(cli, "_run_hydra", hydra_would_start)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "sampling", str(path), f"hydra.run.dir={out}"])
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for needle in (*needles, str(path)):
        assert needle in lines[0], lines[0]
    assert not out.exists()
    # The task itself (as Hydra would run it) fails the same way, writing nothing.
    cfg = compose("compare_sampling", [f"checkpoint={path}"])
    with pytest.raises(error, match=str(path)):
        tasks.compare_sampling(cfg, out)
    assert not out.exists()


def test_device_override_rescues_a_cuda_checkpoint(bad_checkpoints):
    """The stored device=cuda is only a problem of this machine: device=cpu loads it."""
    path = bad_checkpoints["cuda"]
    assert cli.check_overrides("compare_sampling", [f"checkpoint={path}", "device=cpu"]) is None


@pytest.mark.slow  # a CLI subprocess: ~6 s on a loaded machine
def test_misfit_checkpoint_in_a_real_process_writes_nothing(bad_checkpoints, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        "compare",
        "sampling",
        str(bad_checkpoints["misfit"]),
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "weights do not fit" in lines[0], proc.stderr
    assert not out.exists() and not (tmp_path / "outputs").exists()


def test_unsigned_checkpoint_needs_the_key_that_says_so(bad_checkpoints):
    """A checkpoint without a checksum is refused as `naqs evaluate` refuses it, and loads with
    allow_unverified_checkpoint=true."""
    state = torch.load(bad_checkpoints["good"], weights_only=True)
    state.pop("digest")
    unsigned = bad_checkpoints["root"] / "unsigned.pt"
    torch.save(state, unsigned)
    message = cli.check_overrides("compare_sampling", [f"checkpoint={unsigned}"])
    assert message is not None and "carries no checksum" in message and str(unsigned) in message
    allowed = [f"checkpoint={unsigned}", "allow_unverified_checkpoint=true"]
    assert cli.check_overrides("compare_sampling", allowed) is None
