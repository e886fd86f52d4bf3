"""Exact i.i.d. autoregressive sampling (paper Eq. 2: site by site from |ψ_i|²)."""

from __future__ import annotations

import torch

from naqs_cli import store
from naqs_cli.samplers import Samples


class DirectSampler:
    """Draw independent configurations exactly from |Ψ|², no Markov chain.

    Args:
        n_samples: default batch size.
        method: "cached" (the fast path of Fig. 1b) or "reference" (one pass per site).
        seed: seed of the sampler's own `torch.Generator`.
        device: where the generator lives (the model's device).
    """

    def __init__(
        self,
        *,
        n_samples: int = 512,
        method: str = "cached",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_samples = n_samples
        self.method = method
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def sample(self, model: torch.nn.Module, n_samples: int | None = None) -> Samples:
        """Return `n_samples` i.i.d. configurations with their log-amplitudes (no graph)."""
        n = self.n_samples if n_samples is None else n_samples
        with torch.no_grad():
            x, log_psi = model.sample(n, self.generator, method=self.method)
        return Samples(x=x, weights=None, log_psi=log_psi.detach(), n_chains=1)

    def state_dict(self) -> dict:
        """Return the generator state (a uint8 tensor) for checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator state written by `state_dict` (the tensor on any device).

        Raises:
            CheckpointError: the state comes from a generator on another device type.
        """
        store.restore_generator(self.generator, state["generator"])
