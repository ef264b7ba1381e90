"""The ingest's vectorised helpers against plain, value-by-value versions of the same rule:
integer parsing, per-measure lookups, the answers' fingerprint, and the bulk insert of
entity rows (dates) against SQLAlchemy's own insert."""

from __future__ import annotations

import random
import re
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from pipeline.ingest.batch import _CONTENT, _entity_fp, _fingerprint, _norm
from pipeline.store import Store, bulk_insert, episodes, goals, plans, read_frame
from pipeline.validate import _INT_RE, _ints, _Lookup

TRICKY = ["", " ", "3", " 3 ", "+3", "-3", "03", "0003", "3.", "3.0", "3.00", "3.01", "3.5",
          "1e3", "x", "\u0663", "\uff13", "123456789", "1234567890", "000000000123456789",
          "-0", "+0", "0", "00", "-123456789", "+.0", ".0", "3 .0", "- 3", "\u00a03\u00a0",
          "3\t", "nan", "NaN", "inf", "0x1", "1_000", "\u00b2", "++3", "3-", "-3.0000"]


def _plain_int(text: str) -> tuple[int | None, bool]:
    """(value, bad) for one field, by Python's re and int."""
    s = text.strip()
    if s == "":
        return None, False
    if not re.match(_INT_RE, s):
        return None, True
    return int(s.split(".")[0]), False


def test_ints_match_the_plain_rule() -> None:
    rnd = random.Random(11)
    values = TRICKY + ["".join(rnd.choice("0123456789+-. e") for _ in range(rnd.randint(0, 7)))
                       for _ in range(3000)]
    parsed, bad = _ints(pd.Series(values, dtype="str"))
    assert str(parsed.dtype) == "Int64"
    for v, p, b in zip(values, parsed.tolist(), bad.tolist(), strict=True):
        want, want_bad = _plain_int(v)
        assert (None if pd.isna(p) else int(p), bool(b)) == (want, want_bad), repr(v)
    # The cases that tell a lax parser from this one.
    got = dict(zip(values, parsed.tolist(), strict=True))
    assert got["+3"] == 3 and got["-3.0000"] == -3 and got["000000000123456789"] == 123456789
    assert pd.isna(got["1234567890"]) and pd.isna(got["\u0663"]) and pd.isna(got["3.01"])


def test_lookup_gives_what_map_gives() -> None:
    measure = pd.Series(["PHQ-9", "GAD-7", "XYZ", "PHQ-9", ""], dtype="str", index=[5, 6, 7, 8, 9])
    lookup = _Lookup(measure)
    for values in ({"PHQ-9": 9, "GAD-7": 7}, {"PHQ-9": 9, "GAD-7": 7, "XYZ": 1, "": 0},
                   {"PHQ-9": True, "GAD-7": False}, {}):
        pd.testing.assert_series_equal(lookup(values), measure.map(values), check_exact=True)
    with_na = pd.Series(["PHQ-9", None], dtype="str")
    pd.testing.assert_series_equal(_Lookup(with_na)({"PHQ-9": 9}), with_na.map({"PHQ-9": 9}))


def _plain_fingerprint(frame: pd.DataFrame) -> list[str]:
    return ["|".join("" if pd.isna(v) else str(int(v)) for v in row)
            for row in frame[_CONTENT].itertuples(index=False)]


def test_fingerprint_matches_the_plain_join() -> None:
    rng = np.random.default_rng(4)
    n = 400

    def col(kind: str) -> Any:
        v = rng.integers(-5, 1_000_000_000, n)
        miss = rng.random(n) < 0.3
        if kind == "Int64":
            return pd.array([None if m else int(x) for x, m in zip(v, miss, strict=True)],
                            dtype="Int64")
        if kind == "float":
            return np.where(miss, np.nan, v.astype(float))
        return pd.Series([None if m else int(x) for x, m in zip(v, miss, strict=True)],
                         dtype=object)

    for kind in ("Int64", "float", "object"):  # as checked; as read back from either store
        frame = pd.DataFrame({c: col(kind) for c in _CONTENT}, index=np.arange(3, n + 3))
        fp = _fingerprint(frame)
        assert fp.tolist() == _plain_fingerprint(frame)
        assert list(fp.index) == list(frame.index) and fp.dtype == "str"
    assert _fingerprint(frame.iloc[:0]).empty


def _plain_entity_fp(frame: pd.DataFrame, fields: list[str]) -> list[str]:
    return ["|".join(_norm(v) for v in row)
            for row in frame[fields].astype(object).itertuples(index=False)]


def test_entity_fingerprint_matches_the_plain_join() -> None:
    """Each field as ``_norm`` writes it, whatever the column holds: text with gaps,
    integers, nullable integers, floats (-0.0, NaN), dates, date-times, Timestamps,
    booleans, and object columns of mixed kinds (1, True and 1.0 are equal keys but
    are written "1", "True" and "1"; a date and a date-time of one day differ)."""
    frame = pd.DataFrame({
        "s": pd.array(["a", None, "c", "a", "a|b"], dtype="str"),
        "i": [1, 2, 3, 1, -7], "I": pd.array([1, None, 3, 1, 1], dtype="Int64"),
        "fl": [1.0, np.nan, 2.5, -0.0, 1e16],
        "d": [date(2025, 1, 2), None, date(2025, 1, 2), pd.NaT, date(1999, 12, 31)],
        "dt": [datetime(2025, 1, 2, 3, 4), None, datetime(2025, 1, 2),
               datetime(2025, 1, 2, 3, 4), datetime(2025, 1, 2, 3, 4, 5, 6)],
        "mix": [1, True, 1.0, None, 2.5],
        "mixd": [date(2025, 1, 1), datetime(2025, 1, 1), None, "x", date(2025, 1, 1)],
        "b": pd.array([True, None, False, True, True], dtype="boolean"),
        "bo": [True, False, True, True, False],
        "ts": pd.to_datetime(["2025-01-01", None, "2025-01-01 10:00", "2025-01-01",
                              "2025-01-01"], format="ISO8601"),
        "none": [None] * 5,
    }, index=np.arange(10, 15))
    fields = list(frame.columns)
    fp = _entity_fp(frame, fields)
    assert fp.tolist() == _plain_entity_fp(frame, fields)
    assert fp.tolist()[1] == "|2|||||True|2025-01-01T00:00:00||False||"
    assert list(fp.index) == list(frame.index) and fp.dtype == "str"
    assert _entity_fp(frame.iloc[:0], fields).empty


def test_bulk_insert_stores_dates_as_sqlalchemy_does(store: Store) -> None:
    """Episode and goal rows written by the bulk path read back, value and type, as the
    same rows written by SQLAlchemy's insert."""
    eps = pd.DataFrame({"episode_id": ["A", "B"], "client_id": ["c1", "c2"],
                        "therapist_id": ["t1", "t1"], "team": ["North", None],
                        "start_date": [date(2024, 1, 31), date(1999, 12, 1)],
                        "end_date": [None, date(2025, 2, 28)], "end_reason": [None, "completed"],
                        "batch_id": [1, 1]})
    plan = pd.DataFrame({"episode_id": ["A", "B"], "version": [1, 1],
                         "created_at": [datetime(2026, 1, 2, 3, 4, 5, 6)] * 2,
                         "batch_id": [1, 1]})
    goal = pd.DataFrame({"episode_id": ["A", "B"], "plan_version": [1, 1],
                         "goal_id": ["g1", "g1"], "measure": ["PHQ-9", "GAD-7"],
                         "kind": ["below", "remission"], "target": [10.0, 7.5],
                         "due_date": [date(2026, 3, 1), None], "due_session": [None, 12],
                         "sustain": [1, 2], "description": ["under ten", None]})
    read: dict[str, list[pd.DataFrame]] = {}
    for how in ("bulk", "sqlalchemy"):
        with store.transaction() as conn:
            for table, frame in ((episodes, eps), (plans, plan), (goals, goal)):
                conn.execute(table.delete())
                if how == "bulk":
                    bulk_insert(conn, table, frame)
                else:
                    conn.execute(table.insert(), [
                        {k: (None if v is None or (isinstance(v, float) and np.isnan(v))
                             else v) for k, v in r.items()}
                        for r in frame.astype(object).to_dict(orient="records")])
            # Raw driver values: the text SQLite holds, or PostgreSQL's typed values.
            read[how] = [read_frame(conn, sa.select(t).order_by(*t.primary_key.columns),
                                    raw=True) for t in (episodes, plans, goals)]
    for bulk, plain in zip(read["bulk"], read["sqlalchemy"], strict=True):
        pd.testing.assert_frame_equal(bulk, plain, check_exact=True)
        for c in bulk.columns:  # the same Python types, value by value
            assert [type(v) for v in bulk[c]] == [type(v) for v in plain[c]], c
    assert str(read["bulk"][0]["start_date"].iloc[0]).startswith("2024-01-31")


def test_bulk_insert_in_chunks_stores_the_same_rows(store: Store) -> None:
    """Rows written a few at a time read back exactly as rows written in one go, though
    a chunk may hold only missing values of a column, or only whole numbers of a float."""
    goal = pd.DataFrame({"episode_id": [f"E{i}" for i in range(7)], "plan_version": 1,
                         "goal_id": "g1", "measure": "PHQ-9", "kind": "below",
                         "target": [10.0, 7.0, 7.5, 5.0, 6.0, 4.0, 3.25],
                         "due_date": [None, None, date(2026, 3, 1), None, None, None,
                                      date(2027, 1, 2)],
                         "due_session": [None, None, None, 12, None, 4, None],
                         "sustain": [1, 2, 1, 1, 3, 1, 2],
                         "description": [None, "x", None, None, "y", None, None]})
    read = []
    for chunk in (100_000, 2, 1):
        with store.transaction() as conn:
            conn.execute(goals.delete())
            bulk_insert(conn, goals, goal, chunk_rows=chunk)
            read.append(read_frame(conn, sa.select(goals).order_by(goals.c.episode_id),
                                   raw=True))
    # Chosen rows by position, a chunk at a time: the rows of the filtered frame.
    pick = np.array([5, 0, 2, 6])
    for chunk in (100_000, 3, 1):
        with store.transaction() as conn:
            conn.execute(goals.delete())
            bulk_insert(conn, goals, goal, chunk_rows=chunk, positions=pick)
            read.append(read_frame(conn, sa.select(goals).order_by(goals.c.episode_id),
                                   raw=True))
    with store.transaction() as conn:
        conn.execute(goals.delete())
        bulk_insert(conn, goals, goal.iloc[pick])
        picked = read_frame(conn, sa.select(goals).order_by(goals.c.episode_id), raw=True)
        conn.execute(goals.delete())
        bulk_insert(conn, goals, goal, positions=np.array([], dtype=np.int64))
        assert read_frame(conn, sa.select(goals), raw=True).empty
    assert len(read[0]) == 7 and len(picked) == 4
    for other in read[1:3]:
        pd.testing.assert_frame_equal(other, read[0], check_exact=True)
    for other in read[3:]:
        pd.testing.assert_frame_equal(other, picked, check_exact=True)


def test_dates_are_formatted_as_sqlalchemy_writes_them_repeated_or_not() -> None:
    """The bulk path's date text (each distinct value formatted once when values
    repeat, value by value when they do not): SQLAlchemy's SQLite format, to the
    microsecond, and NaN where a value is missing."""
    from pipeline.store import _SQL_DATE, _SQL_DATETIME, _formatted

    ten = datetime(2026, 1, 5, 10)
    repeated = pd.Series([ten, None, ten, ten, datetime(2027, 2, 28, 23, 59, 59, 1)],
                         dtype="datetime64[us]")
    got = _formatted(repeated, _SQL_DATETIME)
    assert list(got[[0, 2, 3, 4]]) == ["2026-01-05 10:00:00.000000"] * 3 + \
        ["2027-02-28 23:59:59.000001"]
    assert isinstance(got[1], float) and np.isnan(got[1])
    assert list(_formatted(repeated.iloc[[4, 0]], _SQL_DATE)) == ["2027-02-28", "2026-01-05"]
    assert np.isnan(_formatted(pd.Series([pd.NaT] * 3, dtype="datetime64[us]"),
                               _SQL_DATE).astype(float)).all()
    assert len(_formatted(pd.Series([], dtype="datetime64[us]"), _SQL_DATETIME)) == 0
