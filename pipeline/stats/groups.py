"""Administrations ordered into episode x measure groups, once, for every statistic.

Each statistic of a partition needs the same thing first: the rows in
``(episode_id, measure, administered_at)`` order with a group code, the group
boundaries and each row's position in its group. Sorting text keys is the costliest
step of a pass, so the keys are factorised (hashing) into integer codes whose order is
the text order, and only the integer group key is sorted (a stable sort, so rows of a
group keep their input order). Rows usually arrive in time order within an episode
(ingest order); when they do not, a stable ``np.lexsort`` on ``(time, group key)``
orders them. Either way the order is that of ``DataFrame.sort_values(kind="stable")``
on the three keys.

Rows already in that order (the Parquet export writes each partition so) are taken as
they are: comparing each row's keys with the previous row's (Arrow kernels, ~0.03 s a
text column at 10M rows) finds the group boundaries and shows the order holds, so no
factorising, no sort and no gathering is needed (the column readers return slices).

The frame itself is not reordered: statistics read the columns they need through
:meth:`Grouped.values` (every row, in group order) or :meth:`Grouped.first` (one value
per group), so text columns are gathered only at the group starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import as_mask
from pipeline.errors import UsageError

__all__ = ["Grouped", "group_administrations", "in_group_order", "stable_order"]


@dataclass(frozen=True)
class Grouped:
    """Administrations in group and time order, with the group structure as arrays."""

    #: the administrations as given (not reordered).
    source: pd.DataFrame
    #: row positions of ``source`` in group order.
    order: npt.NDArray[np.int64]
    #: group code of each ordered row, 0..n_groups-1 in (episode_id, measure) order.
    gid: npt.NDArray[np.int64]
    #: first and last ordered row (inclusive) of each group.
    starts: npt.NDArray[np.int64]
    ends: npt.NDArray[np.int64]
    #: 1-based position of each ordered row in its group (the administration number).
    k: npt.NDArray[np.int64]
    #: each group's measure, as a code into ``measures`` (the distinct measures, sorted).
    mcode: npt.NDArray[np.int64]
    measures: npt.NDArray[np.object_]
    #: when not None, ``order`` is ``arange(offset, offset + len(order))``: the source's
    #: rows are already in group order, and columns are read as slices, not gathered.
    offset: int | None = None

    @property
    def n_groups(self) -> int:
        return int(self.starts.size)

    @property
    def sizes(self) -> npt.NDArray[np.int64]:
        return self.ends - self.starts + 1

    def per_measure(self, values: dict[str, Any], default: Any = None,
                    dtype: Any = None) -> np.ndarray:
        """One value per group from a measure -> value mapping (``default`` for others),
        looked up by measure code rather than by text."""
        table = np.array([values.get(m, default) for m in self.measure_index], dtype=dtype)
        return table[self.mcode] if table.size else np.array([], dtype=table.dtype)

    def values(self, column: str, dtype: Any = None, na_value: Any = None) -> np.ndarray:
        """``column`` as a numpy array (``Series.to_numpy`` options), in group order.

        The array may be read-only (a slice of the frame, or Arrow memory): copy it
        before writing to it."""
        # Only this part's rows are converted: each part of a split source must not
        # pay for converting every row (e.g. a nullable column to float).
        data = self.source[column].array
        data = data.take(self.order) if self.offset is None else \
            data[self.offset:self.offset + self.order.size]
        array = np.asarray(data.to_numpy(dtype=dtype) if na_value is None else
                           data.to_numpy(dtype=dtype, na_value=na_value))
        if self.offset is not None:
            # A slice may share the frame's memory: read-only, so no statistic can
            # change the source through it.
            array.flags.writeable = False
        return array

    def first(self, columns: list[str]) -> pd.DataFrame:
        """``columns`` at each group's first row: one row per group, index 0..n-1."""
        return self.source[columns].take(self.order[self.starts]).reset_index(drop=True)

    def split(self, parts: int) -> list[Grouped]:
        """The groups cut into ``parts`` runs of consecutive groups, each a
        :class:`Grouped` over the same source (the source is not copied; each part's
        index arrays are slices, shifted to start at 0). A statistic
        of one group reads only that group's rows, so each part can be computed alone,
        e.g. in its own thread, and the results concatenated in part order."""
        cuts = np.unique(np.linspace(0, self.n_groups, max(parts, 1) + 1).astype(np.int64))
        out = []
        for g0, g1 in zip(cuts[:-1], cuts[1:], strict=True):
            r0, r1 = int(self.starts[g0]), int(self.ends[g1 - 1]) + 1
            out.append(Grouped(self.source, self.order[r0:r1], self.gid[r0:r1] - g0,
                               self.starts[g0:g1] - r0, self.ends[g0:g1] - r0,
                               self.k[r0:r1], self.mcode[g0:g1], self.measures,
                               None if self.offset is None else self.offset + r0))
        return out or [self]

    @cached_property
    def measure_index(self) -> dict[str, int]:
        """Measure -> its code in :attr:`mcode`."""
        return {str(name): i for i, name in enumerate(self.measures)}

    @cached_property
    def heads(self) -> pd.DataFrame:
        """``episode_id`` and ``measure`` of each group (:meth:`first`), gathered once per
        :class:`Grouped` for every statistic that needs them; callers copy it before
        adding columns."""
        return self.first(["episode_id", "measure"])

    @cached_property
    def frame(self) -> pd.DataFrame:
        """The whole frame in group order (every column gathered: for tests and tools)."""
        return self.source.take(self.order).reset_index(drop=True)


def group_administrations(admins: pd.DataFrame) -> Grouped:
    """Order ``admins`` into episode x measure groups (stable: ties keep input order).

    Parameters
    ----------
    admins
        At least ``episode_id``, ``measure`` and ``administered_at``.
    """
    n = len(admins)
    if n == 0:
        empty = np.array([], dtype=np.int64)
        return Grouped(admins.reset_index(drop=True), empty, empty, empty, empty, empty,
                       empty, np.array([], dtype=object))
    at = admins["administered_at"].to_numpy().astype("datetime64[us]").view(np.int64)
    new = _boundaries_if_ordered(admins, at)
    if new is not None:
        starts = np.flatnonzero(new).astype(np.int64, copy=False)
        mcode, measures = pd.factorize(admins["measure"].take(starts), sort=True)
        return _grouped(admins.reset_index(drop=True), np.arange(n, dtype=np.int64), new,
                        starts, mcode.astype(np.int64, copy=False), measures, offset=0)
    # Each new array of 10M rows costs ~0.15 s in first-touched pages alone on these
    # machines, so the arrays are few and worked on in place.
    episode = pd.factorize(admins["episode_id"], sort=True)[0].astype(np.int64, copy=False)
    measure, measures = pd.factorize(admins["measure"], sort=True)
    measure = measure.astype(np.int64, copy=False)
    if episode.min() < 0 or measure.min() < 0:  # factorize codes a missing value as -1
        raise UsageError("administrations without an episode_id or a measure cannot be "
                         "grouped", fix="drop or quarantine them first (the store never "
                         "holds such rows)")
    group_key = episode  # episode * n_measures + measure, in the codes' own buffer
    group_key *= int(measure.max()) + 1
    group_key += measure
    order = stable_order(group_key)
    key = group_key[order]
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(key[1:], key[:-1], out=new[1:])
    t = at[order]
    if not bool(np.all(new[1:] | (t[1:] >= t[:-1]))):
        # Some group's rows are not in time order: sort by time within groups too.
        order = np.lexsort((at, group_key))
    del t, key
    starts = np.flatnonzero(new).astype(np.int64, copy=False)
    return _grouped(admins.reset_index(drop=True), order.astype(np.int64, copy=False), new,
                    starts, measure[order[starts]], measures)


def in_group_order(admins: pd.DataFrame) -> bool:
    """Whether ``admins`` is already in (episode_id, measure, administered_at) order,
    the order :func:`group_administrations` takes without sorting."""
    if admins.empty:
        return True
    at = admins["administered_at"].to_numpy().astype("datetime64[us]").view(np.int64)
    return _boundaries_if_ordered(admins, at) is not None


def _grouped(source: pd.DataFrame, order: npt.NDArray[np.int64],
             new: npt.NDArray[np.bool_], starts: npt.NDArray[np.int64],
             mcode: npt.NDArray[np.int64], measures: Any,
             offset: int | None = None) -> Grouped:
    """The group arrays from the ordered rows' group starts (``new``: row starts one)."""
    n = order.size
    ends = np.r_[starts[1:], n].astype(np.int64) - 1
    gid = np.cumsum(new, dtype=np.int64)
    gid -= 1
    # k = position in the group, 1-based: ones, with each group's first row stepping
    # back by the previous group's size, summed.
    k = np.ones(n, dtype=np.int64)
    k[starts[1:]] -= ends[:-1] - starts[:-1] + 1
    np.cumsum(k, out=k)
    return Grouped(source, order, gid, starts, ends, k, mcode,
                   np.asarray(measures, dtype=object), offset)


def _text(column: pd.Series) -> pa.Array | pa.ChunkedArray | None:
    """An Arrow-backed text column as Arrow data (no copy); None for other storage,
    which would have to be converted value by value."""
    dtype = column.dtype
    arrow = (isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow") or \
        (isinstance(dtype, pd.ArrowDtype) and (pa.types.is_string(dtype.pyarrow_dtype)
                                               or pa.types.is_large_string(dtype.pyarrow_dtype)))
    if not arrow:
        return None
    return pa.array(column.array)


def _descends(values: pa.Array | pa.ChunkedArray) -> bool:
    """Whether some value is less than the one before it."""
    return bool(len(values) > 1 and pc.any(pc.less(values[1:], values[:-1])).as_py())


def _boundaries_if_ordered(admins: pd.DataFrame, at: npt.NDArray[np.int64]
                           ) -> npt.NDArray[np.bool_] | None:
    """Where each row starts a new (episode_id, measure) group, when the rows are
    already in (episode_id, measure, administered_at) order; None when they are not (or
    a key is missing or not Arrow text: the sorting path handles, or refuses, those).

    Text compares as the sort compares it: Arrow orders UTF-8 bytes, which is code
    point order, the order of Python's ``str`` and of pandas' sort. Times compare as the
    sorting path's int64 view (NaT first).
    """
    episode, measure = _text(admins["episode_id"]), _text(admins["measure"])
    if episode is None or measure is None or episode.null_count or measure.null_count:
        return None

    def pairs(values: pa.Array, op: str) -> npt.NDArray[np.bool_]:
        return as_mask(pc.call_function(op, [values[1:], values[:-1]]))

    # The common unordered case stops at the first rows (before a chained column is
    # joined into one piece), or else after one pass.
    if _descends(episode.slice(0, 4096)):
        return None
    episode, measure = (v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v
                        for v in (episode, measure))
    if _descends(episode):
        return None
    same_episode = pairs(episode, "equal")
    same_group = same_episode & pairs(measure, "equal")
    backwards = same_episode & pairs(measure, "less")
    backwards |= same_group & (at[1:] < at[:-1])
    if backwards.any():
        return None
    new = np.empty(at.size, dtype=bool)
    new[0] = True
    np.logical_not(same_group, out=new[1:])
    return new


def stable_order(key: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """``np.argsort(key, kind="stable")`` for non-negative integer keys, in linear time.

    Keys no larger than a few times their count (group codes are) go through pandas'
    counting sort (``groupsort_indexer``, the one its groupby uses): 0.2 s for 9.7M keys
    against 0.8 s for the radix sort below. Wider keys, or a pandas without it, take an
    LSD radix sort over the key's 16-bit digits: numpy sorts 16-bit integers stably by
    radix sort (linear time) but wider ones by timsort (0.74 s), and each pass is stable,
    so the passes give the same order.
    """
    top = int(key.max()) if key.size else 0
    if key.size and int(key.min()) < 0:
        raise UsageError("stable_order needs non-negative keys",
                         fix="offset the keys by their minimum first")
    key = key.astype(np.int64, copy=False)
    if key.size and top < max(1 << 16, 4 * key.size):
        try:
            from pandas._libs.algos import groupsort_indexer
        except ImportError:  # private to pandas: the radix path stands in
            pass
        else:
            order, _ = groupsort_indexer(key.astype(np.intp, copy=False), top + 1)
            return np.asarray(order, dtype=np.int64)
    # The key's 16-bit digits as strided views of its own bytes (no shifted copy).
    lanes = key.view(np.uint16).reshape(-1, 4)
    little = np.little_endian
    order_: npt.NDArray[np.int64] | None = None
    shift = 0
    while order_ is None or (top >> shift) > 0:
        digit = lanes[:, shift // 16 if little else 3 - shift // 16]
        order_ = np.argsort(digit, kind="stable") if order_ is None else \
            order_[np.argsort(digit[order_], kind="stable")]
        shift += 16
    return order_.astype(np.int64, copy=False)
