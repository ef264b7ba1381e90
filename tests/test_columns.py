"""pipeline.columns.is_in against Python's own set membership."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.columns import is_in


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
