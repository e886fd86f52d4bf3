"""Hydra callbacks: the sweep summary written when a multirun ends."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import h5py
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

COLUMNS = (
    "energy",
    "energy_err",
    "energy_variance",
    "abs_magnetization",
    "abs_magnetization_err",
    "magnetization_sq",
    "magnetization_sq_err",
    "reference_energy",
    "relative_error",
)


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """Return one row per finished job of a sweep: its overrides and final observables."""
    rows = []
    for h5 in sorted(Path(sweep_dir).glob("*/history.h5")):
        job_dir = h5.parent
        with h5py.File(h5, "r") as f:
            if "final" not in f:
                continue
            row: dict[str, Any] = {"job": job_dir.name}
            for key in f["final"]:
                row[key] = float(f["final"][key][()])
        overrides = job_dir / ".hydra" / "overrides.yaml"
        if overrides.exists():
            import yaml

            for item in yaml.safe_load(overrides.read_text()) or []:
                key, _, value = str(item).partition("=")
                try:
                    row[key] = float(value)
                except ValueError:
                    row[key] = value
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path, swept: list[str]) -> list[Path]:
    """Write summary.csv, summary.md and summary.png for the jobs of `sweep_dir`."""
    from naqs_cli import plots

    rows = collect_sweep(sweep_dir)
    if not rows:
        return []
    keys = [k for k in swept if any(k in r for r in rows)] or ["job"]
    header = ["job", *[k for k in keys if k != "job"], *COLUMNS]
    csv_path = Path(sweep_dir) / "summary.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in header})
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = []
        for key in header:
            value = row.get(key, "")
            cells.append(
                f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else str(value)
            )
        md.append("| " + " | ".join(cells) + " |")
    md_path = Path(sweep_dir) / "summary.md"
    md_path.write_text("\n".join(md) + "\n")
    out = [csv_path, md_path]
    numeric = next((k for k in keys if all(isinstance(r.get(k), float) for r in rows)), None)
    if numeric is not None:
        out.append(plots.sweep_plot(rows, numeric, Path(sweep_dir) / "summary.png"))
    return out


class SweepSummary(Callback):
    """Write summary.csv / summary.md / summary.png in the sweep directory after a multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        swept = []
        for item in config.hydra.overrides.task:
            key, _, value = str(item).partition("=")
            if "," in value or value.startswith(("range(", "choice(", "interval(")):
                swept.append(key)
        try:
            written = write_summary(sweep_dir, swept)
        except Exception as err:  # a summary must never fail a finished sweep
            log.warning("could not write the sweep summary: %s", err)
            return
        if written:
            print("sweep summary: " + ", ".join(str(p) for p in written), flush=True)
