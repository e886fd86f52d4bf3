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
from naqs_cli.models.layers import ConvLayout, LayerHalo, TwoStreamCausalLayer

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
        count_feature: let each conditional see the ups the sector still needs (needs
            total_sz; see `AutoregressiveWaveFunction`).

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
        count_feature: bool = False,
    ) -> None:
        super().__init__(
            lattice=lattice, phase=phase, total_sz=total_sz, count_feature=count_feature
        )
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
        halo = None if halos is None else halos[0]
        v_in, h_in, _, _ = self.causal_layers[0].padded_inputs(image, image, halo, False)
        saved: dict[int, tuple[Tensor, Tensor]] = {}  # streams a later layer adds back
        recorded: list[LayerHalo] = []
        last = self.n_layers - 1
        for i, layer in enumerate(self.causal_layers):
            halo = None if halos is None else halos[i]
            v, h, rec = layer.forward_rows(v_in, h_in, halo, record)
            if record:
                recorded.append(rec)
            if i == last:
                break
            source = self.residual_source[i]
            if source is not None:
                v_source, h_source = saved.pop(source)
                if torch.is_grad_enabled():
                    v, h = v + v_source, h + h_source
                else:  # in place on the convolutions' fresh outputs
                    v, h = v.add_(v_source), h.add_(h_source)
            # The next layer's padded inputs receive ReLU of the streams directly.
            halo = None if halos is None else halos[i + 1]
            v_in, h_in, v_stream, h_stream = self.causal_layers[i + 1].padded_inputs(
                v, h, halo, True
            )
            if i + 1 in self._residual_targets:
                saved[i + 1] = (v_stream, h_stream)
        features = F.relu(h)
        if features.shape[1] == self.channels:
            head = self.head(features)
        else:  # zero-padded channels (`layers.padded_channels`): zero weights for them
            layout = ConvLayout(self.n_outputs, features.shape[1], ((0, 0, self.channels),))
            head = F.conv2d(features, *layout.pad(self.head.weight, self.head.bias))
        out = head.flatten(2).transpose(1, 2)  # (B, R·Lx, n_outputs)
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
        output conv) is computed once per finished row for the whole next row. The FLOP count
        is about one forward pass.

        Every cache keeps the batch last, (columns, channels, B): the K columns a site reads
        form one contiguous (K·channels, B) matrix, so each per-site product is a single
        (C_out, K·C_in) @ (K·C_in, B) GEMM written in place into a contiguous (C_out, B) slab.
        The last K rows of each stream live in ring buffers (columns, K, channels, B), row r in
        slot r mod K; a per-row convolution is one batched GEMM over the columns' overlapping
        (K·K·channels, B) windows, with kernel rows rotated to the slots
        (`_LayerMatrices.rotated`): no layout changes between the per-site and per-row work.
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
        m_last = mats[last]
        head_w = self.head.weight.view(self.n_outputs, self.channels)
        head_b = self.head.bias.view(self.n_outputs, 1)
        in_channels = [1] + [self.channels] * last

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        def empty(*shape: int) -> Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        # Batch-last caches. Zero padding: rings start at zero (rows above row 0) and have zero
        # columns left (and right for V); the current-row caches have p zero columns left.
        h_row = [empty(p + n_cols, c, n_batch) for c in in_channels]  # current row of H_l
        a_row = [empty(p + n_cols, c_a, n_batch) for _ in mats]  # current row of a_l
        for row in h_row + a_row:
            row[:p] = 0
        v_ring = [zeros(n_cols + 2 * h, k, c, n_batch) for c in in_channels]  # rows of V_l
        x_ring = [zeros(n_cols + p, k, self.channels, n_batch) for _ in mats]  # rows of [a, b]
        v_windows = [_column_windows(ring, n_cols) for ring in v_ring]
        x_windows = [_column_windows(ring, n_cols) for ring in x_ring]
        # Rows-above part of H'_l for the current row, bias included; each site adds its
        # current-row taps in place. For l < last it is stored where H_{l+1} of the row goes.
        row_part = [row[p:] for row in h_row[1:]] + [empty(n_cols, self.channels, n_batch)]
        v_new = empty(n_cols, self.channels, n_batch)  # V'_l of the row just finished
        v_relu = empty(n_cols, self.channels, n_batch)  # ReLU(V'_l)
        t = empty(self.channels, n_batch)  # ReLU(horizontal conv) at the current site

        def start_row(i: int, r: int, v_above: Tensor | None) -> None:
            # Row r of [a_l, b_l]: b from ReLU(V'(r − 1, ·)) (zero above row 0), a zero for now.
            m = mats[i]
            slot = x_ring[i][p:, r % k]
            slot[:, :c_a] = 0
            if v_above is None:
                slot[:, c_a:] = torch.relu(m.b_b)
            else:
                torch.clamp_min(_batched_matmul(m.b_w, m.b_b, v_above), 0, out=slot[:, c_a:])
            _batched_matmul(m.out_rotated[r % k], m.out_b, x_windows[i], out=row_part[i])

        for i in range(self.n_layers):
            start_row(i, 0, None)

        # The views each site reads and writes, per column, built once rather than per site.
        columns = []
        for c in range(n_cols):
            inclusive = []
            for i in range(last):
                source = self.residual_source[i]
                inclusive.append(
                    (
                        mats[i],
                        h_row[i][c : c + k].view(-1, n_batch),
                        a_row[i][p + c],
                        a_row[i][c : c + k].view(-1, n_batch),
                        h_row[i + 1][p + c],  # holds the rows-above part until the site is done
                        None if source is None else h_row[source][p + c],
                    )
                )
            # Exclusive last layer: its 1×K conv ends at column c − 1 (none at column 0).
            h_window = h_row[last][c - 1 : c - 1 + k].view(-1, n_batch) if c > 0 else None
            columns.append(
                (
                    h_window,
                    a_row[last][p + c],
                    a_row[last][c : c + k].view(-1, n_batch),
                    row_part[last][c],
                    h_row[0][p + c, 0],
                    inclusive,
                )
            )
        # Column 0 of the last layer sees a shifted-in zero: a = ReLU(a_b) in every row.
        a_row[last][p] = torch.relu(m_last.a_b)

        x = torch.empty(self.n_sites, n_batch, dtype=torch.int8, device=device)  # batch last
        n_up = None if self.n_up is None else torch.zeros(n_batch, dtype=torch.long, device=device)
        raw = empty(self.n_sites, self.n_outputs, n_batch)
        uniforms = uniforms.t().contiguous()
        spin_up = torch.ones((), dtype=dtype, device=device)
        spin_down = -spin_up
        # Small per-site products lose more to waking threads than they gain from them
        # (`_SINGLE_THREAD_MACS`): the site loop then runs on one thread, the per-row
        # convolutions on all of them.
        n_threads = torch.get_num_threads()
        site_macs = n_batch * self.channels * k * self.channels  # the largest per-site product
        site_threads = 1 if device.type == "cpu" and site_macs <= _SINGLE_THREAD_MACS else None
        row_threads = None if site_threads is None else n_threads  # None: no change
        try:
            for r in range(n_rows):
                _set_threads(site_threads)
                for c, (h_window, a_new, a_window, hidden, spin, inclusive) in enumerate(columns):
                    site = r * n_cols + c
                    if h_window is not None:
                        torch.addmm(m_last.h_b, m_last.h_w, h_window, out=t).relu_()
                        torch.addmm(m_last.a_b, m_last.a_w, t, out=a_new).relu_()
                    hidden.addmm_(m_last.out_a, a_window).relu_()
                    out = torch.addmm(head_b, head_w, hidden, out=raw[site])  # (n_outputs, B)
                    is_up = self.sample_site(out[:2].t(), n_up, site, uniforms[site])
                    x[site] = is_up
                    if n_up is not None:
                        n_up += is_up
                    if site == self.n_sites - 1:
                        break
                    torch.where(is_up, spin_up, spin_down, out=spin)
                    # Inclusive layers: H_{l+1}(r, c) now that x(r, c) is known.
                    for m, h_window, a_new, a_window, h_new, residual in inclusive:
                        torch.addmm(m.h_b, m.h_w, h_window, out=t).relu_()
                        torch.addmm(m.a_b, m.a_w, t, out=a_new).relu_()
                        h_new.addmm_(m.out_a, a_window)
                        if residual is not None:
                            h_new += residual
                        h_new.relu_()
                _set_threads(row_threads)
                if r == n_rows - 1:
                    break
                # Row r is complete: advance the vertical stream one row, prepare row r + 1.
                slot = r % k
                v_ring[0][h : h + n_cols, slot] = h_row[0][p:]
                for i in range(self.n_layers):
                    m = mats[i]
                    v = _batched_matmul(m.v_rotated[slot], m.v_b, v_windows[i], out=v_new)
                    x_ring[i][p:, slot, :c_a] = a_row[i][p:]
                    start_row(i, r + 1, torch.clamp_min(v, 0, out=v_relu))
                    if i < last:
                        source = self.residual_source[i]
                        if source is not None:
                            v += v_ring[source][h : h + n_cols, slot]
                        torch.clamp_min(v, 0, out=v_ring[i + 1][h : h + n_cols, slot])
        finally:
            _set_threads(row_threads)
        x = x.t().contiguous()
        raw = raw.permute(2, 0, 1)  # (B, N, n_outputs) view
        phase = raw[..., 2:] if self.phase else None
        return x, self.log_psi_from_raw(raw[..., :2], phase, x)


@dataclass(frozen=True)
class _LayerMatrices:
    """Effective weights of one causal layer, laid out for the batch-last cached sampler.

    Products act on the left of batch-last (·, B) matrices; biases are (C_out, 1) columns.
    """

    v_rotated: list[Tensor]  # [q] (C, K·K·C_in) vertical conv on a ring, current slot q
    v_b: Tensor  # (C, 1)
    h_w: Tensor  # (C, K·C_in) horizontal 1×K conv on a (K, C_in, B) window
    h_b: Tensor  # (C, 1)
    a_w: Tensor  # (C_a, C)
    a_b: Tensor  # (C_a, 1)
    b_w: Tensor  # (C_b, C)
    b_b: Tensor  # (C_b, 1)
    out_rotated: list[Tensor]  # [q] (C, K·K·C) output conv on a ring, current slot q
    out_b: Tensor  # (C, 1)
    out_a: Tensor  # (C, K·C_a) output conv taps on the current row's a channels

    @staticmethod
    def rotated(weight: Tensor) -> list[Tensor]:
        """Return K×K kernels for a K-row ring buffer, one per slot q of the current row.

        Slot j holds row ρ ≡ j (mod K) of the rows r − K + 1 … r, i.e. kernel row
        (j − q − 1) mod K when the current row r sits in slot q. Each kernel is a
        (C_out, K·K·C_in) matrix over a (K columns, K slots, C_in) window.
        """
        c_out, _, k, _ = weight.shape
        kernels = []
        for q in range(k):
            taps = [(j - q - 1) % k for j in range(k)]
            kernels.append(weight[:, :, taps].permute(0, 3, 2, 1).reshape(c_out, -1))
        return kernels

    @classmethod
    def of(cls, layer: TwoStreamCausalLayer) -> _LayerMatrices:
        k = layer.kernel_size
        out_w = layer.out.weight

        def as_matrix(weight: Tensor) -> Tensor:  # (C_out, C_in, K) → (C_out, K·C_in)
            return weight.transpose(1, 2).reshape(weight.shape[0], -1)

        def as_column(bias: Tensor) -> Tensor:
            return bias.view(-1, 1)

        return cls(
            v_rotated=cls.rotated(layer.vertical.weight),
            v_b=as_column(layer.vertical.bias),
            h_w=as_matrix(layer.horizontal.weight[:, :, 0, :]),
            h_b=as_column(layer.horizontal.bias),
            a_w=layer.to_a.weight.flatten(1),
            a_b=as_column(layer.to_a.bias),
            b_w=layer.to_b.weight.flatten(1),
            b_b=as_column(layer.to_b.bias),
            out_rotated=cls.rotated(out_w),
            out_b=as_column(layer.out.bias),
            out_a=as_matrix(out_w[:, : layer.channels_a, k - 1, :]),
        )


#: Per-site products of at most this many multiply-adds (≲ 100 µs on one core) run on one
#: thread: sharing them gains less than waking the other OpenMP threads costs (passive waiting,
#: or a loaded machine). Layers=18, channels=32 at B = 1024 is 3.1 M.
_SINGLE_THREAD_MACS = 2**22


def _set_threads(n_threads: int | None) -> None:
    """Set torch's intra-op thread count to `n_threads` (None: leave it alone)."""
    if n_threads is not None:
        torch.set_num_threads(n_threads)


def _column_windows(ring: Tensor, n_windows: int) -> Tensor:
    """View a (columns, K, C, B) ring as its overlapping K-column windows, without copying.

    Args:
        ring: (columns, K, C, B) contiguous ring buffer; columns ≥ n_windows + K − 1.
        n_windows: number of windows (output columns).

    Returns:
        (n_windows, K·K·C, B) view; window c is ring[c : c + K] as one matrix.
    """
    n_slots, n_channels, n_batch = ring.shape[1:]
    width = n_slots  # the kernel is K columns wide, as the ring is K rows deep
    return ring.as_strided(
        (n_windows, width * n_slots * n_channels, n_batch), (ring.stride(0), n_batch, 1)
    )


def _batched_matmul(
    weight: Tensor, bias: Tensor, windows: Tensor, out: Tensor | None = None
) -> Tensor:
    """Return bias + weight @ windows[c] for every column c (one batched GEMM).

    Args:
        weight: (C_out, M) matrix.
        bias: (C_out, 1) column.
        windows: (columns, M, B) batch-last inputs (may overlap in memory).
        out: optional (columns, C_out, B) destination.

    Returns:
        (columns, C_out, B).
    """
    batch = weight.expand(windows.shape[0], *weight.shape)
    return torch.baddbmm(bias, batch, windows, out=out)
