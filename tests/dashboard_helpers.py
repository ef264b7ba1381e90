"""A store with the committed sample, computed, with one demo user per role."""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.ingest.batch import ingest_paths
from pipeline.scales import load_registry
from pipeline.store import Store, episodes
from pipeline.users import add_user

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "input"
NOW = datetime(2026, 11, 27, 12, 0)
PASSWORDS = {"therapist": "therapist-pass-123", "other": "other-pass-1234",
             "director": "director-pass-123", "researcher": "researcher-pass-1"}


def computed_sample(directory: Path) -> tuple[Store, Settings]:
    """The committed sample ingested and computed into a fresh SQLite store."""
    settings = Settings(database_url=f"sqlite:///{directory}/dash.db",
                        secret_key="test-secret-key-not-for-production")
    store = Store(settings.resolved_database_url)
    store.init()
    reg = load_registry()
    ingest_paths([SAMPLE], store, settings, reg, now=NOW)
    compute(store, settings, reg, now=NOW)
    return store, settings


def sample_store(directory: Path) -> tuple[Store, Settings, dict[str, str]]:
    """Ingest and compute the sample; users therapist/other (two therapists), director,
    researcher. Returns the store, settings and {username: therapist_id}."""
    store, settings = computed_sample(directory)
    with store.engine.connect() as conn:
        busiest = conn.execute(sa.select(episodes.c.therapist_id).where(
            episodes.c.end_date.is_(None)).group_by(episodes.c.therapist_id)
            .order_by(sa.func.count().desc(), episodes.c.therapist_id).limit(2)).scalars().all()
    add_user(store, "therapist", PASSWORDS["therapist"], "therapist", busiest[0])
    add_user(store, "other", PASSWORDS["other"], "therapist", busiest[1])
    add_user(store, "director", PASSWORDS["director"], "director")
    add_user(store, "researcher", PASSWORDS["researcher"], "researcher")
    return store, settings, {"therapist": busiest[0], "other": busiest[1]}


def episode_of(store: Store, therapist_id: str, open_only: bool = True) -> str:
    """An episode id of that therapist (open, with a risk flag if there is one)."""
    with store.engine.connect() as conn:
        q = sa.select(episodes.c.episode_id).where(episodes.c.therapist_id == therapist_id)
        if open_only:
            q = q.where(episodes.c.end_date.is_(None))
        return str(conn.execute(q.order_by(episodes.c.episode_id).limit(1)).scalar_one())


def assert_anonymous(directory: Path) -> None:
    """No identifier value of the sample's clients.csv/episodes.csv in any exported file."""
    clients = pd.read_csv(SAMPLE / "clients.csv", dtype=str)
    episodes_in = pd.read_csv(SAMPLE / "episodes.csv", dtype=str)
    text = "\n".join(p.read_text(encoding="utf-8") for p in directory.iterdir()
                     if p.suffix in (".csv", ".json"))
    cells: set[str] = set()
    for path in directory.glob("*.csv"):
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.reader(fh):
                cells.update(row)
    # Long identifiers must not appear even as substrings.
    for col in ("birth_date", "record_number", "postcode", "client_id"):
        for value in clients[col].dropna():
            assert value not in text, (col, value)
    for value in episodes_in["episode_id"]:
        assert value not in text
    # Names: no cell equals a name (short names occur inside ordinary words).
    names = set(clients["given_name"].dropna()) | set(clients["family_name"].dropna())
    assert not names & cells
    full = set((clients["given_name"] + " " + clients["family_name"]).dropna())
    assert not any(n in text for n in full)
    # No calendar date finer than a year anywhere.
    assert not any(len(c) >= 10 and c[4] == "-" and c[7] == "-" and c[:4].isdigit()
                   for c in cells)
