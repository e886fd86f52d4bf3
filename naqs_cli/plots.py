"""Matplotlib figures drawn from HDF5 files only (matplotlib is imported lazily)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from naqs_cli import store


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Return the trailing mean over `window` points (shorter at the start)."""
    values = np.asarray(values, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(1, values.size + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def training_plot(
    history: Path,
    out_png: Path,
    reference_energy: float | None = None,
    title: str | None = None,
) -> Path:
    """Draw energy (or relative error to the reference) and variance against step.

    Raw per-step values are drawn faintly, with a trailing moving average (2 % of the steps,
    at least 5) on top, since single-batch estimates are noisy.

    Args:
        history: a `history.h5`.
        out_png: the PNG to write.
        reference_energy: exact or literature energy per site; with it the top panel shows
            |E − E_ref|/|E_ref| of the moving average on a log scale.
        title: figure title (e.g. the Hamiltonian and lattice).
    """
    plt = _pyplot()
    h = store.read_history(history)
    step, energy, err = h["step"], h["energy"], h["energy_err"]
    window = max(5, step.size // 50)
    smooth = _moving_average(energy, window)
    fig, (ax_e, ax_v) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if reference_energy is not None and reference_energy != 0:
        rel = np.abs(energy - reference_energy) / abs(reference_energy)
        rel_smooth = np.abs(smooth - reference_energy) / abs(reference_energy)
        ax_e.semilogy(step, np.maximum(rel, 1e-12), lw=0.6, alpha=0.35, color="C0")
        ax_e.semilogy(step, np.maximum(rel_smooth, 1e-12), lw=1.5, color="C0",
                      label=f"moving average ({window} steps)")  # fmt: skip
        ax_e.set_ylabel("|E − E_ref| / |E_ref|")
    else:
        ax_e.plot(step, energy, lw=0.6, alpha=0.35, color="C0")
        ax_e.fill_between(step, energy - err, energy + err, alpha=0.15, color="C0")
        ax_e.plot(step, smooth, lw=1.5, color="C0", label=f"moving average ({window} steps)")
        ax_e.set_ylabel("energy per site")
    ax_e.legend(loc="upper right")
    variance = np.maximum(h["energy_variance"], 1e-16)
    ax_v.semilogy(step, variance, lw=0.6, alpha=0.35, color="C1")
    ax_v.semilogy(step, _moving_average(variance, window), lw=1.5, color="C1")
    ax_v.set_ylabel("Var(H) / N²")
    ax_v.set_xlabel("step")
    for ax in (ax_e, ax_v):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def sweep_plot(rows: list[dict], x_key: str, out_png: Path) -> Path:
    """Draw energy, ⟨|σᶻ|⟩ and ⟨(Σσᶻ)²⟩/N² of sweep jobs against the swept parameter."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r[x_key])
    x = np.array([r[x_key] for r in rows], dtype=float)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (name, label) in zip(
        axes,
        (
            ("energy", "energy per site"),
            ("abs_magnetization", "⟨|Σσᶻ|⟩/N"),
            ("magnetization_sq", "⟨(Σσᶻ)²⟩/N²"),
        ),
        strict=True,
    ):
        y = np.array([r.get(name, np.nan) for r in rows], dtype=float)
        e = np.array([r.get(f"{name}_err", 0.0) for r in rows], dtype=float)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3)
        if name == "energy" and any(np.isfinite(r.get("reference_energy", np.nan)) for r in rows):
            ref = np.array([r.get("reference_energy", np.nan) for r in rows], dtype=float)
            ax.plot(x, ref, "k--", lw=1, label="reference")
            ax.legend()
        ax.set_xlabel(x_key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def compare_sampling_plot(h5: Path, out_png: Path) -> Path:
    """Draw the Fig. 2 comparison: PCA scatter and magnetization histograms.

    Left: the samples projected on the first two principal axes of the direct samples (direct
    in green, each Markov chain in its own colour). Right: histograms of the order parameter
    (m = Σσᶻ/N; the staggered m_s when the file's `order_symbol` says so) per method.

    Args:
        h5: a `compare_sampling.h5` (groups `direct/`, `mcmc/chain_<k>/` with `pca` (S, 2)
            and `samples_order_parameter` (S,)).
        out_png: the PNG to write.
    """
    import h5py

    plt = _pyplot()
    with h5py.File(h5, "r") as f:
        direct_pc = f["direct/pca"][:]
        order = str(f.attrs.get("order_parameter", "magnetization"))
        symbol = str(f.attrs.get("order_symbol", "m"))
        direct_m = f["direct/samples_order_parameter"][:]
        direct_mean = float(f[f"direct/{order}"][()])
        names = sorted(
            (k for k in f["mcmc"] if k.startswith("chain_")), key=lambda k: int(k.split("_")[1])
        )
        chains = [(f[f"mcmc/{k}/pca"][:], f[f"mcmc/{k}/samples_order_parameter"][:]) for k in names]
        mcmc_mean = float(f[f"mcmc/{order}"][()])
        explained = f["pca/explained_variance_ratio"][:]
        title = str(f.attrs.get("hamiltonian", ""))
        n_sites = int(f.attrs.get("n_sites", 0))
    colours = [c for c in (f"C{i}" for i in range(10)) if c != "C2"]
    fig, (ax_pc, ax_m) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    ax_pc.scatter(
        direct_pc[:, 0],
        direct_pc[:, 1],
        s=4,
        alpha=0.25,
        color="C2",
        label=f"direct ({len(direct_m)})",
        rasterized=True,
    )
    for k, (pc, _) in enumerate(chains):
        ax_pc.scatter(
            pc[:, 0],
            pc[:, 1],
            s=4,
            alpha=0.5,
            color=colours[k % len(colours)],
            label=f"chain {k} ({len(pc)})",
            rasterized=True,
        )
    ax_pc.set_xlabel(f"PC 1 ({100 * explained[0]:.0f} % of variance)")
    ax_pc.set_ylabel(f"PC 2 ({100 * explained[1]:.0f} % of variance)")
    ax_pc.set_title(f"{title}: samples on the direct samples' principal axes")
    ax_pc.legend(markerscale=3, fontsize=8, loc="best")
    # One bin per possible value of m (steps of 2/N) when N is known.
    bins = np.arange(-n_sites - 1, n_sites + 2, 2) / n_sites if n_sites else np.linspace(-1, 1, 42)
    ax_m.hist(
        direct_m,
        bins=bins,
        density=True,
        color="C2",
        alpha=0.4,
        label=f"direct, ⟨{symbol}⟩ = {direct_mean:.3f}",
    )
    for k, (_, m) in enumerate(chains):
        ax_m.hist(
            m,
            bins=bins,
            density=True,
            histtype="step",
            lw=1.5,
            color=colours[k % len(colours)],
            label=f"chain {k}" if k < 6 else None,
        )
    ax_m.plot([], [], " ", label=f"all chains, ⟨{symbol}⟩ = {mcmc_mean:.3f}")
    ax_m.set_xlabel("m = Σσᶻ / N" if symbol == "m" else "m_s = Σ(−1)^(r+c) σᶻ / N")
    ax_m.set_ylabel("probability density")
    ax_m.legend(fontsize=8)
    for ax in (ax_pc, ax_m):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def compare_training_plot(h5: Path, out_png: Path) -> Path:
    """Draw the Fig. 3 comparison: relative energy error and energy variance vs wall time.

    One line per run (direct, MCMC at each k), log-log. The relative error is that of the
    trailing moving average of the energy (window ≈ 5 % of the run's steps), |E − E_ref|/|E_ref|
    with the file's `reference_energy`; the variance is Var(H)/N² per step.

    Args:
        h5: a `compare_training.h5` (a group per run with `wall_time`, `energy`,
            `energy_variance`; root attributes `reference_energy`, `reference_source`).
        out_png: the PNG to write.
    """
    import h5py

    plt = _pyplot()
    runs = []
    with h5py.File(h5, "r") as f:
        reference = float(f.attrs["reference_energy"])
        source = str(f.attrs.get("reference_source", ""))
        title = str(f.attrs.get("hamiltonian", ""))
        for name in f:
            group = f[name]
            label = str(group.attrs.get("label", name))
            runs.append(
                (
                    name,
                    label,
                    group["wall_time"][:],
                    group["energy"][:],
                    group["energy_variance"][:],
                    int(group.attrs.get("final_window", 1)),
                )
            )
    runs.sort(key=lambda r: (r[0] != "direct", len(r[0]), r[0]))
    fig, (ax_e, ax_v) = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    palette = iter(c for i in range(100) for c in (f"C{i % 10}",) if c != "C2")
    for name, label, wall, energy, variance, window in runs:
        colour = "C2" if name == "direct" else next(palette)
        smooth = np.array(
            [np.nanmean(energy[max(0, t - window + 1) : t + 1]) for t in range(energy.size)]
        )
        rel = np.abs(smooth - reference) / abs(reference)
        # The run that defines a "lowest found" reference touches 0 there: leave that out.
        rel[rel <= 1e-12] = np.nan
        ax_e.loglog(wall, rel, color=colour, lw=1.5, label=label)
        ax_v.loglog(wall, np.maximum(variance, 1e-16), color=colour, lw=1, ls="--", label=label)
    ax_e.set_ylabel("|E − E_ref| / |E_ref|  (moving average)")
    ax_e.set_title(f"relative error; E_ref = {reference:.6f}: {source}", fontsize=9)
    ax_v.set_ylabel("energy variance Var(H) / N²")
    ax_v.set_title("energy variance", fontsize=9)
    fig.suptitle(f"{title}: direct sampling vs MCMC under equal wall time", fontsize=11)
    for ax in (ax_e, ax_v):
        ax.set_xlabel("wall time (s)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
