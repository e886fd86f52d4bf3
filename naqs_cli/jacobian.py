"""Per-sample log-derivatives O_k(x) = ∂ ln Ψ(x)/∂θ_k, for natural-gradient update rules.

One forward pass over a chunk of B samples and two backward passes (Re and Im of Σ ln Ψ) give
every sample's row of the Jacobian. During the forward pass a `TorchFunctionMode` taps every
`F.conv2d` and `F.linear` whose weight or bias depends on trainable parameters: it keeps the
call's input and output y (if y is later changed in place, the pass is redone with a zero
"probe" added to every output, whose gradient is y's). The backward passes then deliver
∂ ln Ψ/∂y for each call's output y, row by row (samples do not mix in these networks), and the
per-sample gradient of the call's weight follows as in backpropagation but without the sum
over the batch: for a convolution Σ_positions patch(input) ⊗ ∂y, for a linear map input ⊗ ∂y.
A weight-normalized weight W = g·V/‖V‖ (tagged by `WeightNormConv2d`) maps these to V and g in
closed form (for a stride-1 convolution without a per-sample pass over ∂/∂W: ∂/∂g from the
call's output, ∂/∂V as one batched product written into the rows, `_weight_norm_conv_rows`;
on the paper's 18 × 32 model at L = 10 that took the rows from 3.1–3.2 to 2.7–3.0 gradient
passes in alternating runs on 2 cores); any other weight computed from parameters (a masked
W ⊙ M) by a vector-Jacobian product batched over the samples. Every chunk's rows are written
straight into one (2, B, P) real tensor, [Re O; Im O], the layout the update rules use.

Measured on a 4×4 lattice, default PixelCNN (4 layers × 16 channels, P = 20,228), 256 samples,
float32, 2 CPU cores: 0.15 s this way (about 5× one forward + backward pass of the batch;
before the closed-form weight normalization and in-place rows: 2.0 s on busy cores, where
the alternatives were measured); 96 s with one backward pass per sample and
121 s with `torch.autograd.grad(..., is_grads_batched=True)` in chunks of 8 (181 s in chunks of
32: the batched backward costs B² rows). `torch.func` (vmap of jacrev) does not run on the
PixelCNN (it writes into a preallocated, unbatched buffer and uses channels-last copies,
which vmap refuses).

Contract: every trainable parameter reaches ln Ψ only through the weight or bias of these
calls (true of PixelCNN, DenseNAQS and SymmetrizedWaveFunction), and a call over R = k·B rows
holds each sample's k rows together (the symmetrized wrapper evaluates |G| images per sample,
sample-major). A model whose parameters are not all reached this way is differentiated with
one backward pass per sample instead (correct, slow).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from naqs_cli import allocator
from naqs_cli.models.layers import WEIGHT_NORM_ATTRIBUTE

log = logging.getLogger(__name__)

#: Memory the rows of one chunk may take, counting as much again for the per-call gradients
#: (large models get chunks of fewer samples than `chunk_size`). 256 MB: the paper's 18 × 32
#: model (398k parameters) then takes 41 samples per chunk, and a MinSR update at L = 12 with
#: 1,024 samples stays near its 3.0 GB of stored rows (`make bench`, results/natural.md).
ROWS_BYTES = 2**28
#: With the rows written into a caller's tensor (`out`, as MinSR does) only the chunk's autograd
#: graph takes memory: chunks as large as a graph of this size (the paper's 18 × 32 model: 83
#: samples at L = 10, 57 at L = 12). 512 MiB (166 and 115) made the rows faster still but put a
#: MinSR step of that model at L = 12 over its 4 GB (4.13 GB measured).
ROWS_GRAPH_BYTES = 2**28
_CONV_ARGS = ("stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@dataclass(frozen=True)
class _Call:
    """One tapped `F.conv2d` / `F.linear`: its input, output, weight, bias and options.

    `target` is what the backward passes differentiate with respect to: the output itself
    (while its `version` is unchanged), or a zero probe added to it.
    """

    conv: bool
    x: Tensor
    y: Tensor
    weight: Tensor
    bias: Tensor | None
    options: dict[str, Any]
    target: Tensor
    version: int


class _Tap(TorchFunctionMode):
    """Records the convolutions and linear maps whose weights depend on the parameters.

    Args:
        probes: add a zero probe to every output (for models that change outputs in place).
    """

    def __init__(self, probes: bool = False) -> None:
        super().__init__()
        self.probes = probes
        self.calls: list[_Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.conv2d and func is not F.linear:
            return func(*args, **kwargs)
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if not (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return func(*args, **kwargs)
        y = func(*args, **kwargs)
        options = dict(_CONV_DEFAULTS)
        options.update(zip(_CONV_ARGS, args[3:], strict=False))
        options.update({k: v for k, v in kwargs.items() if k in _CONV_ARGS})
        x = args[0] if args else kwargs["input"]
        target = torch.zeros_like(y, requires_grad=True) if self.probes else y
        conv = func is F.conv2d
        self.calls.append(
            _Call(conv, x.detach(), y.detach(), weight, bias, options, target, y._version)
        )
        return y + target if self.probes else y

    def changed_in_place(self) -> bool:
        """Whether an output was modified in place after the call (its gradient is lost)."""
        return not self.probes and any(c.target._version != c.version for c in self.calls)


def log_derivatives(model: torch.nn.Module, x: Tensor, chunk_size: int) -> Iterator[Tensor]:
    """Yield the rows O(x) = ∂ ln Ψ(x)/∂θ of `x`, chunk by chunk, as complex tensors.

    Args:
        model: the wave function (its trainable parameters, in `model.parameters()` order and
            flattened, are the columns).
        x: (B, N) int8 configurations.
        chunk_size: samples per network pass (lowered so one chunk's rows fit `ROWS_BYTES`).

    Yields:
        (b, P) complex tensors (complex64 for a float32 model), the chunks in order.
    """
    for rows in log_derivative_rows(model, x, chunk_size):
        yield torch.complex(rows[0], rows[1])


def log_derivative_rows(
    model: torch.nn.Module, x: Tensor, chunk_size: int, out: Tensor | None = None
) -> Iterator[Tensor]:
    """Yield the rows of `x` as real tensors: (2, b, P) = [Re O; Im O], chunk by chunk.

    The form the update rules use (no complex copy); arguments as `log_derivatives`. With
    `out` a (2, B, P) tensor, every chunk is written into (and yielded as) its slice of `out`,
    so the rows of all of x end up in one tensor without copies; the chunks are then as
    large as `chunk_size` (callers bound it by the autograd graph's memory).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    if x.shape[0] == 0:
        yield params[0].new_zeros(2, 0, n_params)
        return
    if out is None:  # each chunk's rows are allocated here
        per_sample = 4 * n_params * params[0].element_size()
        chunk_size = max(1, min(chunk_size, ROWS_BYTES // per_sample))
    start = 0
    with torch.enable_grad():
        for chunk in x.split(chunk_size):
            if out is None:
                rows = params[0].new_empty(2, chunk.shape[0], n_params)
                allocator.advise_huge_pages(rows)
            else:
                rows = out[:, start : start + chunk.shape[0]]
            start += chunk.shape[0]
            if not _tapped_rows(model, params, chunk, rows):
                log.debug("parameters outside conv2d/linear: one backward pass per sample")
                rows.copy_(_rows_one_by_one(model, params, chunk))
            yield rows


def _tapped_rows(model: torch.nn.Module, params: list[Tensor], x: Tensor, out: Tensor) -> bool:
    """Write the (2, B, P) real and imaginary rows into `out`; False if a parameter escaped
    the tap (then `out` is partly written)."""
    tap = _Tap()
    with tap:
        log_psi = model.log_psi(x)
    if tap.changed_in_place():
        tap = _Tap(probes=True)
        with tap:
            log_psi = model.log_psi(x)
    calls = [c for c in tap.calls if c.options["groups"] == 1]
    if len(calls) < len(tap.calls) or any(isinstance(c.options["padding"], str) for c in calls):
        return False
    targets = [c.target for c in calls]
    grads = [
        torch.autograd.grad(
            part.sum(), targets, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        for part in (log_psi.real, log_psi.imag)
    ]
    n_batch = x.shape[0]
    columns: dict[int, slice] = {}
    start = 0
    for p in params:
        columns[id(p)] = slice(start, start + p.numel())
        start += p.numel()
    reached: set[int] = set()

    def add(tensor: Tensor, value: Tensor) -> None:
        target = out[:, :, columns[id(tensor)]]
        if id(tensor) in reached:
            target += value.reshape(2, n_batch, -1)
        else:
            target.copy_(value.reshape(2, n_batch, -1))
            reached.add(id(tensor))

    for k, call in enumerate(calls):
        if _weight_norm_conv_rows(call, (grads[0][k], grads[1][k]), out, columns, reached):
            continue
        dy = torch.stack([grads[0][k], grads[1][k]])  # (2, R, ...)
        for tensor, per_sample in zip(
            (call.weight, call.bias), _per_sample_grads(call, dy, n_batch), strict=True
        ):
            if tensor is None or not tensor.requires_grad:
                continue
            if id(tensor) in columns:
                add(tensor, per_sample)
                continue
            norm_of = getattr(tensor, WEIGHT_NORM_ATTRIBUTE, None)
            if norm_of is not None and all(id(t) in columns for t in norm_of):
                v, g = norm_of
                d_v, d_g = _weight_norm_vjp(per_sample, v, g)
                add(v, d_v)
                add(g, d_g)
                continue
            leaves = torch.autograd.grad(
                tensor,
                params,
                grad_outputs=per_sample.reshape(2 * n_batch, *tensor.shape),
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            for p, leaf in zip(params, leaves, strict=True):
                if leaf is not None:
                    add(p, leaf)
    return len(reached) == len(columns)


def _weight_norm_conv_rows(
    call: _Call,
    dy: tuple[Tensor, Tensor],
    out: Tensor,
    columns: dict[int, slice],
    reached: set[int],
) -> bool:
    """Write the rows of a weight-normalized convolution's V, g and bias straight into `out`.

    With s_o = g_o/‖V_o‖, U = s·V/‖V‖ and G the per-sample weight gradient Σ_l dy_l ⊗ patch_l,

        ∂/∂g_o = ⟨V̂_o, G_o⟩ = Σ_l dy_{o,l} (y_{o,l} − bias_o)/g_o,   ∂/∂V = s·G − U ⊙ ∂/∂g,

    the first from the call's own output y (no pass over G), the second with s folded into dy
    before the product and one fused pass into `out`. Returns False (nothing written) where
    this path does not apply: no weight-norm tag, a parameter already reached (shared), a
    stride or dilation, a padding string, or several rows per sample (the symmetrized
    wrapper's |G| images: there the general path was faster, 0.26 against 0.29 s for the
    4 × 8 model's rows of 256 samples on 4 × 4).
    """
    norm_of = getattr(call.weight, WEIGHT_NORM_ATTRIBUTE, None)
    options = call.options
    if (
        not call.conv
        or norm_of is None
        or call.bias is None
        or any(id(t) not in columns or id(t) in reached for t in (*norm_of, call.bias))
        or options["stride"] not in (1, (1, 1))
        or options["dilation"] not in (1, (1, 1))
        or isinstance(options["padding"], str)
        or call.y.shape[0] != out.shape[1]
    ):
        return False
    v, g = (t.detach() for t in norm_of)
    n_batch = out.shape[1]
    n_out, n_in, kh, kw = v.shape
    flat_v = v.flatten(1)
    norm = flat_v.norm(dim=1)
    scale = g / norm  # s_o

    # Per sample: dy and (y − bias)/g = ⟨V̂_o, patch_l⟩ as (O, L) matrices (views of
    # contiguous tensors).
    unit_y = call.y.contiguous().view(n_batch, n_out, -1)
    unit_y = (unit_y - call.bias.detach()[:, None]) / g[:, None]
    g_rows = out[:, :, columns[id(norm_of[1])]]
    bias_rows = out[:, :, columns[id(call.bias)]]
    # s·dy as (2·O, L) per sample: the left factor of one batched product.
    scaled = unit_y.new_empty(n_batch, 2, n_out, unit_y.shape[2])
    for part, d in enumerate(dy):
        rows = d.reshape(n_batch, n_out, -1)
        torch.sum(rows * unit_y, dim=2, out=g_rows[part])  # ∂/∂g = ⟨V̂, G⟩
        torch.sum(rows, dim=2, out=bias_rows[part])
        torch.mul(rows, scale[:, None], out=scaled[:, part])
    # G = s·dy ⊗ patches with the patches as (K, L) matrices, K in the weight's (C, kh, kw)
    # order: G comes out in the parameter's own layout.
    patches = _patch_columns(call.x, (kh, kw), options["padding"])  # (B, K, L)
    grad = torch.bmm(scaled.view(n_batch, 2 * n_out, -1), patches.transpose(1, 2))
    grad = grad.view(n_batch, 2, n_out, -1).transpose(0, 1)
    target = out[:, :, columns[id(norm_of[0])]].view(2, n_batch, n_out, -1)
    weight = flat_v * (scale / norm)[:, None]  # U
    torch.addcmul(grad, g_rows[..., None], weight, value=-1.0, out=target)
    reached.update(id(t) for t in (*norm_of, call.bias))
    return True


def _weight_norm_vjp(grad_w: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Map per-sample gradients (2, B, O, ...) of W = g · V/‖V‖ (overwritten) to (V, g):
    ∂/∂V = (g/‖V‖)(G − V̂ ⟨V̂, G⟩), ∂/∂g = ⟨V̂, G⟩ (V̂ = V/‖V‖, inner products per output)."""
    flat_v = v.detach().flatten(1)
    norm = flat_v.norm(dim=1)
    unit = flat_v / norm[:, None]
    grad = grad_w.reshape(*grad_w.shape[:3], -1)  # (2, B, O, K), overwritten
    along = torch.einsum("sbok,ok->sbo", grad, unit)
    d_v = grad.addcmul_(along[..., None], unit, value=-1.0).mul_((g.detach() / norm)[:, None])
    return d_v, along


def _per_sample_grads(call: _Call, dy: Tensor, n_batch: int) -> tuple[Tensor, Tensor]:
    """Return the (2, B, *weight.shape) and (2, B, out) gradients of one call, per sample."""
    n_rows = dy.shape[1]
    rep = n_rows // n_batch
    if call.conv:
        weight = call.weight
        n_out, n_in, kh, kw = weight.shape
        patches = _patches(call.x, (kh, kw), call.options)  # (R, L, K), K in (kh, kw, C_in)
        dy = dy.flatten(3).reshape(2, n_batch, rep, n_out, -1)  # (2, B, rep, O, L)
        patches = patches.reshape(n_batch, rep, patches.shape[1], -1)
        d_weight = torch.einsum("sbrol,brlk->sbok", dy, patches)
        d_weight = d_weight.view(2, n_batch, n_out, kh, kw, n_in).permute(0, 1, 2, 5, 3, 4)
        return d_weight, dy.sum(dim=(2, 4))
    n_out = dy.shape[-1]
    dy = dy.reshape(2, n_batch, -1, n_out)  # rows and any middle dimensions together
    inputs = call.x.reshape(n_batch, -1, call.x.shape[-1])
    return torch.einsum("sbmo,bmi->sboi", dy, inputs), dy.sum(dim=2)


def _zero_padded(x: Tensor, padding: Any) -> Tensor:
    """Return x with a convolution's symmetric zero padding (int or (ph, pw)) applied."""
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def _patch_columns(x: Tensor, kernel: tuple[int, int], padding: Any) -> Tensor:
    """Return a stride-1 convolution's input patches as (B, C·kh·kw, L) column matrices.

    K in (C, kh, kw) order, positions in (out_h, out_w) order. One copy from a contiguous
    (NCHW) input whose innermost run is an output row (faster than gathering channel-first
    from channels-last).
    """
    kh, kw = kernel
    x = _zero_padded(x, padding).contiguous()
    n_batch, n_channels, height, width = x.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    s_row, s_channel, s_h, s_w = x.stride()
    view = x.as_strided(
        (n_batch, n_channels, kh, kw, out_h, out_w), (s_row, s_channel, s_h, s_w, s_h, s_w)
    )
    return view.reshape(n_batch, n_channels * kh * kw, out_h * out_w)


def _patches(x: Tensor, kernel: tuple[int, int], options: dict[str, Any]) -> Tensor:
    """Return the (R, L, kh·kw·C) input patches of a convolution, one row per output position.

    A strided view of the padded channels-last input, copied once by the reshape: 3-7x faster
    than `F.unfold` (im2col) on these small maps (measured, 2 cores: B = 4,096, 8 channels,
    4 × 4 lattice, 3 × 3 kernel: 5.4 ms against 38 ms). Stride or dilation ≠ 1 use `F.unfold`.
    """
    kh, kw = kernel
    padding = options["padding"]
    if options["stride"] not in (1, (1, 1)) or options["dilation"] not in (1, (1, 1)):
        cols = F.unfold(x.contiguous(), kernel, options["dilation"], padding, options["stride"])
        n_rows, n_channels = x.shape[:2]  # (R, C·kh·kw, L) → (R, L, kh·kw·C)
        cols = cols.view(n_rows, n_channels, kh, kw, -1).permute(0, 4, 2, 3, 1)
        return cols.reshape(n_rows, cols.shape[1], -1)
    x = _zero_padded(x, padding).contiguous(memory_format=torch.channels_last)
    n_rows, n_channels, height, width = x.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    s_row, s_channel, s_h, s_w = x.stride()
    view = x.as_strided(
        (n_rows, out_h, out_w, kh, kw, n_channels), (s_row, s_h, s_w, s_h, s_w, s_channel)
    )
    return view.reshape(n_rows, out_h * out_w, kh * kw * n_channels)


def _rows_one_by_one(model: torch.nn.Module, params: list[Tensor], x: Tensor) -> Tensor:
    """Return (2, B, P) rows with one backward pass per sample and part (any model)."""
    rows = []
    for i in range(x.shape[0]):
        log_psi = model.log_psi(x[i : i + 1])[0]
        for part in (log_psi.real, log_psi.imag):
            grads = torch.autograd.grad(
                part, params, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).reshape(x.shape[0], 2, -1).transpose(0, 1)
