"""Benchmark: the statistics step alone, on ~10M administrations held in memory.

The step ``compute`` runs between reading the store and writing the results: ordering
the administrations into episode x measure groups, the whole-store reference (baseline
SDs, expected recovery curves) and every episode x measure outcome with its sudden
gains and losses (``pipeline.stats``). Input: ``bench_dask.py``'s Parquet dataset
(built if missing), read once into one frame, so no read or write is timed. The frame
is timed in two row orders (each put in place before the clock starts): ``ingest``,
rows in time order as the store's full compute reads them (the statistics sort them
into groups), and ``key``, rows in (episode_id, measure, administered_at) order as
``ontrack export-parquet`` writes each file (the groups are found without a sort). Each
repeat runs the three parts in one process, as ``compute`` does (the outcomes over runs
of groups in ``--threads`` threads: 1, and one per CPU, by default);
medians and min-max are printed with the ratios to the issue's target (2 s) and to its
physical floor for the simpler statistics (0.21 s: reading the columns and one grouped
pass), and the peak RSS.

Run: ``.venv/bin/python benchmarks/bench_statistics.py [--copies 10] [--repeat 3]
[--threads 1,0] [--orders ingest,key]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import pandas as pd

from benchmarks.bench_dask import dataset, dataset_arguments
from pipeline.compute import build_reference
from pipeline.config import load_settings
from pipeline.parquet import read_partition
from pipeline.scales import Registry, load_registry
from pipeline.stats.groups import group_administrations, in_group_order
from pipeline.stats.outcomes import episode_outcomes_in_parts

FLOOR_S, TARGET_S = 0.21, 2.0


def main() -> None:
    ap = dataset_arguments()
    ap.add_argument("--threads", default="1,0",
                    help="thread counts to time, comma-separated (0: one per CPU, as "
                         "compute does by default)")
    ap.add_argument("--orders", default="ingest,key",
                    help="row orders to time: ingest (time order), key (group order)")
    args = ap.parse_args()
    base, rows = dataset(args)
    whole = pd.concat([read_partition(p) for p in sorted(base.glob("part-*.parquet"))],
                      ignore_index=True)
    # Finished episodes' ids, one each, as compute reads them from the episodes table.
    ended = pd.Series(whole.loc[whole["ended"], "episode_id"].unique())
    whole = whole.drop(columns="ended")
    registry = load_registry()
    for order in args.orders.split(","):
        keys = {"ingest": ["administered_at"],
                "key": ["episode_id", "measure", "administered_at"]}[order]
        a = whole.sort_values(keys, kind="stable", ignore_index=True)
        print(f"rows in {order} order (in group order already: {in_group_order(a)})")
        _time(a, ended, registry, rows, args)
        del a


def _time(a: pd.DataFrame, ended: pd.Series, registry: Registry, rows: int,
          args: argparse.Namespace) -> None:
    for threads_arg in (int(t) for t in args.threads.split(",")):
        settings = load_settings(env={"ONTRACK_COMPUTE_THREADS": str(threads_arg)})
        threads = settings.threads()
        parts: dict[str, list[float]] = {"group": [], "reference": [], "outcomes": [],
                                         "total": []}
        n_groups = 0
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            g = group_administrations(a)
            t1 = time.perf_counter()
            reference, _ = build_reference(a, ended, registry, settings, grouped=g)
            t2 = time.perf_counter()
            out, _ = episode_outcomes_in_parts(a, registry, settings, reference, g, threads)
            t3 = time.perf_counter()
            n_groups = len(out)
            for key, value in (("group", t1 - t0), ("reference", t2 - t1),
                               ("outcomes", t3 - t2), ("total", t3 - t0)):
                parts[key].append(value)
            del g, out
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"threads {threads}: rows {rows:,} ({len(a):,} in memory), "
              f"episode x measure groups {n_groups:,}")
        for key, times in parts.items():
            print(f"{key:10} median {statistics.median(times):6.2f} s "
                  f"(min {min(times):.2f}, max {max(times):.2f}, n={len(times)})")
        total = statistics.median(parts["total"])
        print(f"statistics step: {total:.2f} s = {total / TARGET_S:.1f}x the 2 s target, "
              f"{total / FLOOR_S:.0f}x the 0.21 s floor; peak RSS so far {peak:,.0f} MB "
              "(the frame included)")


if __name__ == "__main__":
    main()
