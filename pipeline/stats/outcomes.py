"""Per episode x measure outcomes: one vectorised pass over a partition of episodes.

:func:`episode_outcomes` is the single production implementation; it needs only the
administrations of the episodes it is given plus the *reference* (baseline SDs and
expected recovery curves, built over the whole store), so it runs unchanged on a pandas
partition of episodes (and so on Dask).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from pipeline.config import Settings
from pipeline.memory import trim_heap
from pipeline.scales import Registry
from pipeline.stats.change import (
    CATEGORY_BY_CODE,
    DIRECTION_BY_CODE,
    clinical_cutoff,
    clinical_significance_codes,
    fixed_point_codes,
)
from pipeline.stats.curves import band_codes, curve_points
from pipeline.stats.gains import sudden_changes
from pipeline.stats.groups import Grouped, group_administrations
from pipeline.stats.trend import trend_arrays

__all__ = ["Reference", "SUDDEN_COLUMNS", "episode_outcomes", "episode_outcomes_in_parts",
           "max_gain_columns"]

SUDDEN_COLUMNS = ["episode_id", "measure", "kind", "pregain_session", "size",
                  "score_before", "score_after", "n_pre", "n_post", "crit3_adjusted"]
max_gain_columns = 200  # sessions beyond this are not scanned for sudden gains
_TREND_STATUS = np.array(["ok", "insufficient data"], dtype=object)


@dataclass(frozen=True)
class Reference:
    """Whole-store reference statistics a partition needs."""

    #: measure -> SD of baseline scores (n-1) used for the RCI.
    sd: dict[str, float] = field(default_factory=dict)
    #: measure -> where that SD came from.
    sd_source: dict[str, str] = field(default_factory=dict)
    #: expected recovery curves (see :func:`pipeline.stats.curves.build_curves`).
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)


def episode_outcomes(admins: pd.DataFrame, registry: Registry, settings: Settings,
                     reference: Reference, grouped: Grouped | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Outcomes of every episode x measure in ``admins``, and their sudden gains/losses.

    Parameters
    ----------
    admins
        ``episode_id, measure, administered_at, score`` (+ optional ``session_number``):
        every scored administration of the episodes in this partition.
    registry, settings
        Scale definitions and thresholds.
    reference
        Baseline SDs and expected recovery curves.
    grouped
        ``admins`` already ordered by :func:`group_administrations` (a caller that also
        builds the reference partials from the same rows sorts them once).

    Returns
    -------
    (outcomes, sudden)
        ``outcomes``: one row per episode x measure (see ``pipeline.store.outcomes``
        for the columns and SPEC sections). ``sudden``: one row per sudden gain or loss.
    """
    if admins.empty:
        return pd.DataFrame(columns=["episode_id", "measure"]), \
            pd.DataFrame(columns=SUDDEN_COLUMNS)
    g = grouped if grouped is not None else group_administrations(admins)
    gid_np, starts, ends, k = g.gid, g.starts, g.ends, g.k
    n_groups = g.n_groups
    score = g.values("score", dtype=np.int64)
    at = g.values("administered_at")
    date = at.astype("datetime64[D]")
    day = (date - date[starts][gid_np]).astype(np.int64)

    # Columns are gathered as arrays and the frame is made once at the end: one
    # assignment into a DataFrame costs more than the arithmetic of most columns.
    heads = g.heads
    out: dict[str, Any] = {"episode_id": heads["episode_id"].array.copy(),
                           "measure": heads["measure"].array.copy()}
    n = (ends - starts + 1).astype(np.int64)
    first = score[starts]
    last = score[ends]
    out["n"] = n
    out["first_score"] = first
    out["first_at"] = at[starts]
    out["last_score"] = last
    out["last_at"] = at[ends]
    out["min_score"] = np.minimum.reduceat(score, starts) if starts.size else \
        np.array([], dtype=np.int64)
    out["max_score"] = np.maximum.reduceat(score, starts) if starts.size else \
        np.array([], dtype=np.int64)
    span_days = day[ends]
    weeks = span_days / 7.0
    out["weeks"] = weeks
    change = (last - first).astype(float)
    out["change"] = change
    with np.errstate(invalid="ignore", divide="ignore"):
        out["pct_change"] = np.where(first != 0, 100.0 * change / first, np.nan)

    mcode = g.mcode
    higher = g.per_measure({c: s.higher_is_better for c, s in registry.items()}, False,
                           dtype=bool)
    better_change = np.where(higher, change, -change)

    # Reliable change (JT, reference SD) and fixed points, one registry pass.
    rci = np.full(n_groups, np.nan)
    missing_dir = DIRECTION_BY_CODE.tolist().index(None)
    jt_cat = np.zeros(n_groups, dtype=np.int64)  # codes: CATEGORY_BY_CODE[0] is None
    jt_dir = np.full(n_groups, missing_dir, dtype=np.int64)
    fixed = np.full(n_groups, missing_dir, dtype=np.int64)
    sd_used = np.full(n_groups, np.nan)
    r_used = np.full(n_groups, np.nan)
    cut_used = np.full(n_groups, np.nan)
    case_first = np.full(n_groups, None, dtype=object)
    case_last = np.full(n_groups, None, dtype=object)
    remission = np.full(n_groups, None, dtype=object)
    rc_points = np.full(n_groups, np.nan)
    for code, scale in registry.items():
        if code not in g.measure_index:
            continue
        m = mcode == g.measure_index[code]
        if not m.any():
            continue
        caseness = settings.caseness(scale.caseness_setting, scale.caseness_cutoff)
        cut = clinical_cutoff(scale, caseness)
        sd = reference.sd.get(code)
        if sd and scale.reliability is not None and cut is not None:
            rci[m], jt_dir[m], jt_cat[m] = clinical_significance_codes(
                first[m], last[m], sd=sd, reliability=scale.reliability, cutoff=cut,
                higher_is_better=scale.higher_is_better, alpha=settings.rci_alpha)
            sd_used[m] = sd
            r_used[m] = scale.reliability
        if cut is not None:
            cut_used[m] = cut
        if scale.reliable_change_points is not None:
            fixed[m] = fixed_point_codes(first[m], last[m], points=scale.reliable_change_points,
                                         higher_is_better=scale.higher_is_better)
            rc_points[m] = scale.reliable_change_points
        if caseness is not None:
            ge = scale.caseness_comparison == ">="
            case_first[m] = first[m] >= caseness if ge else first[m] <= caseness
            case_last[m] = last[m] >= caseness if ge else last[m] <= caseness
        if scale.remission_below is not None:
            remission[m] = last[m] < scale.remission_below
    out["sd_used"] = sd_used
    out["r_used"] = r_used
    out["clinical_cutoff"] = cut_used
    out["rci"] = rci
    out["jt_direction"] = _text(DIRECTION_BY_CODE, jt_dir)
    out["jt_category"] = _text(CATEGORY_BY_CODE, jt_cat)
    out["rc_points"] = rc_points
    out["fixed_change"] = _text(DIRECTION_BY_CODE, fixed)
    out["caseness_first"] = case_first
    out["caseness_last"] = case_last
    # Response (>= 50% reduction from baseline, NQF 1885) is undefined for a baseline of 0,
    # as pct_change is: missing, not "responded" (0 -> 0 would pass 0 >= 0).
    out["response"] = pd.arrays.BooleanArray(
        np.where(first != 0, 100.0 * better_change >= settings.response_pct * first, False),
        first == 0)
    out["remission"] = remission

    # Trend: closed-form grouped sums.
    trend = trend_arrays(gid_np, day, score, n_groups)
    for name, values in trend.items():
        if name != "n":
            out[name] = values

    # Stalled (SPEC §6): exact integer comparison of the slope with its threshold.
    reliable_method = settings.reliable_change_method
    improved = (fixed if reliable_method == "fixed" else jt_dir) == \
        DIRECTION_BY_CODE.tolist().index("improved")
    num = n * trend["sum_dy"] - trend["sum_d"] * trend["sum_y"]
    den = n * trend["sum_dd"] - trend["sum_d"] ** 2
    thr = Fraction(settings.stalled_slope_per_week).limit_denominator(10**6)
    lhs = 7 * num * thr.denominator
    rhs = thr.numerator * den
    slow = np.where(higher, lhs < -rhs, lhs > rhs) & (den > 0)
    ci_zero = (trend["slope_ci_low"] <= 0) & (trend["slope_ci_high"] >= 0)  # NaN: False
    eligible = (n >= settings.stalled_min_administrations) & \
        (weeks >= settings.stalled_min_weeks)
    out["stalled"] = eligible & ~improved & (ci_zero | slow)
    out["stalled_slow_slope"] = slow & (n >= 3)
    out["stalled_ci_includes_zero"] = ci_zero

    # Expected recovery curves and not on track at the latest administration.
    band, bands = band_codes(mcode, list(g.measure_index), first.astype(float), registry)
    out["band"] = _text(np.array(bands, dtype=object), band)
    out["k_last"] = n.copy()  # the frame takes its arrays uncopied: one array a column
    prev_score = np.where(n >= 2, score[np.maximum(ends - 1, 0)], -1)
    measures = list(g.measure_index)
    cur = curve_points(reference.curves, mcode, measures, band, bands, n)
    prv = curve_points(reference.curves, mcode, measures, band, bands, np.maximum(n - 1, 1))
    out["expected_median"] = cur["median"]
    out["expected_upper"] = cur["upper"]
    out["expected_lower"] = cur["lower"]
    out["curve_source"] = cur["source"]
    k_from = settings.not_on_track_from
    bound = np.where(higher, cur["lower"], cur["upper"])
    not_ok = np.where(higher, last < bound, last > bound)
    judged = (n >= k_from) & ~np.isnan(bound)
    prev_bound = np.where(higher, prv["lower"], prv["upper"])
    prev_not_ok = np.where(higher, prev_score < prev_bound, prev_score > prev_bound)
    prev_judged = (n - 1 >= k_from) & ~np.isnan(prev_bound)
    out["not_on_track"] = pd.arrays.BooleanArray(np.where(judged, not_ok, False), ~judged)
    out["not_on_track_consecutive"] = judged & not_ok & prev_judged & prev_not_ok

    session = g.values("session_number", dtype=float, na_value=np.nan) \
        if "session_number" in admins.columns else None
    sudden, group_of = _sudden(score, k, session, gid_np, starts, heads, g, registry)
    # Count and first session per group and kind, by group code (no text-keyed merge).
    kind_of = sudden["kind"].to_numpy(dtype=object)
    pregain = sudden["pregain_session"].to_numpy(dtype=np.int64)
    for kind, n_col, first_col in (("gain", "sudden_gains", "first_sudden_gain"),
                                   ("loss", "sudden_losses", "first_sudden_loss")):
        of = kind_of == kind
        out[n_col] = np.bincount(group_of[of], minlength=n_groups).astype(np.int64)
        first_at = np.full(n_groups, np.iinfo(np.int64).max)
        np.minimum.at(first_at, group_of[of], pregain[of])
        none_yet = first_at == np.iinfo(np.int64).max
        out[first_col] = pd.arrays.IntegerArray(np.where(none_yet, 0, first_at), none_yet)
    out["trend_status"] = _text(_TREND_STATUS, (n < 3).astype(np.int64))
    # Uncopied (each array is this call's own, once), and not consolidated into 2-D
    # blocks: half the time of a copying constructor.
    return pd.DataFrame(out, copy=False), sudden


T = TypeVar("T")


def _text(labels: np.ndarray, code: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """A ``str`` column of ``labels[code]`` (a None label is missing), made by one Arrow
    gather rather than from a column of Python objects."""
    return pd.array(labels.tolist(), dtype="str").take(code)


def _in_threads(work: Callable[[Grouped], T], parts: list[Grouped], threads: int) -> list[T]:
    """``work`` on each part, in up to ``threads`` threads, results in part order.

    numpy releases the GIL in its array loops (sorting, gathering, arithmetic), which
    are most of a partition's statistics, so the parts run largely in parallel.
    """
    if threads <= 1 or len(parts) <= 1:
        return [work(p) for p in parts]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(work, parts))
    trim_heap()
    return results


def episode_outcomes_in_parts(admins: pd.DataFrame, registry: Registry, settings: Settings,
                              reference: Reference, grouped: Grouped, threads: int,
                              min_groups: int = 100_000, part_groups: int = 150_000
                              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`episode_outcomes` over runs of consecutive groups, in up to ``threads``
    threads, with the rows of a single call, in the same order.

    Each group's statistics read only its own rows and the reference, so a partition of
    the groups gives the same rows (as the Dask engine's partitions do). The runs hold
    at most ``part_groups`` groups (and there are at least ``threads`` of them): a
    run's temporary arrays then stay small enough to be reused from the heap, where
    10M-row ones would each be fresh pages (~2 s per GB on these machines); at 10M
    rows 8 runs of ~140k groups took 2.1 s on one thread against 4.0 s for one call.
    Below ``min_groups`` groups (an incremental run) one call does it all. Sudden
    changes come out of each call by measure (registry order), then kind, then group;
    the runs' rows are put back in that order by a stable sort.
    """
    if grouped.n_groups < min_groups:
        return episode_outcomes(admins, registry, settings, reference, grouped)
    parts = max(threads, -(-grouped.n_groups // max(part_groups, 1)))
    results = _in_threads(lambda part: episode_outcomes(admins, registry, settings, reference,
                                                      part),
                         grouped.split(parts), threads)
    # Every part gives each column one dtype (text columns are built as str even when
    # a part has no label at all), so the parts concatenate to one call's frame.
    out = pd.concat([r[0] for r in results], ignore_index=True)
    frames = [r[1] for r in results if not r[1].empty]
    if not frames:
        return out, results[0][1]
    sudden = pd.concat(frames, ignore_index=True)
    rank = {code: i for i, code in enumerate(registry)}
    by = sudden["measure"].map(rank).to_numpy(dtype=np.int64) * 2 + \
        (sudden["kind"] == "loss").to_numpy(dtype=np.int64)
    return out, sudden.take(np.argsort(by, kind="stable")).reset_index(drop=True)


def _sudden(score: np.ndarray, k: np.ndarray, session: np.ndarray | None, gid: np.ndarray,
            starts: np.ndarray, heads: pd.DataFrame, g: Grouped, registry: Registry
            ) -> tuple[pd.DataFrame, np.ndarray]:
    """Sudden gains and losses, and the group code of each, through
    :func:`~pipeline.stats.gains.sudden_changes` (the scan behind ``sudden_gains``).

    Scores are placed by ``session_number`` when every administration of the group has a
    distinct whole one (so a missing session leaves a gap), else by administration order.
    Arrays are per administration in group order (:class:`Grouped`).
    """
    n_groups = starts.size
    none = np.array([], dtype=np.int64)
    if n_groups == 0:
        return pd.DataFrame(columns=SUDDEN_COLUMNS), none
    col: np.ndarray | None = None  # each row's session column, 0-based
    if session is not None:
        sn = session
        # Every session numbered, by a whole number (validation accepts only those; a
        # caller's fractional number would share a column with another session).
        has_all = np.logical_and.reduceat(np.floor(sn) == sn, starts)  # NaN: False
        # Session numbers rising within a group are distinct: one pass. Only a group
        # where they do not rise is sorted to look for a repeated number.
        rising = np.empty(sn.size, dtype=bool)
        np.greater(sn[1:], sn[:-1], out=rising[1:])
        rising[starts] = True  # a group's first row
        distinct = np.logical_and.reduceat(rising, starts)
        suspect = has_all & ~distinct
        if suspect.any():
            rows = np.flatnonzero(suspect[gid])
            o = np.lexsort((sn[rows], gid[rows]))
            gs, ss = gid[rows][o], sn[rows][o]
            repeated = gs[1:][(gs[1:] == gs[:-1]) & (ss[1:] == ss[:-1])]
            distinct[suspect] = True
            distinct[repeated] = False
        usable_g = has_all & distinct
        if usable_g.all():  # the usual case: placed by session number throughout
            col = sn.astype(np.int64)
            col -= 1
        else:
            col = np.where(usable_g[gid], sn, k).astype(np.int64) - 1  # usable: no NaN
    if col is None:  # by administration order (made only when needed: 10M fresh rows)
        col = k - 1
    # The scores in long form for sudden_changes: sorted by group and session, each
    # session once (distinct by the choice above). Rows whose sessions are not in row
    # order are put in order within their group; sessions beyond max_gain_columns (or
    # numbered below 1) are not scanned.
    y = score
    backwards = np.diff(col) <= 0
    backwards[starts[1:] - 1] = False  # a group's last row and the next group's first
    if backwards.any():
        bad = np.zeros(n_groups, dtype=bool)
        bad[gid[1:][backwards]] = True
        rows = np.flatnonzero(bad[gid])
        moved = rows[np.lexsort((col[rows], gid[rows]))]
        col, y = col.copy(), y.copy()
        col[rows], y[rows] = col[moved], y[moved]
    del backwards
    keep = (col >= 0) & (col < max_gain_columns)
    g_row = gid
    if not keep.all():
        g_row, col, y = gid[keep], col[keep], y[keep]
    del keep
    cutoff = g.per_measure({c: s.reliable_change_points for c, s in registry.items()
                            if s.reliable_change_points is not None}, np.nan, dtype=float)
    higher = g.per_measure({c: s.higher_is_better for c, s in registry.items()}, False,
                           dtype=bool)
    found = sudden_changes(g_row, col, y, cutoff=cutoff, higher_is_better=higher,
                           candidates_only=True)
    frames, group_of = [], []
    for kind, res in found.items():
        hit = res["gain"].to_numpy(dtype=bool, na_value=False)
        if not hit.any():
            continue
        at = res["at"][hit]
        r = g_row[at]
        group_of.append(r)
        frames.append(pd.DataFrame({
            "episode_id": heads["episode_id"].take(r).to_numpy(),
            "measure": g.measures[g.mcode[r]],
            "kind": kind, "pregain_session": res["pregain_session"][hit],
            "size": res["change"][hit], "score_before": y[at].astype(float),
            "score_after": y[at + 1].astype(float), "n_pre": res["n_pre"][hit],
            "n_post": res["n_post"][hit],
            "crit3_adjusted": res["crit3_adjusted"].to_numpy(dtype=bool)[hit],
        }))
    if not frames:
        return pd.DataFrame(columns=SUDDEN_COLUMNS), none
    table = pd.concat(frames, ignore_index=True)
    # By measure (registry order), kind, group and session, as before.
    rank = g.per_measure({c: i for i, c in enumerate(registry)}, len(registry), dtype=np.int64)
    groups = np.concatenate(group_of).astype(np.int64)
    o = np.lexsort((table["pregain_session"].to_numpy(), groups,
                    (table["kind"] == "loss").to_numpy(), rank[groups]))
    return table.take(o).reset_index(drop=True)[SUDDEN_COLUMNS], groups[o]
