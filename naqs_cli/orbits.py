"""Samples grouped by symmetry orbit, so each distinct orbit is evaluated once per step.

If g maps the Hamiltonian onto itself (⟨g·x|H|g·y⟩ = ⟨x|H|y⟩) and the state is invariant
(Ψ(g·x) = Ψ(x) for every parameter value: the symmetrized wrapper, `model.symmetry`), then
E_loc(g·x) = E_loc(x) and O(g·x) = ∂ ln Ψ(g·x)/∂θ = O(x): every sample of an orbit contributes
the same local energy and the same row of log-derivatives. The estimators are sums over samples,
so one representative per orbit weighted by its count gives the same energy, gradient, S and
MinSR update as the whole batch — exactly, not approximately: with rows √(c_u / N) r_u,
XᵀX and Xᵀf are unchanged, and so is the push-through form Xᵀ(XXᵀ + λ)⁻¹f. For models without
a symmetry group the group is trivial and orbits are the distinct configurations.

Exact samples of the 4×4 Heisenberg ground state in the Σσᶻ = 0 sector, averaged over 20
batches: 256 samples hold 193 distinct configurations but only 102 orbits of D4 × Z2 (1,024:
583 and 223); on the TFIM at Γ = 3 nearly every sample is its own orbit (256: 237).
"""

from __future__ import annotations

import torch
from torch import Tensor

from naqs_cli.samplers import Orbits

#: Configurations for the check that the Hamiltonian commutes with a model's group.
CHECK_CONFIGURATIONS = 64
#: Sites up to which a configuration packs into one int64 key.
PACKED_SITES = 62


def group_images(model: torch.nn.Module, x: Tensor) -> Tensor:
    """Return the images g·x under the model's symmetry group, (B, |G|, N) ((B, 1, N) without)."""
    transformed = getattr(model, "transformed", None)
    return x[:, None, :] if transformed is None else transformed(x)


def row_ids(rows: Tensor) -> Tensor:
    """Return (R,) int64 ids of (R, N) configurations, equal exactly when the rows are.

    Up to `PACKED_SITES` sites the id is the configuration's bits; beyond, the row's rank among
    the distinct rows in lexicographic order (then ids compare only within one call).
    """
    n_sites = rows.shape[-1]
    if n_sites <= PACKED_SITES:
        weights = torch.ones(n_sites, dtype=torch.int64, device=rows.device) << torch.arange(
            n_sites, device=rows.device
        )
        return (rows.to(torch.int64) * weights).sum(-1)
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def find_orbits(model: torch.nn.Module, x: Tensor, use_group: bool = True) -> Orbits:
    """Group a batch by orbit under the model's symmetry group (or by configuration).

    Args:
        model: the wave function (its group, if any, from `transformed`).
        x: (B, N) int8 configurations.
        use_group: False: orbits are distinct configurations (a Hamiltonian the group does not
            map onto itself).

    Returns:
        `Orbits` with the first sample of each orbit, each sample's orbit and the counts.
    """
    images = group_images(model, x) if use_group else x[:, None, :]
    n_batch, size, n_sites = images.shape
    keys = row_ids(images.reshape(n_batch * size, n_sites)).view(n_batch, size).amin(dim=1)
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    first = torch.full((counts.shape[0],), n_batch, dtype=torch.int64, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(n_batch, device=x.device), reduce="amin")
    return Orbits(first=first, inverse=inverse, counts=counts)


def hamiltonian_is_invariant(hamiltonian, model: torch.nn.Module) -> bool:
    """Whether ⟨g·x|H|g·y⟩ = ⟨x|H|y⟩ for every g of the model's group, checked on the
    connections of `CHECK_CONFIGURATIONS` fixed pseudo-random configurations (a model without
    a group: True).

    For each g, the connections of g·x must be the images of the connections of x with the
    same matrix elements (compared as sets of (configuration, element) pairs).
    """
    if getattr(model, "transformed", None) is None:
        return True
    n_sites = model.n_sites
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (CHECK_CONFIGURATIONS, n_sites), generator=generator)
    x = x.to(torch.int8)  # on the CPU: `transformed` and `get_conn` follow x's device
    images = model.transformed(x)  # (M, |G|, N)
    x_conn, mels = hamiltonian.get_conn(x)  # (M, K, N), (M, K)
    n_conf, n_conn = mels.shape
    mapped = model.transformed(x_conn.reshape(-1, n_sites))
    mapped = mapped.view(n_conf, n_conn, -1, n_sites)  # (M, K, |G|, N): g·y
    for g in range(images.shape[1]):
        own_conn, own_mels = hamiltonian.get_conn(images[:, g])
        both = torch.cat([mapped[:, :, g].reshape(-1, n_sites), own_conn.reshape(-1, n_sites)])
        expected, actual = row_ids(both).view(2, n_conf, n_conn)
        ids_e, mels_e = _sorted_pairs(expected, mels)
        ids_a, mels_a = _sorted_pairs(actual, own_mels)
        if not torch.equal(ids_e, ids_a) or not torch.allclose(mels_e, mels_a, 1e-12, 1e-12):
            return False
    return True


def _sorted_pairs(ids: Tensor, mels: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) ids and elements sorted by id per row, zero elements given id −1."""
    ids = torch.where(mels != 0, ids, -1)
    ids, order = torch.sort(ids, dim=1, stable=True)
    return ids, mels.gather(1, order)
