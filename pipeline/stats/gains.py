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

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import special  # not scipy.stats: 0.15 s to load instead of 0.7 s

__all__ = ["sudden_gains"]


def _window_stats(x: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray,
                                                             np.ndarray]:
    """(count, mean, sample variance n-1) of columns lo..hi of x, NaN ignored."""
    w = x[:, max(lo, 0):min(hi, x.shape[1] - 1) + 1]
    n = np.sum(~np.isnan(w), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(w, axis=1) / n
        var = np.nansum((w - mean[:, None]) ** 2, axis=1) / (n - 1)
    return n, mean, var


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
    n_rows, n_cols = x.shape
    better = -1.0 if higher_is_better else 1.0  # + when "down is better"
    sign = -better if losses else better  # direction of the change looked for
    # Criterion-3 windows hold 2-3 values each, so df is 2, 3 or 4: one ppf call.
    t_table = special.stdtrit(np.arange(1, 5), 1 - alpha / 2)  # t.ppf's kernel
    frames = []
    for j in range(n_cols - 1):
        a, b = x[:, j], x[:, j + 1]
        both = ~np.isnan(a) & ~np.isnan(b)
        if not both.any():
            continue
        rows = np.flatnonzero(both)
        change = sign * (a[rows] - b[rows])
        if candidates_only:
            hit = (change >= cutoff) & ((change >= pct * a[rows]) if not losses else True)
            rows, change = rows[hit], change[hit]
            if rows.size == 0:
                continue
        crit1 = change >= cutoff
        if losses:
            crit2 = pd.array([pd.NA] * rows.size, dtype="boolean")
        else:
            crit2 = pd.array(change >= pct * a[rows], dtype="boolean")
        lo, hi = max(j - 2, 0), min(j + 3, n_cols - 1)
        window = x[rows, lo:hi + 1]  # only the columns the windows need
        n1, m1, v1 = _window_stats(window, j - 2 - lo, j - lo)
        n2, m2, v2 = _window_stats(window, j + 1 - lo, j + 3 - lo)
        evaluable = (n1 >= 2) & (n2 >= 2)
        df = np.where(evaluable, n1 + n2 - 2, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = np.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
        t_crit = t_table[df - 1]
        c3 = sign * (m1 - m2) > t_crit * pooled
        crit3 = pd.array(np.where(evaluable, c3, False), dtype="boolean")
        crit3[~evaluable] = pd.NA
        c1 = pd.array(crit1, dtype="boolean")
        gain = c1 & (crit2 if not losses else True) & crit3
        frames.append(pd.DataFrame({
            "row": rows, "pregain_session": j + 1, "change": change,
            "crit1": c1, "crit2": crit2, "crit3": crit3, "gain": gain,
            "n_pre": n1, "n_post": n2,
            "t_critical": np.where(evaluable, t_crit, np.nan),
            "crit3_adjusted": pd.array(np.where(evaluable, n1 + n2 < 6, False),
                                       dtype="boolean"),
        }))
    if not frames:
        return pd.DataFrame(columns=["row", "pregain_session", "change", "crit1", "crit2",
                                     "crit3", "gain", "n_pre", "n_post", "t_critical",
                                     "crit3_adjusted"])
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["row", "pregain_session"], kind="stable").reset_index(drop=True)
