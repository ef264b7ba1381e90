"""An incremental compute re-evaluates only the open episodes whose results can change.

Reference: the same sequence of cycles with every open episode re-evaluated each time
(what incremental runs did before), on a second store. After every step the derived
tables must be identical: flags (all but the bookkeeping timestamps ``last_seen`` and
``acknowledged_at``, and the ids), goal status, the caseload summary, the per-episode
service indicators and the service cells.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

import pipeline.compute as compute_module
import pipeline.store as store_module
from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.ingest.batch import ingest_paths
from pipeline.reviews import record_review
from pipeline.scales import Registry, load_registry
from pipeline.store import SERVICE_COUNTS, Store, episodes
from pipeline.synth import next_week
from tests.conftest import fresh_store
from tests.dashboard_helpers import NOW, SAMPLE

TABLES = {"flags": ["flag_id", "last_seen", "acknowledged_at", "review_id"],
          "goal_status": ["run_id"], "caseload": ["run_id"], "episode_service": ["run_id"],
          "service_cells": ["cell_id"]}


def _cells_are_the_episodes_sums(store: Store) -> None:
    """The service cells, updated by difference on incremental runs, equal a fresh sum
    of the per-episode rows (team x therapist x month x finished, counted by pandas)."""
    es = store.read_table("episode_service")
    es["is_finished"] = es["finished"]
    key = ["team", "therapist_id", "end_month", "is_finished"]
    want = es.groupby(key, dropna=False).agg(
        episodes=("episode_id", "size"), **{c: (c, "sum") for c in SERVICE_COUNTS}
    ).reset_index()
    got = store.read_table("service_cells").drop(columns="cell_id")
    cols = ["team", "therapist_id", "end_month", "episodes", *SERVICE_COUNTS]
    want, got = (f[cols].astype(str).sort_values(cols).reset_index(drop=True)
                 for f in (want, got))
    assert len(got) > 5
    pd.testing.assert_frame_equal(got, want, obj="service cells against a fresh sum")


def _snapshot(store: Store) -> dict[str, pd.DataFrame]:
    out = {}
    for table, drop in TABLES.items():
        df = store.read_table(table).drop(columns=drop)
        out[table] = df.sort_values(list(df.columns)[:4]).reset_index(drop=True) \
            .astype(str)
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    with fresh_store(request.param, tmp_path / "a") as a, \
            fresh_store(request.param, tmp_path / "b") as b:
        yield a, b


def test_narrow_scope_gives_what_re_evaluating_every_open_episode_gives(
        pair: tuple[Store, Store], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    narrow, wide = pair
    settings, reg = Settings(), load_registry()
    new = tmp_path / "new"
    new.mkdir()
    next_week(SAMPLE / "administrations.csv", 40).to_csv(new / "administrations.csv",
                                                          index=False)
    real_moved_on = compute_module._moved_on

    def every_open(conn: Any, *args: Any) -> set[str]:
        return {r[0] for r in conn.execute(sa.select(episodes.c.episode_id).where(
            episodes.c.end_date.is_(None)))}

    def run(store: Store, clock: Any, widen: bool) -> Any:
        monkeypatch.setattr(compute_module, "_moved_on", every_open if widen
                            else real_moved_on)
        return compute(store, settings, reg, now=clock)

    for store in pair:
        ingest_paths([SAMPLE], store, settings, reg, now=NOW)
        compute(store, settings, reg, full=True, now=NOW)
    with narrow.engine.connect() as conn:
        open_ids = sorted(r[0] for r in conn.execute(sa.select(episodes.c.episode_id)
                                                     .where(episodes.c.end_date.is_(None))))
    steps: list[tuple[str, int]] = [("nothing new, a day later", 1), ("a review", 3),
                                    ("new administrations", 8), ("weeks later", 40),
                                    ("months later", 200), ("the clock goes back", 100),
                                    ("same clock again", 100)]
    scopes = []
    for what, days in steps:
        clock = NOW + timedelta(days=days)
        if what == "a review":
            for store in pair:
                record_review(store, open_ids[0], reviewer="t", decision="continue",
                              next_review=date(2027, 1, 4), now=clock)
        if what == "new administrations":
            for store in pair:
                ingest_paths([new], store, settings, reg, now=clock)
        reports = [run(narrow, clock, False), run(wide, clock, True)]
        assert reports[0].mode == reports[1].mode == "incremental"
        scopes.append((what, reports[0].rule_scope, reports[1].rule_scope))
        a, b = _snapshot(narrow), _snapshot(wide)
        for table in TABLES:
            pd.testing.assert_frame_equal(a[table], b[table], obj=f"{table} after {what}")
        _cells_are_the_episodes_sums(narrow)
    # Within one day: the review and goal windows are empty, and missing_measures
    # moves exactly with the clock. Take an open episode's missing-measures threshold
    # T (its latest score + N weeks) and step from T - 30 min to T + 30 min (one day).
    with narrow.engine.connect() as conn:
        last = pd.read_sql(
            "SELECT o.episode_id, MAX(o.last_at) AS last_at FROM outcomes o JOIN episodes e "
            "ON e.episode_id = o.episode_id WHERE e.end_date IS NULL GROUP BY o.episode_id",
            conn)
    threshold = pd.to_datetime(last["last_at"]) + pd.Timedelta(
        weeks=settings.missing_measures_weeks)
    hours = threshold.dt.hour + threshold.dt.minute / 60
    inside = threshold[(hours > 1) & (hours < 23)]
    crossing = inside.max()
    crossers = int((inside == crossing).sum())
    for what, clock in (("just before a threshold", crossing - timedelta(minutes=30)),
                        ("just after it, the same day", crossing + timedelta(minutes=30)),
                        ("later the same day", crossing + timedelta(minutes=31))):
        reports = [run(narrow, clock.to_pydatetime(), False),
                   run(wide, clock.to_pydatetime(), True)]
        scopes.append((what, reports[0].rule_scope, reports[1].rule_scope))
        a, b = _snapshot(narrow), _snapshot(wide)
        for table in TABLES:
            pd.testing.assert_frame_equal(a[table], b[table], obj=f"{table} after {what}")
    # The narrow scope is the point: nothing to redo when the clock has not moved, a
    # part of the open episodes when it moved by a day (the sample's dates cluster
    # around its end, so that part is large here: 21 of 52).
    by = {what: (n, w) for what, n, w in scopes}
    assert by["same clock again"][0] == 0, scopes
    assert by["nothing new, a day later"][0] < by["nothing new, a day later"][1], scopes
    assert by["a review"][0] >= 1, scopes
    # The same day: only the episodes whose threshold the clock passed.
    assert by["just after it, the same day"][0] >= crossers >= 1, scopes
    assert by["later the same day"][0] == 0, scopes
    flags = narrow.read_table("flags")
    missing = flags[(flags["kind"] == "missing_measures") & (flags["state"] == "open")]
    assert set(last.loc[threshold == crossing, "episode_id"]) <= set(missing["episode_id"])


def test_a_changed_setting_or_scale_makes_the_next_run_a_full_one(store: Store) -> None:
    """A setting or a scale definition can change any episode's statistics and flags,
    not only the touched ones': the next run recomputes everything (and the one after
    it is incremental again). Where the store or the inbox is changes no result."""
    reg = load_registry()
    ingest_paths([SAMPLE], store, Settings(), reg, now=NOW)
    compute(store, Settings(), reg, full=True, now=NOW)
    rep = compute(store, Settings(), reg, now=NOW)
    assert (rep.mode, rep.rule_scope) == ("incremental", 0)
    moved = Settings(data_dir=Path("elsewhere"), inbox=Path("elsewhere/in"),
                     database_url="sqlite:///elsewhere.db", chunk_rows=10)
    rep = compute(store, moved, reg, now=NOW)
    assert (rep.mode, rep.rule_scope) == ("incremental", 0)
    # GAD-7 caseness at 10 instead of 8 moves closed, untouched episodes' caseness and
    # recovery: the run must give what a full compute gives.
    changed = Settings(gad7_caseness=10)
    tables = ("outcomes", "episode_service", "goal_status", "caseload")

    def snap() -> dict[str, pd.DataFrame]:
        out = {}
        for t in tables:
            df = store.read_table(t).drop(columns="run_id")
            out[t] = df.sort_values(list(df.columns[:3])).reset_index(drop=True)
        return out

    before = snap()
    for settings, registry in ((changed, reg), (changed, _edited(reg))):
        rep = compute(store, settings, registry, now=NOW)
        assert (rep.mode, rep.rule_scope) == ("full", None)
        got = snap()
        compute(store, settings, registry, full=True, keep_reference=True, now=NOW)
        for t, want in snap().items():
            pd.testing.assert_frame_equal(got[t], want, obj=t)
        rep = compute(store, settings, registry, now=NOW)
        assert (rep.mode, rep.rule_scope) == ("incremental", 0)
    assert not before["episode_service"].equals(got["episode_service"])


def _edited(reg: Registry) -> Registry:
    phq = reg.scales["PHQ-9"]
    return Registry(scales={**reg.scales, "PHQ-9": replace(phq, name=phq.name + " (v2)")})


def test_a_revised_plan_of_a_closed_episode_gets_its_goal_status(store: Store) -> None:
    reg, settings = load_registry(), Settings()
    ingest_paths([SAMPLE], store, settings, reg, now=NOW)
    compute(store, settings, reg, full=True, now=NOW)
    with store.engine.connect() as conn:
        closed = conn.execute(sa.select(episodes.c.episode_id).where(
            episodes.c.end_date.is_not(None)).order_by(episodes.c.episode_id).limit(1)
        ).scalar_one()
    goal = pd.DataFrame([{"goal_id": "G9", "measure": "PHQ-9", "kind": "below",
                          "target": 10, "due_date": date(2027, 1, 1)}])
    record_review(store, closed, reviewer="t", decision="revise", new_goals=goal,
                  now=NOW + timedelta(days=1))
    compute(store, settings, reg, now=NOW + timedelta(days=1))
    status = store.read_table("goal_status")
    assert "G9" in set(status.loc[status["episode_id"] == closed, "goal_id"])


def test_incremental_runs_give_what_a_full_compute_gives_when_the_clock_goes_back(
        pair: tuple[Store, Store], tmp_path: Path) -> None:
    """Against a full compute (same stored reference) rather than the earlier scope: an
    episode closed with an end date ahead and a revised plan's goal due before that
    end. Its goal is overdue at a clock after the due date, and on track or at risk
    again when the clock goes back before it; the incremental run must follow (a
    fallback that took only the open episodes left it overdue). A new open episode
    in a new team, with no month of end, opens a service cell whose key is missing."""
    inc, full = pair
    settings, reg = Settings(), load_registry()
    for store in pair:
        ingest_paths([SAMPLE], store, settings, reg, now=NOW)
        compute(store, settings, reg, full=True, now=NOW)
    with inc.engine.connect() as conn:
        x = conn.execute(sa.select(episodes).where(episodes.c.end_date.is_(None))
                         .order_by(episodes.c.episode_id).limit(1)).mappings().one()
    rows = {"referral": {"episode_id": "EXNEW", "client_id": x["client_id"],
                         "therapist_id": x["therapist_id"], "team": "West",
                         "start_date": "2026-11-20", "end_date": "", "end_reason": ""},
            "closing": {"episode_id": x["episode_id"], "client_id": x["client_id"],
                        "therapist_id": x["therapist_id"], "team": x["team"],
                        "start_date": x["start_date"], "end_date": "2027-01-31",
                        "end_reason": "completed"}}
    for name, row in rows.items():
        (tmp_path / name).mkdir()
        pd.DataFrame([row]).to_csv(tmp_path / name / "episodes.csv", index=False)
    goal = pd.DataFrame([{"goal_id": "G9", "measure": "PHQ-9", "kind": "below",
                          "target": 0, "due_date": date(2027, 1, 10)}])
    day = NOW + timedelta(days=1)
    seen = []
    for step, clock in (("referral", NOW + timedelta(hours=1)), ("closing", day),
                        ("", datetime(2027, 1, 20, 12)), ("", datetime(2027, 1, 5, 12))):
        for store in pair:
            if step:
                report = ingest_paths([tmp_path / step], store, settings, reg, now=clock)
                assert report.as_dict()["accepted"] == 1
            if step == "closing":
                record_review(store, x["episode_id"], reviewer="t", decision="revise",
                              new_goals=goal, now=clock)
        compute(inc, settings, reg, now=clock)
        compute(full, settings, reg, full=True, keep_reference=True, now=clock)
        a, b = _snapshot(inc), _snapshot(full)
        for table in TABLES:
            pd.testing.assert_frame_equal(a[table], b[table], obj=f"{table} at {clock}")
        _cells_are_the_episodes_sums(inc)
        gs = a["goal_status"]
        seen.append(gs.loc[(gs["episode_id"] == x["episode_id"]) & (gs["goal_id"] == "G9"),
                           "status"].tolist())
    assert seen[2] == ["overdue"] and seen[3] not in ([], ["overdue"]), seen


def test_review_overdue_evidence_is_the_same_from_any_run_and_store(
        pair: tuple[Store, Store]) -> None:
    """The latest review's time in a review_overdue flag's evidence reads the same
    after an incremental run and a full compute, on SQLite (which gives the driver's
    text) and PostgreSQL (datetime objects): "2026-11-20 10:30:00"."""
    store, _ = pair
    settings, reg = Settings(), load_registry()
    ingest_paths([SAMPLE], store, settings, reg, now=NOW)
    compute(store, settings, reg, full=True, now=NOW)
    with store.engine.connect() as conn:
        x = conn.execute(sa.select(episodes.c.episode_id).where(episodes.c.end_date.is_(None))
                         .order_by(episodes.c.episode_id).limit(1)).scalar_one()
    record_review(store, x, reviewer="t", decision="continue", next_review=date(2026, 12, 1),
                  now=datetime(2026, 11, 20, 10, 30))
    for full in (False, True):
        compute(store, settings, reg, full=full, now=datetime(2026, 12, 5, 9))
        f = store.read_table("flags")
        f = f[(f["episode_id"] == x) & (f["kind"] == "review_overdue")]
        evidence = json.loads(f["evidence"].item())
        assert evidence["last_review"] == "2026-11-20 10:30:00", (full, evidence)
        assert evidence["review_due"] == "2026-12-01 00:00:00", (full, evidence)


def test_a_cycle_scans_no_table_that_grows_with_the_store(tmp_path: Path) -> None:
    """Every query of a cycle (new records ingested a day later, then the incremental
    run) finds its rows through an index: a whole-table scan of episodes, plans,
    administrations or any derived per-episode table would grow with the store, not
    with the new records. Checked with SQLite's query plan of each statement run."""
    reg = load_registry()
    with fresh_store("sqlite", tmp_path / "s") as store:
        ingest_paths([SAMPLE], store, Settings(), reg, now=NOW)
        compute(store, Settings(), reg, full=True, now=NOW)
        new = tmp_path / "new"
        new.mkdir()
        # One record sent again among the new ones: the ingest then asks the store
        # which records it already holds (the join through the unique index).
        again = pd.read_csv(SAMPLE / "administrations.csv", dtype=str, nrows=1,
                            keep_default_na=False)
        pd.concat([next_week(SAMPLE / "administrations.csv", 40), again]).to_csv(
            new / "administrations.csv", index=False)
        later = NOW + timedelta(days=1)
        statements: list[str] = []
        traced: list[Any] = []

        # SQLite's own trace (values bound in), so the driver-level reads and the
        # ingest's join through its temporary table are checked too.
        @sa.event.listens_for(store.engine, "checkout")
        def trace(dbapi_conn: Any, record: Any, proxy: Any) -> None:
            dbapi_conn.set_trace_callback(statements.append)
            traced.append(dbapi_conn)

        ingest_paths([new], store, Settings(), reg, now=later)
        assert store.read_table("batches")["duplicates"].iloc[-1] == 1
        rep = compute(store, Settings(), reg, now=later)
        sa.event.remove(store.engine, "checkout", trace)
        for dbapi_conn in traced:
            dbapi_conn.set_trace_callback(None)
        assert rep.mode == "incremental" and rep.rule_scope
        growing = {t.name for t in store_module.metadata.sorted_tables} - {
            "schema_info", "batches", "compute_runs", "reference_norms", "expected_curves",
            "service_cells", "users", "therapists"}
        scans = set()
        with store.engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.execute("CREATE TEMP TABLE IF NOT EXISTS _ontrack_identities "
                        "(episode_id, measure, administered_at)")
            selects = [q for q in statements if q.lstrip().upper().startswith("SELECT")]
            for statement in selects:
                for row in raw.execute("EXPLAIN QUERY PLAN " + statement):
                    detail = row[3]
                    if detail.startswith("SCAN ") and detail.split()[1] in growing:
                        scans.add(f"{detail}: {statement[:80]}")
        assert len(selects) > 20
        assert any("_ontrack_identities" in q for q in selects)  # the ingest's join
        assert any("group_concat" in q for q in selects)  # the columnar reads
        assert not scans, sorted(scans)


def test_a_full_run_rebuilds_the_indexes_it_drops(tmp_path: Path) -> None:
    """A full run writes every row of a per-episode table afresh; on SQLite it drops
    the table's secondary indexes first and builds them from the rows afterwards. The
    store ends with every index the schema declares, each holding exactly its table's
    rows (SQLite's integrity check compares them), and a reader that started before
    the run's commit still has the old rows and their index."""
    reg = load_registry()
    with fresh_store("sqlite", tmp_path / "s") as store:
        ingest_paths([SAMPLE], store, Settings(), reg, now=NOW)
        compute(store, Settings(), reg, full=True, now=NOW)

        def indexes() -> set[str]:
            with store.engine.connect() as conn:
                return {r[0] for r in conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'index' "
                    "AND name NOT LIKE 'sqlite_autoindex%'")}

        declared = {i.name for t in store_module.metadata.sorted_tables for i in t.indexes}
        assert indexes() == declared
        assert "ix_episode_service_therapist_id" in declared
        therapist = store.read_table("episode_service")["therapist_id"].iloc[0]
        count = ("SELECT count(*) FROM episode_service "
                 "INDEXED BY ix_episode_service_therapist_id WHERE therapist_id = ?")
        reader = sqlite3.connect(tmp_path / "s" / "t.db", isolation_level=None)
        try:
            reader.execute("BEGIN")  # its snapshot starts at its first read
            before = reader.execute(count, (therapist,)).fetchone()[0]
            compute(store, Settings(), reg, full=True, now=NOW + timedelta(days=1))
            assert reader.execute(count, (therapist,)).fetchone()[0] == before
            reader.execute("COMMIT")
        finally:
            reader.close()
        assert before and before >= 1
        assert indexes() == declared
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
            assert conn.exec_driver_sql(count, (therapist,)).scalar() == before
