"""Samples grouped by symmetry orbit: the grouping itself, the invariance check, and that a step
on one sample per orbit equals the step on the whole batch."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from naqs_cli import build, natural, orbits
from naqs_cli.models.symmetry import SymmetrizedWaveFunction
from naqs_cli.state import VariationalState


def _state(overrides: list[str]):
    cfg = compose("train", ["sampler=direct", "dtype=float64", "device=cpu", "seed=3", *overrides])
    setup = build.build_training(cfg)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from the initialization, so every parameter matters
        for p in setup.state.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return setup.state


HEISENBERG_2X4 = ["lattice.Lx=4", "lattice.Ly=2", "ham=heisenberg", "model.total_sz=0"]
SMALL_PIXELCNN = ["model.layers=2", "model.channels=4"]


def _brute_force_orbit(model, row: torch.Tensor) -> frozenset:
    return frozenset(tuple(image.tolist()) for image in model.transformed(row[None])[0])


@pytest.mark.parametrize("packed_sites", [orbits.PACKED_SITES, 4])
def test_orbits_are_the_sets_of_images(packed_sites, monkeypatch):
    monkeypatch.setattr(orbits, "PACKED_SITES", packed_sites)  # 4: the lexicographic path
    state = _state(["lattice.Lx=3", "lattice.Ly=3", "model.symmetry=lattice_spin_flip"])
    x = state.sample(200).x
    found = orbits.find_orbits(state.model, x)
    sets = [_brute_force_orbit(state.model, row) for row in x]
    assert int(found.counts.sum()) == x.shape[0]
    assert len(set(sets)) == found.counts.shape[0] < x.shape[0]
    for i, orbit in enumerate(sets):
        assert sets[int(found.first[found.inverse[i]])] == orbit
        assert int(found.first[found.inverse[i]]) <= i, "the first sample of the orbit"
    for u in range(found.counts.shape[0]):
        members = [i for i in range(len(sets)) if int(found.inverse[i]) == u]
        assert len(members) == int(found.counts[u])
    plain = orbits.find_orbits(state.model, x, use_group=False)
    assert plain.counts.shape[0] == torch.unique(x, dim=0).shape[0]


@pytest.mark.parametrize(
    "overrides",
    [
        ["lattice.Lx=4", "lattice.Ly=4", "ham=tfim", "model.symmetry=lattice_spin_flip"],
        ["lattice.Lx=3", "lattice.Ly=3", "lattice.pbc=true", "model.symmetry=lattice"],
        ["lattice.Lx=4", "lattice.Ly=2", "ham=tfim", "model.symmetry=lattice_spin_flip"],
        [*HEISENBERG_2X4, "model.symmetry=lattice_spin_flip"],
        ["lattice.Lx=3", "lattice.Ly=3", "ham=heisenberg", "model.symmetry=lattice_spin_flip"],
    ],
)
def test_lattice_hamiltonians_are_invariant_under_their_symmetry_groups(overrides):
    state = _state([*SMALL_PIXELCNN, *overrides])
    assert orbits.hamiltonian_is_invariant(state.hamiltonian, state.model)
    assert state.orbits_by_group


def test_a_group_that_is_no_symmetry_of_the_hamiltonian_is_not_used():
    state = _state([*SMALL_PIXELCNN, "lattice.Lx=4", "lattice.Ly=4", "ham=tfim"])
    shifted = SymmetrizedWaveFunction(state.model, symmetry="spin_flip")
    # Translation by one column: no symmetry of the open lattice.
    shift = torch.arange(16).view(4, 4).roll(1, dims=1).reshape(-1)
    shifted.perms = torch.stack([torch.arange(16), shift])
    shifted.flips = torch.tensor([False, False])
    assert not orbits.hamiltonian_is_invariant(state.hamiltonian, shifted)
    wrapped = VariationalState(shifted, state.sampler, state.hamiltonian)
    assert not wrapped.orbits_by_group
    batch = wrapped.sample(64)
    assert batch.orbits.counts.shape[0] == torch.unique(batch.x, dim=0).shape[0]


def _update(rule_class, state, batch, **kwargs) -> torch.Tensor:
    params = state.parameters()
    before = [p.detach().clone() for p in params]
    rule = rule_class(params, lr=1.0, **kwargs)
    assert rule.step(state, batch, state.local_energy(batch)).is_finite
    delta = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, params, strict=True)])
    with torch.no_grad():
        for p, b in zip(params, before, strict=True):
            p.copy_(b)
    return delta


@pytest.mark.parametrize("symmetry", ["lattice_spin_flip", "none"])
def test_one_sample_per_orbit_gives_the_whole_batch_update(symmetry):
    state = _state([*SMALL_PIXELCNN, *HEISENBERG_2X4, f"model.symmetry={symmetry}"])
    batch = state.sample(256)
    assert batch.orbits is not None
    n_orbits = batch.orbits.counts.shape[0]
    distinct = torch.unique(batch.x, dim=0).shape[0]
    if symmetry == "none":
        assert n_orbits == distinct
    else:
        assert n_orbits < distinct, "the group joins distinct configurations"
    whole = type(batch)(x=batch.x, log_psi=batch.log_psi)  # no orbits: every sample a row
    e_orbits, e_whole = state.local_energy(batch), state.local_energy(whole)
    torch.testing.assert_close(e_orbits.total, e_whole.total, rtol=0, atol=1e-11)
    for rule_class, kwargs in [
        (natural.MinSR, {"diag_shift": 1e-3}),
        (natural.SR, {"diag_shift": 1e-3}),
        (natural.MinSR, {"diag_shift": 1e-2, "diag_shift_rel": 0.1}),
    ]:
        got = _update(rule_class, state, batch, **kwargs)
        want = _update(rule_class, state, whole, **kwargs)
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * scale)
    grads = []
    for b in (batch, whole):
        state.expect_and_grad(b, state.local_energy(b).total)
        grads.append(torch.cat([p.grad.reshape(-1) for p in state.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12 * float(grads[1].abs().max()))
