"""Sudden gains and sudden losses (Tang & DeRubeis 1999), as the R package suddengains.

References
----------
.. [1] Tang TZ, DeRubeis RJ. Sudden gains and critical sessions in cognitive-behavioral
       therapy for depression. J Consult Clin Psychol. 1999;67(6):894-904.
.. [2] Lutz W, Ehrlich T, Rubel J, et al. The ups and downs of psychotherapy: sudden
       gains and sudden losses identified with session reports. Psychother Res.
       2013;23(1):14-24 (the t criterion adjusted for missing values).
.. [3] Wiedemann M, Thew GR, Stott R, Ehlers A. suddengains: an R package to identify
       sudden gains in longitudinal data. PLoS One. 2020;15(3):e0230276 (v0.7.2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import special  # not scipy.stats: 0.15 s to load instead of 0.7 s

from pipeline.errors import UsageError

__all__ = ["SUDDEN_RESULT_COLUMNS", "sudden_changes", "sudden_gains"]

SUDDEN_RESULT_COLUMNS = ["row", "pregain_session", "change", "crit1", "crit2", "crit3",
                         "gain", "n_pre", "n_post", "t_critical", "crit3_adjusted"]


def _window_stats(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, mean, sample variance n-1) of each row of ``w``, NaN ignored."""
    n = np.sum(~np.isnan(w), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(w, axis=1) / n
        var = np.nansum((w - mean[:, None]) ** 2, axis=1) / (n - 1)
    return n, mean, var


def sudden_changes(group: npt.ArrayLike, column: npt.ArrayLike, score: npt.ArrayLike, *,
                   cutoff: npt.ArrayLike, higher_is_better: npt.ArrayLike = False,
                   kinds: tuple[str, ...] = ("gain", "loss"), pct: float = 0.25,
                   alpha: float = 0.05, candidates_only: bool = False
                   ) -> dict[str, dict[str, Any]]:
    """Sudden gains and losses of scores given one entry per scored session.

    The computation behind :func:`sudden_gains`, on the scores in long form: only the
    sessions that have a score, so its cost follows the number of scores, not clients x
    sessions. Vectorised over every pair of consecutive sessions at once.

    Parameters
    ----------
    group, column, score
        One entry per scored session: the client (a non-negative integer code), the
        session's 0-based column (consecutive sessions differ by 1; a gap is a missing
        session) and its score. Sorted by group, then column, each column at most once
        a group.
    cutoff, higher_is_better
        Criterion 1's points and the scale's direction: one value, or an array indexed
        by group code (one value per client).
    kinds
        ``"gain"`` and/or ``"loss"`` (a sudden loss: criteria 1 and 3 mirrored, no
        criterion 2, as :func:`sudden_gains` with ``losses``).
    pct, alpha, candidates_only
        As :func:`sudden_gains`.

    Returns
    -------
    dict
        Kind -> arrays with one entry per pair evaluated (every pair of consecutive
        sessions, or with ``candidates_only`` the pairs meeting criteria 1 and 2), in
        input order: ``at`` (the entry of the score before the change) and the columns
        of :func:`sudden_gains` but ``row`` (``pregain_session`` is ``column[at] + 1``),
        the criteria as nullable booleans (``crit2`` and ``crit3`` NA as there).

    References
    ----------
    .. [1] Tang & DeRubeis 1999; Lutz et al. 2013; Wiedemann et al. 2020 (see module).
    """
    unknown = sorted(set(kinds) - {"gain", "loss"})
    if unknown:
        raise UsageError(f"sudden_changes: unknown kind(s) {unknown}",
                         fix='ask for "gain" and/or "loss"')
    g = np.asarray(group)
    c = np.asarray(column, dtype=np.int64)
    y = np.asarray(score, dtype=float)  # differences of any integer dtype, exactly
    n = y.size
    if n > 1:
        step_g = np.diff(g)
        if (step_g < 0).any() or ((step_g == 0) & (np.diff(c) <= 0)).any():
            raise UsageError("sudden_changes needs entries sorted by group, then column, "
                             "each column once a group",
                             fix="sort by (group, column) and drop repeated sessions")
        del step_g

    def of_group(value: npt.ArrayLike, dtype: type, at: np.ndarray) -> np.ndarray:
        v: np.ndarray = np.asarray(value, dtype=dtype)
        return np.broadcast_to(v, at.shape) if v.ndim == 0 else v[g[at]]

    # Consecutive sessions of one client (a pair across a missing session is not one).
    pair = np.diff(c) == 1
    if candidates_only and n > 1:
        # Criterion 1 is necessary: a first cut on the integer-exact differences (against
        # the smallest cut-off) leaves few pairs for the rest.
        cuts = np.asarray(cutoff, dtype=float)
        fall = np.diff(y)
        np.abs(fall, out=fall)
        with np.errstate(invalid="ignore"):
            pair &= fall >= (np.nanmin(cuts) if cuts.size and not np.isnan(cuts).all()
                             else np.inf)
        del fall
    at_all = np.flatnonzero(pair).astype(np.int64, copy=False)
    del pair
    at_all = at_all[g[at_all] == g[at_all + 1]]
    found: dict[str, dict[str, Any]] = {}
    # Criterion-3 windows hold 2-3 values each, so df is 2, 3 or 4: one ppf call.
    t_table = special.stdtrit(np.arange(1, 5), 1 - alpha / 2)  # t.ppf's kernel
    for kind in kinds:
        losses = kind == "loss"
        at = at_all
        better = np.where(of_group(higher_is_better, bool, at), -1.0, 1.0)  # + = down better
        sign = -better if losses else better  # direction of the change looked for
        change = sign * (y[at] - y[at + 1])
        cut = of_group(cutoff, float, at)
        if candidates_only:
            hit = change >= cut
            if not losses:
                hit &= change >= pct * y[at]
            at, change, cut, sign = at[hit], change[hit], cut[hit], sign[hit]
        crit1 = change >= cut
        if losses:
            crit2 = pd.array([pd.NA] * at.size, dtype="boolean")
        else:
            crit2 = pd.array(change >= pct * y[at], dtype="boolean")
        # Criterion 3's windows (sessions n-2..n and n+1..n+3) from the entries around
        # the pair: each in its own slot (column - n + 2), NaN where the session has no
        # score or belongs to another client, so they are the session matrix's windows.
        near = at[:, None] + np.arange(-2, 4)
        inside = (near >= 0) & (near < n)
        near = np.clip(near, 0, max(n - 1, 0))
        slot = c[near] - c[at][:, None] + 2
        inside &= (g[near] == g[at][:, None]) & (slot >= 0) & (slot <= 5)
        w = np.full((at.size, 6), np.nan)
        r, j = np.nonzero(inside)
        w[r, slot[r, j]] = y[near[r, j]]
        n1, m1, v1 = _window_stats(w[:, :3])
        n2, m2, v2 = _window_stats(w[:, 3:])
        evaluable = (n1 >= 2) & (n2 >= 2)
        df = np.where(evaluable, n1 + n2 - 2, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = np.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
        t_crit = t_table[df - 1]
        c3 = sign * (m1 - m2) > t_crit * pooled
        crit3 = pd.array(np.where(evaluable, c3, False), dtype="boolean")
        crit3[~evaluable] = pd.NA
        c1 = pd.array(crit1, dtype="boolean")
        found[kind] = {
            "at": at,
            "pregain_session": c[at] + 1, "change": change, "crit1": c1, "crit2": crit2,
            "crit3": crit3, "gain": c1 & (crit2 if not losses else True) & crit3,
            "n_pre": n1, "n_post": n2, "t_critical": np.where(evaluable, t_crit, np.nan),
            "crit3_adjusted": pd.array(np.where(evaluable, n1 + n2 < 6, False),
                                       dtype="boolean"),
        }
    return found


def sudden_gains(scores: npt.ArrayLike, *, cutoff: float, pct: float = 0.25,
                 alpha: float = 0.05, higher_is_better: bool = False,
                 losses: bool = False, candidates_only: bool = False) -> pd.DataFrame:
    """Evaluate every pair of consecutive scored sessions for a sudden gain (or loss).

    Parameters
    ----------
    scores
        2-D array: one row per client, one column per session in order, NaN = missing.
    cutoff
        Criterion 1: the change from session n to n+1 must be at least this (inclusive),
        usually the scale's reliable-change points.
    pct
        Criterion 2 (gains only): the change must be at least ``pct`` of the score at n
        (inclusive).
    alpha
        Criterion 3: two-sided level of the t test.
    higher_is_better
        Mirror every direction (e.g. ORS).
    losses
        Look for sudden losses instead: criteria 1 and 3 mirrored; criterion 2 does not
        apply (SPEC §6) and is NA.
    candidates_only
        Return only the pairs that meet criteria 1 and 2 (the only pairs that can be a
        gain), so criterion 3 is computed for them alone; every row returned is as it
        would be in the full result.

    Returns
    -------
    DataFrame
        One row per client x pair (n, n+1) with both scores present (a change across a
        missing session is not evaluated): ``row`` (0-based), ``pregain_session``
        (1-based column of the score before the change), ``change`` (signed, in the
        direction looked for: positive = a gain, or a loss when ``losses``),
        ``crit1``, ``crit2``, ``crit3`` and ``gain`` (nullable booleans),
        ``n_pre``/``n_post`` (values in each criterion-3 window), ``t_critical``, and
        ``crit3_adjusted`` (fewer than 3 + 3 values, so the t critical value was
        adjusted).

    Notes
    -----
    Criterion 3: ``mean(n-2..n) - mean(n+1..n+3) > t * pooled SD`` (strict, mirrored
    for the other direction), windows cut at the first/last session and missing values
    dropped, pooled SD from the two sample variances with n-1 weights, and ``t`` the
    two-sided critical value with ``n_pre + n_post - 2`` degrees of freedom (2.7764 for
    3+3 values, 3.1824 for 5, 4.3027 for 4). With fewer than 2 values on a side it is NA
    (not evaluable), and so is ``gain`` unless criterion 1 or 2 already failed. Pair
    2->3 therefore uses 3.1824 even with complete data, as suddengains 0.7.2 does.

    References
    ----------
    .. [1] Tang & DeRubeis 1999; Lutz et al. 2013; Wiedemann et al. 2020 (see module).

    Examples
    --------
    >>> x = [[20, 21, 19, 10, 9, 8]]
    >>> sudden_gains(x, cutoff=6).query("gain == True")["pregain_session"].tolist()
    [3]
    """
    x = np.atleast_2d(np.asarray(scores, dtype=float))
    # The matrix's scored cells in long form, row by row (so sorted by row, column).
    rows, cols = np.nonzero(~np.isnan(x))
    res = sudden_changes(rows, cols, x[rows, cols], cutoff=cutoff,
                         higher_is_better=higher_is_better,
                         kinds=("loss",) if losses else ("gain",), pct=pct, alpha=alpha,
                         candidates_only=candidates_only)["loss" if losses else "gain"]
    res["row"] = rows[res.pop("at")]
    return pd.DataFrame({name: res[name] for name in SUDDEN_RESULT_COLUMNS})
