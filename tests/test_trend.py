"""Grouped OLS and Theil-Sen trends (SPEC §6) against scipy's independent implementations
(``scipy.stats.linregress``, ``scipy.stats.theilslopes``) and hand-computed sums."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from scipy import stats

from pipeline.stats.trend import grouped_trend

# Groups of (days, scores); several in one call, deliberately unsorted by group and day.
GROUPS: dict[tuple[str, str], tuple[list[int], list[int]]] = {
    ("E1", "PHQ-9"): ([0, 7, 14, 28], [18, 15, 12, 8]),
    ("E1", "GAD-7"): ([0, 7, 14, 21, 28], [15, 15, 16, 15, 15]),
    ("E2", "PHQ-9"): ([0, 3, 13, 21, 33, 40, 51, 65], [16, 16, 15, 15, 12, 14, 12, 11]),
    ("E3", "PHQ-9"): ([0, 5, 5, 12, 30, 31, 60], [20, 22, 19, 14, 15, 9, 7]),  # tied days
    ("E4", "ORS"): ([0, 7, 14, 28], [15, 20, 25, 30]),  # rising (higher is better)
    ("E6", "GAD-7"): ([0, 7, 21, 28], [20, 17, 11, 8]),  # exact line: -3/7 a day, SE 0
    ("E5", "PHQ-9"): ([0, 14, 35], [10, 10, 10]),  # flat: SE 0 (linregress gives NaN)
}
# linregress leaves stderr undefined (NaN) for constant scores; E5 is checked by hand.
NON_FLAT = [k for k in GROUPS if k != ("E5", "PHQ-9")]


def long_frame(groups: dict[tuple[str, str], tuple[list[int], list[int]]],
               seed: int = 3) -> pd.DataFrame:
    rows = [{"episode_id": e, "measure": m, "day": d, "score": y}
            for (e, m), (days, ys) in groups.items() for d, y in zip(days, ys, strict=True)]
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def by_key(out: pd.DataFrame) -> pd.DataFrame:
    return out.set_index(["episode_id", "measure"])


@pytest.mark.parametrize("key", NON_FLAT)
def test_ols_matches_linregress(key: tuple[str, str]) -> None:
    out = by_key(grouped_trend(long_frame(GROUPS), ["episode_id", "measure"]))
    days, ys = GROUPS[key]
    ref = stats.linregress(days, ys)  # independent implementation
    n = len(days)
    t = stats.t.ppf(0.975, n - 2)
    row = out.loc[key]
    assert row["n"] == n
    # per week = per day x 7
    assert_allclose(row["slope_week"], 7 * ref.slope, rtol=1e-10, atol=1e-12)
    assert_allclose(row["slope_se_week"], 7 * ref.stderr, rtol=1e-8, atol=1e-12)
    assert_allclose(row["slope_ci_low"], 7 * (ref.slope - t * ref.stderr), rtol=1e-8,
                    atol=1e-12)
    assert_allclose(row["slope_ci_high"], 7 * (ref.slope + t * ref.stderr), rtol=1e-8,
                    atol=1e-12)


@pytest.mark.parametrize("key", list(GROUPS))
def test_theil_sen_matches_scipy(key: tuple[str, str]) -> None:
    out = by_key(grouped_trend(long_frame(GROUPS), ["episode_id", "measure"]))
    days, ys = GROUPS[key]
    ref = stats.theilslopes(ys, days)
    assert_allclose(out.loc[key, "theil_sen_week"], 7 * ref.slope, rtol=1e-12, atol=1e-12)


def test_hand_values_first_group() -> None:
    # days 0, 7, 14, 28; scores 18, 15, 12, 8:
    # n 4, Σd 49, Σy 53, Σdy 0 + 105 + 168 + 224 = 497, Σd² 0 + 49 + 196 + 784 = 1029
    # slope/day = (4*497 - 49*53) / (4*1029 - 49²) = -609 / 1715 = -87/245
    # slope/week = -87/35 = -2.4857143
    # Theil-Sen: pairwise slopes -3/7, -3/7, -5/14, -3/7, -1/3, -2/7 -> median of six =
    #   (-3/7 + -5/14)/2 = -11/28 per day = -2.75 per week.
    out = by_key(grouped_trend(long_frame(GROUPS), ["episode_id", "measure"]))
    row = out.loc[("E1", "PHQ-9")]
    assert (row["sum_d"], row["sum_y"], row["sum_dy"], row["sum_dd"]) == (49, 53, 497, 1029)
    assert_allclose(row["slope_week"], -87 / 35, rtol=1e-12)
    assert_allclose(row["theil_sen_week"], -2.75, rtol=1e-12)


def test_flat_scores_have_zero_slope_and_se() -> None:
    # Scores 10, 10, 10 at days 0, 14, 35: Sxy = 0, RSS = 0 -> slope 0, SE 0, CI [0, 0],
    # Theil-Sen 0.
    out = by_key(grouped_trend(long_frame(GROUPS), ["episode_id", "measure"]))
    row = out.loc[("E5", "PHQ-9")]
    assert_allclose([row["slope_week"], row["slope_se_week"], row["slope_ci_low"],
                     row["slope_ci_high"], row["theil_sen_week"]], 0.0, atol=1e-12)


@pytest.mark.parametrize(("days", "scores"), [
    ([0], [10]),               # one administration
    ([0, 7], [10, 5]),         # two: n < 3
    ([3, 3, 3], [10, 12, 9]),  # all on one day: Sxx = 0
    ([5, 5, 5, 5], [1, 2, 3, 4]),
])
def test_insufficient_data_gives_nan(days: list[int], scores: list[int]) -> None:
    groups = {("X", "PHQ-9"): (days, scores), ("E1", "PHQ-9"): GROUPS[("E1", "PHQ-9")]}
    out = by_key(grouped_trend(long_frame(groups), ["episode_id", "measure"]))
    row = out.loc[("X", "PHQ-9")]
    assert row["n"] == len(days)
    for col in ("slope_week", "slope_se_week", "slope_ci_low", "slope_ci_high",
                "theil_sen_week"):
        assert np.isnan(row[col]), col
    # the neighbouring group is unaffected
    assert_allclose(out.loc[("E1", "PHQ-9"), "slope_week"], -87 / 35, rtol=1e-12)


def test_min_points_parameter() -> None:
    # With min_points=5 the 4-point group is "insufficient"; the 5-point group is not.
    out = by_key(grouped_trend(long_frame(GROUPS), ["episode_id", "measure"], min_points=5))
    assert np.isnan(out.loc[("E1", "PHQ-9"), "slope_week"])
    assert_allclose(out.loc[("E1", "GAD-7"), "slope_week"],
                    7 * stats.linregress(*GROUPS[("E1", "GAD-7")]).slope, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 0.10, 0.01])
def test_ci_level(alpha: float) -> None:
    days, ys = GROUPS[("E2", "PHQ-9")]
    out = grouped_trend(long_frame({("E2", "PHQ-9"): (days, ys)}), ["episode_id", "measure"],
                        alpha=alpha).iloc[0]
    ref = stats.linregress(days, ys)
    t = stats.t.ppf(1 - alpha / 2, len(days) - 2)
    assert_allclose(out["slope_ci_low"], 7 * (ref.slope - t * ref.stderr), rtol=1e-8)
    assert_allclose(out["slope_ci_high"], 7 * (ref.slope + t * ref.stderr), rtol=1e-8)


def test_sums_exact_in_int64() -> None:
    # Days near 1e8: Σd² ~ 5e16 > 2^53, where float64 sums would lose the last units.
    # Python integers give the exact reference values.
    base = 100_000_007
    days = [base, base + 1, base + 3, base + 10, base + 11]
    ys = [27, 25, 22, 21, 19]
    out = grouped_trend(pd.DataFrame({"g": "a", "day": days, "score": ys}), ["g"]).iloc[0]
    assert out["sum_d"] == sum(days)
    assert out["sum_y"] == sum(ys)
    assert out["sum_dy"] == sum(d * y for d, y in zip(days, ys, strict=True))
    assert out["sum_dd"] == sum(d * d for d in days)
    assert sum(d * d for d in days) > 2**53
    # and the exact slope numerator/denominator give the exact slope:
    n = len(days)
    num = n * out["sum_dy"] - out["sum_d"] * out["sum_y"]
    den = n * out["sum_dd"] - out["sum_d"] ** 2
    shifted = [d - base for d in days]
    ref = stats.linregress(shifted, ys)
    assert_allclose(num / den, ref.slope, rtol=1e-12)


def test_group_order_and_columns() -> None:
    out = grouped_trend(long_frame(GROUPS), ["episode_id", "measure"])
    assert sorted(zip(out["episode_id"], out["measure"], strict=True)) == sorted(GROUPS)
    assert len(out) == len(GROUPS)
    for col in ("n", "sum_d", "sum_y", "sum_dy", "sum_dd"):
        assert out[col].dtype == np.int64, col


def test_theil_sen_on_many_group_sizes_matches_scipy() -> None:
    """Groups of 1 to 40 administrations (the vectorised path stacks groups by size),
    with tied days, each against scipy.stats.theilslopes on that group alone."""
    rng = np.random.default_rng(11)
    groups: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for i in range(300):
        m = int(rng.integers(1, 41))
        days = np.sort(rng.integers(0, 200, m)).tolist()  # repeats give tied days
        groups[(f"E{i:03d}", "PHQ-9")] = (days, rng.integers(0, 28, m).tolist())
    out = by_key(grouped_trend(long_frame(groups), ["episode_id", "measure"]))
    checked = 0
    for key, (days, ys) in groups.items():
        distinct = len(set(days)) > 1
        if len(days) >= 3 and distinct:
            expected = 7 * stats.theilslopes(ys, days).slope
            assert_allclose(out.loc[key, "theil_sen_week"], expected, rtol=1e-12, atol=1e-12)
            checked += 1
        else:  # fewer than 3 points, or all on one day: no trend
            assert np.isnan(out.loc[key, "theil_sen_week"])
    assert checked > 250


@pytest.mark.parametrize("layout", ["no ties", "all tied", "mixed"])
def test_theil_sen_by_size_with_and_without_tied_days(layout: str) -> None:
    """Groups of one size take one of three paths (every pair valid: the middle pairs by
    partition; some days shared: a sort, NaNs last; or both in one size): each group
    against scipy.stats.theilslopes on that group alone, odd and even pair counts."""
    rng = np.random.default_rng({"no ties": 1, "all tied": 2, "mixed": 3}[layout])
    groups: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for m in (3, 4, 5, 6, 9, 12, 16, 25):  # 3, 6, 10, 15, 36, 66, 120 and 300 pairs
        for i in range(40):
            tied = layout == "all tied" or (layout == "mixed" and i % 2 == 0)
            days = np.sort(rng.choice(150, m, replace=False))
            if tied:
                days[int(rng.integers(1, m))] = days[0] if m == 3 else days[1]
                days = np.sort(days)
            groups[(f"E{m}-{i:02d}", "PHQ-9")] = (days.tolist(), rng.integers(0, 28, m).tolist())
    out = by_key(grouped_trend(long_frame(groups), ["episode_id", "measure"]))
    for key, (days, ys) in groups.items():
        if len(set(days)) < 2:
            assert np.isnan(out.loc[key, "theil_sen_week"])
            continue
        expected = 7 * stats.theilslopes(ys, days).slope
        assert_allclose(out.loc[key, "theil_sen_week"], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["fractional scores", "wide days", "integer floats"])
def test_theil_sen_takes_floats_and_wide_integers(kind: str) -> None:
    """Integer days and scores are differenced in int32; fractional scores, or values
    whose differences do not fit int32, keep float64. Every kind matches scipy."""
    from pipeline.stats.trend import theil_sen

    rng = np.random.default_rng(len(kind))
    sizes = rng.integers(3, 12, 60)
    gid = np.repeat(np.arange(sizes.size), sizes)
    day = np.concatenate([np.sort(rng.choice(400, m, replace=False)) for m in sizes])
    score = rng.integers(0, 28, gid.size).astype(float)
    if kind == "fractional scores":
        score = score + rng.random(gid.size)
    elif kind == "wide days":
        day = day * 10_000_000  # differences beyond int32
    got = theil_sen(gid, day.astype(np.int64), score, sizes.size)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    for g, (s, m) in enumerate(zip(starts, sizes, strict=True)):
        expected = stats.theilslopes(score[s:s + m], day[s:s + m]).slope
        assert_allclose(got[g], expected, rtol=1e-12, atol=0)
