"""Scoring: item responses -> totals (SPEC §3), vectorised per scale.

- Reverse-keyed items are reversed (``item_min + item_max - x``) before summing.
- Missing items are prorated up to the scale's ``max_missing``: each missing item takes
  the mean of the answered items (NHS Data Dictionary for PHQ-9/GAD-7), which is the
  same number as ``n_items x sum / answered`` (CamCOPS' CORE-10 rule). The total is
  rounded to the nearest integer, halves up, in exact integer arithmetic.
- Optional items (WSAS item 1, "not applicable") are neither missing nor prorated.
- A risk item is never imputed: a missing risk item makes the risk status ``unknown``.
- A supplied total that disagrees with the items' score is kept as ``total_supplied``;
  the items' score wins and ``total_mismatch`` is set.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.scales import Registry, Scale

__all__ = ["round_half_up_ratio", "score_administrations", "score_items"]


def round_half_up_ratio(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Round ``p / q`` to the nearest integer, halves up, for integers ``p >= 0, q > 0``.

    Exact: ``floor((2p + q) / 2q)``, no floating point.
    """
    p = np.asarray(p, dtype=np.int64)
    q = np.asarray(q, dtype=np.int64)
    return (2 * p + q) // (2 * q)


def score_items(items: np.ndarray, scale: Scale) -> dict[str, np.ndarray]:
    """Score a matrix of item responses of one scale.

    Parameters
    ----------
    items
        Float array (records x ``scale.items``), NaN where an item was not answered;
        values as given (before reverse keying).
    scale
        The scale's registry entry.

    Returns
    -------
    dict of arrays
        ``score`` (int64; -1 where no item was answered), ``n_missing`` (required items
        missing), ``prorated`` (bool), ``risk`` (``"yes"``/``"no"``/``"unknown"``, or None
        when the scale has no risk item), ``risk_value`` (float, NaN when unknown).

    Examples
    --------
    >>> from pipeline.scales import load_registry
    >>> phq9 = load_registry()["PHQ-9"]
    >>> out = score_items(np.array([[3, 3, 2, 2, 1, 1, np.nan, np.nan, 0]]), phq9)
    >>> int(out["score"][0])   # 12 answered over 7 items, x 9/7 = 15.43 -> 15
    15
    """
    x = np.array(items, dtype=float, copy=True)
    n_rec, n = x.shape
    for i in scale.reverse_keyed:
        x[:, i - 1] = scale.item_min + scale.item_max - x[:, i - 1]
    answered = ~np.isnan(x)
    n_answered = answered.sum(axis=1)
    optional = np.zeros(n, dtype=bool)
    for i in scale.optional_items:
        optional[i - 1] = True
    n_missing = (~answered & ~optional).sum(axis=1)
    total = np.nansum(x, axis=1).astype(np.int64)
    scored = n_answered > 0
    safe_q = np.where(scored, n_answered, 1)
    prorated_total = round_half_up_ratio(total * (n_answered + n_missing), safe_q)
    score = np.where(n_missing > 0, prorated_total, total)
    score = np.where(scored, score, -1)

    risk: np.ndarray = np.full(n_rec, None, dtype=object)
    risk_value = np.full(n_rec, np.nan)
    if scale.risk_items:
        r = x[:, [i - 1 for i in scale.risk_items]]
        # Risk items are read as given; reverse keying does not apply to them in any
        # shipped scale, and they are never imputed.
        any_yes = np.nan_to_num(r, nan=0) > 0
        any_missing = np.isnan(r)
        risk = np.where(any_yes.any(axis=1), "yes",
                        np.where(any_missing.any(axis=1), "unknown", "no")).astype(object)
        with np.errstate(all="ignore"):
            risk_value = np.where(np.isnan(r).all(axis=1), np.nan, np.nanmax(
                np.where(np.isnan(r), -np.inf, r), axis=1))
    return {
        "score": score,
        "n_missing": np.where(scored, n_missing, 0),
        "prorated": scored & (n_missing > 0),
        "risk": risk,
        "risk_value": risk_value,
    }


def score_administrations(frame: pd.DataFrame, registry: Registry) -> pd.DataFrame:
    """Add ``score``, ``prorated``, ``n_missing``, ``has_items``, ``risk``, ``risk_value``
    and ``total_mismatch`` to validated administrations (one pass per scale, no row loop).

    Records with no items take the supplied total as their score; their risk status is
    ``unknown`` for scales with a risk item (a total never tells whether item 9 was 0).
    """
    out = frame.copy()
    n = len(out)
    score = np.zeros(n, dtype=np.int64)
    n_missing = np.zeros(n, dtype=np.int64)
    prorated = np.zeros(n, dtype=bool)
    has_items = np.zeros(n, dtype=bool)
    risk = np.full(n, None, dtype=object)
    risk_value = np.full(n, np.nan)
    measure = out["measure"].to_numpy()
    supplied = out["total_supplied"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    for code, scale in registry.items():
        idx = np.flatnonzero(measure == code)
        if idx.size == 0:
            continue
        cols = [f"item_{i}" for i in range(1, scale.items + 1)]
        items = out[cols].iloc[idx].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        res = score_items(items, scale)
        given = res["score"] >= 0
        has_items[idx] = given
        score[idx] = np.where(given, res["score"], np.nan_to_num(supplied[idx], nan=-1))
        n_missing[idx] = res["n_missing"]
        prorated[idx] = res["prorated"]
        if scale.risk_items:
            risk[idx] = np.where(given, res["risk"], "unknown")
            risk_value[idx] = np.where(given, res["risk_value"], np.nan)
    out["score"] = score
    out["prorated"] = prorated
    out["n_missing"] = n_missing
    out["has_items"] = has_items
    out["risk"] = pd.Series(risk, index=out.index, dtype="str").where(pd.notna(risk), None)
    out["risk_value"] = pd.array(np.where(np.isnan(risk_value), 0, risk_value).astype(np.int64),
                                 dtype="Int64")
    out.loc[np.isnan(risk_value), "risk_value"] = pd.NA
    out["total_mismatch"] = has_items & ~np.isnan(supplied) & (supplied != score)
    return out
