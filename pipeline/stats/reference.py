"""The whole-store *reference* (baseline SDs, expected recovery curves) from mergeable
partial aggregates, so that it can be built over partitions of episodes (pandas: one
partition; Dask: a reduction over many) with bit-identical results.

Each partition contributes, per measure, the count, sum and sum of squares of episodes'
first scores (exact integers), and, per (measure, baseline band, administration number,
score), the count of administrations of finished episodes. Scores are whole numbers, so
these histograms determine every quantile exactly
(:func:`pipeline.stats.curves.curves_from_histogram`).

References
----------
.. [1] Jacobson, N. S., & Truax, P. (1991). Clinical significance: a statistical approach
   to defining meaningful change in psychotherapy research. Journal of Consulting and
   Clinical Psychology, 59(1), 12-19. (SD of pre-treatment scores in the RCI.)
.. [2] Lutz, W., Martinovich, Z., & Howard, K. I. (1999). Patient profiling: an
   application of random coefficient regression models to depicting the response of a
   patient to outpatient psychotherapy. Journal of Consulting and Clinical Psychology,
   67(4), 571-577. (Expected recovery curves with tolerance bands.)
.. [3] Hyndman, R. J., & Fan, Y. (1996). Sample quantiles in statistical packages. The
   American Statistician, 50(4), 361-365. (Definition 7, the linear interpolation.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pandas as pd

from pipeline.columns import is_in
from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.stats.curves import (
    DEFAULT_PERCENTILE,
    baseline_band,
    curves_from_histogram,
    default_curves,
    with_defaults,
)
from pipeline.stats.groups import Grouped, group_administrations
from pipeline.stats.outcomes import Reference

__all__ = ["FIRSTS_COLUMNS", "HIST_COLUMNS", "Partials", "merge_partials", "partials",
           "reference_from_partials", "sd_from_partials"]

FIRSTS_COLUMNS = ["measure", "n", "s1", "s2"]
HIST_COLUMNS = ["measure", "band", "k", "score", "count"]


@dataclass(frozen=True)
class Partials:
    """Mergeable aggregates of one partition of episodes."""

    #: per measure: number of episodes, sum and sum of squares of their first scores.
    firsts: pd.DataFrame
    #: per (measure, band, k, score): administrations of finished episodes.
    hist: pd.DataFrame


def partials(admins: pd.DataFrame, ended: pd.Series | Iterable[str],
             registry: Registry, grouped: Grouped | None = None) -> Partials:
    """The partial aggregates of the episodes in ``admins`` (all of each one's rows).

    Parameters
    ----------
    admins
        ``episode_id, measure, administered_at, score``.
    ended
        Ids of episodes with an end date (curves use finished episodes only).
    grouped
        ``admins`` already ordered by :func:`group_administrations`, if the caller has it.
    """
    if admins.empty:
        return Partials(pd.DataFrame(columns=FIRSTS_COLUMNS),
                        pd.DataFrame(columns=HIST_COLUMNS))
    g = grouped if grouped is not None else group_administrations(admins)
    score = g.values("score", dtype=np.int64)
    heads = g.heads
    f = pd.DataFrame({"measure": heads["measure"], "x": score[g.starts]})
    f["x2"] = f["x"] * f["x"]
    firsts = f.groupby("measure", observed=True).agg(
        n=("x", "size"), s1=("x", "sum"), s2=("x2", "sum")).reset_index()
    # Band and "finished" belong to the episode x measure: one per group, then per row.
    band = baseline_band(f["measure"], f["x"], registry, grouped=g)
    m_code, m_names = pd.factorize(f["measure"], sort=True)
    b_code, b_names = pd.factorize(band, sort=True)
    done_g = is_in(heads["episode_id"], ended)
    # Histogram by one integer key whose order is (measure, band, k, score): sorted
    # codes keep the text order, so this equals a sorted groupby, without text keys.
    # The key is built for every row, an unfinished episode's rows in one extra
    # stratum that is left out of the counts: two whole-length arrays instead of
    # gathering the finished rows' columns first.
    n_mb = len(m_names) * len(b_names)
    if score.size and done_g.any():
        lo_x, n_x = int(score.min()), int(score.max() - score.min()) + 1
        n_k = int(g.sizes.max())
        mb_g = np.where(done_g, m_code.astype(np.int64) * len(b_names) + b_code, n_mb)
        codes = np.take((mb_g * n_k - 1) * n_x - lo_x, g.gid)  # ((mb n_k + k - 1) n_x + x - lo)
        step = g.k * n_x
        codes += step
        del step
        codes += score
        span = n_mb * n_k * n_x
        if span <= 4 * codes.size + 1_000_000:  # a dense count: linear, no sort
            counts = np.bincount(codes, minlength=span + n_k * n_x)[:span]
            key = np.flatnonzero(counts)
            count = counts[key]
        else:
            key, count = np.unique(codes, return_counts=True)
            count = count[key < span]
            key = key[key < span]
    else:
        lo_x, n_k, n_x = 0, 1, 1
        key, count = np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    mb_of, rest = np.divmod(key, n_k * n_x)
    k_of, x_of = np.divmod(rest, n_x)
    hist = pd.DataFrame({
        "measure": m_names.take(mb_of // len(b_names)),
        "band": b_names.take(mb_of % len(b_names)),
        "k": k_of + 1, "score": x_of + lo_x, "count": count.astype(np.int64)})
    return Partials(firsts[FIRSTS_COLUMNS], hist[HIST_COLUMNS])


def merge_partials(parts: list[Partials]) -> Partials:
    """Sum the aggregates of several partitions (associative and commutative)."""
    firsts = pd.concat([p.firsts for p in parts if not p.firsts.empty], ignore_index=True) \
        if any(not p.firsts.empty for p in parts) else pd.DataFrame(columns=FIRSTS_COLUMNS)
    hist = pd.concat([p.hist for p in parts if not p.hist.empty], ignore_index=True) \
        if any(not p.hist.empty for p in parts) else pd.DataFrame(columns=HIST_COLUMNS)
    if not firsts.empty:
        firsts = firsts.groupby("measure", observed=True)[["n", "s1", "s2"]].sum() \
            .reset_index()[FIRSTS_COLUMNS]
    if not hist.empty:
        hist = hist.groupby(["measure", "band", "k", "score"], observed=True)["count"] \
            .sum().reset_index()[HIST_COLUMNS]
    return Partials(firsts, hist)


def sd_from_partials(n: int, s1: int, s2: int) -> float:
    """Sample SD (n-1) from exact integer sums: one rounding, whatever the partitioning.

    ``var = (n * s2 - s1**2) / (n * (n - 1))`` in exact rational arithmetic.
    """
    if n < 2:
        return math.nan
    return math.sqrt(Fraction(int(n) * int(s2) - int(s1) ** 2, int(n) * (int(n) - 1)))


def reference_from_partials(parts: Partials, registry: Registry, settings: Settings,
                            use_defaults: bool = True) -> tuple[Reference, pd.DataFrame]:
    """Baseline SDs and expected recovery curves from (merged) partial aggregates.

    The SD of a measure is the service's own baseline SD (n-1) when at least two
    episodes have a baseline and it is above 0, else the registry's clinical norm SD,
    else none (no RCI for that measure). Curves: :func:`curves_from_histogram`, with the
    shipped defaults filling strata the service lacks (at the default percentile).

    Returns
    -------
    (reference, norms table)
        The norms table has ``measure, sd, n, source`` (what ``reference_norms`` stores).
    """
    sds: dict[str, float] = {}
    sources: dict[str, str] = {}
    rows = []
    f = parts.firsts
    for code_, n_, s1, s2 in zip(f["measure"], f["n"], f["s1"], f["s2"],
                                 strict=True):  # one row per measure
        code, n = str(code_), int(n_)
        scale = registry.get(code)
        sd = sd_from_partials(n, int(s1), int(s2))
        if n >= 2 and sd > 0:
            sds[code] = sd
            sources[code] = f"service baseline SD (n-1) over {n} episodes"
        elif scale is not None and scale.norms_clinical is not None:
            sds[code] = scale.norms_clinical.sd
            sources[code] = f"registry clinical norms: {scale.norms_clinical.source}"
        else:
            continue
        rows.append({"measure": code, "sd": sds[code], "n": n, "source": sources[code]})
    curves = curves_from_histogram(parts.hist, percentile=settings.curve_percentile,
                                   min_stratum=settings.curve_min_stratum)
    if use_defaults and settings.curve_percentile == DEFAULT_PERCENTILE:
        # A young service borrows the shipped curve where its own strata are too small.
        curves = with_defaults(curves, default_curves())
    norms = pd.DataFrame(rows, columns=["measure", "sd", "n", "source"])
    return Reference(sd=sds, sd_source=sources, curves=curves), norms
