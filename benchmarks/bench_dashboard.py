"""Benchmark: the dashboard's caseload and service-outcome data callbacks on a large store.

Builds (or reuses) a store of N synthetic episodes (default 100,000) through the real
ingest and compute, then times the data-access calls behind the caseload page (its filter
options and one 100-row block of the grid, for a director seeing every open episode and
for a therapist) and the service-outcomes page, with the cache empty and warm, reporting
the median of several calls.

Run: ``.venv/bin/python benchmarks/bench_dashboard.py [--episodes N] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dashboard.access import Viewer
from dashboard.data import DataAccess
from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.ingest.batch import ingest_paths
from pipeline.scales import load_registry
from pipeline.store import Store, episodes
from pipeline.synth import SynthConfig, write_sample


def _http_block(store: Store, settings: Settings, data: DataAccess) -> Any:
    """The whole grid callback through Flask and Dash (signed in, JSON out)."""
    from dashboard.app import create_app
    from pipeline.errors import UsageError
    from pipeline.users import add_user

    password = "bench-director-password"
    try:
        add_user(store, "bench-director", password, "director")
    except (UsageError, sa.exc.IntegrityError):
        pass  # made by an earlier run
    app = create_app(replace(settings, secret_key="bench-secret-key-" + "x" * 32), store)
    app.server.config["ONTRACK_DATA"] = data  # one cache, cleared by the timing loop
    c = app.server.test_client()
    token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").get_data(as_text=True))
    c.post("/login", data={"username": "bench-director", "password": password,
                           "csrf": token.group(1) if token else "", "next": "/"})
    request = {"startRow": 0, "endRow": 100, "sortModel": [], "filterModel": {}}
    body = {"output": "..caseload-grid.getRowsResponse...caseload-count.children..",
            "outputs": [{"id": "caseload-grid", "property": "getRowsResponse"},
                        {"id": "caseload-count", "property": "children"}],
            "inputs": [{"id": "caseload-grid", "property": "getRowsRequest",
                        "value": request}],
            "changedPropIds": ["caseload-grid.getRowsRequest"], "state": []}

    def call() -> None:
        r = c.post("/_dash-update-component", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"callback failed: {r.status_code}")
    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default="benchmarks/_data/dashboard")
    ap.add_argument("--store", help="time an existing, computed SQLite store instead")
    args = ap.parse_args()
    d = Path(args.dir) / str(args.episodes)
    db = Path(args.store) if args.store else d / "store.db"
    settings = Settings(database_url=f"sqlite:///{db}")
    reg = load_registry()
    store = Store(settings.resolved_database_url)
    if not db.exists():
        t = time.perf_counter()
        write_sample(d, SynthConfig(episodes=args.episodes, therapists=max(15, args.episodes
                                                                           // 300)))
        store.init()
        ingest_paths([d / "input"], store, settings, reg)
        compute(store, settings, reg, full=True)
        print(f"built the store in {time.perf_counter() - t:.0f} s")
    store.init()
    data = DataAccess(store, settings, reg)
    with store.engine.connect() as conn:
        tid = conn.execute(sa.select(episodes.c.therapist_id).limit(1)).scalar_one()
        n_open = conn.execute(sa.select(sa.func.count()).select_from(episodes).where(
            episodes.c.end_date.is_(None))).scalar_one()
        n_all = conn.execute(sa.select(sa.func.count()).select_from(episodes)).scalar_one()
    director, therapist = Viewer("d", "director"), Viewer("t", "therapist", tid)
    # What the caseload page asks for: its filter options, then the grid's first block
    # of 100 rows (AG Grid's infinite row model: sorted and filtered in the database).
    cases = {
        "caseload options (director)": lambda: data.options(director),
        "caseload first block (director, all open)": lambda: data.caseload_page(
            director, 0, 100),
        "caseload block, sorted by PHQ-9 (director)": lambda: data.caseload_page(
            director, 0, 100, [{"colId": "dep_latest", "sort": "desc"}]),
        "caseload block, client name filter": lambda: data.caseload_page(
            director, 0, 100, None,
            {"client_link": {"filterType": "text", "type": "contains", "filter": "an"}}),
        "caseload first block (therapist)": lambda: data.caseload_page(therapist, 0, 100),
        "service outcomes": lambda: data.service(director),
    }
    print(f"store: {n_all:,} episodes, {n_open:,} open")
    cases["HTTP: caseload block callback (director)"] = _http_block(store, settings, data)
    for name, fn in cases.items():
        for label, clear in (("cold (cache empty)", True), ("warm (cached)", False)):
            times = []
            for _ in range(args.repeat):
                if clear:
                    data._cache.clear()
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            print(f"{name:44} {label:19} median {1000 * statistics.median(times):7.0f} ms "
                  f"(min {1000 * min(times):.0f}, max {1000 * max(times):.0f}, "
                  f"n={args.repeat})")


if __name__ == "__main__":
    main()
