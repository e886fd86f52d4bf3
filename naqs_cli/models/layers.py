"""Building blocks: weight-normalized convolutions, shifts, the two-stream causal layer, MADE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Run the convolutions on channels-last (NHWC) activations: oneDNN's CPU kernels for the small
#: channel counts of these networks are faster without the per-call NCHW ↔ blocked reorders.
CHANNELS_LAST = True
#: The attribute `WeightNormConv2d` sets on the weight it passes to `F.conv2d`: (V, g), so
#: per-sample derivatives (`naqs_cli.jacobian`) map ∂/∂W to V and g in closed form.
WEIGHT_NORM_ATTRIBUTE = "_naqs_weight_norm"
#: Without autograd, float32 passes on the CPU run with channel counts rounded up to a multiple
#: of 8 (one AVX2 register) where that adds at most `MAX_PADDED_CHANNELS`: zero weights and
#: biases keep the added channels at exactly 0, and oneDNN's kernels are faster at the rounded
#: count than at the true one (measured on a 2-core AMD EPYC, AVX2, batch 1,024, L = 10: a 3×3
#: convolution 6.3 ms at 16 channels against 7.5 ms at 14, a 1×1 0.9 ms against 1.3 ms, 8
#: channels against 7: 2.9 against 3.7 ms; 17 → 24 is slower, hence the limit).
PAD_CHANNELS = True
MAX_PADDED_CHANNELS = 2


def padded_channels(channels: int) -> int:
    """Return the channel count a padded pass computes `channels` with (see `PAD_CHANNELS`)."""
    rounded = -(-channels // 8) * 8
    return rounded if PAD_CHANNELS and rounded - channels <= MAX_PADDED_CHANNELS else channels


@dataclass(frozen=True)
class ConvLayout:
    """Where a convolution's real channels sit in zero-padded inputs and outputs.

    Attributes:
        out_channels: output channels computed (the real ones first, then zeros).
        in_channels: input channels of the padded input.
        in_segments: (padded start, real start, count) of each run of real input channels.
    """

    out_channels: int
    in_channels: int
    in_segments: tuple[tuple[int, int, int], ...]

    def pad(self, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """Return the (out_channels, in_channels, kh, kw) weight and bias, zero elsewhere."""
        padded = weight.new_zeros(self.out_channels, self.in_channels, *weight.shape[2:])
        for start, source, count in self.in_segments:
            padded[: weight.shape[0], start : start + count] = weight[:, source : source + count]
        padded_bias = bias.new_zeros(self.out_channels)
        padded_bias[: bias.shape[0]] = bias
        return padded, padded_bias


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

    def forward(
        self, x: Tensor, padding: tuple[int, int] = (0, 0), layout: ConvLayout | None = None
    ) -> Tensor:
        """Convolve (B, in, H, W) → (B, out, H + 2ph − kh + 1, W + 2pw − kw + 1).

        Args:
            x: the input (made channels-last when `CHANNELS_LAST`: so is the output).
            padding: symmetric zero padding (ph, pw), done inside the convolution kernel.
            layout: zero-padded channels of x and of the output (without autograd only).
        """
        weight, bias = self.weight, self.bias
        if layout is not None:
            weight, bias = layout.pad(weight, bias)
        if CHANNELS_LAST:
            x = x.contiguous(memory_format=torch.channels_last)
            weight = weight.contiguous(memory_format=torch.channels_last)
        setattr(weight, WEIGHT_NORM_ATTRIBUTE, (self.weight_v, self.weight_g))
        return F.conv2d(x, weight, bias, padding=padding)


def shift_right(x: Tensor) -> Tensor:
    """Shift (B, C, H, W) right by one column, zero-filling column 0 (memory format kept)."""
    if torch.is_grad_enabled():
        return F.pad(x[:, :, :, :-1], (1, 0, 0, 0))
    out = torch.empty_like(x)
    out[:, :, :, :1] = 0
    out[:, :, :, 1:] = x[:, :, :, :-1]
    return out


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
        self.channels = channels
        self.channels_a = channels // 2
        self.channels_b = channels - self.channels_a
        k = kernel_size
        self.vertical = WeightNormConv2d(in_channels, channels, (k, k))
        self.horizontal = WeightNormConv2d(in_channels, channels, (1, k))
        self.to_a = WeightNormConv2d(channels, self.channels_a, (1, 1))
        self.to_b = WeightNormConv2d(channels, self.channels_b, (1, 1))
        self.out = WeightNormConv2d(channels, channels, (k, k))

    def padded_inputs(
        self, vertical: Tensor, horizontal: Tensor, halo: LayerHalo | None, activate: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return this layer's padded stream inputs, and the streams themselves.

        The vertical input holds p = K − 1 rows above row r (zeros, or the halo's rows) on top
        of the stream's rows r … Ly − 2; the horizontal input p zero columns on the left of
        rows r … Ly − 1. Without autograd the streams (ReLU'd when `activate`) are written
        straight into preallocated buffers (one pass each); with autograd they are padded
        out of place (slicing backward passes, no copies of whole buffers).

        Args:
            vertical: (B, C_in, R or R − 1, Lx) the vertical stream before activation.
            horizontal: (B, C_in, R, Lx) the horizontal stream before activation.
            halo: the rows above r, or None (zeros).
            activate: apply ReLU to the streams.

        Returns:
            (B, C_in, p + R − 1, Lx) vertical and (B, C_in, R, p + Lx) horizontal inputs, and
            the (activated) streams they hold (the residuals later layers add back).
        """
        p = self.kernel_size - 1
        n_batch, c_in, n_rows, n_cols = horizontal.shape
        vertical = vertical[:, :, : n_rows - 1]
        if torch.is_grad_enabled():
            if activate:
                vertical, horizontal = F.relu(vertical), F.relu(horizontal)
            if halo is None:
                v_in = F.pad(vertical, (0, 0, p, 0))
            else:
                v_in = torch.cat([halo.vertical, vertical], dim=2)
            return v_in, F.pad(horizontal, (p, 0, 0, 0)), vertical, horizontal
        v_in = _buffer((n_batch, c_in, p + n_rows - 1, n_cols), horizontal)
        v_in[:, :, :p] = 0 if halo is None else halo.vertical
        h_in = _buffer((n_batch, c_in, n_rows, p + n_cols), horizontal)
        h_in[:, :, :, :p] = 0
        v_stream, h_stream = v_in[:, :, p:], h_in[:, :, :, p:]
        if activate:
            torch.clamp(vertical, min=0, out=v_stream)
            torch.clamp(horizontal, min=0, out=h_stream)
        else:
            v_stream.copy_(vertical)
            h_stream.copy_(horizontal)
        return v_in, h_in, v_stream, h_stream

    def padded_layouts(self, in_channels: int, like: Tensor) -> _LayerLayouts:
        """Return the channel layout of a pass: zero-padded without autograd, else as built.

        Float32 CPU passes without autograd compute C, C_a and C_b rounded by
        `padded_channels`; the streams between layers then carry the rounded count (the
        extra channels exactly 0) and the [a, b] input of the output convolution holds a in
        channels 0 … C_a − 1 and b from the rounded C_a on. Where no channel is added the
        layouts are None (the convolutions as built).

        Args:
            in_channels: channels of the incoming (possibly padded) streams.
            like: a tensor on the pass's device, of its dtype.
        """
        as_built = _LayerLayouts(self.channels, self.channels_a, self.channels_b, (None,) * 5)
        if torch.is_grad_enabled() or like.device.type != "cpu" or like.dtype != torch.float32:
            return as_built
        channels = padded_channels(self.channels)
        c_a, c_b = padded_channels(self.channels_a), padded_channels(self.channels_b)
        real_in = self.vertical.weight_v.shape[1]
        if (channels, c_a, c_b, in_channels) == (
            self.channels,
            self.channels_a,
            self.channels_b,
            real_in,
        ):
            return as_built
        streams = ConvLayout(channels, in_channels, ((0, 0, real_in),))
        inner = ((0, 0, self.channels),)
        return _LayerLayouts(
            channels,
            c_a,
            c_b,
            (
                streams,
                streams,
                ConvLayout(c_a, channels, inner),
                ConvLayout(c_b, channels, inner),
                ConvLayout(
                    channels,
                    c_a + c_b,
                    ((0, 0, self.channels_a), (c_a, self.channels_a, self.channels_b)),
                ),
            ),
        )

    def forward_rows(
        self,
        v_in: Tensor,
        h_in: Tensor,
        halo: LayerHalo | None = None,
        record: bool = False,
    ) -> tuple[Tensor, Tensor, LayerHalo | None]:
        """Apply the layer to the rows r, r + 1, … of the streams, given what lies above row r.

        Rows above r reach rows ≥ r only through p = K − 1 rows of the vertical input, one row
        of ReLU(V') (the shifted-down `b` input) and p rows of [a, b]: with those from `halo`
        the outputs on rows ≥ r equal the full layer's. Without a halo r = 0 (zero padding).

        Row Ly − 1 of V' feeds nothing (V' reaches H only shifted down, and the next layer's
        V' on rows ≤ Ly − 2 only): V' is computed on rows r … Ly − 2.

        Args:
            v_in: (B, C_in, p + R − 1, Lx) vertical stream on rows r … Ly − 2 with the p rows
                above on top (`padded_inputs`: zeros or the halo's).
            h_in: (B, C_in, R, p + Lx) horizontal stream on rows r … Ly − 1 with p zero
                columns on the left.
            halo: the rows above r (from `record` on the full configuration), or None.
            record: also return this layer's halo source for every row (for a cache).

        Returns:
            V' (B, C, R − 1, Lx) and H' (B, C, R, Lx) before activation (C rounded up by
            `padded_layouts` in float32 CPU passes without autograd), and with `record` a
            `LayerHalo` whose tensors cover the rows computed, zero-padded on top (else None).
        """
        p = self.kernel_size - 1
        h = p // 2
        n_batch, c_in, n_rows, n_cols = h_in.shape
        n_cols -= p
        layouts = self.padded_layouts(c_in, h_in)
        l_vertical, l_horizontal, l_a, l_b, l_out = layouts.convs
        if n_rows == 1:
            v = h_in.new_zeros(n_batch, layouts.channels, 0, n_cols)
        else:
            v = self.vertical(v_in, padding=(0, h), layout=l_vertical)
        # In place only without autograd: with it, the convolution's output stays intact
        # (per-sample derivatives, `naqs_cli.jacobian`, differentiate with respect to it).
        t = F.relu(self.horizontal(h_in, layout=l_horizontal), inplace=not torch.is_grad_enabled())
        if self.exclusive:
            t = shift_right(t)
        # ReLU(V') shifted down one row: the row above r on top (zeros or the halo's).
        if torch.is_grad_enabled():
            relu_v = F.relu(v)
            if halo is None:
                above = F.pad(relu_v, (0, 0, 1, 0))
            else:
                above = torch.cat([halo.relu_v, relu_v], dim=2)
        else:
            above = _buffer((n_batch, layouts.channels, n_rows, n_cols), h_in)
            above[:, :, :1] = 0 if halo is None else halo.relu_v
            torch.clamp(v, min=0, out=above[:, :, 1:])
        # The output conv's input: [a, b] with the p rows above on top (zeros or the halo) and
        # p zero columns on the left, written in place (no concatenations or padding copies).
        c_a = layouts.channels_a
        ab_in = _buffer((n_batch, c_a + layouts.channels_b, p + n_rows, p + n_cols), h_in)
        ab_in[:, :, :, :p] = 0
        ab_in[:, :, :p, p:] = 0 if halo is None else halo.ab
        relu_into(ab_in[:, :c_a, p:, p:], self.to_a(t, layout=l_a))
        relu_into(ab_in[:, c_a:, p:, p:], self.to_b(above, layout=l_b))
        out = self.out(ab_in, layout=l_out)
        recorded = None
        if record:
            recorded = LayerHalo(vertical=v_in, relu_v=above, ab=ab_in[:, :, :, p:])
        return v, out, recorded


def _buffer(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialized activation buffer in the convolutions' memory format."""
    return torch.empty(
        shape,
        dtype=like.dtype,
        device=like.device,
        memory_format=torch.channels_last if CHANNELS_LAST else torch.contiguous_format,
    )


def relu_into(dest: Tensor, x: Tensor) -> None:
    """Write ReLU(x) into the view `dest` (one pass without autograd; differentiable with)."""
    if torch.is_grad_enabled():
        dest.copy_(F.relu(x))
    else:
        torch.clamp(x, min=0, out=dest)


@dataclass(frozen=True)
class _LayerLayouts:
    """A causal layer's channel counts in one pass and its five convolutions' layouts.

    Attributes:
        channels: channels of the streams V', H' and of ReLU(V').
        channels_a: channels written for a (b follows).
        channels_b: channels written for b.
        convs: `ConvLayout` (or None: as built) of vertical, horizontal, to_a, to_b, out.
    """

    channels: int
    channels_a: int
    channels_b: int
    convs: tuple[ConvLayout | None, ...]


@dataclass(frozen=True)
class LayerHalo:
    """What a `TwoStreamCausalLayer` needs from the rows above the first row it recomputes.

    Recorded for all rows with p = K − 1 (vertical, ab) or 1 (relu_v) zero rows on top, so the
    halo of row r is `rows(r)`: padded rows r … r + p − 1 (resp. r), i.e. rows r − p … r − 1.

    Attributes:
        vertical: (B, C_in, p + Ly − 1, Lx) the layer's vertical input stream.
        relu_v: (B, C, Ly, Lx) ReLU of its vertical output V' (rows −1 … Ly − 2).
        ab: (B, C, p + Ly, Lx) its [a, b] channels, input of the output convolution.

    Channel counts are those of the pass that recorded it (`padded_layouts`: rounded up in
    float32 CPU passes without autograd), so a halo is used by passes of the same kind.
    """

    vertical: Tensor
    relu_v: Tensor
    ab: Tensor

    def rows(self, index: Tensor, row: int) -> LayerHalo:
        """Return the halo of first recomputed row `row` for the samples `index`."""
        p = self.vertical.shape[2] - self.relu_v.shape[2] + 1
        return LayerHalo(
            vertical=self.vertical[index, :, row : row + p],
            relu_v=self.relu_v[index, :, row : row + 1],
            ab=self.ab[index, :, row : row + p],
        )


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
