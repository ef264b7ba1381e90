"""Goal attainment (SPEC §7): met / on_track / at_risk / overdue / no_data, with a
projected attainment date and its interval from the trend's confidence interval.

A goal is read against one measure of an episode. Per administration it is *met* when
(lower-is-better scales; mirrored for higher-is-better):

- ``below``: score < target;
- ``reduction_pct``: a fall from the first score of at least ``target`` % of it;
- ``reliable_improvement``: a fall of at least ``target`` points (the registry's
  reliable-change points when ``target`` is 0 or missing);
- ``remission``: score < the registry's remission threshold (``target`` when given);
- ``recovery``: at caseness at the first administration and below it now.

``sustain`` consecutive administrations must meet it; the goal is met at the last of them.
Not met: ``overdue`` once past ``due`` (a date, or the ``due_session``-th administration
has happened); ``no_data`` without administrations of the measure, or with fewer than
3 (no trend to project from); otherwise the trend is projected from the latest score to
the goal's boundary score: ``on_track`` when the projection lands on or before ``due``
and the slope's 95% CI excludes "no improvement", else ``at_risk`` (also when the
episode is stalled or not on track). The projected date comes with an interval from the
slope's CI; a flat or worsening trend gives none ("not projected to attain").

References
----------
.. [1] Doran GT. There's a S.M.A.R.T. way to write management's goals and objectives.
       Manage Rev. 1981;70(11):35-36.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

from pipeline.columns import to_datetimes
from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.stats.groups import Grouped

__all__ = ["GOAL_STATUSES", "goal_status"]

GOAL_STATUSES = ("met", "on_track", "at_risk", "overdue", "no_data")
#: Projections further out than this are reported as "not projected".
MAX_PROJECTION_WEEKS = 104
#: Goals evaluated together in :func:`goal_status` (bounds its goals x administrations
#: arrays; any size gives the same result).
GOAL_BLOCK = 100_000


def _scale_values(measure: pd.Series, registry: Registry, settings: Settings
                  ) -> dict[str, np.ndarray]:
    # One value per distinct measure, then per row by code (code -1, NA, -> the last, NaN).
    codes, names = pd.factorize(measure)

    def get(fn: object) -> np.ndarray:
        vals = {c: fn(s) for c, s in registry.items()}  # type: ignore[operator]
        table = np.array([vals.get(m, np.nan) for m in names] + [np.nan], dtype=float)
        return table[codes]

    return {
        "sign": get(lambda s: -1.0 if s.higher_is_better else 1.0),
        "points": get(lambda s: s.reliable_change_points if s.reliable_change_points
                      is not None else np.nan),
        "remission": get(lambda s: s.remission_below if s.remission_below is not None
                         else np.nan),
        "caseness": get(lambda s: settings.caseness(s.caseness_setting, s.caseness_cutoff)
                        if s.caseness_cutoff is not None else np.nan),
    }


def _boundary(kind: pd.Series, target: np.ndarray, first: np.ndarray,
              sv: dict[str, np.ndarray]) -> np.ndarray:
    """The score a goal must get past (strictly for below/remission/recovery)."""
    sign = sv["sign"]
    pts = np.where(np.nan_to_num(target) > 0, target, sv["points"])
    rem = np.where(np.isnan(target) | (target <= 0), sv["remission"], target)
    return np.select(
        [kind == "below", kind == "reduction_pct", kind == "reliable_improvement",
         kind == "remission", kind == "recovery"],
        [target, first - sign * first * target / 100.0, first - sign * pts, rem,
         sv["caseness"]], default=np.nan)


def _meets(kind: pd.Series | pd.Categorical, score: np.ndarray, first: np.ndarray, boundary: np.ndarray,
           sv: dict[str, np.ndarray]) -> np.ndarray:
    sign = sv["sign"]
    strict = sign * score < sign * boundary  # below / remission / recovery
    inclusive = sign * score <= sign * boundary  # reductions are "at least"
    at_case_first = sign * first >= sign * sv["caseness"]
    return np.select(
        [kind == "below", kind == "reduction_pct", kind == "reliable_improvement",
         kind == "remission", kind == "recovery"],
        [strict, inclusive, inclusive, strict, at_case_first & strict], default=False)


def _select(conditions: list[np.ndarray], choices: list[str], default: str) -> np.ndarray:
    """``np.select`` of labels, as an object array of the (shared) label strings: a
    fixed-width unicode result and its intermediates were ~0.4 GB each for 1.4M goals'
    reasons, the full compute's peak."""
    labels = np.array([*choices, default], dtype=object)
    return labels[np.select(conditions, list(range(len(choices))), default=len(choices))]


def _ranges_of_groups(grouped: Grouped, keys: pd.DataFrame
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each (episode_id, measure) row of ``keys``: the first position and the number
    of its administrations in ``grouped.order`` (0 rows when it has none), and that
    order. The groups are in (episode_id, measure) text order, so integer codes from
    one sorted factorisation of both key sets are ascending over the groups and each
    key is found by binary search."""
    heads = grouped.heads
    both = pd.concat([heads, keys], ignore_index=True)
    ep = pd.factorize(both["episode_id"], sort=True)[0].astype(np.int64)
    ms = pd.factorize(both["measure"], sort=True)[0].astype(np.int64)
    key = ep * (int(ms.max()) + 1 if ms.size else 1) + ms
    hkey, gkey = key[:len(heads)], key[len(heads):]
    at = np.searchsorted(hkey, gkey)
    found = at < hkey.size
    found[found] = hkey[at[found]] == gkey[found]
    safe = np.where(found, at, 0)
    lo = np.where(found, grouped.starts[safe] if hkey.size else 0, 0)
    count = np.where(found, grouped.sizes[safe] if hkey.size else 0, 0)
    return lo.astype(np.int64), count.astype(np.int64), grouped.order


def goal_status(goals: pd.DataFrame, admins: pd.DataFrame, outcomes: pd.DataFrame,
                registry: Registry, settings: Settings, today: datetime,
                grouped: Grouped | None = None) -> pd.DataFrame:
    """Status of every goal.

    Parameters
    ----------
    goals
        ``episode_id, goal_id, measure, kind, target, due_date, due_session, sustain``.
    admins
        ``episode_id, measure, administered_at, score`` of the goals' episodes.
    outcomes
        Per episode x measure: ``first_score, last_score, last_at, n, weeks,
        slope_week, slope_ci_low, slope_ci_high, stalled, not_on_track``.
    today
        The date the status is judged on (naive UTC); for goals carrying an
        ``end_date`` (closed episodes), the earlier of the two.
    grouped
        ``admins`` (row for row) already ordered into episode x measure groups, when
        the caller holds that order (a full compute): it saves sorting them again.

    Returns
    -------
    DataFrame
        ``goals`` plus ``status``, ``met_at``, ``boundary`` (the score to get past),
        ``projected_at``, ``projected_earliest``, ``projected_latest`` (NaT when not
        projected), ``due_at`` (the due date, or an estimate for ``session:N`` from the
        episode's mean interval) and ``status_reason`` (plain words).
    """
    g = goals.reset_index(drop=True).copy()
    o_cols = ["episode_id", "measure", "first_score", "last_score", "last_at", "n", "weeks",
              "slope_week", "slope_ci_low", "slope_ci_high", "stalled", "not_on_track"]
    g = g.merge(outcomes[o_cols], on=["episode_id", "measure"], how="left")
    sv = _scale_values(g["measure"], registry, settings)
    target = pd.to_numeric(g["target"], errors="coerce").to_numpy(dtype=float)
    first = g["first_score"].to_numpy(dtype=float)
    g["boundary"] = _boundary(g["kind"], target, first, sv)

    # Per administration of each goal's measure, in time order (ties: input order):
    # meets? then runs of consecutive meeting administrations. Each goal's rows are one
    # range of the administrations sorted by integer (episode, measure) codes, so the
    # goals x administrations rows are gathered by index, without a text-keyed merge.
    at = admins["administered_at"].to_numpy().astype("datetime64[us]")
    if grouped is not None and len(grouped.source) == len(admins):
        lo, count, order = _ranges_of_groups(grouped, g[["episode_id", "measure"]])
    else:
        keys = pd.concat([admins[["episode_id", "measure"]], g[["episode_id", "measure"]]],
                         ignore_index=True)
        ep = pd.factorize(keys["episode_id"])[0].astype(np.int64)
        ms = pd.factorize(keys["measure"])[0].astype(np.int64)
        key = ep * (int(ms.max()) + 1 if ms.size else 1) + ms
        akey, gkey = key[:len(admins)], key[len(admins):]
        order = np.lexsort((at.view(np.int64), akey))
        lo = np.searchsorted(akey[order], gkey, side="left")
        count = np.searchsorted(akey[order], gkey, side="right") - lo
    kinds = pd.Categorical(g["kind"].astype("object"))
    score = admins["score"].to_numpy(dtype=float)
    boundary = g["boundary"].to_numpy(dtype=float)
    sustain_of = pd.to_numeric(g["sustain"]).fillna(1).to_numpy()
    met_at = np.full(len(g), np.datetime64("NaT"), dtype="datetime64[us]")
    # Goals a block at a time: the goals x administrations rows of all 1.4M goals of a
    # 10M store were ~1 GB of arrays at once. Each goal's rows are in one block, so the
    # result is the same.
    for a in range(0, len(g), GOAL_BLOCK):
        b = min(a + GOAL_BLOCK, len(g))
        n_rows = count[a:b]
        ends = np.cumsum(n_rows)
        local = np.repeat(np.arange(b - a), n_rows)
        pos = np.arange(int(ends[-1]) if b > a else 0)
        seg_start = (ends - n_rows)[local]
        rows = order[pos - seg_start + lo[a:b][local]]
        goal_of = local + a
        meets = _meets(pd.Categorical.from_codes(kinds.codes[goal_of], kinds.categories),
                       score[rows], first[goal_of], boundary[goal_of],
                       {k: v[goal_of] for k, v in sv.items()})
        # Length of the run of meeting administrations ending at each row (0 if not met).
        last_miss = np.maximum.accumulate(np.where(meets, seg_start - 1, pos)) \
            if pos.size else pos
        run_len = np.where(meets, pos - last_miss, 0)
        hit = np.flatnonzero(meets & (run_len >= sustain_of[goal_of]))
        # Rows are in time order within a goal: the first hit is the earliest.
        met_goal, first_hit = np.unique(goal_of[hit], return_index=True)
        met_at[met_goal] = at[rows[hit[first_hit]]]
    g["met_at"] = pd.Series(met_at, index=g.index, dtype="datetime64[us]")

    # Due: a date, or the due_session-th administration (estimated date if in future).
    n = g["n"].fillna(0).to_numpy(dtype=float)
    weeks = g["weeks"].to_numpy(dtype=float)
    per_session_days = np.where(n > 1, weeks * 7 / np.maximum(n - 1, 1), 7.0)
    due_session = pd.to_numeric(g["due_session"], errors="coerce").to_numpy(dtype=float)
    last_at = to_datetimes(g["last_at"])
    # To the second: an estimate from the cadence, whose float days otherwise read as
    # "07:59:59.999999997" in the clinician's evidence.
    est_due = (last_at + pd.to_timedelta(np.nan_to_num((due_session - n) * per_session_days),
                                         unit="D")).dt.round("s")
    due_date = to_datetimes(g["due_date"])
    g["due_at"] = due_date.where(due_date.notna(), est_due.where(~np.isnan(due_session)))
    # A closed episode's goals are judged as of its end: the clock stops with the episode.
    as_of = pd.Series(pd.Timestamp(today).normalize(), index=g.index)
    if "end_date" in g.columns:
        ended = to_datetimes(g["end_date"]).astype("datetime64[us]")
        as_of = as_of.where(ended.isna() | (ended > as_of), ended)
    past_due = (due_date.notna() & (due_date < as_of)).to_numpy() | \
        (~np.isnan(due_session) & (n >= due_session))

    # Projection from the latest score along the slope (points per week).
    sign = sv["sign"]
    gap = sign * (g["last_score"].to_numpy(dtype=float) - g["boundary"].to_numpy(dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = -sign * g["slope_week"].to_numpy(dtype=float)  # improvement per week
        fast = np.maximum(-sign * g["slope_ci_low"].to_numpy(dtype=float),
                          -sign * g["slope_ci_high"].to_numpy(dtype=float))
        slow = np.minimum(-sign * g["slope_ci_low"].to_numpy(dtype=float),
                          -sign * g["slope_ci_high"].to_numpy(dtype=float))
        w_point = np.where(rate > 0, gap / rate, np.nan)
        w_early = np.where(fast > 0, gap / fast, np.nan)
        w_late = np.where(slow > 0, gap / slow, np.nan)

    def project(w: np.ndarray) -> pd.Series:
        # Beyond two years a straight-line projection means nothing clinically.
        w = np.where(w > MAX_PROJECTION_WEEKS, np.nan, w)
        days = pd.to_timedelta(np.where(np.isnan(w), 0, np.maximum(w, 0)) * 7, unit="D")
        return (last_at + days).dt.floor("s").where(~np.isnan(w))

    g["projected_at"] = project(w_point)
    g["projected_earliest"] = project(w_early)
    g["projected_latest"] = project(w_late)

    met = g["met_at"].notna().to_numpy()
    no_admin = np.isnan(n) | (n == 0)
    few = n < 3
    due_at = to_datetimes(g["due_at"])
    reaches = (g["projected_at"].notna() & due_at.notna() &
               (g["projected_at"] <= due_at)).to_numpy()
    significant = slow > 0  # the whole CI is on the improving side
    flagged = g["stalled"].fillna(False).astype(bool).to_numpy() | \
        g["not_on_track"].astype("boolean").fillna(False).to_numpy(dtype=bool)
    status = _select(
        [met, past_due, no_admin | few, reaches & significant & ~flagged],
        ["met", "overdue", "no_data", "on_track"], default="at_risk")
    reason = _select(
        [met, past_due, no_admin, few, flagged, ~(rate > 0), reaches & significant],
        ["met", "past due and not met",
         "no administrations of this measure yet",
         "fewer than 3 administrations: no trend to project",
         "the episode is stalled or not on track",
         "not projected to attain: the trend is flat or worsening",
         "projected to attain before the due date"],
        default="projection misses the due date or the trend is not reliably improving")
    g["status"] = status
    g["status_reason"] = reason
    for col in ("projected_at", "projected_earliest", "projected_latest"):
        g.loc[met, col] = pd.NaT  # nothing to project once met

    return g
