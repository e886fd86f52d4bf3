"""Hydra callbacks: the sweep summary, kept current as jobs end and written when a multirun ends."""

from __future__ import annotations

import csv
import logging
import math
import os
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
        # Jobs of a parallel sweep may still be writing: read without a lock, skip what fails.
        try:
            with h5py.File(h5, "r", locking=False) as f:
                if "final" not in f:
                    continue
                row: dict[str, Any] = {"job": job_dir.name}
                for key in f["final"]:
                    row[key] = float(f["final"][key][()])
        except (OSError, KeyError, ValueError) as err:
            log.info("sweep summary: skipping %s (%s)", job_dir.name, err)
            continue
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
    # Jobs of a parallel sweep write these as they end: each file is replaced whole (temp, rename).
    tmp = _temp_path(csv_path)
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in header})
    os.replace(tmp, csv_path)
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
    tmp = _temp_path(md_path)
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, md_path)
    out = [csv_path, md_path]
    numeric = next((k for k in keys if all(isinstance(r.get(k), float) for r in rows)), None)
    if numeric is not None:
        png_path = Path(sweep_dir) / "summary.png"
        os.replace(plots.sweep_plot(rows, numeric, _temp_path(png_path)), png_path)
        out.append(png_path)
    return out


def _temp_path(path: Path) -> Path:
    """Return a hidden per-process name beside `path`, with its suffix (matplotlib needs it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def swept_keys(overrides: list[str]) -> list[str]:
    """Return the keys of the sweep overrides (`key=a,b`, `key=range(...)`, ...) among these."""
    swept = []
    for item in overrides:
        key, _, value = str(item).partition("=")
        if "," in value or value.startswith(("range(", "choice(", "interval(", "glob(")):
            swept.append(key)
    return swept


class SweepSummary(Callback):
    """Write summary.csv / summary.md / summary.png in the sweep directory of a multirun.

    Every job rewrites the summary of the jobs finished so far when it ends (in its own process:
    a joblib worker, a SLURM job), so the finished jobs stay summarized when another job fails
    or the launching command dies; the last write, when the multirun ends, covers them all.
    """

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.get("mode") != RunMode.MULTIRUN:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            import yaml

            multirun = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
            swept = swept_keys(multirun["hydra"]["overrides"]["task"])
            write_summary(sweep_dir, swept)
        except Exception as err:  # a summary must never fail a finished job
            log.warning("could not update the sweep summary: %s", err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        swept = swept_keys(list(config.hydra.overrides.task))
        try:
            written = write_summary(sweep_dir, swept)
        except Exception as err:  # a summary must never fail a finished sweep
            log.warning("could not write the sweep summary: %s", err)
            return
        if written:
            print("sweep summary: " + ", ".join(str(p) for p in written), flush=True)
