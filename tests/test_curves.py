"""Expected recovery curves (SPEC §6) on a small constructed table.

Percentiles are the linear interpolation of R type 7 / numpy's default: the q-th
percentile of n sorted values sits at position (n - 1) q (0-based).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from pipeline.scales import Registry
from pipeline.stats.curves import ALL_BANDS, baseline_band, build_curves, lookup_curve

# One row per administration: measure, band (baseline severity), k, score.
SCORES = {
    # PHQ-9 moderate: 4 episodes at k 1 and 2, 2 of them at k 3
    ("PHQ-9", "moderate", 1): [10, 12, 13, 14],
    ("PHQ-9", "moderate", 2): [15, 8, 11, 9],
    ("PHQ-9", "moderate", 3): [7, 9],
    # PHQ-9 mild: 2 episodes only (below min_stratum 3)
    ("PHQ-9", "mild", 1): [5, 7],
    ("PHQ-9", "mild", 2): [6, 4],
    # GAD-7 severe: 3 episodes at k 1
    ("GAD-7", "severe", 1): [21, 15, 18],
}


def table() -> pd.DataFrame:
    rows = [{"measure": m, "band": b, "k": k, "score": s}
            for (m, b, k), ss in SCORES.items() for s in ss]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=7).reset_index(drop=True)


def curve_row(curves: pd.DataFrame, measure: str, band: str, k: int) -> pd.Series:
    hit = curves[(curves["measure"] == measure) & (curves["band"] == band)
                 & (curves["k"] == k)]
    assert len(hit) == 1, hit
    return hit.iloc[0]


# (measure, band, k) -> (n, median, upper 75th, lower 25th, source), min_stratum 3
EXPECTED = {
    # [10, 12, 13, 14]: median (12 + 13)/2 = 12.5; 75th at 2.25: 13 + .25 = 13.25;
    # 25th at .75: 10 + .75 * 2 = 11.5
    ("PHQ-9", "moderate", 1): (4, 12.5, 13.25, 11.5, "service"),
    # [8, 9, 11, 15]: median 10; 75th at 2.25: 11 + .25 * 4 = 12; 25th at .75: 8.75
    ("PHQ-9", "moderate", 2): (4, 10.0, 12.0, 8.75, "service"),
    # mild k 1 has 2 < 3 episodes -> all bands at k 1: [5, 7, 10, 12, 13, 14], n 6:
    # median (10 + 12)/2 = 11; 75th at 3.75: 12 + .75 = 12.75; 25th at 1.25: 7 + .25*3 = 7.75
    ("PHQ-9", "mild", 1): (6, 11.0, 12.75, 7.75, "service_all_bands"),
    # mild k 2 -> all bands at k 2: [4, 6, 8, 9, 11, 15]: median 8.5; 75th at 3.75:
    # 9 + .75 * 2 = 10.5; 25th at 1.25: 6 + .25 * 2 = 6.5
    ("PHQ-9", "mild", 2): (6, 8.5, 10.5, 6.5, "service_all_bands"),
    # [15, 18, 21]: median 18; 75th at 1.5: 19.5; 25th at .5: 16.5
    ("GAD-7", "severe", 1): (3, 18.0, 19.5, 16.5, "service"),
}


def test_curve_columns_and_strata() -> None:
    curves = build_curves(table(), min_stratum=3)
    assert list(curves.columns) == ["measure", "band", "k", "n", "median", "upper", "lower",
                                    "source"]
    # k 3 has only 2 episodes even over all bands: left out for both bands
    got = sorted(zip(curves["measure"], curves["band"], curves["k"], strict=True))
    assert got == sorted(EXPECTED)


@pytest.mark.parametrize("key", list(EXPECTED))
def test_curve_values(key: tuple[str, str, int]) -> None:
    curves = build_curves(table(), min_stratum=3)
    row = curve_row(curves, *key)
    n, median, upper, lower, source = EXPECTED[key]
    assert int(row["n"]) == n
    assert_allclose([row["median"], row["upper"], row["lower"]], [median, upper, lower],
                    rtol=1e-12)
    assert row["source"] == source


@pytest.mark.parametrize("key", list(EXPECTED))
def test_curve_values_match_numpy_percentile(key: tuple[str, str, int]) -> None:
    measure, band, k = key
    curves = build_curves(table(), min_stratum=3)
    row = curve_row(curves, *key)
    src = SCORES[key] if row["source"] == "service" else \
        [s for (m, _b, kk), ss in SCORES.items() if m == measure and kk == k for s in ss]
    assert_allclose([row["median"], row["upper"], row["lower"]],
                    np.percentile(src, [50, 75, 25]), rtol=1e-12)


def test_percentile_configurable() -> None:
    # 90th / 10th of [10, 12, 13, 14]: positions 2.7 and .3 -> 13 + .7 = 13.7, 10 + .6 = 10.6
    curves = build_curves(table(), percentile=0.9, min_stratum=3)
    row = curve_row(curves, "PHQ-9", "moderate", 1)
    assert_allclose([row["median"], row["upper"], row["lower"]], [12.5, 13.7, 10.6],
                    rtol=1e-12)


def test_min_stratum_one_keeps_every_stratum_with_data() -> None:
    # With min 1 every stratum with data is its own: mild k 1 is [5, 7] (median 6,
    # 75th 6.5, 25th 5.5). Only mild k 3 (no mild episode reached k 3: 0 < 1) falls back
    # to all bands at k 3, [7, 9].
    curves = build_curves(table(), min_stratum=1)
    fallback = curves[curves["source"] == "service_all_bands"]
    assert list(zip(fallback["band"], fallback["k"], strict=True)) == [("mild", 3)]
    assert_allclose(fallback[["n", "median"]].to_numpy(dtype=float), [[2, 8.0]])
    assert (curves["source"] == "service").sum() == 6
    row = curve_row(curves, "PHQ-9", "mild", 1)
    assert_allclose([row["median"], row["upper"], row["lower"]], [6.0, 6.5, 5.5])
    # PHQ-9 moderate k 3: [7, 9]
    row = curve_row(curves, "PHQ-9", "moderate", 3)
    assert_allclose([row["n"], row["median"]], [2, 8.0])


def test_min_stratum_too_large_leaves_nothing() -> None:
    assert build_curves(table(), min_stratum=7).empty
    assert build_curves(table().iloc[:0], min_stratum=1).empty


def test_baseline_band(registry: Registry) -> None:
    # PHQ-9 bands 0-4 minimal, 5-9 mild, 10-14 moderate, 15-19 moderately severe, 20-27
    # severe; GAD-7 15-21 severe; ORS has no bands -> "all".
    measure = pd.Series(["PHQ-9", "PHQ-9", "PHQ-9", "PHQ-9", "PHQ-9", "GAD-7", "ORS"])
    score = pd.Series([0, 4, 9, 10, 27, 15, 12])
    got = baseline_band(measure, score, registry).tolist()
    assert got == ["minimal", "minimal", "mild", "moderate", "severe", "severe", ALL_BANDS]


def test_lookup_curve() -> None:
    curves = build_curves(table(), min_stratum=3)
    keys = pd.DataFrame({"measure": ["PHQ-9", "PHQ-9", "GAD-7"],
                         "band": ["mild", "moderate", "mild"], "k": [2, 3, 1]})
    got = lookup_curve(keys, curves)
    assert_allclose(got.loc[0, ["median", "upper", "lower"]].to_numpy(dtype=float),
                    [8.5, 10.5, 6.5])
    assert got.loc[0, "source"] == "service_all_bands"
    assert np.isnan(got.loc[1, "median"])  # stratum left out
    assert np.isnan(got.loc[2, "median"])  # no such band


def test_curve_points_by_codes_with_band_names_shared_by_scales(registry: Registry) -> None:
    """The lookup by codes that the outcomes use gives the points of ``lookup_curve`` (a
    join on the text keys), also where two scales have bands of the same name (PHQ-9
    and GAD-7 both have "mild" and "severe", with different score ranges)."""
    from pipeline.stats.curves import band_codes, curve_points

    curves = build_curves(table(), min_stratum=3)
    phq = curves[curves["measure"] == "PHQ-9"]
    curves = pd.concat([curves, phq.assign(measure="GAD-7", median=phq["median"] + 100)],
                       ignore_index=True)
    measures = ["GAD-7", "PHQ-9"]
    rng = np.random.default_rng(4)
    mcode = rng.integers(0, 2, 400)
    first = rng.integers(0, 22, 400).astype(float)
    k = rng.integers(0, 5, 400)
    band, bands = band_codes(mcode, measures, first, registry)
    assert len(bands) == len(set(bands))
    labels = np.array(bands, dtype=object)[band]
    assert {"mild", "severe"} <= set(labels[mcode == 0]) & set(labels[mcode == 1])
    keys = pd.DataFrame({"measure": np.array(measures, dtype=object)[mcode], "band": labels,
                         "k": k})
    assert labels.tolist() == baseline_band(keys["measure"], pd.Series(first),
                                            registry).tolist()
    got = curve_points(curves, mcode, measures, band, bands, k)
    want = lookup_curve(keys, curves)
    for name in ("median", "upper", "lower"):
        assert_allclose(got[name], want[name].to_numpy(dtype=float), equal_nan=True)
    pd.testing.assert_series_equal(pd.Series(got["source"]),
                                   want["source"].astype("str"), check_names=False)
    # by hand: PHQ-9 moderate k 2 is 10.0; its GAD-7 copy 110.0; moderate k 4 has none
    assert np.isin([10.0, 110.0], got["median"]).all()
    assert np.isnan(got["median"]).sum() > 50
