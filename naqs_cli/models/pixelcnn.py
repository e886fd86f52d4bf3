"""The two-stream PixelCNN NAQS of Sharir et al. (2020), with cached exact sampling (Fig. 1b)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from naqs_cli.lattice import SquareLattice
from naqs_cli.models.base import (
    AutoregressiveWaveFunction,
    Proposal,
    RatioCache,
    generic_log_psi_ratios,
)
from naqs_cli.models.layers import LayerHalo, TwoStreamCausalLayer

#: The head's Glorot-uniform weights are scaled by this, so the conditionals start near 1/2.
HEAD_INIT_SCALE = 1e-2


def residual_sources(n_layers: int) -> list[int | None]:
    """Return, per causal layer, the stream its output adds as a residual (None: no residual).

    Layer 0 reads the input and layer n−1 is the exclusive last layer; the layers in between
    form residual blocks of two (an odd one out runs without residual): layer l2 of block
    (l1, l2) adds stream l1, the input of l1 (stream k = input of layer k, stream 0 = spins).
    """
    sources: list[int | None] = [None] * n_layers
    for first in range(1, n_layers - 2, 2):
        if first + 1 <= n_layers - 2:
            sources[first + 1] = first
    return sources


class PixelCNN(AutoregressiveWaveFunction):
    """Two-stream (vertical + horizontal) PixelCNN NAQS in raster order, as in FlowKet.

        ln ψ_i(s) = a_{i,s} + iφ_{i,s} − ½ ln Σ_s' exp(2 a_{i,s'}),   (a, φ)_i = head(ReLU(H_L(i)))

    Streams start from the ±1 spins, V_0 = H_0 = x as a (B, 1, Ly, Lx) image, zero-padded at
    open edges. Causal layer l (`TwoStreamCausalLayer`: K×K vertical conv, 1×K horizontal conv,
    two 1×1 convs into [a, b], K×K conv on [a, b], all weight-normalized) maps (V_l, H_l) to
    (V_{l+1}, H_{l+1}) = ReLU(layer(V_l, H_l) [+ (V_k, H_k)]), with residual connections on both
    streams every two layers between the input layer and the exclusive last layer. The last
    layer shifts its horizontal stream right, so head output i depends on x_<i only; the
    vertical stream, shifted down, brings all rows above (no blind spot). A 1×1 head gives per
    site a log-magnitude a_{i,s} and (with `phase`) a phase φ_{i,s} per local state.

    `channels=32` has about 22·C² parameters per layer: layers=18 ≈ 0.40 M and layers=38 ≈ 0.85 M
    parameters, the paper's sizes. `sample(method="cached")` costs about one forward pass.

    Args:
        lattice: the lattice (chains Ly = 1 included).
        layers: number of causal layers (≥ 1).
        channels: feature channels C (≥ 2).
        kernel_size: K, odd and ≥ 3.
        phase: whether to output phases (False: real positive amplitudes).
        total_sz: fixed Σσᶻ/2, or None.

    Raises:
        ValueError: a bad layer count, channel count, kernel size or total_sz.
    """

    def __init__(
        self,
        *,
        lattice: SquareLattice,
        layers: int = 4,
        channels: int = 16,
        kernel_size: int = 3,
        phase: bool = True,
        total_sz: float | None = None,
    ) -> None:
        super().__init__(lattice=lattice, phase=phase, total_sz=total_sz)
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"model.layers must be an integer >= 1, got {layers!r}")
        if not isinstance(channels, int) or channels < 2:
            raise ValueError(f"model.channels must be an integer >= 2, got {channels!r}")
        if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size must be an odd integer >= 3, got {kernel_size!r}")
        self.n_layers = layers
        self.channels = channels
        self.kernel_size = kernel_size
        self.causal_layers = nn.ModuleList(
            TwoStreamCausalLayer(
                1 if i == 0 else channels, channels, kernel_size, exclusive=i == layers - 1
            )
            for i in range(layers)
        )
        self.residual_source = residual_sources(layers)
        self._residual_targets = {s for s in self.residual_source if s is not None}
        self.n_outputs = 4 if self.phase else 2
        self.head = nn.Conv2d(channels, self.n_outputs, 1)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.head.weight)
            self.head.weight.mul_(HEAD_INIT_SCALE)
            self.head.bias.zero_()

    def raw_outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Run the network on the whole configuration.

        Args:
            x: (B, N) int8 configurations.

        Returns:
            log-magnitudes (B, N, 2) and phases (B, N, 2) or None, output i depending on
            x[:, :i] only.
        """
        n_batch = x.shape[0]
        image = self.spins(x).view(n_batch, 1, *self.lattice.shape)
        out, _ = self._run_layers(image)
        return out[..., :2], (out[..., 2:] if self.phase else None)

    def _run_layers(
        self, image: Tensor, halos: list[LayerHalo] | None = None, record: bool = False
    ) -> tuple[Tensor, list[LayerHalo] | None]:
        """Run the causal layers and the head on rows r … Ly − 1 of the ±1 image.

        Args:
            image: (B, 1, R, Lx) spins of rows r = Ly − R … Ly − 1.
            halos: per layer, what lies above row r (None: r = 0, zero padding).
            record: also return every layer's `LayerHalo` of rows r … (padded on top).

        Returns:
            head outputs (B, R·Lx, n_outputs) and the recorded halos (None without `record`).
        """
        vertical, horizontal = image, image
        saved: dict[int, tuple[Tensor, Tensor]] = {}  # streams a later layer adds back
        recorded: list[LayerHalo] = []
        last = self.n_layers - 1
        for i, layer in enumerate(self.causal_layers):
            if i in self._residual_targets:
                saved[i] = (vertical, horizontal)
            halo = None if halos is None else halos[i]
            v, h, rec = layer.forward_rows(vertical, horizontal, halo, record)
            if record:
                recorded.append(rec)
            if i == last:
                break
            source = self.residual_source[i]
            if source is not None:
                v_source, h_source = saved.pop(source)
                v = v + v_source[:, :, : v.shape[2]]
                h = h + h_source
            vertical, horizontal = F.relu(v, inplace=True), F.relu(h, inplace=True)
        out = self.head(F.relu(h)).flatten(2).transpose(1, 2)  # (B, R·Lx, n_outputs)
        return out, (recorded if record else None)

    def activation_bytes_per_sample(self) -> int:
        """Estimate the autograd memory of one configuration's forward pass (for chunking).

        About 14 saved activations of C channels per layer and site (measured: 12 for the
        paper's 18 × 32 model at L = 21, 12.2 MB per configuration).
        """
        itemsize = self._parameter_like().element_size()
        return 14 * self.n_layers * self.channels * self.n_sites * itemsize

    @torch.no_grad()
    def ratio_cache(self, x: Tensor) -> RatioCache:
        """Run the network on x keeping every layer's halo rows and ln ψ_i(x_i) per site.

        Memory: about 3·layers·C·(Ly + 2)·Lx floats per configuration (≈ 3.4 MB for the
        paper's 18 × 32 model at L = 21): callers chunk the reference configurations.

        Args:
            x: (B, N) int8 configurations.
        """
        image = self.spins(x).view(x.shape[0], 1, *self.lattice.shape)
        out, halos = self._run_layers(image, record=True)
        site_log = self.site_log_psi(out[..., :2], out[..., 2:] if self.phase else None, x)
        return RatioCache(x=x, log_psi=site_log.sum(dim=-1), site_log_psi=site_log, layers=halos)

    @torch.no_grad()
    def log_psi_ratios(
        self,
        cache: RatioCache,
        index: Tensor,
        x_conn: Tensor,
        first_site: Tensor | None = None,
        chunk_size: int = 4096,
    ) -> Tensor:
        """Return ln Ψ(x') − ln Ψ(x) recomputing only rows from x\'s first changed row on.

        For x' equal to x before site j (row r = j // Lx), conditionals before j are unchanged:
        ln Ψ(x') − ln Ψ(x) = Σ_{i ≥ r·Lx} [ln ψ_i(x'_i) − ln ψ_i(x_i)]. Every layer's rows
        above r are reused from the cache (`LayerHalo`): configurations are grouped by first
        changed row and the network runs on rows r … Ly − 1 only, about (Ly − r)/Ly of a
        forward pass; the differences are summed in float64.

        Args:
            cache: from `ratio_cache` (a generic cache falls back to full passes).
            index: (M,) int64, the reference configuration cache.x[index] of each x'.
            x_conn: (M, N) int8 configurations x'.
            first_site: (M,) int64 with x'[:f] = x[:f] (a lower bound of the first changed
                site), or None to compute it.
            chunk_size: configurations per full-network-pass equivalent (bounds memory).

        Returns:
            (M,) complex128.
        """
        if cache.layers is None:
            return generic_log_psi_ratios(self, cache, index, x_conn, chunk_size)
        return self._partial_passes(cache, index, x_conn, first_site, chunk_size, None)

    @torch.no_grad()
    def propose(
        self,
        cache: RatioCache,
        index: Tensor,
        x_new: Tensor,
        first_site: Tensor | None = None,
        chunk_size: int = 4096,
    ) -> Proposal:
        """Evaluate one candidate per cached configuration, keeping its rows for `accept`.

        As `log_psi_ratios` (at most one x' per reference), but the recomputed rows are kept,
        so accepting a move only copies them into the cache: a Metropolis step costs about
        (Ly − r)/Ly of a forward pass, not one.
        """
        if cache.layers is None:
            return super().propose(cache, index, x_new, first_site, chunk_size)
        parts: list = []
        log_ratio = self._partial_passes(cache, index, x_new, first_site, chunk_size, parts)
        return Proposal(index=index, x=x_new, log_ratio=log_ratio, parts=parts)

    @torch.no_grad()
    def accept(self, cache: RatioCache, proposal: Proposal, accepted: Tensor) -> None:
        """Replace the cached configurations by their accepted proposals (in place).

        Args:
            cache: the cache `proposal` was made from.
            proposal: from `propose`.
            accepted: (M,) bool, one flag per proposal.
        """
        if cache.layers is None:
            super().accept(cache, proposal, accepted)
            return
        p = self.kernel_size - 1
        n_cols = self.lattice.shape[1]
        for members, row, site_log, recorded in proposal.parts:
            keep = accepted[members]
            if not bool(keep.any()):
                continue
            ref = proposal.index[members][keep]
            start = row * n_cols
            cache.x[ref] = proposal.x[members][keep]
            cache.log_psi[ref] += proposal.log_ratio[members][keep]
            cache.site_log_psi[ref, start:] = site_log[keep]
            for layer, new in zip(cache.layers, recorded, strict=True):
                layer.vertical[ref, :, p + row :] = new.vertical[keep, :, p:]
                layer.relu_v[ref, :, 1 + row :] = new.relu_v[keep, :, 1:]
                layer.ab[ref, :, p + row :] = new.ab[keep, :, p:]

    def _partial_passes(
        self,
        cache: RatioCache,
        index: Tensor,
        x_conn: Tensor,
        first_site: Tensor | None,
        chunk_size: int,
        parts: list | None,
    ) -> Tensor:
        """Group x' by first changed row and run the rows below (see `log_psi_ratios`).

        With `parts` a list, appends (members, row, new ln ψ_i, recorded halos) per pass.
        """
        n_rows, n_cols = self.lattice.shape
        x_conn = x_conn.to(cache.x.device)
        index = index.to(cache.x.device)
        if first_site is None:
            differs = x_conn != cache.x[index]
            first_site = torch.where(
                differs.any(dim=-1), differs.to(torch.uint8).argmax(dim=-1), self.n_sites
            )
        first_row = torch.clamp(first_site.to(cache.x.device) // n_cols, max=n_rows)
        result = torch.zeros(x_conn.shape[0], dtype=torch.complex128, device=cache.x.device)
        for row in torch.unique(first_row).tolist():
            if row >= n_rows:
                continue  # x' = x: ratio 1
            members = torch.nonzero(first_row == row, as_tuple=True)[0]
            per_pass = max(1, chunk_size * n_rows // (n_rows - row))
            for part in members.split(per_pass):
                ratio, site_log, recorded = self._rows_log_ratio(
                    cache, index[part], x_conn[part], row, parts is not None
                )
                result[part] = ratio
                if parts is not None:
                    parts.append((part, row, site_log, recorded))
        return result

    def _rows_log_ratio(
        self, cache: RatioCache, index: Tensor, x_conn: Tensor, row: int, record: bool = False
    ) -> tuple[Tensor, Tensor, list[LayerHalo] | None]:
        """Run rows ≥ row of x' on the cached halos.

        Returns:
            Σ_{i ≥ row·Lx} ln ψ_i(x'_i) − ln ψ_i(x_i) (M,) complex128, the new ln ψ_i(x'_i)
            (M, N − row·Lx), and with `record` the layers' recorded rows (top rows padding).
        """
        n_rows, n_cols = self.lattice.shape
        start = row * n_cols
        like = self._parameter_like()
        spins = 2 * x_conn[:, start:].to(device=like.device, dtype=like.dtype) - 1
        spins = spins.view(x_conn.shape[0], 1, n_rows - row, n_cols)
        halos = [layer.rows(index, row) for layer in cache.layers]
        out, recorded = self._run_layers(spins, halos, record=record)
        phase = out[..., 2:] if self.phase else None
        new = self.site_log_psi(out[..., :2], phase, x_conn, start)
        return (new - cache.site_log_psi[index, start:]).sum(dim=-1), new, recorded

    def _sample_cached(self, uniforms: Tensor) -> tuple[Tensor, Tensor]:
        """Sample with cached activations, computing only what each new site needs (Fig. 1b).

        Per site, each layer evaluates its horizontal 1×K conv, its 1×1 conv into `a` and the
        current-row taps of its K×K output conv, at that site only. Everything that depends on
        rows above only (the vertical stream, the `b` channels and the rows-above taps of the
        output conv) is computed once per finished row for the whole next row, as one
        convolution over the last K rows. The FLOP count is about one forward pass.

        The last K rows of each stream live in ring buffers (B, columns, K, channels), row r in
        slot r mod K, read as one (B, K·channels, 1, columns) channels-last image by kernels
        whose row taps are rotated to match (`_LayerMatrices.rotated`): no copies per row.
        """
        n_batch = uniforms.shape[0]
        n_rows, n_cols = self.lattice.shape
        k = self.kernel_size
        p = k - 1
        h = p // 2
        c_a = self.channels // 2
        last = self.n_layers - 1
        like = self._parameter_like()
        dtype, device = like.dtype, like.device
        mats = [_LayerMatrices.of(layer) for layer in self.causal_layers]
        head_w = self.head.weight.view(self.n_outputs, self.channels).t().contiguous()
        head_b = self.head.bias
        in_channels = [1] + [self.channels] * last

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        def ring_conv(ring: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            # (B, W, K, C_in) ring → (B, W − K + 1, C_out) one-row convolution.
            image = ring.flatten(2).unsqueeze(1).permute(0, 3, 1, 2)  # channels-last view
            return F.conv2d(image, weight, bias)[:, :, 0].transpose(1, 2)

        # Channels-last caches, zero-padded on the left (and right for V): zero padding.
        h_row = [zeros(n_batch, p + n_cols, c) for c in in_channels]  # current row of H_l
        a_row = [zeros(n_batch, p + n_cols, c_a) for _ in mats]  # current row of a_l
        v_ring = [zeros(n_batch, n_cols + 2 * h, k, c) for c in in_channels]  # rows of V_l
        x_ring = [zeros(n_batch, n_cols + p, k, self.channels) for _ in mats]  # rows of [a, b]
        row_part: list[Tensor] = [zeros(0)] * self.n_layers  # (B, Lx, C) rows-above part of H'

        def start_row(i: int, r: int, v_above: Tensor | None) -> None:
            # Row r of [a_l, b_l]: b from ReLU(V'(r − 1, ·)) (zero above row 0), a zero for now.
            m = mats[i]
            slot = x_ring[i][:, p:, r % k]
            slot[..., :c_a] = 0
            if v_above is None:
                slot[..., c_a:] = torch.relu(m.b_b)
            else:
                slot[..., c_a:] = torch.relu(torch.matmul(v_above, m.b_w) + m.b_b)
            row_part[i] = ring_conv(x_ring[i], m.out_rotated[r % k], m.out_b)

        for i in range(self.n_layers):
            start_row(i, 0, None)

        x = torch.zeros(n_batch, self.n_sites, dtype=torch.int8, device=device)
        n_up = None if self.n_up is None else torch.zeros(n_batch, dtype=torch.long, device=device)
        raw = torch.empty(n_batch, self.n_sites, self.n_outputs, dtype=dtype, device=device)
        spin_up = torch.ones((), dtype=dtype, device=device)
        spin_down = -spin_up
        m_last = mats[last]
        a_first = torch.relu(m_last.a_b)  # a at column 0 of the last layer (shifted-in zero)
        for r in range(n_rows):
            for c in range(n_cols):
                site = r * n_cols + c
                # Exclusive last layer: its 1×K conv ends at column c − 1.
                if c == 0:
                    a_row[last][:, p] = a_first
                else:
                    window = h_row[last][:, c - 1 : c - 1 + k].flatten(1)
                    t = torch.addmm(m_last.h_b, window, m_last.h_w).relu_()
                    torch.addmm(m_last.a_b, t, m_last.a_w, out=a_row[last][:, p + c]).relu_()
                window = a_row[last][:, c : c + k].flatten(1)
                hidden = torch.addmm(row_part[last][:, c], window, m_last.out_a).relu_()
                out = torch.addmm(head_b, hidden, head_w, out=raw[:, site])  # (B, n_outputs)
                is_up = self.sample_site(out[:, :2], n_up, site, uniforms[:, site])
                x[:, site] = is_up
                if n_up is not None:
                    n_up += is_up
                if site == self.n_sites - 1:
                    break
                torch.where(is_up, spin_up, spin_down, out=h_row[0][:, p + c, 0])
                # Inclusive layers: H_{l+1}(r, c) now that x(r, c) is known.
                for i in range(last):
                    m = mats[i]
                    window = h_row[i][:, c : c + k].flatten(1)
                    t = torch.addmm(m.h_b, window, m.h_w).relu_()
                    torch.addmm(m.a_b, t, m.a_w, out=a_row[i][:, p + c]).relu_()
                    window = a_row[i][:, c : c + k].flatten(1)
                    hidden = torch.addmm(
                        row_part[i][:, c], window, m.out_a, out=h_row[i + 1][:, p + c]
                    )
                    source = self.residual_source[i]
                    if source is not None:
                        hidden += h_row[source][:, p + c]
                    hidden.relu_()
            if r == n_rows - 1:
                break
            # Row r is complete: advance the vertical stream by one row and prepare row r + 1.
            slot = r % k
            v_ring[0][:, h : h + n_cols, slot] = h_row[0][:, p:]
            for i in range(self.n_layers):
                m = mats[i]
                v = ring_conv(v_ring[i], m.v_rotated[slot], m.v_b)  # V'_l(r, ·), (B, Lx, C)
                x_ring[i][:, p:, slot, :c_a] = a_row[i][:, p:]
                start_row(i, r + 1, torch.relu(v))
                if i < last:
                    source = self.residual_source[i]
                    if source is not None:
                        v += v_ring[source][:, h : h + n_cols, slot]
                    v_ring[i + 1][:, h : h + n_cols, slot] = v.relu_()
        phase = raw[..., 2:] if self.phase else None
        return x, self.log_psi_from_raw(raw[..., :2], phase, x)


@dataclass(frozen=True)
class _LayerMatrices:
    """Effective weights of one causal layer, laid out for the cached sampler."""

    v_rotated: list[Tensor]  # [q] (C, K·C_in, 1, K) vertical conv on a ring, current slot q
    v_b: Tensor  # (C,)
    h_w: Tensor  # (K·C_in, C) horizontal 1×K conv on a (B, K, C_in) window
    h_b: Tensor  # (C,)
    a_w: Tensor  # (C, C_a)
    a_b: Tensor  # (C_a,)
    b_w: Tensor  # (C, C_b)
    b_b: Tensor  # (C_b,)
    out_rotated: list[Tensor]  # [q] (C, K·C, 1, K) output conv on a ring, current slot q
    out_b: Tensor  # (C,)
    out_a: Tensor  # (K·C_a, C) output conv taps on the current row's a channels

    @staticmethod
    def rotated(weight: Tensor) -> list[Tensor]:
        """Return K×K kernels for a K-row ring buffer, one per slot q of the current row.

        Slot j holds row ρ ≡ j (mod K) of the rows r − K + 1 … r, i.e. kernel row
        (j − q − 1) mod K when the current row r sits in slot q.
        """
        c_out, c_in, k, _ = weight.shape
        kernels = []
        for q in range(k):
            taps = [(j - q - 1) % k for j in range(k)]
            kernels.append(weight[:, :, taps].transpose(1, 2).reshape(c_out, k * c_in, 1, k))
        return kernels

    @classmethod
    def of(cls, layer: TwoStreamCausalLayer) -> _LayerMatrices:
        k = layer.kernel_size
        out_w = layer.out.weight

        def as_matrix(weight: Tensor) -> Tensor:  # (C_out, C_in, K) → (K·C_in, C_out)
            return weight.permute(2, 1, 0).reshape(-1, weight.shape[0]).contiguous()

        return cls(
            v_rotated=cls.rotated(layer.vertical.weight),
            v_b=layer.vertical.bias,
            h_w=as_matrix(layer.horizontal.weight[:, :, 0, :]),
            h_b=layer.horizontal.bias,
            a_w=layer.to_a.weight.flatten(1).t().contiguous(),
            a_b=layer.to_a.bias,
            b_w=layer.to_b.weight.flatten(1).t().contiguous(),
            b_b=layer.to_b.bias,
            out_rotated=cls.rotated(out_w),
            out_b=layer.out.bias,
            out_a=as_matrix(out_w[:, : layer.channels_a, k - 1, :]),
        )
