"""Benchmark: OnTrack end to end at a given size, through the command line, one process
per step so each step's peak memory is its own, and its wall time the whole process's.

Steps, on a fresh SQLite store (the default store):

1. ``ontrack ingest`` of the synthetic CSVs (records/s, peak RSS: streamed in chunks
   inside one batch, so the peak should not grow with the file);
2. ``ontrack compute --full``: the store's first compute (every flag raised; skipped with
   ``--reuse-store``), then ``--full-repeat`` recomputes of the computed store (median
   wall, peak RSS, and the median of each step it reports);
3. one ``ontrack run`` cycle bringing 10,000 new administrations (median of
   ``--repeat``, each on a fresh copy of the store);
4. the dashboard's caseload and service data callbacks on that store
   (:mod:`benchmarks.bench_dashboard`, median of ``--repeat``).

Sizes: ``--episodes 55000`` gives ~1M administrations, ``--episodes 560000`` ~10M.

Run: ``.venv/bin/python benchmarks/bench_scale.py [--episodes 55000] [--repeat 3]
[--full-repeat 3] [--reuse-store]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline.synth import next_week

HERE = Path(__file__).resolve().parent
# Runs the ontrack command line as its console script does (main() parsing the process's
# own argv), then reports its peak RSS: the address space's high-water mark (VmHWM),
# which starts afresh at exec. ru_maxrss does not: Linux keeps it across fork and exec,
# so a command started after this benchmark had read the 10M-row CSV (next_week)
# reported the benchmark's ~2.8 GB as its own. The wall time is the whole process's,
# from its start to its exit, measured here: interpreter, imports and exit included.
MEASURE = ("import json, resource, sys\n"
           "from pipeline.cli import main\n"
           "sys.argv = ['ontrack', *sys.argv[1:]]\n"
           "try:\n"
           "    code = main()\n"
           "finally:\n"
           "    try:\n"
           "        hwm = [int(x.split()[1]) for x in open('/proc/self/status')\n"
           "               if x.startswith('VmHWM:')][0]\n"
           "    except (OSError, IndexError):\n"
           "        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
           "    print(json.dumps({'peak_mb': hwm / 1024}), file=sys.stderr)\n"
           "sys.exit(code)\n")


def ontrack(args: list[str], db: Path, env: dict[str, str] | None = None
            ) -> tuple[dict[str, float], str]:
    e = dict(os.environ, ONTRACK_DATABASE_URL=f"sqlite:///{db}", PYTHONPATH=str(HERE.parent),
             **(env or {}))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True,
                       text=True, env=e, cwd=HERE.parent, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"ontrack {' '.join(args)} failed:\n{r.stdout}\n{r.stderr[-3000:]}")
    return {**json.loads(r.stderr.strip().splitlines()[-1]), "wall": wall}, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=55_000)
    ap.add_argument("--new", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="benchmarks/_data/scale")
    ap.add_argument("--full-repeat", type=int, default=3,
                    help="full recomputes of the computed store to time (median reported)")
    ap.add_argument("--reuse-store", action="store_true",
                    help="keep the store an earlier run ingested (skip step 1)")
    args = ap.parse_args()
    base = Path(args.dir) / str(args.episodes)
    inp = base / "sample" / "input"
    if not (inp / "administrations.csv").exists():
        t = time.perf_counter()
        ontrack(["synth", "--out", str(base / "sample"), "--episodes", str(args.episodes),
                 "--therapists", str(max(15, args.episodes // 300)), "--seed", "7"],
                base / "unused.db")
        print(f"synthetic data written in {time.perf_counter() - t:.0f} s")
    records = sum(sum(1 for _ in open(f, encoding="utf-8")) - 1 for f in inp.glob("*.csv"))
    n_adm = sum(1 for _ in open(inp / "administrations.csv", encoding="utf-8")) - 1
    db = base / "store.db"
    reused = bool(args.reuse_store and db.exists())
    if reused:
        ontrack(["init"], db)  # adds what a later version indexes or derives
        print(f"ingest: skipped, reusing {db} ({n_adm:,} administrations)")
    else:
        for f in base.glob("store.db*"):
            f.unlink()
        ontrack(["init"], db)
        m, _ = ontrack(["ingest", str(inp)], db)
        print(f"ingest: {records:,} records ({n_adm:,} administrations) in {m['wall']:.1f} s"
              f" = {records / m['wall']:,.0f} records/s; peak RSS {m['peak_mb']:,.0f} MB")

    if not reused:  # a freshly ingested store: its first compute raises every flag
        m, out = ontrack(["compute", "--full", "--json"], db)
        t = json.loads(out)["timings"]
        steps = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "total")
        print(f"first compute --full: {m['wall']:.1f} s wall ({t['total']:.1f} s in compute: "
              f"{steps}); peak RSS {m['peak_mb']:,.0f} MB")
    # Recomputing the computed store, the steady state: median of --full-repeat runs.
    walls, peaks, steps_of = [], [], []
    for _ in range(max(1, args.full_repeat)):
        os.sync()  # the previous run's pages written back, as in a store at rest
        m, out = ontrack(["compute", "--full", "--json"], db)
        walls.append(m["wall"])
        peaks.append(m["peak_mb"])
        steps_of.append(json.loads(out)["timings"])
    steps = ", ".join(f"{k} {statistics.median(t[k] for t in steps_of):.1f}"
                      for k in steps_of[0] if k != "total")
    print(f"compute --full (recompute): median {statistics.median(walls):.1f} s wall (min "
          f"{min(walls):.1f}, max {max(walls):.1f}, n={len(walls)}; step medians: {steps}); "
          f"peak RSS {min(peaks):,.0f}-{max(peaks):,.0f} MB")

    new = next_week(inp / "administrations.csv", args.new)  # one cycle's new file
    walls, peaks, ingests, computes = [], [], [], []
    for i in range(args.repeat):
        work = base / f"cycle{i}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "inbox").mkdir(parents=True)
        shutil.copy(db, work / "store.db")
        # The copy's pages are still being written back; the cycle's first checkpoint
        # fsyncs the file and would wait for all of them (~1.5 s of a 10M store's 3 GB),
        # which a store at rest never costs.
        os.sync()
        new.to_csv(work / "inbox" / "new.csv", index=False)
        m, out = ontrack(["run", "--json"], work / "store.db",
                         env={"ONTRACK_DATA_DIR": str(work),
                              "ONTRACK_INBOX": str(work / "inbox")})
        walls.append(m["wall"])
        peaks.append(m["peak_mb"])
        timings = json.loads(out)["timings"]
        ingests.append(timings["ingest"])
        computes.append(timings["compute"]["total"])
        shutil.rmtree(work, ignore_errors=True)
    print(f"cycle with {len(new):,} new administrations: median {statistics.median(walls):.1f} s "
          f"(min {min(walls):.1f}, max {max(walls):.1f}, n={args.repeat}); "
          f"peak RSS {max(peaks):,.0f} MB")
    rest = [w - a - b for w, a, b in zip(walls, ingests, computes, strict=True)]
    print(f"  of which (medians): ingest {statistics.median(ingests):.2f} s, compute "
          f"{statistics.median(computes):.2f} s, the rest (interpreter, imports, lock, "
          f"exit) {statistics.median(rest):.2f} s")

    r = subprocess.run([sys.executable, str(HERE / "bench_dashboard.py"), "--store", str(db),
                        "--repeat", str(max(args.repeat, 5))], capture_output=True, text=True,
                       cwd=HERE.parent, env=dict(os.environ, PYTHONPATH=str(HERE.parent)),
                       check=False)
    print(r.stdout.strip() if r.returncode == 0 else f"dashboard failed: {r.stderr[-2000:]}")


if __name__ == "__main__":
    main()
