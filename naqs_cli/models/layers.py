"""Building blocks: weight-normalized convolutions, shifts, the two-stream causal layer, MADE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormConv2d(nn.Module):
    """A 2-D convolution (no padding) with weight normalization (Salimans & Kingma 2016).

        W[o] = g[o] · V[o] / ‖V[o]‖   (norm over input channels and kernel positions),

    with V initialized Glorot-uniform (Keras' default, as in FlowKet), g = ‖V‖ and zero bias.
    Plain parameters `weight_v`, `weight_g`, `bias`: ordinary autograd and state_dict.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: (kh, kw).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int]) -> None:
        super().__init__()
        weight = torch.empty(out_channels, in_channels, *kernel_size)
        nn.init.xavier_uniform_(weight)
        self.weight_v = nn.Parameter(weight)
        self.weight_g = nn.Parameter(weight.flatten(1).norm(dim=1).detach().clone())
        self.bias = nn.Parameter(torch.zeros(out_channels))

    @property
    def weight(self) -> Tensor:
        """(out, in, kh, kw) effective weight g · V / ‖V‖."""
        norm = self.weight_v.flatten(1).norm(dim=1)
        return self.weight_v * (self.weight_g / norm).view(-1, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Convolve (B, in, H, W) → (B, out, H − kh + 1, W − kw + 1)."""
        return F.conv2d(x, self.weight, self.bias)


def shift_down(x: Tensor) -> Tensor:
    """Shift (B, C, H, W) down by one row, zero-filling row 0."""
    return F.pad(x[:, :, :-1, :], (0, 0, 1, 0))


def shift_right(x: Tensor) -> Tensor:
    """Shift (B, C, H, W) right by one column, zero-filling column 0."""
    return F.pad(x[:, :, :, :-1], (1, 0, 0, 0))


class TwoStreamCausalLayer(nn.Module):
    """One causal layer of the two-stream PixelCNN (FlowKet's `ConvNetAutoregressive2D` layer).

    With K the kernel size, p = K − 1, h = p/2, on (B, C, Ly, Lx) maps and zero padding:

        V'      = conv_{K×K}(V)            rows r−p…r, columns c−h…c+h
        t       = ReLU(conv_{1×K}(H))      row r, columns c−p…c   (shifted right if exclusive)
        a       = ReLU(conv_{1×1}(t))                                   C_a = C // 2 channels
        b       = ReLU(conv_{1×1}(shift_down(ReLU(V'))))               C_b = C − C_a channels
        H'      = conv_{K×K}([a, b])       rows r−p…r, columns c−p…c

    V'(r, c) depends on input rows ≤ r and reaches the horizontal stream only shifted down, so it
    brings everything above (no blind spot). H'(r, c) depends on inputs up to and including
    (r, c) in raster order; in the exclusive (last) layer the right shift makes it strictly
    before (r, c). All five convolutions are weight-normalized.

    Args:
        in_channels: channels of the incoming streams (1 for the input layer).
        channels: C.
        kernel_size: K (odd, ≥ 3).
        exclusive: whether the horizontal stream excludes the current site (last layer).
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, exclusive: bool) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.exclusive = exclusive
        self.channels_a = channels // 2
        self.channels_b = channels - self.channels_a
        k = kernel_size
        self.vertical = WeightNormConv2d(in_channels, channels, (k, k))
        self.horizontal = WeightNormConv2d(in_channels, channels, (1, k))
        self.to_a = WeightNormConv2d(channels, self.channels_a, (1, 1))
        self.to_b = WeightNormConv2d(channels, self.channels_b, (1, 1))
        self.out = WeightNormConv2d(channels, channels, (k, k))

    def forward(self, vertical: Tensor, horizontal: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the layer.

        Args:
            vertical: (B, C_in, Ly, Lx) vertical stream V.
            horizontal: (B, C_in, Ly, Lx) horizontal stream H.

        Returns:
            V' and H', each (B, C, Ly, Lx), before activation.
        """
        p = self.kernel_size - 1
        h = p // 2
        v = self.vertical(F.pad(vertical, (h, h, p, 0)))
        t = F.relu(self.horizontal(F.pad(horizontal, (p, 0, 0, 0))))
        if self.exclusive:
            t = shift_right(t)
        a = F.relu(self.to_a(t))
        b = F.relu(self.to_b(shift_down(F.relu(v))))
        out = self.out(F.pad(torch.cat([a, b], dim=1), (p, 0, p, 0)))
        return v, out


class MaskedLinear(nn.Linear):
    """A linear layer with a fixed 0/1 connectivity mask: y = (W ⊙ M) x + b.

    Args:
        mask: (out, in) bool connectivity, True = connected.
    """

    def __init__(self, mask: Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply (B, in) → (B, out)."""
        return F.linear(x, self.weight * self.mask, self.bias)
