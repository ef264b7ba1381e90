"""Statistics over a Parquet dataset partitioned by episode, on pandas or on Dask.

Both engines run the *same* per-partition functions
(:func:`pipeline.stats.reference.partials` and
:func:`pipeline.stats.outcomes.episode_outcomes`):

1. a reduction: each partition's mergeable aggregates (baseline sums, score histograms)
   are summed into the whole-store reference (SDs, expected recovery curves); only
   these small aggregates travel, never the administrations;
2. a map: each partition's outcomes and sudden gains/losses, computed against that
   reference where the partition lives and written next to it as Parquet.

With Dask, a ``dask.distributed`` client runs the tasks: on ``scheduler`` (an address
such as ``tcp://10.0.0.5:8786``) or on a ``LocalCluster`` of ``workers`` processes. Each
worker needs OnTrack installed and the dataset's path readable (a shared file system or
object store); what is shipped to workers is the file path, the registry and settings
(small dataclasses) and the reference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Settings
from pipeline.errors import UsageError
from pipeline.parquet import read_partition
from pipeline.scales import Registry
from pipeline.stats.outcomes import Reference, episode_outcomes
from pipeline.stats.reference import (
    Partials,
    merge_partials,
    partials,
    reference_from_partials,
)

__all__ = ["compute_parquet"]


def _partials_of(path: str, registry: Registry) -> Partials:
    a = read_partition(path)
    return partials(a.drop(columns="ended"), a.loc[a["ended"], "episode_id"], registry)


def _outcomes_of(path: str, out_dir: str, registry: Registry, settings: Settings,
                 reference: Reference) -> tuple[int, int]:
    a = read_partition(path).drop(columns="ended")
    out, sudden = episode_outcomes(a, registry, settings, reference)
    name = Path(path).name
    for sub, frame in (("outcomes", out), ("sudden_changes", sudden)):
        target = Path(out_dir) / sub
        target.mkdir(parents=True, exist_ok=True)
        frame.reset_index(drop=True).to_parquet(target / name, index=False)
    return len(out), len(sudden)


def compute_parquet(dataset: Path, out_dir: Path, settings: Settings, registry: Registry,
                    *, engine: str = "pandas", scheduler: str | None = None,
                    workers: int = 2) -> dict[str, Any]:
    """Reference, outcomes and sudden gains of every episode in a partitioned dataset.

    Writes ``out_dir/outcomes/part-*.parquet``, ``out_dir/sudden_changes/part-*.parquet``,
    ``out_dir/reference_norms.csv`` and ``out_dir/expected_curves.csv``; returns counts
    and timings.
    """
    files = sorted(str(p) for p in Path(dataset).glob("part-*.parquet"))
    if not files:
        raise UsageError("no part-*.parquet files in the dataset folder", path=str(dataset),
                         fix="write one with `ontrack export-parquet --out DIR`")
    out_dir.mkdir(parents=True, exist_ok=True)
    # A previous run's partitions would otherwise be read back with this run's.
    for sub in ("outcomes", "sudden_changes"):
        for old in (out_dir / sub).glob("part-*.parquet"):
            old.unlink()
    t0 = time.perf_counter()
    if engine == "pandas":
        merged = merge_partials([_partials_of(f, registry) for f in files])
        reference, norms = reference_from_partials(merged, registry, settings)
        t1 = time.perf_counter()
        counts = [_outcomes_of(f, str(out_dir), registry, settings, reference)
                  for f in files]
    elif engine == "dask":
        from dask import delayed
        from distributed import Client, LocalCluster

        cluster = None if scheduler else LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True,
            dashboard_address=None)
        try:
            with Client(scheduler or cluster) as client:
                parts = [delayed(_partials_of)(f, registry) for f in files]
                merged = client.compute(delayed(merge_partials)(parts)).result()
                reference, norms = reference_from_partials(merged, registry, settings)
                t1 = time.perf_counter()
                ref = client.scatter(reference, broadcast=True)
                futures = [client.submit(_outcomes_of, f, str(out_dir), registry, settings,
                                         ref, pure=False) for f in files]
                counts = client.gather(futures)
        finally:
            if cluster is not None:
                cluster.close()
    else:
        raise UsageError("engine must be pandas or dask", value=engine)
    norms.to_csv(out_dir / "reference_norms.csv", index=False, lineterminator="\n")
    reference.curves.to_csv(out_dir / "expected_curves.csv", index=False,
                            lineterminator="\n")
    result = {"engine": engine, "partitions": len(files),
              "outcome_rows": int(sum(c[0] for c in counts)),
              "sudden_rows": int(sum(c[1] for c in counts)),
              "timings": {"reference": round(t1 - t0, 3),
                          "outcomes": round(time.perf_counter() - t1, 3)}}
    (out_dir / "_compute.json").write_text(json.dumps(result, indent=2) + "\n",
                                           encoding="utf-8")
    return result


def read_results(out_dir: Path, name: str = "outcomes") -> pd.DataFrame:
    """All partitions of a result table written by :func:`compute_parquet`."""
    files = sorted((out_dir / name).glob("part-*.parquet"))
    frames = [pd.read_parquet(f) for f in files]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
