"""Neural autoregressive wave functions: PixelCNN, MADE, symmetrized wrapper, Σσᶻ constraint."""

from naqs_cli.models.base import AutoregressiveWaveFunction
from naqs_cli.models.dense import DenseNAQS
from naqs_cli.models.pixelcnn import PixelCNN
from naqs_cli.models.symmetry import SYMMETRIES, SymmetrizedWaveFunction, symmetry_group


def unwrap(model):
    """Return the autoregressive network inside a symmetrized wrapper (or the model itself)."""
    return getattr(model, "base", model)


__all__ = [
    "SYMMETRIES",
    "AutoregressiveWaveFunction",
    "DenseNAQS",
    "PixelCNN",
    "SymmetrizedWaveFunction",
    "symmetry_group",
    "unwrap",
]
