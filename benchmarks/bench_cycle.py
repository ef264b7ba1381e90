"""Benchmark: one `ontrack run` cycle bringing N new administrations into a large store.

Builds (or reuses) a store of ~1M administrations, then drops a file of 10,000 new
administrations (a further week of sessions for existing episodes) into an inbox and
times `run_cycle` (ingest + incremental compute + flags), median of several cycles, each
on a fresh copy of the store.

Run: ``.venv/bin/python benchmarks/bench_cycle.py [--episodes 55000] [--new 10000]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.ingest.batch import ingest_paths
from pipeline.jobs import run_cycle
from pipeline.scales import load_registry
from pipeline.store import Store
from pipeline.synth import SynthConfig, next_week, write_sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=55_000)
    ap.add_argument("--new", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="benchmarks/_data/cycle")
    args = ap.parse_args()
    base = Path(args.dir) / str(args.episodes)
    reg = load_registry()
    db = base / "store.db"
    if not db.exists():
        t = time.perf_counter()
        write_sample(base / "sample", SynthConfig(episodes=args.episodes,
                                                  therapists=max(15, args.episodes // 300)))
        s = Settings(database_url=f"sqlite:///{db}")
        store = Store(s.resolved_database_url)
        store.init()
        ingest_paths([base / "sample" / "input"], store, s, reg)
        compute(store, s, reg, full=True)
        store.engine.dispose()
        print(f"built the base store in {time.perf_counter() - t:.0f} s")
    # A store from an earlier version gets its new indexes and tables, and one run
    # records the clock and settings the next incremental run compares against (as a
    # deployed store's first cycle after an upgrade would).
    s = Settings(database_url=f"sqlite:///{db}")
    store = Store(s.resolved_database_url)
    store.init()
    compute(store, s, reg)
    store.engine.dispose()
    csv = base / "sample" / "input" / "administrations.csv"
    n_base = sum(1 for _ in open(csv, encoding="utf-8")) - 1
    new = next_week(csv, args.new)
    times, breakdown = [], []
    for i in range(args.repeat):
        work = base / f"run{i}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "inbox").mkdir(parents=True)
        shutil.copy(db, work / "store.db")
        # The copy's pages are still being written back; the cycle's first checkpoint
        # fsyncs the file and would wait for all of them (~1.5 s of a 10M store's 3 GB),
        # which a store at rest never costs.
        os.sync()
        new.to_csv(work / "inbox" / "new.csv", index=False)
        s = Settings(database_url=f"sqlite:///{work}/store.db", data_dir=work,
                     inbox=work / "inbox")
        t = time.perf_counter()
        res = run_cycle(s, reg)
        times.append(time.perf_counter() - t)
        breakdown.append(res.accepted)
        shutil.rmtree(work, ignore_errors=True)
    print(f"base store: {n_base:,} administrations ({args.episodes:,} episodes); "
          f"new file: {len(new):,} administrations, {breakdown[0]:,} accepted")
    print(f"cycle (ingest + incremental compute + flags): median {statistics.median(times):.1f} s"
          f" (min {min(times):.1f}, max {max(times):.1f}, n={args.repeat})")


if __name__ == "__main__":
    main()
