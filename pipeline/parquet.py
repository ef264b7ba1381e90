"""Scored administrations as a Parquet dataset partitioned by episode (issue #8).

``ontrack export-parquet --out DIR`` writes ``DIR/part-00000.parquet`` ... : every row of
an episode lands in the same file (partition = a stable hash of the episode id), which is
what the per-partition statistics need, whether run by the pandas engine or on a Dask
cluster. Within a file the rows are in (episode_id, measure, administered_at) order
(byte order of the text; on SQLite across the whole file, on PostgreSQL within each
block of episodes, whose order follows the database's collation), so the statistics
find the episode x measure groups without sorting (see
:func:`pipeline.stats.groups.group_administrations`). This is an *internal* dataset for
compute (identifiable ids, exact dates): keep it where the store is; the research
export is :mod:`pipeline.export`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from pipeline.columns import to_datetimes
from pipeline.errors import UsageError
from pipeline.stats.groups import in_group_order
from pipeline.store import Store, administrations, episodes, read_frame

__all__ = ["SCHEMA", "partition_of", "read_partition", "write_parquet_dataset"]

SCHEMA = pa.schema([
    ("episode_id", pa.string()), ("measure", pa.string()),
    ("administered_at", pa.timestamp("us")), ("session_number", pa.int64()),
    ("score", pa.int64()), ("ended", pa.bool_()),
])


def partition_of(episode_id: pd.Series, partitions: int) -> np.ndarray:
    """Stable partition number of each episode id (same id, same partition, any run)."""
    h = pd.util.hash_pandas_object(episode_id.astype("str"), index=False).to_numpy()
    return (h % np.uint64(partitions)).astype(np.int64)


def write_parquet_dataset(store: Store, out_dir: Path, partitions: int = 8,
                          chunk_episodes: int = 200_000) -> dict[str, Any]:
    """Write every scored administration, partitioned by episode, to ``out_dir``.

    Read from the store a block of episodes at a time, so memory stays bounded by the
    block, not the store. Returns counts (rows, episodes, partitions).
    """
    if partitions < 1:
        raise UsageError("partitions must be at least 1", value=partitions)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    writers = [pq.ParquetWriter(out_dir / f"part-{i:05d}.parquet", SCHEMA)
               for i in range(partitions)]
    rows = n_episodes = 0
    try:
        with store.snapshot() as conn:
            ep = read_frame(conn, sa.select(episodes.c.episode_id, episodes.c.end_date)
                            .order_by(episodes.c.episode_id))
            for start in range(0, len(ep), chunk_episodes):
                block = ep.iloc[start:start + chunk_episodes]
                lo, hi = block["episode_id"].iloc[0], block["episode_id"].iloc[-1]
                a = read_frame(conn, sa.select(
                    administrations.c.episode_id, administrations.c.measure,
                    administrations.c.administered_at, administrations.c.session_number,
                    administrations.c.score)
                    .where(administrations.c.episode_id.between(lo, hi)
                           & administrations.c.score.is_not(None))
                    .order_by(administrations.c.episode_id, administrations.c.measure,
                              administrations.c.administered_at), raw=True)
                if a.empty:
                    continue
                ended = set(block.loc[block["end_date"].notna(), "episode_id"])
                frame = pd.DataFrame({
                    "episode_id": a["episode_id"].astype("str"),
                    "measure": a["measure"].astype("str"),
                    "administered_at": to_datetimes(a["administered_at"])
                    .astype("datetime64[us]"),
                    "session_number": pd.to_numeric(a["session_number"]).astype("Int64"),
                    "score": pd.to_numeric(a["score"]).astype("int64"),
                })
                frame["ended"] = frame["episode_id"].isin(ended)
                if not in_group_order(frame):
                    # The database's collation, not byte order (PostgreSQL's locales).
                    frame = frame.sort_values(
                        ["episode_id", "measure", "administered_at"], kind="stable",
                        ignore_index=True)
                part = partition_of(frame["episode_id"], partitions)
                for i in np.unique(part):
                    table = pa.Table.from_pandas(frame[part == i], schema=SCHEMA,
                                                 preserve_index=False)
                    writers[int(i)].write_table(table)
                rows += len(frame)
                n_episodes += int(frame["episode_id"].nunique())
    finally:
        for w in writers:
            w.close()
    meta = {"rows": rows, "episodes": n_episodes, "partitions": partitions,
            "partitioned_by": "episode_id (pandas hash_pandas_object % partitions)"}
    (out_dir / "_ontrack.json").write_text(json.dumps(meta, indent=2) + "\n",
                                           encoding="utf-8")
    return meta


def read_partition(path: str | Path) -> pd.DataFrame:
    """One partition file as the frame the statistics take (``administered_at`` us)."""
    df = pq.read_table(path, schema=SCHEMA).to_pandas()
    df["administered_at"] = df["administered_at"].astype("datetime64[us]")
    df["session_number"] = df["session_number"].astype("Int64")
    df["episode_id"] = df["episode_id"].astype("str")
    df["measure"] = df["measure"].astype("str")
    return df
