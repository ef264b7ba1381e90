"""The store: schema versioning, idempotent re-ingest, and all-or-nothing batches."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from pipeline.config import Settings
from pipeline.errors import StoreError
from pipeline.scales import Registry
from pipeline.store import SCHEMA_VERSION, Store, bulk_read, read_frame
from tests.conftest import (
    ADM_HEADER,
    SAMPLE_INPUT,
    adm_row,
    administrations,
    ingest,
    quarantine,
    write_csv,
)

DATA_TABLES = ("administrations", "episodes", "clients", "therapists", "goals")


def test_init_is_idempotent(store: Store) -> None:
    assert store.init() == SCHEMA_VERSION
    assert store.init() == SCHEMA_VERSION
    with store.engine.connect() as conn:
        n = conn.execute(sa.text("SELECT COUNT(*) FROM schema_info")).scalar_one()
    assert n == 1
    assert set(store.counts()) >= {"administrations", "batches", "quarantine"}
    assert all(v == 0 for v in store.counts().values())


def test_wrong_schema_version_refused(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE schema_info SET version = 99"))
    with pytest.raises(StoreError, match="99"):
        store.init()


def test_bad_url_is_a_store_error() -> None:
    with pytest.raises(StoreError):
        Store("not a url at all")


@pytest.mark.parametrize(("mb", "bulk_kib"), [(64, 65536), (0, 2000)])
def test_sqlite_bulk_transactions_get_the_configured_page_cache(
        tmp_path: Path, mb: int, bulk_kib: int) -> None:
    """A bulk write transaction (an ingest) has the configured cache (0: SQLite's 2 MB
    default); any other transaction on the same pooled connection, read or write, has
    the default again."""
    store = Store(f"sqlite:///{tmp_path / 'c.db'}", bulk_cache_mb=mb)
    store.init()
    for _ in range(2):
        with store.transaction(bulk=True) as conn:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -bulk_kib
        with store.snapshot() as conn:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -2000
        with store.transaction(bulk=True) as conn:
            pass
        with store.transaction() as conn:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -2000


def test_an_ingest_writes_in_bulk_transactions(store: Store, settings: Settings,
                                               registry: Registry,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bulk: list[bool] = []
    plain = Store.transaction

    def spy(self: Store, bulk_: bool = False, **kw: Any) -> Any:
        bulk.append(bool(kw.get("bulk", bulk_)))
        return plain(self, bulk=bool(kw.get("bulk", bulk_)))

    monkeypatch.setattr(Store, "transaction", spy)
    report = ingest([SAMPLE_INPUT], store, settings, registry)
    assert report.total("accepted") > 0 and len(bulk) >= 5 and all(bulk), bulk


def test_a_negative_bulk_cache_is_refused() -> None:
    from pipeline.config import load_settings
    from pipeline.errors import ConfigError

    assert load_settings(env={"ONTRACK_SQLITE_BULK_CACHE_MB": "16"}
                         ).sqlite_bulk_cache_mb == 16
    with pytest.raises(ConfigError, match="sqlite_bulk_cache_mb"):
        load_settings(env={"ONTRACK_SQLITE_BULK_CACHE_MB": "-1"})


# ------------------------------------------------------------------ idempotency


def _tables(store: Store) -> dict[str, pd.DataFrame]:
    out = {}
    for name in DATA_TABLES:
        t = store.read_table(name)
        key = [c for c in t.columns if c not in ("admin_id",)][:3]
        out[name] = t.sort_values(key).reset_index(drop=True)
    return out


def test_reingest_sample_changes_nothing(store: Store, settings: Settings,
                                         registry: Registry,
                                         expected_quarantine: pd.DataFrame) -> None:
    first = ingest([SAMPLE_INPUT], store, settings, registry)
    before = _tables(store)
    adm1 = {f.kind: f for f in first.files}["administrations"]
    assert len(before["administrations"]) == adm1.accepted > 0
    second = ingest([SAMPLE_INPUT], store, settings, registry)
    d1, d2 = first.as_dict(), second.as_dict()
    planted = expected_quarantine[expected_quarantine["reason"] != "duplicate"]
    assert d2["records"] == d1["records"]
    assert d2["accepted"] == 0
    assert d2["quarantined"] == len(planted)
    assert d2["duplicates"] == d2["records"] - len(planted)
    assert d2["by_reason"] == d1["by_reason"]
    for f in d2["files"]:
        assert f["records"] == f["accepted"] + f["duplicates"] + f["quarantined"]
    after = _tables(store)
    for name in DATA_TABLES:
        pd.testing.assert_frame_equal(before[name], after[name], obj=name)
    # The second run's quarantine repeats the planted rows, line for line.
    q = quarantine(store)
    adm2 = {f.kind: f for f in second.files}["administrations"]
    assert adm2.batch_id != adm1.batch_id
    again = q[q["batch_id"] == adm2.batch_id]
    assert dict(zip(again["line"].astype(int), again["reason"], strict=True)) == \
        dict(zip(planted["line"], planted["reason"], strict=True))


def test_changed_episode_end_is_an_update(indir: Path, entities: list[Path], store: Store,
                                          settings: Settings, registry: Registry) -> None:
    ingest(entities, store, settings, registry)
    episodes = entities[2]
    episodes.write_text(episodes.read_text(encoding="utf-8").replace(
        "E1,C1,T1,North,2025-01-01,,", "E1,C1,T1,North,2025-01-01,2025-04-01,completed"),
        encoding="utf-8")
    rep = ingest([episodes], store, settings, registry)
    f = rep.files[0]
    assert (f.accepted, f.duplicates, f.quarantined) == (1, 1, 0)
    assert dict(f.warnings) == {"updated": 1}
    ep = store.read_table("episodes").set_index("episode_id")
    assert str(ep.loc["E1", "end_date"]) == "2025-04-01"
    assert ep.loc["E1", "end_reason"] == "completed"


def test_changed_episode_client_is_a_conflict(indir: Path, entities: list[Path],
                                              store: Store, settings: Settings,
                                              registry: Registry) -> None:
    ingest(entities, store, settings, registry)
    episodes = entities[2]
    episodes.write_text(episodes.read_text(encoding="utf-8").replace(
        "E1,C1,T1", "E1,C2,T1"), encoding="utf-8")
    rep = ingest([episodes], store, settings, registry)
    assert dict(rep.files[0].by_reason) == {"conflict": 1}
    assert store.read_table("episodes").set_index("episode_id").loc["E1", "client_id"] == "C1"


# ------------------------------------------------------------------ interrupted batch


def _interrupt(monkeypatch: pytest.MonkeyPatch, method: str) -> dict[str, Any]:
    """Make ``Store.<method>`` do its work, then fail as if the process died there."""
    seen: dict[str, Any] = {}
    original = getattr(Store, method)

    def boom(self: Store, conn: sa.Connection, *args: Any, **kwargs: Any) -> None:
        original(self, conn, *args, **kwargs)
        # Inside the batch's transaction the rows are there ...
        seen["administrations"] = conn.execute(
            sa.text("SELECT COUNT(*) FROM administrations")).scalar_one()
        seen["quarantine"] = conn.execute(sa.text("SELECT COUNT(*) FROM quarantine")).scalar_one()
        seen["batches"] = conn.execute(sa.text("SELECT COUNT(*) FROM batches")).scalar_one()
        raise RuntimeError("simulated crash mid-batch")

    monkeypatch.setattr(Store, method, boom)
    return seen


@pytest.mark.parametrize("method", ["insert_administrations", "finish_batch"])
def test_interrupted_batch_is_all_or_nothing(indir: Path, entities: list[Path], store: Store,
                                             settings: Settings, registry: Registry,
                                             monkeypatch: pytest.MonkeyPatch,
                                             method: str) -> None:
    ingest(entities, store, settings, registry)
    before = store.counts()
    rows = [adm_row(when=f"2025-02-{d:02d}") for d in range(1, 6)] + \
        [adm_row(when="2025-03-01", measure="PHQ9")]
    path = write_csv(indir / "administrations.csv", ADM_HEADER, rows)
    seen = _interrupt(monkeypatch, method)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest([path], store, settings, registry)
    # ... and they were really written before the failure:
    assert seen == {"administrations": 5, "quarantine": 1, "batches": before["batches"] + 1}
    # ... but none of them survive it.
    after = store.counts()
    assert after == before
    assert after["administrations"] == 0 and after["quarantine"] == 0
    assert len(store.read_table("batches")) == 3  # the three entity files only
    monkeypatch.undo()
    # The same file goes in cleanly afterwards.
    rep = ingest([path], store, settings, registry)
    assert (rep.files[0].accepted, rep.files[0].quarantined) == (5, 1)
    assert len(administrations(store)) == 5


def test_failed_file_does_not_undo_earlier_files(indir: Path, entities: list[Path],
                                                 store: Store, settings: Settings,
                                                 registry: Registry,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_csv(indir / "administrations.csv", ADM_HEADER, [adm_row()])
    _interrupt(monkeypatch, "insert_administrations")
    with pytest.raises(RuntimeError):
        ingest([*entities, path], store, settings, registry)
    counts = store.counts()
    assert (counts["therapists"], counts["clients"], counts["episodes"]) == (2, 2, 2)
    assert counts["administrations"] == 0
    assert counts["batches"] == 3


def test_postgresql_and_sqlite_give_identical_results_on_the_sample(
        tmp_path: Path, settings: Settings, registry: Registry) -> None:
    """The same sample through both stores: identical rows in every derived table."""
    from pipeline.compute import compute
    from pipeline.report import service_report
    from tests.conftest import NOW, SAMPLE_INPUT, fresh_store

    tables = {"outcomes": ["episode_id", "measure"],
              "sudden_changes": ["episode_id", "measure", "kind", "pregain_session"],
              "flags": ["episode_id", "kind", "key"],
              "goal_status": ["episode_id", "goal_id"],
              "episode_service": ["episode_id"]}
    results = []
    for kind in ("sqlite", "postgresql"):
        with fresh_store(kind, tmp_path) as s:
            ingest([SAMPLE_INPUT], s, settings, registry)
            compute(s, settings, registry, full=True, now=NOW)
            frames = {t: s.read_table(t).drop(columns=["run_id", "flag_id", "first_raised",
                                                       "last_seen"], errors="ignore")
                      .sort_values(k).reset_index(drop=True) for t, k in tables.items()}
            results.append((frames, service_report(s, settings, registry)))
    (a, rep_a), (b, rep_b) = results
    assert rep_a == rep_b
    for t in tables:
        assert len(a[t]) > 0, t
        pd.testing.assert_frame_equal(a[t], b[t], check_dtype=False, obj=t)


def _bulk_and_raw(store: Store, ids: list[str | None], n_copies: int = 1
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write a small scratch table, read it by :func:`bulk_read` and by the row path."""
    meta = sa.MetaData()
    t = sa.Table("bulk_probe", meta, sa.Column("pk", sa.Integer, primary_key=True),
                 sa.Column("name", sa.String), sa.Column("n", sa.Integer),
                 sa.Column("at", sa.DateTime))
    with store.transaction() as conn:
        meta.create_all(conn)
        rows = [
            {"name": v, "n": None if i % 3 == 0 else i * 1_000_003,
             "at": datetime(2026, 1, 1 + i % 28, 10, 30)}
            for i, v in enumerate(ids * n_copies)]
        if rows:
            conn.execute(t.insert(), rows)
        bulk = bulk_read(conn, t, ["name", "n", "at"], chunk_rows=7)
        raw = read_frame(conn, sa.select(t.c.name, t.c.n, t.c.at), raw=True)
    return bulk, raw


@pytest.mark.parametrize("ids", [
    ["E1", None, "E,3", "E \"4\"", "Ünïcode"],
    ["NA", "null", "N/A", "NaN", "#N/A", "-nan", None],  # pyarrow's null markers: values
    ["E1", "bad\x1fseparator", "E3"],  # a separator inside a value: row-by-row path
    ["E1", "two\nlines", "E3"],
])
def test_bulk_read_equals_the_row_by_row_read(store: Store, ids: list[str | None]) -> None:
    bulk, raw = _bulk_and_raw(store, ids, n_copies=5)  # 15 rows, chunks of 7 on SQLite
    assert len(bulk) == len(raw) == 5 * len(ids)
    def plain(values: pd.Series) -> list[Any]:
        return [None if v is None or (isinstance(v, float) and v != v) else v
                for v in values.tolist()]

    assert plain(bulk["name"]) == plain(raw["name"]) == [*ids] * 5
    assert [None if pd.isna(v) else int(v) for v in bulk["n"]] == \
        [None if v is None or v != v else int(v) for v in raw["n"]]
    assert (pd.to_datetime(bulk["at"]) == pd.to_datetime(raw["at"])).all()


def test_bulk_read_gives_floats_bit_for_bit(store: Store,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Float columns come exactly as stored (SQLite's text form keeps 15 digits, which
    would turn 0.1 + 0.2 into 0.3), beside the text columns, without the row path."""
    import pipeline.store as store_module

    values = [0.1 + 0.2, 1 / 3, None, 1e-300, -2.5, 12345678.123456789, 7.0] * 3
    meta = sa.MetaData()
    t = sa.Table("float_probe", meta, sa.Column("pk", sa.Integer, primary_key=True),
                 sa.Column("name", sa.String), sa.Column("x", sa.Float),
                 sa.Column("n", sa.Integer), sa.Column("y", sa.Float))
    with store.transaction() as conn:
        meta.create_all(conn)
        conn.execute(t.insert(), [{"name": f"r{i}", "x": v, "n": i, "y": float(i) / 7}
                                  for i, v in enumerate(values)])
        raw = read_frame(conn, sa.select(t.c.name, t.c.x, t.c.n, t.c.y), raw=True)

        def no_rows(*_args: Any, **_kw: Any) -> pd.DataFrame:
            raise AssertionError("bulk_read fell back to the row path")

        monkeypatch.setattr(store_module, "read_frame", no_rows)
        bulk = bulk_read(conn, t, ["name", "x", "n", "y"], chunk_rows=4)
    assert bulk["name"].tolist() == raw["name"].tolist() == [f"r{i}" for i in range(21)]
    for c in ("x", "y"):
        got = [None if v != v else v for v in bulk[c].tolist()]
        assert got == [None if v is None or v != v else v for v in raw[c].tolist()], c
    assert [None if v != v else v for v in bulk["x"].tolist()] == values
    assert bulk["n"].tolist() == list(range(21))


@pytest.mark.parametrize("columns", [["name"], ["name", "n"]])
def test_bulk_read_of_rows_with_every_field_missing(store: Store, columns: list[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A row whose every read column is missing is still a row. On SQLite one column
    alone is printed beside its rowid (its missing value would be an empty line),
    several by their separators, both by the text path, not the row path; PostgreSQL's
    COPY writes a lone column's NULL as an empty line, which is read as a row."""
    import pipeline.store as store_module

    meta = sa.MetaData()
    t = sa.Table("missing_probe", meta, sa.Column("pk", sa.Integer, primary_key=True),
                 sa.Column("name", sa.String), sa.Column("n", sa.Integer))
    rows = [{"name": None if i % 3 else f"r{i}", "n": None if i % 3 else i}
            for i in range(10)]
    with store.transaction() as conn:
        meta.create_all(conn)
        conn.execute(t.insert(), rows)
        raw = read_frame(conn, sa.select(*[t.c[c] for c in columns]), raw=True)
        if store.dialect == "sqlite":
            def no_rows(*_args: Any, **_kw: Any) -> pd.DataFrame:
                raise AssertionError("bulk_read fell back to the row path")

            monkeypatch.setattr(store_module, "read_frame", no_rows)
        bulk = bulk_read(conn, t, columns, chunk_rows=4)
    assert len(bulk) == len(raw) == 10
    assert [None if pd.isna(v) else v for v in bulk["name"]] == \
        [None if i % 3 else f"r{i}" for i in range(10)]
    if "n" in columns:
        assert [None if pd.isna(v) else int(v) for v in bulk["n"]] == \
            [None if i % 3 else i for i in range(10)]


def test_bulk_read_of_an_empty_table(store: Store) -> None:
    bulk, raw = _bulk_and_raw(store, [])
    assert bulk.empty and raw.empty and list(bulk.columns) == ["name", "n", "at"]


PLAN_HEADER = ["episode_id", "goal_id", "measure", "kind", "target", "due", "description",
               "sustain"]


def _goal(episode: str, goal: str, target: int = 10) -> dict[str, Any]:
    return {"episode_id": episode, "goal_id": goal, "measure": "PHQ-9", "kind": "below",
            "target": target, "due": "session:12", "description": f"below {target}",
            "sustain": 1}


def test_a_plan_straddling_chunks_keeps_every_goal(indir: Path, entities: list[Path],
                                                   store: Store, registry: Registry) -> None:
    """Chunks of 2 records: E1's three goals arrive in two chunks and are one plan; a
    changed goal later in the same file is still a conflict, and a re-import is all
    duplicates. (Found at 560k episodes: goals at a 200,000-row boundary were lost.)"""
    settings = Settings(chunk_rows=2)
    rows = [_goal("E1", "G1"), _goal("E1", "G2", 8), _goal("E1", "G3", 5), _goal("E2", "G1"),
            _goal("E2", "G1", 12)]  # E2's G1 twice, different: a conflict
    plans_csv = write_csv(indir / "plans.csv", PLAN_HEADER, rows)
    rep = ingest([*entities, plans_csv], store, settings, registry)
    f = next(x for x in rep.files if x.kind == "plans")
    assert (f.records, f.accepted, f.duplicates, f.quarantined) == (5, 4, 0, 1)
    goals_ = store.read_table("goals")
    assert sorted(zip(goals_["episode_id"], goals_["goal_id"], goals_["plan_version"],
                      strict=True)) == [("E1", "G1", 1), ("E1", "G2", 1), ("E1", "G3", 1),
                                        ("E2", "G1", 1)]
    assert len(store.read_table("plans")) == 2
    q = quarantine(store)
    assert q["reason"].tolist() == ["conflict"] and q["line"].tolist() == [6]

    # The same file again, in a new batch: every goal is a duplicate (the conflicting
    # row stays a conflict); nothing is appended to a plan made by an earlier batch.
    rep2 = ingest([plans_csv], store, settings, registry)
    f2 = rep2.files[0]
    assert (f2.accepted, f2.duplicates, f2.quarantined) == (0, 4, 1)
    more = indir / "more"
    more.mkdir()
    extra = write_csv(more / "plans.csv", PLAN_HEADER, [_goal("E1", "G4")])
    rep3 = ingest([extra], store, settings, registry)
    assert (rep3.files[0].accepted, rep3.files[0].quarantined) == (0, 1)  # a revision


def test_init_adds_later_indexes_and_fills_the_service_cells(store: Store,
                                                            registry: Registry) -> None:
    """A store made before the caseload/service indexes and cells gets them at init, and
    the cells are the per-episode SPEC §5 indicators summed (checked with pandas)."""
    from pipeline.compute import compute
    from pipeline.ingest.batch import ingest_paths
    from pipeline.store import service_cells

    settings = Settings()
    ingest_paths([SAMPLE_INPUT], store, settings, registry)
    compute(store, settings, registry)
    later = {"ix_episodes_open", "ix_flags_open_episode", "ix_flags_acknowledged"}
    with store.engine.begin() as conn:
        for name in later:
            conn.execute(sa.text(f"DROP INDEX {name}"))
        conn.execute(service_cells.delete())
    store.init()
    names = {ix["name"] for table in ("episodes", "flags")
             for ix in sa.inspect(store.engine).get_indexes(table)}
    assert later <= names
    es, cells = store.read_table("episode_service"), store.read_table("service_cells")
    keys = ["team", "therapist_id", "end_month", "finished"]
    want = es.fillna({"end_month": "-"}).groupby(keys).agg(
        episodes=("episode_id", "size"), at_caseness=("at_caseness", "sum"),
        recovered=("recovered", "sum")).reset_index()
    got = cells.fillna({"end_month": "-"}).astype({"finished": bool})
    want["finished"] = want["finished"].astype(bool)
    cols = [*keys, "episodes", "at_caseness", "recovered"]
    assert len(es) > 20 and len(cells) == len(want)
    pd.testing.assert_frame_equal(
        got[cols].sort_values(keys).reset_index(drop=True).astype({"episodes": "int64",
                                                                   "at_caseness": "int64",
                                                                   "recovered": "int64"}),
        want[cols].sort_values(keys).reset_index(drop=True).astype({"episodes": "int64",
                                                                    "at_caseness": "int64",
                                                                    "recovered": "int64"}))
    assert int(cells["episodes"].sum()) == len(es)


@pytest.mark.parametrize("odd", [None, "bad\x1fseparator", "two\nlines"])
def test_bulk_read_of_some_keys_equals_the_row_by_row_read(
        store: Store, odd: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """``where_in`` reads the rows of some keys (more than one query's 900) in the order
    and with the values a plain ``IN`` read gives, floats bit for bit; a separator or a
    line break inside a value falls back to the row path with the same result."""
    meta = sa.MetaData()
    t = sa.Table("in_probe", meta, sa.Column("pk", sa.Integer, primary_key=True),
                 sa.Column("key", sa.String, index=True), sa.Column("name", sa.String),
                 sa.Column("n", sa.Integer), sa.Column("x", sa.Float))
    keys = [f"K{i:04d}" for i in range(1500)]
    rng = np.random.default_rng(5)
    rows = [{"key": keys[int(rng.integers(0, len(keys)))], "name": f"r{i}",
             "n": None if i % 5 == 0 else i, "x": None if i % 7 == 0 else i / 3}
            for i in range(4000)]
    rows[17]["name"] = odd
    wanted = [k for k in keys if int(k[1:]) % 3 != 0] + ["K9999"]  # one key with no rows
    with store.transaction() as conn:
        meta.create_all(conn)
        conn.execute(t.insert(), rows)
        if odd is None and store.dialect == "sqlite":  # the text path, not the fallback
            import pipeline.store as store_module

            def no_rows(*_args: Any, **_kw: Any) -> pd.DataFrame:
                raise AssertionError("bulk_read fell back to the row path")

            with monkeypatch.context() as m:
                m.setattr(store_module, "read_frame", no_rows)
                bulk = bulk_read(conn, t, ["key", "name", "n", "x"], where_in=("key", wanted))
        else:
            bulk = bulk_read(conn, t, ["key", "name", "n", "x"], where_in=("key", wanted))
        parts = [read_frame(conn, sa.select(t.c.key, t.c.name, t.c.n, t.c.x)
                            .where(t.c.key.in_(wanted[i:i + 900])), raw=True)
                 for i in range(0, len(wanted), 900)]
        none = bulk_read(conn, t, ["key", "name"], where_in=("key", ["nothing"]))
    raw = pd.concat(parts, ignore_index=True)
    expected = sum(1 for r in rows if r["key"] in set(wanted))
    assert len(bulk) == len(raw) == expected > 2000

    def plain(values: pd.Series) -> list[Any]:
        return [None if v is None or (isinstance(v, float) and v != v) else v
                for v in values.tolist()]

    for c in ("key", "name", "x"):
        assert plain(bulk[c]) == plain(raw[c]), c
    assert [None if pd.isna(v) else int(v) for v in bulk["n"]] == \
        [None if v is None or v != v else int(v) for v in raw["n"]]
    assert none.empty and list(none.columns) == ["key", "name"]


@pytest.mark.parametrize("where_in", [False, True])
def test_bulk_read_keeps_empty_strings_of_not_null_text(store: Store,
                                                        where_in: bool) -> None:
    """SQLite's text path writes NULL and '' alike: a NOT NULL text column (a flag's
    ``key``, ``measure``) must read '' back, a nullable one missing as missing."""
    meta = sa.MetaData()
    t = sa.Table("empty_probe", meta, sa.Column("pk", sa.Integer, primary_key=True),
                 sa.Column("ep", sa.String, nullable=False),
                 sa.Column("code", sa.String, nullable=False),
                 sa.Column("note", sa.String))
    rows = [{"ep": f"E{i % 3}", "code": "" if i % 2 else ("NA", "null", "N/A")[i % 3],
             "note": None if i % 4 == 0 else ("" if i % 4 == 1 else f"n{i}")}
            for i in range(12)]
    with store.transaction() as conn:
        meta.create_all(conn)
        conn.execute(t.insert(), rows)
        got = bulk_read(conn, t, ["ep", "code", "note"],
                        where_in=("ep", ["E0", "E1", "E2"]) if where_in else None)
    got = got.sort_values(["ep", "code"]).reset_index(drop=True)
    want = pd.DataFrame(rows).sort_values(["ep", "code"]).reset_index(drop=True)
    assert got["code"].tolist() == want["code"].tolist()
    assert "" in got["code"].tolist() and "NA" in got["code"].tolist()
    # A nullable column: NULL stays missing (and '' reads as missing on SQLite's path).
    assert got["note"].isna().sum() >= int(want["note"].isna().sum())
    assert [v for v in got["note"] if isinstance(v, str) and v] == \
        [v for v in want["note"] if isinstance(v, str) and v]


def test_flags_whose_identity_looks_like_a_null_marker_are_found_again(
        store: Store) -> None:
    """Flag identities are data (goal ids, episode ids): "NA" or "null" must match the
    stored flag on the next refresh, not read as missing and raise the flag twice."""
    from pipeline import flags as flag_rules

    firing = pd.DataFrame({
        "episode_id": ["NA", "E1", "E1"], "measure": ["PHQ-9", "", "PHQ-9"],
        "kind": ["goal_overdue", "review_overdue", "goal_overdue"],
        "key": ["null", "", "N/A"], "severity": ["review"] * 3, "rule": ["r"] * 3,
        "message": ["NA", "m", "m"], "evidence": ["{}"] * 3,
        "evidence_at": [datetime(2025, 3, 1)] * 3})
    for when in (datetime(2025, 3, 2), datetime(2025, 3, 3)):
        with store.transaction() as conn:
            counts = flag_rules.refresh(conn, firing, when, episodes={"NA", "E1"})
    assert counts["raised"] == 0 and counts["updated"] == 3, counts
    flags = store.read_table("flags")
    assert len(flags) == 3 and set(flags["key"]) == {"null", "", "N/A"}
    # Fired unchanged: not rewritten, so last_seen is still the first refresh's.
    assert set(pd.to_datetime(flags["last_seen"])) == {pd.Timestamp("2025-03-02")}


def test_an_episode_called_na_is_computed_under_its_own_id(
        indir: Path, entities: list[Path], store: Store, settings: Settings,
        registry: Registry) -> None:
    """Ids are data: episodes "NA" and "null" (valid ids; pyarrow's CSV reader would take
    them for missing values) keep their ids through the columnar reads of compute."""
    from pipeline.compute import compute

    eps = indir / "more_episodes.csv"
    eps.write_text("episode_id,client_id,therapist_id,team,start_date,end_date,end_reason\n"
                   "NA,C1,T1,North,2025-01-01,,\nnull,C2,T2,South,2025-01-06,,\n",
                   encoding="utf-8")
    rows = [adm_row(ep, when=f"2025-02-{d:02d}T10:00:00", session=i + 1,
                    items=(s,) * 8 + (0,))
            for ep in ("NA", "null", "E1") for i, (d, s) in enumerate([(1, 3), (8, 2), (15, 1)])]
    ingest([*entities, eps, write_csv(indir / "adm.csv", ADM_HEADER, rows)], store,
           settings, registry)
    compute(store, settings, registry, full=True, now=datetime(2025, 3, 1))
    out = store.read_table("outcomes").set_index("episode_id")
    assert sorted(out.index) == ["E1", "NA", "null"]
    assert [int(out.loc[e, "n"]) for e in ("E1", "NA", "null")] == [3, 3, 3]
    assert [int(out.loc[e, "last_score"]) for e in ("E1", "NA", "null")] == [8, 8, 8]


@pytest.mark.parametrize("nan_is_null", [True, False])
def test_bulk_insert_stores_missing_values_as_null(store: Store, nan_is_null: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing value of any column type is stored as NULL, by NaN on SQLite (its
    fast path) or by None (other stores, or a SQLite that keeps NaN): the same rows
    either way, and a NOT NULL column refuses it."""
    import pipeline.store as store_module

    if store.dialect == "sqlite":  # this SQLite takes the fast path
        with store.engine.connect() as conn:
            assert store_module._nan_is_null(conn.connection.driver_connection)
    if not nan_is_null:
        monkeypatch.setattr(store_module, "_nan_is_null", lambda dbapi: False)
    table = sa.Table(
        "scratch_nulls", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("n", sa.Integer), sa.Column("x", sa.Float), sa.Column("t", sa.String(10)),
        sa.Column("at", sa.DateTime), sa.Column("ok", sa.Boolean),
        sa.Column("need", sa.Integer, nullable=False))
    frame = pd.DataFrame({
        "id": [1, 2], "n": pd.array([7, pd.NA], dtype="Int64"), "x": [np.nan, 2.5],
        "t": pd.array([None, "a"], dtype="str"),
        "at": pd.to_datetime([None, "2026-01-05 10:00"]).astype("datetime64[us]"),
        "ok": pd.array([pd.NA, True], dtype="boolean"), "need": [3, 4]})
    with store.transaction() as conn:
        table.create(conn)
        store_module.bulk_insert(conn, table, frame)
        nulls = conn.execute(sa.text(
            "SELECT id, n IS NULL, x IS NULL, t IS NULL, at IS NULL, ok IS NULL "
            "FROM scratch_nulls ORDER BY id")).all()
        values = conn.execute(sa.select(table).order_by(table.c.id)).all()
    assert [tuple(bool(v) for v in r[1:]) for r in nulls] == \
        [(False, True, True, True, True), (True, False, False, False, False)]
    assert values[0][1] == 7 and values[1][2] == 2.5 and values[1][3] == "a"
    assert values[1][4] == datetime(2026, 1, 5, 10) and values[1][5] is True
    # The driver's own error: bulk_insert works on the driver's cursor.
    refused = store.engine.dialect.loaded_dbapi.IntegrityError
    with pytest.raises(refused, match="(?i)not.null"), store.transaction() as conn:
        store_module.bulk_insert(conn, table, frame.assign(
            id=[3, 4], need=pd.array([pd.NA, 5], dtype="Int64")))


def _scratch_goals() -> sa.Table:
    return sa.Table("scratch_goals", sa.MetaData(),
                    sa.Column("episode_id", sa.String(20), primary_key=True),
                    sa.Column("goal_id", sa.String(20), primary_key=True),
                    sa.Column("status", sa.String(20)),
                    sa.Column("run_id", sa.Integer, nullable=False))


def test_bulk_insert_upsert_updates_stored_keys_in_place(store: Store) -> None:
    """On SQLite a row whose key is stored updates it where it is (its rowid kept), a
    new key is inserted, and two rows of one key in the frame are refused, nothing
    written; PostgreSQL's COPY cannot upsert, so asking is an error there."""
    import pipeline.store as store_module

    table = _scratch_goals()
    first = pd.DataFrame({"episode_id": ["E1", "E1", "E2"], "goal_id": ["G1", "G2", "G1"],
                          "status": ["on_track", "met", "at_risk"], "run_id": [1, 1, 1]})
    with store.transaction() as conn:
        table.create(conn)
        store_module.bulk_insert(conn, table, first)
    later = pd.DataFrame({"episode_id": ["E1", "E3"], "goal_id": ["G2", "G1"],
                          "status": ["not_met", "on_track"], "run_id": [2, 2]})
    if store.dialect != "sqlite":
        with pytest.raises(ValueError, match="SQLite"), store.transaction() as conn:
            store_module.bulk_insert(conn, table, later, upsert=True)
        return
    with store.transaction() as conn:
        before = dict(conn.execute(sa.text(
            "SELECT episode_id || goal_id, rowid FROM scratch_goals")).all())
        store_module.bulk_insert(conn, table, later, upsert=True)
        rows = conn.execute(sa.text("SELECT episode_id || goal_id, rowid, status, run_id "
                                    "FROM scratch_goals ORDER BY 1")).all()
    assert [(k, s, r) for k, _, s, r in rows] == [
        ("E1G1", "on_track", 1), ("E1G2", "not_met", 2), ("E2G1", "at_risk", 1),
        ("E3G1", "on_track", 2)]
    assert {k: i for k, i, _, _ in rows if k != "E3G1"} == before
    twice = pd.DataFrame({"episode_id": ["E4", "E4"], "goal_id": ["G1", "G1"],
                          "status": ["met", "not_met"], "run_id": [3, 3]})
    with pytest.raises(StoreError, match=r"same key \(episode_id, goal_id\) twice"), \
            store.transaction() as conn:
        store_module.bulk_insert(conn, table, twice, upsert=True)
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM scratch_goals")).scalar() == 4


def test_bulk_insert_skip_stored_skips_only_that_keys_conflicts(store: Store) -> None:
    """``skip_stored`` (SQLite): a row whose unique key is stored is skipped and the
    stored row kept, the others are written and counted; a NOT NULL violation is still
    refused. PostgreSQL's COPY cannot skip, so asking is an error there."""
    import pipeline.store as store_module

    table = _scratch_goals()
    first = pd.DataFrame({"episode_id": ["E1", "E2"], "goal_id": ["G1", "G1"],
                          "status": ["on_track", "met"], "run_id": [1, 1]})
    later = pd.DataFrame({"episode_id": ["E1", "E3", "E2", "E4"],
                          "goal_id": ["G1", "G1", "G2", "G1"],
                          "status": ["not_met", "at_risk", "met", "met"], "run_id": 2})
    key = ["episode_id", "goal_id"]
    with store.transaction() as conn:
        table.create(conn)
        written = store_module.bulk_insert(conn, table, first)
    if store.dialect != "sqlite":
        assert written is None
        with pytest.raises(ValueError, match="SQLite"), store.transaction() as conn:
            store_module.bulk_insert(conn, table, later, skip_stored=key)
        return
    assert written == 2
    with store.transaction() as conn:
        # Chunks of one row: the count is over every chunk.
        written = store_module.bulk_insert(conn, table, later, skip_stored=key,
                                           chunk_rows=1)
        rows = conn.execute(sa.select(table).order_by(*key)).all()
    assert written == 3
    assert [tuple(r) for r in rows] == [
        ("E1", "G1", "on_track", 1), ("E2", "G1", "met", 1), ("E2", "G2", "met", 2),
        ("E3", "G1", "at_risk", 2), ("E4", "G1", "met", 2)]
    refused = store.engine.dialect.loaded_dbapi.IntegrityError
    with pytest.raises(refused, match="(?i)not.null"), store.transaction() as conn:
        store_module.bulk_insert(conn, table, later.assign(
            goal_id="G9", run_id=pd.array([pd.NA, 2, 2, 2], dtype="Int64")),
            skip_stored=key)
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM scratch_goals")).scalar() == 5


def test_replacing_a_scope_keeps_other_episodes_and_drops_stale_rows(store: Store) -> None:
    """compute's per-episode write: the scope's rows become exactly the new ones (a
    goal no longer reported is gone, an episode with no rows has none), other
    episodes' rows are untouched; on SQLite by updates in place, elsewhere by delete
    and insert: the same rows either way."""
    import pipeline.store as store_module
    from pipeline.compute import _replace

    table = _scratch_goals()
    first = pd.DataFrame({"episode_id": ["E1", "E1", "E2", "E3"],
                          "goal_id": ["G1", "G2", "G1", "G1"],
                          "status": ["on_track", "met", "at_risk", "met"], "run_id": 1})
    with store.transaction() as conn:
        table.create(conn)
        store_module.bulk_insert(conn, table, first)
    new = pd.DataFrame({"episode_id": ["E1", "E1"], "goal_id": ["G1", "G3"],
                        "status": ["at_risk", "on_track"]})
    with store.transaction() as conn:
        _replace(conn, table, new, ["E1", "E2"], run_id=2)
    with store.engine.connect() as conn:
        got = conn.execute(sa.select(table).order_by(table.c.episode_id,
                                                     table.c.goal_id)).all()
    assert [tuple(r) for r in got] == [
        ("E1", "G1", "at_risk", 2), ("E1", "G3", "on_track", 2), ("E3", "G1", "met", 1)]


def test_bulk_update_stores_what_sqlalchemy_update_stores(store: Store) -> None:
    """Rows updated by key through the fast path read back, value and type, as the same
    update through SQLAlchemy: a datetime to the microsecond, a missing value as NULL,
    rows not named left alone."""
    import pipeline.store as store_module

    table = sa.Table("scratch_updates", sa.MetaData(),
                     sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("state", sa.String(20), nullable=False),
                     sa.Column("at", sa.DateTime), sa.Column("score", sa.Float))
    start = [{"id": i, "state": "open", "at": datetime(2026, 1, i), "score": 1.5}
             for i in (1, 2, 3)]
    change = pd.DataFrame({"id": [3, 1], "state": ["resolved", "acknowledged"],
                           "at": [datetime(2026, 2, 1, 9, 30, 0, 7), None],
                           "score": [np.nan, 2.25]})
    read = {}
    for how in ("bulk", "sqlalchemy"):
        with store.transaction() as conn:
            table.drop(conn, checkfirst=True)
            table.create(conn)
            conn.execute(table.insert(), start)
            if how == "bulk":
                store_module.bulk_update(conn, table, change, "id")
            else:
                for r in [{"id": 3, "state": "resolved",
                           "at": datetime(2026, 2, 1, 9, 30, 0, 7), "score": None},
                          {"id": 1, "state": "acknowledged", "at": None, "score": 2.25}]:
                    conn.execute(table.update().where(table.c.id == r["id"]).values(**r))
            read[how] = read_frame(conn, sa.select(table).order_by(table.c.id), raw=True)
    pd.testing.assert_frame_equal(read["bulk"], read["sqlalchemy"], check_exact=True)
    rows = read["bulk"].to_dict(orient="records")
    assert [r["state"] for r in rows] == ["acknowledged", "open", "resolved"]
    assert pd.isna(rows[0]["at"]) and pd.isna(rows[2]["score"]) and rows[0]["score"] == 2.25
    assert str(rows[2]["at"]).startswith("2026-02-01") and rows[1]["score"] == 1.5


def test_item_columns_no_row_answers_are_left_out_and_stored_as_null(
        indir: Path, entities: list[Path], store: Store, settings: Settings,
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """An insert leaves out the item columns none of its rows answers (a GAD-7 file
    with totals only: every item; PHQ-9 answers: items 10-20); they are stored as
    NULL, and the answered ones as given, the same as a row that leaves them blank."""
    import pipeline.store as store_module

    sent: list[list[str]] = []
    real = store_module.bulk_insert

    def spy(conn: Any, table: sa.Table, frame: pd.DataFrame, **kw: Any) -> Any:
        if table.name == "administrations":
            sent.append(list(frame.columns))
        return real(conn, table, frame, **kw)

    monkeypatch.setattr(store_module, "bulk_insert", spy)
    totals = write_csv(indir / "gad.csv", ADM_HEADER, [
        adm_row("E1", "GAD-7", "2025-02-01T10:00:00", items=None, total=12),
        adm_row("E2", "GAD-7", "2025-02-01T11:00:00", items=None, total=7)])
    answers = write_csv(indir / "phq.csv", ADM_HEADER, [
        adm_row("E1", "PHQ-9", "2025-02-01T10:00:00", items=(3, 2, 1, 0, 1, 2, 3, 0, 1)),
        adm_row("E2", "PHQ-9", "2025-02-01T11:00:00", items=(0, 1, 0, 1, 0, 1, 0, 1, 0))])
    ingest([*entities, totals, answers], store, settings, registry)
    items = [f"item_{i}" for i in range(1, 21)]
    assert [[c for c in cols if c.startswith("item_")] for cols in sent] == \
        [[], items[:9]]
    a = administrations(store).sort_values(["measure", "episode_id"])
    assert a["measure"].tolist() == ["GAD-7", "GAD-7", "PHQ-9", "PHQ-9"]
    assert a["score"].tolist() == [12, 7, 13, 4]
    for i, name in enumerate(items):
        values = [None if pd.isna(v) else int(v) for v in a[name]]
        expected = [None, None, (3, 2, 1, 0, 1, 2, 3, 0, 1)[i] if i < 9 else None,
                    (0, 1, 0, 1, 0, 1, 0, 1, 0)[i] if i < 9 else None]
        assert values == expected, name
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM administrations WHERE "
                                    + " OR ".join(f"{n} IS NOT NULL" for n in items[9:]))
                            ).scalar() == 0
