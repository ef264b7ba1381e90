"""Benchmark: the statistics over a Parquet dataset partitioned by episode, pandas engine
(in-process, partition after partition) vs the Dask engine on a LocalCluster of 1 and 2
worker processes, in one run.

Data: the synthetic generator's administrations (~1M rows for 55,000 episodes),
replicated ``--copies`` times under new episode ids (10 copies: ~10M rows), written as
``--partitions`` Parquet files. Each engine is timed ``--repeat`` times (a Dask run
includes starting its LocalCluster); medians and min-max are printed, with the peak RSS
of this process (which runs the pandas engine: bounded by one partition, not the data).

Run: ``.venv/bin/python benchmarks/bench_dask.py [--copies 10] [--partitions 16]``
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import load_settings
from pipeline.distributed import compute_parquet
from pipeline.parquet import SCHEMA, partition_of
from pipeline.scales import load_registry
from pipeline.synth import SynthConfig, generate


def build(base: Path, episodes: int, copies: int, partitions: int) -> int:
    data = generate(SynthConfig(episodes=episodes, therapists=200, seed=7))
    adm = data.administrations
    items = adm[[f"item_{i}" for i in range(1, 10)]].astype("Float64")
    total = pd.to_numeric(adm["total"], errors="coerce")
    score = np.where(total.notna(), total, items.sum(axis=1, skipna=True).round())
    ended = set(data.episodes.loc[data.episodes["end_date"] != "", "episode_id"])
    one = pd.DataFrame({
        "episode_id": adm["episode_id"].astype("str"), "measure": adm["measure"].astype("str"),
        "administered_at": pd.to_datetime(adm["administered_at"]).astype("datetime64[us]"),
        "session_number": adm["session_number"].astype("Int64"),
        "score": np.asarray(score, dtype=np.int64)})
    one["ended"] = one["episode_id"].isin(ended)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    writers = [pq.ParquetWriter(base / f"part-{i:05d}.parquet", SCHEMA)
               for i in range(partitions)]
    rows = 0
    for c in range(copies):  # a copy at a time: the data may not fit in memory
        frame = one.assign(episode_id=one["episode_id"] + f"-{c}")
        part = partition_of(frame["episode_id"], partitions)
        for i in range(partitions):
            writers[i].write_table(pa.Table.from_pandas(frame[part == i], schema=SCHEMA,
                                                        preserve_index=False))
        rows += len(frame)
    for w in writers:
        w.close()
    # Then each file in (episode_id, measure, administered_at) order, as
    # ``ontrack export-parquet`` writes it (one partition in memory at a time).
    for i in range(partitions):
        path = base / f"part-{i:05d}.parquet"
        table = pq.read_table(path, schema=SCHEMA)
        pq.write_table(table.sort_by([("episode_id", "ascending"), ("measure", "ascending"),
                                      ("administered_at", "ascending")]), path)
    (base / "_ontrack.json").write_text(json.dumps({"rows": rows, "order": "key"}) + "\n")
    return rows


def dataset_arguments() -> argparse.ArgumentParser:
    """The options naming the synthetic Parquet dataset (shared with bench_statistics)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=55_000)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="benchmarks/_data/dask")
    return ap


def dataset(args: argparse.Namespace) -> tuple[Path, int]:
    """The dataset's folder and row count, built first when it is missing."""
    base = Path(args.dir) / f"{args.episodes}x{args.copies}p{args.partitions}"
    meta = base / "_ontrack.json"
    if meta.exists():
        known = json.loads(meta.read_text())
        if known.get("order") == "key":  # else an older layout (ingest order): rebuilt
            return base, known["rows"]
    t = time.perf_counter()
    rows = build(base, args.episodes, args.copies, args.partitions)
    print(f"built {rows:,} rows in {time.perf_counter() - t:.0f} s")
    return base, rows


def main() -> None:
    ap = dataset_arguments()
    ap.add_argument("--engines", default="pandas,dask1,dask2",
                    help="which of pandas, dask1, dask2 to time (e.g. pandas alone at 100M)")
    args = ap.parse_args()
    base, rows = dataset(args)
    settings, registry = load_settings(env={}), load_registry()
    results = {}
    chosen = set(args.engines.split(","))
    for key, name, engine, workers in (("pandas", "pandas, in-process", "pandas", 1),
                                       ("dask1", "dask, 1 worker", "dask", 1),
                                       ("dask2", "dask, 2 workers", "dask", 2)):
        if key not in chosen:
            continue
        times = []
        for _ in range(args.repeat):
            out = base.parent / "out"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            compute_parquet(base, out, settings, registry, engine=engine, workers=workers)
            times.append(time.perf_counter() - t)
        results[name] = times
        print(f"{name:22} median {statistics.median(times):6.1f} s "
              f"(min {min(times):.1f}, max {max(times):.1f})", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"rows {rows:,}; partitions {args.partitions}; peak RSS of this process "
          f"{peak:.0f} MB")
    if {"dask, 1 worker", "dask, 2 workers"} <= results.keys():
        base_t = statistics.median(results["dask, 1 worker"])
        print(f"speed-up of 2 workers over 1: "
              f"{base_t / statistics.median(results['dask, 2 workers']):.2f}x")


if __name__ == "__main__":
    main()
