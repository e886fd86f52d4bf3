"""A MADE-style dense NAQS: an independent reference implementation for small systems."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from naqs_cli.lattice import SquareLattice
from naqs_cli.models.base import AutoregressiveWaveFunction
from naqs_cli.models.layers import MaskedLinear

#: The output layer's default weights are scaled by this, so the conditionals start near 1/2.
OUTPUT_INIT_SCALE = 1e-2


def made_masks(n_sites: int, layers: int, hidden: int, n_outputs: int) -> list[Tensor]:
    """Return the MADE connectivity masks (Germain et al. 2015) for the raster order.

    Input i has degree i + 1, hidden units degrees 1…N−1 cyclically; a hidden unit of degree m
    sees units of degree ≤ m, and the outputs of site i (degree i + 1) see hidden degrees ≤ i,
    so output i depends on x_<i only (output 0 only on its bias).

    Args:
        n_sites: N.
        layers: number of hidden layers.
        hidden: hidden width.
        n_outputs: outputs per site.

    Returns:
        `layers + 1` bool masks (out, in); the last has N·n_outputs rows, site-major.
    """
    degree_in = torch.arange(1, n_sites + 1)
    degree_hidden = torch.arange(hidden) % max(n_sites - 1, 1) + 1
    degree_out = torch.arange(1, n_sites + 1).repeat_interleave(n_outputs)
    masks = []
    previous = degree_in
    for _ in range(layers):
        masks.append(degree_hidden[:, None] >= previous[None, :])
        previous = degree_hidden
    masks.append(degree_out[:, None] > previous[None, :])
    return masks


class DenseNAQS(AutoregressiveWaveFunction):
    """MADE NAQS: masked fully connected layers on the ±1 spins.

        h_0 = x (±1),  h_l = ReLU((W_l ⊙ M_l) h_{l−1} + b_l),  (a, φ)_i = rows of (W ⊙ M) h_L + b,
        ln ψ_i(s) = a_{i,s} + iφ_{i,s} − ½ ln Σ_s' exp(2 a_{i,s'}),

    with MADE masks (`made_masks`) making output i depend on x_<i only. Sampling re-runs the
    network once per site (`method="cached"` falls back to the reference path): meant for small
    systems and for cross-checking `PixelCNN`.

    Args:
        lattice: the lattice.
        layers: number of hidden masked layers (≥ 1).
        hidden: hidden width (≥ N − 1 to let every output see all earlier sites).
        phase: whether to output phases (False: real positive amplitudes).
        total_sz: fixed Σσᶻ/2, or None.
        count_feature: let each conditional see the ups the sector still needs (needs
            total_sz; see `AutoregressiveWaveFunction`).

    Raises:
        ValueError: a bad layer count, width or total_sz.
    """

    def __init__(
        self,
        *,
        lattice: SquareLattice,
        layers: int = 2,
        hidden: int = 64,
        phase: bool = True,
        total_sz: float | None = None,
        count_feature: bool = False,
    ) -> None:
        super().__init__(
            lattice=lattice, phase=phase, total_sz=total_sz, count_feature=count_feature
        )
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"model.layers must be an integer >= 1, got {layers!r}")
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"model.hidden must be an integer >= 1, got {hidden!r}")
        self.n_outputs = 4 if self.phase else 2
        masks = made_masks(self.n_sites, layers, hidden, self.n_outputs)
        self.hidden_layers = nn.ModuleList(MaskedLinear(mask) for mask in masks[:-1])
        self.output = MaskedLinear(masks[-1])
        with torch.no_grad():
            self.output.weight.mul_(OUTPUT_INIT_SCALE)
            self.output.bias.zero_()

    def raw_outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Run the network.

        Args:
            x: (B, N) int8 configurations.

        Returns:
            log-magnitudes (B, N, 2) and phases (B, N, 2) or None.
        """
        h = self.spins(x)
        for layer in self.hidden_layers:
            h = torch.relu(layer(h))
        out = self.output(h).view(x.shape[0], self.n_sites, self.n_outputs)
        return out[..., :2], (out[..., 2:] if self.phase else None)
