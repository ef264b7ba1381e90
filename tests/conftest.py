"""Shared fixtures and helpers for the foundation tests.

Every test gets a fresh SQLite store under ``tmp_path`` and a fixed clock (``NOW``), so
``future_date`` checks do not depend on the day the suite runs. Input files are written
into ``tmp_path / "in"`` (never next to the database, which a directory ingest would read).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from pipeline.config import Settings, load_settings
from pipeline.ingest.batch import IngestReport, ingest_paths
from pipeline.scales import Registry, load_registry
from pipeline.store import Store

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SAMPLE_INPUT = SAMPLE / "input"
EXPECTED_QUARANTINE = SAMPLE / "truth" / "expected_quarantine.csv"

#: The clock of every ingest (naive UTC). The committed sample ends 2026-10-31 and plants
#: future-dated rows in January 2027.
NOW = datetime(2026, 11, 27, 12, 0, 0)

#: The administrations header used by most tests (PHQ-9 wide).
ADM_HEADER = ["episode_id", "measure", "administered_at", "session_number", "total",
              *[f"item_{i}" for i in range(1, 10)]]

THERAPISTS = "therapist_id,name,team\nT1,Ann Therapist,North\nT2,Ben Therapist,South\n"
CLIENTS = "client_id,given_name,sex\nC1,Alex,F\nC2,Sam,M\n"
EPISODES = ("episode_id,client_id,therapist_id,team,start_date,end_date,end_reason\n"
            "E1,C1,T1,North,2025-01-01,,\n"
            "E2,C2,T2,South,2025-01-06,,\n")


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry()


@pytest.fixture
def settings() -> Settings:
    return load_settings(env={})


@pytest.fixture
def now() -> datetime:
    return NOW


#: The PostgreSQL server of the run, taken out of the environment so that no other test
#: (CLI, subprocess) writes to it by accident: each gets its own schema or SQLite file.
_POSTGRES_URL = os.environ.pop("ONTRACK_DATABASE_URL", "")


def postgres_url() -> str | None:
    """The PostgreSQL server of the run (``ONTRACK_DATABASE_URL``), or None.

    CI (``.ci/run``) always sets it; a CI run without it fails rather than skipping the
    PostgreSQL half of the store tests.
    """
    url = _POSTGRES_URL
    if url.startswith("postgresql"):
        return url
    if os.environ.get("CI"):
        pytest.fail("CI must set ONTRACK_DATABASE_URL to a PostgreSQL server (see .ci/run)")
    return None


@contextmanager
def fresh_store(kind: str, directory: Path) -> Iterator[Store]:
    """An empty, initialised store: a SQLite file, or a private PostgreSQL schema that is
    dropped afterwards (one schema per test, so tests never see each other's rows)."""
    if kind == "sqlite":
        s = Store(f"sqlite:///{directory}/t.db")
        s.init()
        try:
            yield s
        finally:
            s.engine.dispose()
        return
    base = postgres_url()
    if base is None:
        pytest.skip("set ONTRACK_DATABASE_URL=postgresql+psycopg://... to run on PostgreSQL")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    s = Store(f"{base}{sep}options=-csearch_path%3D{schema}")
    try:
        s.init()
        yield s
    finally:
        s.engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Every store test runs on SQLite and on PostgreSQL."""
    with fresh_store(request.param, tmp_path) as s:
        yield s


@pytest.fixture
def indir(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    return d


@pytest.fixture
def entities(indir: Path) -> list[Path]:
    """Therapists T1, T2; clients C1, C2; episodes E1 (C1, T1) and E2 (C2, T2)."""
    return write_entities(indir)


def write_entities(directory: Path) -> list[Path]:
    paths = []
    for name, text in (("therapists.csv", THERAPISTS), ("clients.csv", CLIENTS),
                       ("episodes.csv", EPISODES)):
        p = directory / name
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows (dicts; missing keys are blank) under ``header``; header is line 1."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for row in rows:
            w.writerow(["" if row.get(c) is None else str(row.get(c)) for c in header])
    return path


def adm_row(episode: str = "E1", measure: str = "PHQ-9", when: str = "2025-02-01T10:00:00",
            items: Sequence[int | str | None] | None = (1, 1, 1, 1, 1, 1, 1, 1, 0),
            total: int | str | None = None, session: int | str | None = 1,
            **extra: Any) -> dict[str, Any]:
    """An administration record as a dict of CSV fields."""
    row: dict[str, Any] = {"episode_id": episode, "measure": measure,
                           "administered_at": when, "session_number": session,
                           "total": total}
    for i, v in enumerate(items or (), start=1):
        row[f"item_{i}"] = v
    row.update(extra)
    return row


def ingest(paths: Sequence[Path | str], store: Store, settings: Settings,
           registry: Registry, now: datetime = NOW) -> IngestReport:
    return ingest_paths(paths, store, settings, registry, now=now)


def quarantine(store: Store) -> pd.DataFrame:
    return store.read_table("quarantine")


def administrations(store: Store) -> pd.DataFrame:
    return store.read_table("administrations")


def raw_of(q_row: Mapping[str, Any]) -> Any:
    return json.loads(str(q_row["raw"]))


def reconciles(report: IngestReport) -> bool:
    d = report.as_dict()
    per_file = all(f["records"] == f["accepted"] + f["duplicates"] + f["quarantined"]
                   for f in d["files"])
    return per_file and d["records"] == d["accepted"] + d["duplicates"] + d["quarantined"]


@pytest.fixture(scope="module")
def base_db(registry: Registry) -> Iterator[Path]:
    """A SQLite store file holding the test entities (therapists T1, T2, clients C1, C2,
    episodes E1, E2), for tests that copy it per example instead of re-ingesting."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "in").mkdir()
        store = Store(f"sqlite:///{root}/base.db")
        store.init()
        ingest(write_entities(root / "in"), store, Settings(), registry)
        store.engine.dispose()  # checkpoints the WAL into the file
        yield root / "base.db"


@pytest.fixture(scope="session")
def sample_ingested(tmp_path_factory: pytest.TempPathFactory,
                    registry: Registry) -> Iterator[tuple[Store, IngestReport]]:
    """The committed sample ingested once into its own store (read-only for tests)."""
    d = tmp_path_factory.mktemp("sample_store")
    s = Store(f"sqlite:///{d}/t.db")
    s.init()
    report = ingest_paths([SAMPLE_INPUT], s, Settings(), registry, now=NOW)
    yield s, report
    s.engine.dispose()


@pytest.fixture(scope="session")
def expected_quarantine() -> pd.DataFrame:
    return pd.read_csv(EXPECTED_QUARANTINE)


@pytest.fixture(scope="session")
def dash_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One dashboard app per test session: Dash registers page callbacks globally, so a
    second app in the same process would lack them (production runs one per process)."""
    from dashboard.app import create_app
    from tests.dashboard_helpers import sample_store

    store, settings, tids = sample_store(tmp_path_factory.mktemp("dash"))
    app = create_app(settings, store)
    return {"app": app, "store": store, "settings": settings, "tids": tids}
