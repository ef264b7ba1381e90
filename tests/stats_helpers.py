"""Shared helpers for the statistics tests (test_change ... test_compute).

Kept apart from ``conftest.py`` (owned by the foundation tests): small builders of input
CSVs, a store ingest with a fixed clock, and a reader of the outcomes table.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Settings
from pipeline.ingest.batch import IngestReport, ingest_paths
from pipeline.scales import Registry
from pipeline.store import Store

#: Clock of every ingest (naive UTC); all test data lie before it.
NOW = datetime(2026, 11, 27)
#: Day 0 of the constructed episodes (a Monday).
DAY0 = date(2026, 1, 5)

ADMIN_HEADER = ["episode_id", "measure", "administered_at", "session_number", "total"]
EPISODE_HEADER = ["episode_id", "client_id", "therapist_id", "team", "start_date",
                  "end_date", "end_reason"]


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Rows (dicts; missing keys blank) under ``header``."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for row in rows:
            w.writerow(["" if row.get(c) is None else str(row[c]) for c in header])
    return path


def series(episode: str, measure: str, days: Sequence[int], scores: Sequence[int],
           first_session: int = 1,
           sessions: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Administrations of one episode x measure at ``DAY0 + day`` (10:00).

    Session numbers are ``first_session, first_session + 1, ...`` unless ``sessions``
    gives them (e.g. with a gap).
    """
    assert len(days) == len(scores)
    if sessions is None:
        sessions = [first_session + i for i in range(len(days))]
    return [{"episode_id": episode, "measure": measure,
             "administered_at": f"{(DAY0 + timedelta(days=int(d))).isoformat()}T10:00:00",
             "session_number": sn, "total": int(s)}
            for d, s, sn in zip(days, scores, sessions, strict=True)]


def episode(episode_id: str, team: str = "North", ended: bool = True) -> dict[str, Any]:
    """An episode starting on ``DAY0``; ended 2026-06-30 (completed) unless open."""
    therapist = "T1" if team == "North" else "T2"
    return {"episode_id": episode_id, "client_id": f"C{episode_id}", "therapist_id": therapist,
            "team": team, "start_date": DAY0.isoformat(),
            "end_date": "2026-06-30" if ended else None,
            "end_reason": "completed" if ended else None}


def entity_files(directory: Path, episodes: Sequence[Mapping[str, Any]],
                 name: str = "episodes.csv") -> list[Path]:
    """therapists.csv (T1 North, T2 South), clients.csv and the episodes file."""
    directory.mkdir(parents=True, exist_ok=True)
    th = write_csv(directory / "therapists.csv", ["therapist_id", "name", "team"],
                   [{"therapist_id": "T1", "name": "Ann", "team": "North"},
                    {"therapist_id": "T2", "name": "Ben", "team": "South"}])
    cl = write_csv(directory / f"clients_{name}", ["client_id", "sex"],
                   [{"client_id": e["client_id"], "sex": "F"} for e in episodes])
    ep = write_csv(directory / name, EPISODE_HEADER, episodes)
    return [th, cl, ep]


def ingest(paths: Sequence[Path], store: Store, settings: Settings,
           registry: Registry) -> IngestReport:
    """Ingest and insist that every record was accepted (no silent quarantine)."""
    report = ingest_paths(paths, store, settings, registry, now=NOW)
    d = report.as_dict()
    assert d["quarantined"] == 0, d
    return report


def outcomes_table(store: Store) -> pd.DataFrame:
    """The outcomes table indexed by (episode_id, measure), sorted."""
    return store.read_table("outcomes").set_index(["episode_id", "measure"]).sort_index()
