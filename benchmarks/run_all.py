"""Run every benchmark script in this folder; results land in benchmarks/results/.

Usage: python benchmarks/run_all.py [--quick]

Each `bench_*.py` writes its own JSON and markdown table; this runner executes them one after
another (never in parallel: they time the same cores) and concatenates the markdown tables
into `benchmarks/results/README.md`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> int:
    extra = sys.argv[1:]
    scripts = sorted(HERE.glob("bench_*.py"))
    if not scripts:
        print("no benchmarks yet")
        return 0
    RESULTS.mkdir(exist_ok=True)
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), *extra], cwd=HERE.parent)
        print(f"   {script.name}: exit {proc.returncode} in {time.perf_counter() - started:.0f} s")
        if proc.returncode != 0:
            failed.append(script.name)
    tables = [p.read_text() for p in sorted(RESULTS.glob("*.md")) if p.name != "README.md"]
    (RESULTS / "README.md").write_text("# Benchmark results\n\n" + "\n\n".join(tables) + "\n")
    print(f"results: {RESULTS}")
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
