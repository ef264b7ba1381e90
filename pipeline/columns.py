"""Column operations pandas does slowly on Arrow-backed text, done by Arrow compute."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["as_mask", "is_in"]


def _text(values: pd.Series | pd.Index | Iterable[str]) -> pa.Array:
    if not isinstance(values, pd.Series | pd.Index | np.ndarray | list):
        values = list(values)  # a set or another iterable
    return pa.array(values, from_pandas=True).cast(pa.large_string())


def is_in(values: pd.Series | pd.Index | Iterable[str],
          among: pd.Series | pd.Index | Iterable[str]) -> npt.NDArray[np.bool_]:
    """Boolean array: is each text value one of ``among``? (a missing value never is).

    ``Series.isin`` on pandas' Arrow-backed ``str`` columns builds a Python list of the
    candidates and took 3 s for 1.1M values against 550k; Arrow's hash lookup takes 0.2 s.
    """
    # A value set with repeats (one id per administration) is deduplicated first: Arrow
    # hashes every element of the set, and unique() hashes them more cheaply.
    hit = pc.is_in(_text(values), value_set=pc.unique(_text(among)), skip_nulls=True)
    return as_mask(hit)


def as_mask(flags: pa.Array) -> npt.NDArray[np.bool_]:
    """An Arrow boolean array as a numpy boolean array, a missing value as False."""
    return np.asarray(flags.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
