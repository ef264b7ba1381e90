""":func:`pipeline.store.stored_frame`: a frame as reading it back would give it.

The column-wise array path against the per-value list it replaced (the constructor's
inference over ``_column_values``), and the whole claim against a real read on both
stores, on the tables a compute keeps in memory (outcomes, sudden changes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

import pipeline.compute as compute_module
from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.store import Store, _column_values, _stored_column, read_frame
from tests.conftest import NOW, SAMPLE_INPUT, ingest

DATES: list[sa.types.TypeEngine[Any]] = [sa.DateTime(), sa.Date()]
NUMBERS: list[sa.types.TypeEngine[Any]] = [sa.Integer(), sa.Float()]


def _columns(rng: np.random.Generator, n: int
             ) -> list[tuple[pd.Series, list[sa.types.TypeEngine[Any]]]]:
    """Columns as the statistics give them, each with the column types it is written
    to: every dtype, with none, some or all values missing, and empty."""
    when = pd.Series(pd.to_datetime("2024-01-01") + pd.to_timedelta(
        rng.integers(0, 10**12, n), unit="us")).astype("datetime64[us]")
    whole = rng.integers(-50, 50, n).astype(float)
    out = [(when, DATES), (pd.Series(rng.random(n) < 0.5), [sa.Boolean()]),
           (pd.Series(rng.integers(-9, 9, n)), NUMBERS), (pd.Series(whole), NUMBERS),
           (pd.Series(whole + 0.25), NUMBERS), (pd.Series(rng.normal(size=n)), NUMBERS),
           (pd.Series([f"t{i % 7}" for i in range(n)], dtype="str"), [sa.String(20)]),
           (pd.Series(rng.integers(0, 9, n)).astype("Int64"), NUMBERS)]
    variants = []
    for c, kinds in out:
        variants.append((c, kinds))
        for share in (0.3, 1.0):
            miss = rng.random(n) < share
            if c.dtype == bool:  # as a nullable boolean arrives: Python bools and None
                variants.append((pd.Series(np.where(miss, None, c.astype(object)),
                                           dtype=object), kinds))
            else:
                variants.append((c.mask(miss), kinds))
        variants.append((c.iloc[:0], kinds))
    return variants


def _reference(col: pd.Series, kind: sa.types.TypeEngine[Any], dialect: str) -> pd.Series:
    """What the constructor infers from the values given to the driver."""
    return pd.DataFrame({col.name: _column_values(col, kind, dialect)})[col.name]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_stored_column_is_what_the_value_list_gives(dialect: str) -> None:
    rng = np.random.default_rng(3)
    checked = 0
    for col, kinds in _columns(rng, 300):
        for kind in kinds:
            col = col.rename("x")
            want = _reference(col, kind, dialect)
            got = _stored_column(col, kind, dialect)
            pd.testing.assert_series_equal(got, want, check_exact=True)
            assert isinstance(got.index, pd.RangeIndex)
            checked += 1
    assert checked == 4 * (2 + 1 + 5 * 2 + 1)  # four variants of each pairing


def test_stored_column_keeps_a_fraction_in_an_integer_column() -> None:
    """An integer column given 2.5 stores 2.5 (never truncated), as the list did."""
    col = pd.Series([2.0, 2.5, np.nan], name="x")
    got = _stored_column(col, sa.Integer(), "sqlite")
    assert got.tolist()[:2] == [2.0, 2.5] and np.isnan(got.iloc[2])
    assert _stored_column(pd.Series([2.0, 3.0], name="x"), sa.Integer(), "sqlite"
                          ).dtype == np.int64


def test_stored_frame_is_what_reading_back_gives(store: Store, settings: Settings,
                                                 registry: Registry,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The frames a full compute keeps instead of reading outcomes and sudden changes
    back equal, dtype and value, what reading those tables back gives."""
    kept: dict[str, pd.DataFrame] = {}
    real = compute_module.stored_frame

    def spy(table: sa.Table, frame: pd.DataFrame, dialect: str) -> pd.DataFrame:
        got = real(table, frame, dialect)
        kept[table.name] = got.copy()  # the compute converts its columns in place later
        return got

    monkeypatch.setattr(compute_module, "stored_frame", spy)
    ingest([SAMPLE_INPUT], store, settings, registry)
    compute(store, settings, registry, full=True, now=NOW)
    assert set(kept) == {"outcomes", "sudden_changes"}
    with store.engine.connect() as conn:
        for name, frame in kept.items():
            table = sa.Table(name, sa.MetaData(), autoload_with=conn)
            key = [c.name for c in table.primary_key.columns]
            back = read_frame(conn, sa.select(table), raw=True)
            assert len(back) == len(frame) > 0
            back = back.sort_values(key, ignore_index=True)
            frame = frame.sort_values(key, ignore_index=True)
            # Datetimes are what the consumers convert with pandas: SQLite gives the
            # stored text, PostgreSQL datetime objects, the kept frame the text.
            for c in table.c:
                if isinstance(c.type, (sa.DateTime, sa.Date)):
                    back[c.name] = pd.to_datetime(back[c.name])
                    frame[c.name] = pd.to_datetime(frame[c.name])
            pd.testing.assert_frame_equal(frame, back[frame.columns], check_exact=True)
