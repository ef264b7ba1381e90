"""Expected recovery curves (ERC) and "not on track" (SPEC §6).

Built empirically from the service's own finished episodes (Finch, Lambert & Schaalje
2001): by measure, baseline severity band and administration number k, the median
and an upper tolerance percentile (default 75th) of the score. A stratum with fewer
than ``min_stratum`` episodes falls back to the coarser stratum (measure x k, all
bands), and says so in ``source``.

References
----------
.. [1] Finch AE, Lambert MJ, Schaalje BG. Psychotherapy quality control: the
       statistical generation of expected recovery curves for integration into an
       early warning system. Clin Psychol Psychother. 2001;8(4):231-242.
.. [2] Delgadillo J, de Jong K, Lucock M, et al. Feedback-informed treatment versus
       usual psychological treatment for depression and anxiety: a multisite, open-label,
       cluster randomised controlled trial. Lancet Psychiatry. 2018;5(7):564-572.
.. [3] Hyndman RJ, Fan Y. Sample quantiles in statistical packages. Am Stat.
       1996;50(4):361-365. (Definition 7, the linear interpolation of numpy and pandas,
       used for the median and the tolerance bands.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.scales import Registry
from pipeline.stats.groups import Grouped

__all__ = ["ALL_BANDS", "DEFAULT_CURVES", "DEFAULT_PERCENTILE", "band_codes", "baseline_band",
           "build_curves", "curve_points", "curves_from_histogram", "default_curves",
           "lookup_curve", "with_defaults"]

#: The shipped curve set: built from a 5,000-episode synthetic cohort (seed 2026) by
#: ``ontrack default-curves``; it serves a new service until its own history is large
#: enough, stratum by stratum.
DEFAULT_CURVES = Path(__file__).parent / "data" / "default_curves.csv"
#: The tolerance percentile the shipped curves were built with.
DEFAULT_PERCENTILE = 0.75

ALL_BANDS = "all"
CURVE_COLUMNS = ["measure", "band", "k", "n", "median", "upper", "lower", "source"]


def baseline_band(measure: pd.Series, score: pd.Series, registry: Registry,
                  grouped: Grouped | None = None) -> pd.Series:
    """Severity band label of each (measure, baseline score); ``"all"`` without bands.

    ``grouped``: when ``measure`` holds one row per group of that
    :class:`~pipeline.stats.groups.Grouped`, its measure codes save factorising the text.
    """
    if grouped is not None and grouped.n_groups == len(measure):
        mcode, names = grouped.mcode, list(grouped.measure_index)
    else:
        codes, uniques = pd.factorize(measure)
        mcode, names = codes.astype(np.int64), [str(m) for m in uniques]
    code, labels = band_codes(mcode, names, score.to_numpy(dtype=float), registry)
    return pd.Series(pd.array(labels, dtype="str").take(code), index=measure.index)


def band_codes(mcode: np.ndarray, measures: list[str], score: np.ndarray,
               registry: Registry) -> tuple[np.ndarray, list[str]]:
    """:func:`baseline_band` as codes: each row's band as an index into the labels
    returned (``"all"`` first, each label once), from its measure as a code into
    ``measures``."""
    labels: list[str] = [ALL_BANDS]
    code = np.zeros(len(mcode), dtype=np.int64)
    for i, name in enumerate(measures):
        scale = registry.get(name)
        if scale is None or not scale.bands:
            continue
        mask = mcode == i
        if not mask.any():
            continue
        mins = np.array([b.min for b in scale.bands])
        idx = np.searchsorted(mins, score[mask], side="right") - 1
        # Each label once (scales share names such as "mild"), so a (measure, band)
        # pair of codes names one stratum.
        for label in (b.label for b in scale.bands):
            if label not in labels:
                labels.append(label)
        to_label = np.array([labels.index(b.label) for b in scale.bands], dtype=np.int64)
        code[mask] = to_label[np.clip(idx, 0, len(scale.bands) - 1)]
    return code, labels


def build_curves(scores: pd.DataFrame, *, percentile: float = 0.75,
                 min_stratum: int = 30) -> pd.DataFrame:
    """Median and tolerance bands of score by (measure, band, k) over finished episodes.

    Parameters
    ----------
    scores
        One row per administration of a *finished* episode: ``measure``, ``band``
        (baseline severity band), ``k`` (1-based administration number) and ``score``.
    percentile
        Upper tolerance percentile (0.75); the lower band is ``1 - percentile``.
    min_stratum
        Minimum episodes in a stratum; smaller strata fall back to (measure, k).

    Returns
    -------
    DataFrame
        See :func:`curves_from_histogram` (this is it, on the scores' histogram).
    """
    if scores.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    hist = scores.groupby(["measure", "band", "k", "score"], observed=True).size() \
        .rename("count").reset_index()
    return curves_from_histogram(hist, percentile=percentile, min_stratum=min_stratum)


def _quantiles(hist: pd.DataFrame, keys: list[str], qs: list[float]) -> pd.DataFrame:
    """Type-7 quantiles of each stratum of ``keys`` from its score histogram."""
    h = hist.groupby([*keys, "score"], observed=True)["count"].sum().reset_index() \
        .sort_values([*keys, "score"], kind="stable").reset_index(drop=True)
    stratum = h.groupby(keys, sort=False, observed=True).ngroup().to_numpy()
    counts = h["count"].to_numpy(dtype=np.int64)
    scores = h["score"].to_numpy(dtype=np.float64)
    cum = np.cumsum(counts)  # global cumulative count over the sorted strata
    first_row = np.flatnonzero(np.r_[True, stratum[1:] != stratum[:-1]])
    n = np.add.reduceat(counts, first_row)
    offset = cum[first_row] - counts[first_row]  # rows of earlier strata
    out = h.iloc[first_row][keys].reset_index(drop=True)
    out["n"] = n
    for q in qs:
        pos = q * (n - 1).astype(np.float64)
        lo = np.floor(pos).astype(np.int64)
        frac = pos - lo
        hi = np.minimum(lo + 1, n - 1)
        # The value of 0-based rank r in a stratum: the first row whose cumulative count
        # exceeds offset + r.
        x_lo = scores[np.searchsorted(cum, offset + lo, side="right")]
        x_hi = scores[np.searchsorted(cum, offset + hi, side="right")]
        out[q] = x_lo + frac * (x_hi - x_lo)
    return out


def curves_from_histogram(hist: pd.DataFrame, *, percentile: float = 0.75,
                          min_stratum: int = 30) -> pd.DataFrame:
    """Median and tolerance bands of score by (measure, band, k) from histograms.

    Strata with fewer than ``min_stratum`` administrations fall back to the curve of all
    bands of the measure at that k (``source`` ``"service_all_bands"``); strata too small
    even then are left out.

    Returns
    -------
    DataFrame
        ``measure, band, k, n, median, upper, lower, source``.
    """
    if hist.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    qs = [0.5, percentile, 1 - percentile]

    def summarise(keys: list[str]) -> pd.DataFrame:
        out = _quantiles(hist, keys, qs)
        return out.rename(columns={0.5: "median", percentile: "upper",
                                   1 - percentile: "lower"})

    fine = summarise(["measure", "band", "k"])
    coarse = summarise(["measure", "k"]).assign(band=ALL_BANDS)
    fine_ok = fine[fine["n"] >= min_stratum].assign(source="service")
    bands = hist[["measure", "band"]].drop_duplicates()
    fallback = bands.merge(coarse.drop(columns="band"), on="measure")
    fallback = fallback[fallback["n"] >= min_stratum]
    fallback = fallback.merge(fine_ok[["measure", "band", "k"]], how="left", indicator=True,
                              on=["measure", "band", "k"])
    fallback = fallback[fallback["_merge"] == "left_only"].drop(columns="_merge")
    fallback = fallback.assign(source="service_all_bands")
    curves = pd.concat([fine_ok, fallback], ignore_index=True)[CURVE_COLUMNS]
    curves = curves.astype({"k": "int64", "n": "int64"})
    return curves.sort_values(["measure", "band", "k"]).reset_index(drop=True)



def lookup_curve(keys: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """The curve point (median, upper, lower, source) of each (measure, band, k) row."""
    cols = ["measure", "band", "k"]
    if curves.empty:
        return keys.assign(median=np.nan, upper=np.nan, lower=np.nan, source=None)
    c = curves[[*cols, "median", "upper", "lower", "source"]].astype({"k": "int64"})
    return keys.astype({"k": "int64"}).merge(c, on=cols, how="left")


def curve_points(curves: pd.DataFrame, mcode: np.ndarray, measures: list[str],
                 band: np.ndarray, bands: list[str], k: np.ndarray) -> dict[str, Any]:
    """:func:`lookup_curve` for keys given as codes: ``mcode`` into ``measures``,
    ``band`` into ``bands`` (as :func:`band_codes` returns them) and ``k``.

    One gather from a dense (measure, band, k) table of curve rows, with no text keys to
    hash or join. Returns ``median``, ``upper``, ``lower`` (float arrays, NaN) and
    ``source`` (a ``str`` array, missing) where the curves have no such point.
    """
    n = len(k)
    out: dict[str, Any] = {name: np.full(n, np.nan) for name in ("median", "upper", "lower")}
    if curves.empty or n == 0:
        out["source"] = pd.array([None] * n, dtype="str")
        return out
    m_of = {name: i for i, name in enumerate(measures)}
    b_of = {name: i for i, name in enumerate(bands)}
    # The curves are small (one row per measure, band and k): mapped row by row.
    cm = np.array([m_of.get(str(v), -1) for v in curves["measure"]], dtype=np.int64)
    cb = np.array([b_of.get(str(v), -1) for v in curves["band"]], dtype=np.int64)
    ck = curves["k"].to_numpy(dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    # As wide as the keys' largest k (a curve point beyond it matches no key), so the
    # table's size follows the data, whatever the curves hold.
    width = max(int(k.max()), 0) + 1
    known = (cm >= 0) & (cb >= 0) & (ck >= 0) & (ck < width)
    table = np.full(len(measures) * len(bands) * width, -1, dtype=np.int64)
    table[((cm * len(bands) + cb) * width + ck)[known]] = np.flatnonzero(known)
    valid = k >= 0
    row = np.where(valid, table[((mcode * len(bands) + band) * width + np.where(valid, k, 0))],
                   -1)
    hit = np.flatnonzero(row >= 0)
    for name in ("median", "upper", "lower"):
        out[name][hit] = curves[name].to_numpy(dtype=float)[row[hit]]
    out["source"] = pd.array(curves["source"].to_numpy(dtype=object), dtype="str").take(
        row, allow_fill=True)
    return out


def default_curves() -> pd.DataFrame:
    """The shipped default curves (``source`` = ``"default"``)."""
    if not DEFAULT_CURVES.exists():
        return pd.DataFrame(columns=CURVE_COLUMNS)
    c = pd.read_csv(DEFAULT_CURVES, dtype={"measure": "str", "band": "str"})
    return c.assign(source="default")[CURVE_COLUMNS]


def with_defaults(curves: pd.DataFrame, defaults: pd.DataFrame) -> pd.DataFrame:
    """Fill the (measure, band, k) points the service's own curves lack from defaults."""
    if defaults.empty:
        return curves
    keys = ["measure", "band", "k"]
    missing = defaults.merge(curves[keys], on=keys, how="left", indicator=True)
    missing = missing[missing["_merge"] == "left_only"].drop(columns="_merge")
    out = pd.concat([curves, missing], ignore_index=True) if not curves.empty else missing
    return out.sort_values(keys).reset_index(drop=True)[CURVE_COLUMNS]
