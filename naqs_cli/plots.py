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


def training_plot(history: Path, out_png: Path, reference_energy: float | None = None) -> Path:
    """Draw energy (or relative error to the reference) and variance against step.

    Args:
        history: a `history.h5`.
        out_png: the PNG to write.
        reference_energy: exact or literature energy per site; with it the top panel shows
            |E − E_ref|/|E_ref| on a log scale.
    """
    plt = _pyplot()
    h = store.read_history(history)
    step, energy, err = h["step"], h["energy"], h["energy_err"]
    fig, (ax_e, ax_v) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if reference_energy is not None and reference_energy != 0:
        rel = np.abs(energy - reference_energy) / abs(reference_energy)
        ax_e.semilogy(step, np.maximum(rel, 1e-12), lw=1)
        ax_e.set_ylabel("|E − E_ref| / |E_ref|")
    else:
        ax_e.plot(step, energy, lw=1)
        ax_e.fill_between(step, energy - err, energy + err, alpha=0.3)
        ax_e.set_ylabel("energy per site")
    ax_v.semilogy(step, np.maximum(h["energy_variance"], 1e-16), lw=1, color="C1")
    ax_v.set_ylabel("Var(H) / N²")
    ax_v.set_xlabel("step")
    for ax in (ax_e, ax_v):
        ax.grid(alpha=0.3)
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
