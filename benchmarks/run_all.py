"""Run every benchmark in one go and write ``benchmarks/RESULTS.md``.

Each script runs in its own process (so peak memory is its own) with the arguments
below; its output is copied into RESULTS.md under the machine, library versions and
date. Sizes are parameters: ``--quick`` runs small sizes to check that everything works.

Run: ``.venv/bin/python benchmarks/run_all.py [--quick] [--scale]``
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
FULL = [
    ("bench_compute.py", ["--episodes", "55000", "--repeat", "3"],
     "outcome statistics on ~1M administrations vs a naive per-episode groupby.apply"),
    ("bench_dask.py", ["--copies", "10", "--partitions", "16", "--repeat", "3"],
     "statistics over ~10M administrations in Parquet: pandas engine vs Dask, 1 and 2 "
     "local workers"),
    ("bench_statistics.py", ["--copies", "10", "--partitions", "16", "--repeat", "3"],
     "the statistics step alone (groups, reference, outcomes) on ~10M administrations "
     "in memory"),
    ("bench_dashboard.py", [], "dashboard callbacks on 100k episodes"),
    ("bench_cycle.py", ["--repeat", "3"],
     "one `ontrack run` with 10k new administrations on a ~1M store"),
    ("bench_scale.py", ["--episodes", "55000", "--repeat", "3"],
     "end to end through the command line at ~1M administrations"),
]
#: ``--scale``: the 10M tier (about 30 minutes more).
SCALE = [
    ("bench_scale.py", ["--episodes", "560000", "--repeat", "3"],
     "end to end through the command line at ~10M administrations"),
    ("bench_dask.py", ["--copies", "100", "--partitions", "160", "--engines", "pandas",
                       "--repeat", "1"],
     "statistics over ~100M administrations in Parquet, pandas engine, one process"),
]
QUICK = [
    ("bench_compute.py", ["--episodes", "3000", "--repeat", "1"], FULL[0][2]),
    ("bench_dask.py", ["--episodes", "3000", "--copies", "2", "--partitions", "4",
                       "--repeat", "1", "--dir", "benchmarks/_data/dask-quick"], FULL[1][2]),
]


def versions() -> str:
    names = ["pandas", "numpy", "scipy", "pyarrow", "sqlalchemy", "dask", "distributed",
             "dash"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            out.append(f"{n} (not installed)")
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scale", action="store_true", help="add the 10M-administration tier")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    runs = QUICK if args.quick else FULL + (SCALE if args.scale else [])
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    lines = [
        "# Benchmark results",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        + (" (quick sizes)" if args.quick else ""),
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
        f"{platform.platform()}",
        f"- Python {platform.python_version()}; {versions()}",
        "- Regenerate: `.venv/bin/python benchmarks/run_all.py"
        + (" --scale" if args.scale else "") + "` (`--scale` adds the 10M tier)",
        "",
    ]
    for script, script_args, what in runs:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, str(HERE / script), *script_args],
                           capture_output=True, text=True, check=False,
                           cwd=HERE.parent, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
        took = time.perf_counter() - t
        lines += [f"## {script}: {what}", "",
                  f"`{script} {' '.join(script_args)}`: exit {r.returncode}, "
                  f"{took:.0f} s in all", "", "```", r.stdout.strip(), "```", ""]
        if r.returncode != 0:
            lines += ["stderr:", "", "```", r.stderr.strip()[-3000:], "```", ""]
        print(f"{script}: exit {r.returncode} in {took:.0f} s", flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
