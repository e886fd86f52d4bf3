"""Metropolis–Hastings sampling of |Ψ|² with many chains advanced together (the VMC baseline).

Each proposal step moves every chain at once. Models with a ratio cache (`propose` / `accept`,
the autoregressive ones) evaluate the proposals by partial recomputation against each chain's
own cached activations (a PixelCNN recomputes only the rows from the moved site on); others
run `model.log_psi` over the proposals:

* `flip`: flip one uniformly random site (TFIM);
* `exchange`: pick one uniformly random lattice bond and swap its two spins (keeps Σσᶻ;
  Heisenberg). A bond whose spins are parallel gives back the same configuration: the step is a
  rejected no-op, so the proposal stays symmetric, T(x→y) = T(y→x) for x ≠ y.

A proposal x → x' is accepted with probability min(1, |Ψ(x')/Ψ(x)|²), so |Ψ|² satisfies
detailed balance exactly. A sweep is N proposal steps; kept samples are `sweeps_between_samples`
sweeps apart; `burn_in` sweeps run on first use (and after `reset`). Chains persist across
`sample` calls, i.e. across training steps, and travel in checkpoints via `state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from naqs_cli import store
from naqs_cli.samplers import Samples

#: Accepted values of `init`.
INITS = ("random", "up", "down")
#: Accepted values of `move`.
MOVES = ("auto", "flip", "exchange")


@dataclass
class _ChainState:
    """The chains' configurations, ln Ψ and (for models with `propose`) the ratio cache.

    With a cache, a proposal is evaluated by partial recomputation against the chain's own
    activations, and an accepted move copies the recomputed rows into the cache.
    """

    x: torch.Tensor
    log_psi: torch.Tensor
    cache: Any = None

    @classmethod
    def start(cls, model: torch.nn.Module, x: torch.Tensor) -> _ChainState:
        """Evaluate the model on the chain states x (ln Ψ and, where possible, the cache)."""
        if hasattr(model, "propose"):
            cache = model.ratio_cache(x.clone())
            return cls(x=x, log_psi=cache.log_psi.clone(), cache=cache)
        return cls(x=x, log_psi=model.log_psi(x).to(torch.complex128))


def fixed_n_up(model: torch.nn.Module) -> int | None:
    """Return the model's fixed number of up spins (`n_up`, also inside a wrapper), or None."""
    n_up = getattr(model, "n_up", None)
    if n_up is None:
        n_up = getattr(getattr(model, "base", None), "n_up", None)
    return None if n_up is None else int(n_up)


class MetropolisSampler:
    """Markov chains sampling |Ψ(x)|² with single-spin flips or bond exchanges.

    `sample(model, n)` returns ceil(n / n_chains) kept samples per chain, so the batch holds
    n rounded up to a multiple of `n_chains`, ordered chain-major: `x.view(n_chains, -1, N)`.

    Args:
        hamiltonian: gives N, the lattice bonds (exchange moves) and `conserves_sz`.
        n_samples: default number of samples per `sample` call (rounded up to a multiple of
            `n_chains`).
        n_chains: number of chains advanced together (≥ 1).
        sweeps_between_samples: k, sweeps (N proposal steps each) between kept samples (≥ 1).
        burn_in: sweeps discarded on first use and after `reset` (≥ 0).
        init: chain start, "random" (uniform bits for flips; a random arrangement of the
            sector's ups for exchanges: the model's `n_up` if fixed, else ⌊N/2⌋), "up" or
            "down" (fully polarized; flips only).
        move: "flip", "exchange" or "auto" (exchange iff the Hamiltonian conserves Σσᶻ).
        seed: seed of the sampler's own `torch.Generator`.
        device: where the chains and the generator live (the model's device).

    Raises:
        ValueError: a bad count, init or move, exchange moves from a polarized start (no bond
            could ever change it), or exchange moves on a lattice without bonds.
    """

    def __init__(
        self,
        *,
        hamiltonian,
        n_samples: int = 512,
        n_chains: int = 16,
        sweeps_between_samples: int = 10,
        burn_in: int = 100,
        init: str = "random",
        move: str = "auto",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        for key, value, low in (
            ("n_samples", n_samples, 1),
            ("n_chains", n_chains, 1),
            ("sweeps_between_samples", sweeps_between_samples, 1),
            ("burn_in", burn_in, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"sampler.{key} must be an integer >= {low}, got {value!r}")
        if init not in INITS:
            raise ValueError(f"sampler.init must be one of {'|'.join(INITS)}, got {init!r}")
        if move not in MOVES:
            raise ValueError(f"sampler.move must be one of {'|'.join(MOVES)}, got {move!r}")
        if move == "auto":
            move = "exchange" if getattr(hamiltonian, "conserves_sz", False) else "flip"
        if move == "exchange" and init in ("up", "down"):
            raise ValueError(
                f"sampler.init={init} with exchange moves: swapping the spins of a fully"
                " polarized state never changes it, so the chains could not move; use"
                " sampler.init=random (or flip moves)"
            )
        self.n_sites = int(hamiltonian.n_sites)
        self.n_samples = n_samples
        self.n_chains = n_chains
        self.sweeps_between_samples = sweeps_between_samples
        self.burn_in = burn_in
        self.init = init
        self.move = move
        self.device = torch.device(device)
        self.bonds = hamiltonian.lattice.bond_tensor(self.device)  # (n_bonds, 2)
        if move == "exchange" and self.bonds.shape[0] == 0:
            raise ValueError(
                f"exchange moves need lattice bonds; {hamiltonian.lattice.describe()} has none"
            )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.x: torch.Tensor | None = None  # (n_chains, N) int8 chain states
        self.needs_burn_in = True

    # -- proposal and acceptance (also used by the tests' exact transition matrix) ---------
    @property
    def n_moves(self) -> int:
        """Number of equally likely moves of one proposal (N sites or n_bonds bonds)."""
        return self.n_sites if self.move == "flip" else int(self.bonds.shape[0])

    def apply_moves(
        self, x: torch.Tensor, moves: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the proposals x' of move `moves[b]` applied to `x[b]`.

        Args:
            x: (B, N) int8 configurations.
            moves: (B,) int64 move indices in [0, n_moves): the site to flip or the bond
                whose spins are swapped.

        Returns:
            x' (B, N) int8 and `changed` (B,) bool (False for a bond with parallel spins:
            the proposal is x itself and counts as rejected).
        """
        rows = torch.arange(x.shape[0], device=x.device)
        proposal = x.clone()
        if self.move == "flip":
            proposal[rows, moves] = 1 - x[rows, moves]
            return proposal, torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        i, j = self.bonds[moves, 0], self.bonds[moves, 1]
        proposal[rows, i], proposal[rows, j] = x[rows, j], x[rows, i]
        return proposal, x[rows, i] != x[rows, j]

    @staticmethod
    def acceptance_probability(log_psi: torch.Tensor, log_psi_new: torch.Tensor) -> torch.Tensor:
        """Return the Metropolis acceptance min(1, |Ψ(x')/Ψ(x)|²).

        Args:
            log_psi: (B,) complex ln Ψ(x) of the current states.
            log_psi_new: (B,) complex ln Ψ(x') of the proposals.

        Returns:
            (B,) float64 probabilities.
        """
        log_ratio = 2.0 * (log_psi_new.real - log_psi.real).double()
        return torch.exp(torch.clamp(log_ratio, max=0.0))

    # -- chains ----------------------------------------------------------------------------
    def initial_states(self, model: torch.nn.Module) -> torch.Tensor:
        """Return fresh chain states following `init` (drawn from the sampler's generator).

        Args:
            model: the wave function; a fixed `n_up` fixes the sector of random exchange starts.

        Returns:
            (n_chains, N) int8 configurations.

        Raises:
            ValueError: a polarized or flip-move start for a model with a fixed Σσᶻ sector.
        """
        n_chains, n_sites = self.n_chains, self.n_sites
        n_up = fixed_n_up(model)
        if n_up is not None and (self.move == "flip" or self.init != "random"):
            raise ValueError(
                f"the model is fixed to {n_up} up spins (model.total_sz): use exchange moves"
                f" with init=random, got move={self.move}, init={self.init}"
            )
        if self.init == "up":
            return torch.ones(n_chains, n_sites, dtype=torch.int8, device=self.device)
        if self.init == "down":
            return torch.zeros(n_chains, n_sites, dtype=torch.int8, device=self.device)
        if self.move == "flip":
            bits = torch.randint(
                0, 2, (n_chains, n_sites), generator=self.generator, device=self.device
            )
            return bits.to(torch.int8)
        n_up = n_sites // 2 if n_up is None else n_up
        keys = torch.rand(n_chains, n_sites, generator=self.generator, device=self.device)
        ranks = keys.argsort(dim=1).argsort(dim=1)  # a uniformly random permutation per chain
        return (ranks < n_up).to(torch.int8)

    def set_chains(self, x: torch.Tensor, burn_in: bool = True) -> None:
        """Replace the chain states (e.g. a Néel start for a comparison).

        Args:
            x: (n_chains, N) int8 configurations.
            burn_in: whether the next `sample` call runs `burn_in` sweeps first.
        """
        if tuple(x.shape) != (self.n_chains, self.n_sites):
            raise ValueError(
                f"chain states must have shape ({self.n_chains}, {self.n_sites}),"
                f" got {tuple(x.shape)}"
            )
        self.x = x.to(device=self.device, dtype=torch.int8).clone()
        self.needs_burn_in = burn_in

    def reset(self) -> None:
        """Forget the chains: the next `sample` call starts from `init` and burns in."""
        self.x = None
        self.needs_burn_in = True

    @torch.no_grad()
    def _step(self, model: torch.nn.Module, state: _ChainState) -> int:
        """Advance every chain by one proposal (in place); return the number accepted."""
        x, log_psi = state.x, state.log_psi
        n_chains = x.shape[0]
        moves = torch.randint(
            0, self.n_moves, (n_chains,), generator=self.generator, device=self.device
        )
        uniforms = torch.rand(
            n_chains, generator=self.generator, dtype=torch.float64, device=self.device
        )
        proposal, changed = self.apply_moves(x, moves)
        first = moves if self.move == "flip" else self.bonds[moves].amin(dim=1)
        # No-op exchanges need no network pass.
        candidates = None if self.move == "flip" else torch.nonzero(changed, as_tuple=True)[0]
        if state.cache is not None:
            index = torch.arange(n_chains, device=x.device) if candidates is None else candidates
            move = model.propose(state.cache, index, proposal[index], first[index])
            log_psi_new = log_psi.clone()
            log_psi_new[index] = log_psi[index] + move.log_ratio
        elif candidates is None:
            log_psi_new = model.log_psi(proposal).to(log_psi.dtype)
        else:
            log_psi_new = log_psi.clone()
            if candidates.numel() > 0:
                log_psi_new[candidates] = model.log_psi(proposal[candidates]).to(log_psi.dtype)
        accept = changed & (uniforms < self.acceptance_probability(log_psi, log_psi_new))
        if state.cache is not None:
            model.accept(state.cache, move, accept[index])
        state.x = torch.where(accept[:, None], proposal, x)
        state.log_psi = torch.where(accept, log_psi_new, log_psi)
        return int(accept.sum())

    def _sweeps(self, model: torch.nn.Module, state: _ChainState, n_sweeps: int) -> int:
        accepted = 0
        for _ in range(n_sweeps * self.n_sites):
            accepted += self._step(model, state)
        return accepted

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, n_samples: int | None = None) -> Samples:
        """Advance the chains and return ceil(n_samples / n_chains) kept samples per chain.

        ln Ψ of the chain states is recomputed at the start (the model may have changed since
        the last call). The first call (and the first after `reset`/`set_chains`) runs
        `burn_in` sweeps; then each kept sample follows `sweeps_between_samples` sweeps.

        Args:
            model: the wave function (`log_psi` of (B, N) int8 → (B,) complex).
            n_samples: number of samples (default `self.n_samples`), rounded up to a multiple
                of `n_chains`.

        Returns:
            `Samples` with x (n_chains·L, N) int8 chain-major, their ln Ψ (complex128, no
            graph), `n_chains`, and `info["acceptance"]`, the fraction of accepted proposals
            after burn-in in this call (no-op exchanges count as rejected).
        """
        n = self.n_samples if n_samples is None else int(n_samples)
        per_chain = max(1, math.ceil(n / self.n_chains))
        if self.x is None:
            self.x = self.initial_states(model)
            self.needs_burn_in = True
        state = _ChainState.start(model, self.x)
        log_psi = state.log_psi
        if not bool(torch.isfinite(log_psi.real).all()):
            raise ValueError(
                "a chain sits on a configuration with Ψ = 0 (outside the model's Σσᶻ sector?);"
                " check sampler.init and sampler.move against model.total_sz"
            )
        if self.needs_burn_in:
            self._sweeps(model, state, self.burn_in)
            self.needs_burn_in = False
        kept_x = torch.empty(
            self.n_chains, per_chain, self.n_sites, dtype=torch.int8, device=self.device
        )
        kept_log_psi = torch.empty(
            self.n_chains, per_chain, dtype=torch.complex128, device=self.device
        )
        accepted = 0
        for t in range(per_chain):
            accepted += self._sweeps(model, state, self.sweeps_between_samples)
            kept_x[:, t] = state.x
            kept_log_psi[:, t] = state.log_psi
        self.x = state.x
        n_proposals = per_chain * self.sweeps_between_samples * self.n_sites * self.n_chains
        return Samples(
            x=kept_x.reshape(-1, self.n_sites),
            weights=None,
            log_psi=kept_log_psi.reshape(-1),
            n_chains=self.n_chains,
            info={"acceptance": accepted / n_proposals},
        )

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Return the chain states (or None before first use), burn-in flag and generator.

        ln Ψ is not stored: `sample` recomputes it for the current model.
        """
        return {
            "x": None if self.x is None else self.x.detach().cpu().clone(),
            "needs_burn_in": bool(self.needs_burn_in),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the state written by `state_dict`.

        Raises:
            ValueError: the stored chains do not have shape (n_chains, N).
            CheckpointError: the generator state comes from another device type.
        """
        store.restore_generator(self.generator, state["generator"])
        x = state.get("x")
        if x is None:
            self.reset()
            return
        self.set_chains(x, burn_in=bool(state.get("needs_burn_in", False)))
