"""pipeline.columns: is_in against Python's own set membership, to_datetimes against
pd.to_datetime and hand-written instants."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.columns import is_in, one_chunk, to_datetimes


@pytest.mark.parametrize("kind", ["series", "set", "list with repeats", "index"])
def test_is_in_matches_set_membership(kind: str) -> None:
    rng = np.random.default_rng(4)
    pool = ["E1", "e1", "É1", "E1 ", "", "E10", "Z"]
    values = pd.Series(list(rng.choice(pool, 200)) + [None], dtype="str")
    chosen = ["E1", "É1", "", "nowhere"]
    among = {"series": pd.Series(chosen * 3, dtype="str"), "set": set(chosen),
             "list with repeats": chosen * 5, "index": pd.Index(chosen)}[kind]
    expected = [v in set(chosen) for v in values.tolist()[:-1]] + [False]
    assert is_in(values, among).tolist() == expected
    assert is_in(values, among).dtype == bool


def test_is_in_empty_sides() -> None:
    assert is_in(pd.Series(["a"], dtype="str"), []).tolist() == [False]
    assert is_in(pd.Series([], dtype="str"), {"a"}).tolist() == []


REPEATED = ["2024-01-05 10:00:00.000000", None, "2024-01-05 10:00:00.000000",
            "2024-02-29 23:00:00.000000"] * 3


@pytest.mark.parametrize(("values", "kwargs"), [
    (pd.Series(REPEATED, dtype="str", index=range(10, 22), name="at"), {}),
    (pd.Series(["2024-01-01", "2024-01-02"] * 4 + [None], dtype=object), {}),
    (pd.Series(["2024-01-01T10:00:00+01:00"] * 2 + ["not a date"] * 2, dtype="str"),
     {"format": "ISO8601", "utc": True, "errors": "coerce"}),
    (pd.Series([None, None, None], dtype="str"), {}),
    (pd.Series(["2024-01-01", "2024-01-02", "2024-01-03"], dtype="str"), {}),  # distinct
    (pd.Series(pd.to_datetime(["2024-01-01"] * 3)), {}),  # not text
])
def test_to_datetimes_is_pd_to_datetime(values: pd.Series, kwargs: dict) -> None:
    got = to_datetimes(values, **kwargs)
    expected = pd.to_datetime(values, **kwargs)
    pd.testing.assert_series_equal(got, expected)
    assert got.dtype == expected.dtype


def test_to_datetimes_values_by_hand() -> None:
    got = to_datetimes(pd.Series(REPEATED, dtype="str"))
    assert got.dtype == "datetime64[us]"
    assert got.iloc[0] == pd.Timestamp(2024, 1, 5, 10) == got.iloc[2]
    assert got.iloc[3] == pd.Timestamp(2024, 2, 29, 23)
    assert got.isna().tolist() == [v is None for v in REPEATED]


def test_to_datetimes_raises_as_pandas_does() -> None:
    values = pd.Series(["2024-01-01 10:00:00"] * 2 + ["2024-13-01 10:00:00"] * 2, dtype="str")
    with pytest.raises(ValueError):
        pd.to_datetime(values)
    with pytest.raises(ValueError):
        to_datetimes(values)


def test_one_chunk_joins_the_pieces_of_a_text_column() -> None:
    parts = [pd.Series(["a", None, "c"], dtype="str"), pd.Series(["d", "e"], dtype="str")]
    chained = pd.concat(parts, ignore_index=True)
    assert pa.array(chained.array).num_chunks == 2
    joined = one_chunk(chained.rename("x"))
    assert not isinstance(pa.array(joined.array), pa.ChunkedArray) or \
        pa.array(joined.array).num_chunks == 1
    assert joined.tolist()[0] == "a" and pd.isna(joined.iloc[1])
    assert joined.tolist()[2:] == ["c", "d", "e"]
    assert joined.dtype == chained.dtype and joined.name == "x"
    numbers = pd.Series([1, 2])
    assert one_chunk(numbers) is numbers
