"""Run every benchmark script in this folder; results land in benchmarks/results/.

Usage: python benchmarks/run_all.py [--quick]

Each `bench_*.py` writes its own JSON and markdown table; this runner executes them one after
another (never in parallel: they time the same cores), passing its arguments on, and
concatenates the markdown tables into `benchmarks/results/README.md`. A failing script does not
stop the others, but is named at the top of the README (its table may be stale) and makes the
runner exit with status 1.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> int:
    """Run the benchmarks and write results/README.md; return the exit status."""
    extra = sys.argv[1:]
    scripts = sorted(HERE.glob("bench_*.py"))
    if not scripts:
        print("no benchmarks yet")
        return 0
    RESULTS.mkdir(exist_ok=True)
    failed = []
    started_all = time.perf_counter()
    for script in scripts:
        print(f"== {script.name} {' '.join(extra)}".rstrip(), flush=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), *extra], cwd=HERE.parent)
        print(
            f"   {script.name}: exit {proc.returncode} in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        if proc.returncode != 0:
            failed.append(f"{script.name} (exit {proc.returncode})")
    total = time.perf_counter() - started_all
    command = " ".join(["benchmarks/run_all.py", *extra])
    finished = datetime.datetime.now().isoformat(timespec="seconds")
    header = [
        "# Benchmark results",
        "",
        f"`{command}` finished {finished} in {total / 60:.1f} min. Each section below states"
        " its own run conditions.",
    ]
    if failed:
        header += ["", "**Failed: " + ", ".join(failed) + "; their tables below may be stale.**"]
    tables = [p.read_text() for p in sorted(RESULTS.glob("*.md")) if p.name != "README.md"]
    (RESULTS / "README.md").write_text("\n".join(header) + "\n\n" + "\n\n".join(tables) + "\n")
    print(f"results: {RESULTS} (total {total / 60:.1f} min)")
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
