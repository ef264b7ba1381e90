"""Crash safety on SQLite and PostgreSQL: a real ``ontrack`` subprocess is killed with
SIGKILL in the middle of an ingest batch, a compute, a plan review and an export (at the
named points of :mod:`pipeline.faults`); the store must be exactly as before the
interrupted work (no partial batch, no half-written outcome set, no orphan review, no
export that looks finished), and the next run completes the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.faults import CRASH_POINTS
from pipeline.ingest.batch import ingest_paths
from pipeline.scales import Registry
from pipeline.store import Store
from tests.conftest import NOW, SAMPLE_INPUT, fresh_store

ENTITY_FILES = [SAMPLE_INPUT / f for f in ("therapists.csv", "clients.csv", "episodes.csv",
                                            "plans.csv")]
ADMINS = SAMPLE_INPUT / "administrations.csv"
TESTED_POINTS: set[str] = set()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with fresh_store(request.param, tmp_path) as s:
        yield s


def run(store: Store, tmp: Path, *args: str, crash_at: str | None = None,
        **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("ONTRACK_")}
    e.update(ONTRACK_DATABASE_URL=store.url, ONTRACK_DATA_DIR=str(tmp / "data"),
             ONTRACK_INBOX=str(tmp / "inbox"), PYTHONUNBUFFERED="1", **env)
    if crash_at:
        TESTED_POINTS.add(crash_at)
        e["ONTRACK_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=e,
                          capture_output=True, text=True, timeout=300, check=False)


def killed(r: subprocess.CompletedProcess[str]) -> bool:
    return r.returncode == -signal.SIGKILL


def counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {t: int(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in ("batches", "administrations", "quarantine", "outcomes",
                          "sudden_changes", "flags", "compute_runs", "reviews", "goal_status",
                          "caseload", "episode_service", "exports_log")}


def snapshot(store: Store, table: str, key: list[str]) -> pd.DataFrame:
    return store.read_table(table).sort_values(key).reset_index(drop=True)


def test_ingest_killed_mid_batch_leaves_no_trace_and_rerun_completes(
        db: Store, tmp_path: Path, settings: Settings, registry: Registry,
        sample_ingested: tuple[Store, Any]) -> None:
    clean = next(f for f in sample_ingested[1].as_dict()["files"]
                 if f["file"].endswith("administrations.csv"))
    ingest_paths(ENTITY_FILES, db, settings, registry, now=NOW)
    before = counts(db)
    # Small chunks: the kill comes after the first 1,000 of 7,001 records were written.
    r = run(db, tmp_path, "ingest", str(ADMINS), crash_at="ingest.chunk",
            ONTRACK_CHUNK_ROWS="1000")
    assert killed(r), r.stderr
    assert counts(db) == before  # no partial batch: nothing of the file, no batch row
    r = run(db, tmp_path, "ingest", str(ADMINS), "--json")
    assert r.returncode == 0, r.stderr
    after = counts(db)
    b = db.read_table("batches").iloc[-1]
    assert b["status"] == "committed" and int(b["records"]) == 7001
    assert int(b["records"]) == int(b["accepted"]) + int(b["duplicates"]) + \
        int(b["quarantined"])
    assert after["administrations"] - before["administrations"] == int(b["accepted"])
    assert after["quarantine"] - before["quarantine"] == int(b["quarantined"])
    # The same outcome as an uninterrupted ingest: the killed attempt left nothing that
    # makes records look like duplicates or the file look already ingested.
    for key in ("accepted", "duplicates", "quarantined"):
        assert int(b[key]) == clean[key], key


@pytest.fixture
def computed(db: Store, settings: Settings, registry: Registry) -> Store:
    ingest_paths([*ENTITY_FILES, ADMINS], db, settings, registry, now=NOW)
    compute(db, settings, registry, full=True, now=NOW)
    return db


def _new_scores(tmp: Path, store: Store) -> tuple[Path, list[str]]:
    """Two new PHQ-9 scores for three open episodes that already have PHQ-9 outcomes."""
    oc = store.read_table("outcomes")
    ep = store.read_table("episodes")
    open_ids = set(ep.loc[ep["end_date"].isna(), "episode_id"])
    chosen = sorted(set(oc.loc[oc["measure"] == "PHQ-9", "episode_id"]) & open_ids)[:3]
    rows = ["episode_id,measure,administered_at,session_number,total"]
    for e in chosen:
        rows += [f"{e},PHQ-9,2026-11-20T10:00:00,,3", f"{e},PHQ-9,2026-11-26T10:00:00,,2"]
    path = tmp / "more.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path, chosen


@pytest.mark.parametrize("point", ["compute.written", "compute.commit"])
def test_compute_killed_leaves_the_previous_results_and_rerun_completes(
        computed: Store, tmp_path: Path, settings: Settings, registry: Registry,
        point: str) -> None:
    path, chosen = _new_scores(tmp_path, computed)
    ingest_paths([path], computed, settings, registry, now=NOW)
    before = counts(computed)
    outcomes_before = snapshot(computed, "outcomes", ["episode_id", "measure"])
    flags_before = snapshot(computed, "flags", ["flag_id"])
    r = run(computed, tmp_path, "compute", crash_at=point)
    assert killed(r), r.stderr
    # Not one outcome row replaced, no run recorded as started or done, flags unchanged.
    assert counts(computed) == before
    pd.testing.assert_frame_equal(snapshot(computed, "outcomes", ["episode_id", "measure"]),
                                  outcomes_before)
    pd.testing.assert_frame_equal(snapshot(computed, "flags", ["flag_id"]), flags_before)
    r = run(computed, tmp_path, "compute")
    assert r.returncode == 0, r.stderr
    runs = computed.read_table("compute_runs")
    assert list(runs["status"]) == ["done", "done"]
    oc = computed.read_table("outcomes").set_index(["episode_id", "measure"])
    old = outcomes_before.set_index(["episode_id", "measure"])
    for e in chosen:
        assert int(oc.loc[(e, "PHQ-9"), "n"]) == int(old.loc[(e, "PHQ-9"), "n"]) + 2
        assert int(oc.loc[(e, "PHQ-9"), "last_score"]) == 2


def test_review_killed_leaves_no_orphan_and_rerun_records_it(
        computed: Store, tmp_path: Path) -> None:
    fl = computed.read_table("flags")
    episode = str(fl.loc[(fl["state"] == "open") & (fl["kind"] != "risk_item"),
                         "episode_id"].iloc[0])
    before = counts(computed)
    flags_before = snapshot(computed, "flags", ["flag_id"])
    args = ["review", episode, "--decision", "continue", "--reviewer", "crash-test",
            "--note", "reviewed"]
    r = run(computed, tmp_path, *args, crash_at="review.inserted")
    assert killed(r), r.stderr
    assert counts(computed) == before
    pd.testing.assert_frame_equal(snapshot(computed, "flags", ["flag_id"]), flags_before)
    r = run(computed, tmp_path, *args, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rv = computed.read_table("reviews")
    assert len(rv) == 1 and rv.iloc[0]["episode_id"] == episode
    acked = computed.read_table("flags").query("review_id == @out['review_id']")
    assert len(acked) == out["flags_acknowledged"] > 0
    assert int(rv.iloc[0]["flags_acknowledged"]) == out["flags_acknowledged"]


def test_export_killed_leaves_no_finished_looking_export_and_rerun_completes(
        computed: Store, tmp_path: Path) -> None:
    out = tmp_path / "exports" / "cohort"
    before = counts(computed)
    r = run(computed, tmp_path, "export", "--out", str(out), crash_at="export.files",
            ONTRACK_EXPORT_KEY="crash-key")
    assert killed(r), r.stderr
    assert not out.exists()  # only a hidden .partial directory may remain
    assert counts(computed) == before  # nothing logged
    r = run(computed, tmp_path, "export", "--out", str(out), ONTRACK_EXPORT_KEY="crash-key")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"],
                                                            "manifest.json"])
    log = computed.read_table("exports_log")
    assert len(log) == 1 and int(log.iloc[0]["episodes"]) == manifest["rows"]["episodes"]


def test_every_crash_point_is_tested(request: pytest.FixtureRequest) -> Any:
    # Runs last in this module: a new crash point without a test fails here.
    if request.session.testscollected < 10 or request.config.option.keyword:
        pytest.skip("only meaningful when the whole module ran")
    assert TESTED_POINTS == set(CRASH_POINTS)
