"""NHS Talking Therapies service metrics (SPEC §5) and Wilson intervals.

The episode table below covers every SPEC §5 rule and its edge; each row says which
flags it must get and why. Counts and rates are tallied by hand beneath it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from scipy import stats

from pipeline.stats.service import (
    METRICS,
    episode_service_outcomes,
    metrics_record,
    service_metrics,
    wilson_interval,
)

# ------------------------------------------------------------------ Wilson


def scipy_wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (0, 10), (5, 10), (3, 7), (2, 7),
                                      (4, 10), (1, 3), (49, 100), (670, 1000), (1, 250)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    lo, hi = wilson_interval(k, n)
    ref_lo, ref_hi = scipy_wilson(k, n)
    assert_allclose([float(lo), float(hi)], [ref_lo, ref_hi], rtol=1e-9, atol=1e-12)


def test_wilson_hand_value() -> None:
    # k 5, n 10, z 1.959964: centre (.5 + z²/20)/(1 + z²/10) = .5;
    # half = z sqrt(.025 + z²/400) / (1 + z²/10) = 1.959964 * .18982 / 1.38415 = .26878
    # -> (.2366, .7634)
    lo, hi = wilson_interval(5, 10)
    assert_allclose([float(lo), float(hi)], [0.2366, 0.7634], atol=5e-5)


@pytest.mark.parametrize("alpha", [0.01, 0.10])
def test_wilson_other_levels(alpha: float) -> None:
    lo, hi = wilson_interval([3, 12], [7, 40], alpha=alpha)
    for i, (k, n) in enumerate([(3, 7), (12, 40)]):
        assert_allclose([lo[i], hi[i]], scipy_wilson(k, n, 1 - alpha), rtol=1e-9)


def test_wilson_vectorised_and_n_zero_is_nan() -> None:
    lo, hi = wilson_interval([0, 3, 0], [0, 7, 5])
    assert np.isnan(lo[0]) and np.isnan(hi[0])
    assert_allclose([lo[1], hi[1]], scipy_wilson(3, 7), rtol=1e-9)
    assert_allclose([lo[2], hi[2]], scipy_wilson(0, 5), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ per-episode flags

# (episode, team, ended, PHQ-9 n first last, GAD-7 n first last,
#  finished, at_caseness, recovered, improved, deteriorated, reliably_recovered)
N_ = None
CASES = [
    # open episode (no end date): never in the rates, however good
    ("E01", "A", False, (2, 15, 5), (2, 12, 4), 0, 0, 0, 0, 0, 0),
    # ended but only 1 GAD-7: not finished
    ("E02", "C", True, (3, 15, 5), (1, 12, N_), 0, 0, 0, 0, 0, 0),
    # PHQ-9 first exactly 10 -> caseness; 10 -> 4 (-6: reliable), GAD 5 -> 3: recovered
    ("E03", "A", True, (2, 10, 4), (2, 5, 3), 1, 1, 1, 1, 0, 1),
    # PHQ-9 9, GAD-7 first exactly 8 -> caseness; last 9 and 7 (<10, <8): recovered,
    # changes 0 and -1: not reliable, so not reliably recovered
    ("E04", "A", True, (2, 9, 9), (2, 8, 7), 1, 1, 1, 0, 0, 0),
    # PHQ-9 9 and GAD-7 7: not caseness; PHQ-9 -5 (9 -> 4) is not reliable
    ("E05", "A", True, (2, 9, 4), (2, 7, 7), 1, 0, 0, 0, 0, 0),
    # PHQ-9 16 -> 10 (-6: reliable) but last exactly 10: not recovered
    ("E06", "A", True, (4, 16, 10), (3, 9, 5), 1, 1, 0, 1, 0, 0),
    # GAD-7 -4 counts (12 -> 8); GAD-7 last exactly 8: not recovered
    ("E07", "B", True, (2, 12, 12), (2, 12, 8), 1, 1, 0, 1, 0, 0),
    # PHQ-9 -6 and GAD-7 +4: neither improvement nor deterioration; GAD last 9: not recovered
    ("E08", "B", True, (2, 15, 9), (2, 5, 9), 1, 1, 0, 0, 0, 0),
    # PHQ-9 +6 (5 -> 11): deterioration; not caseness (5, 3)
    ("E09", "B", True, (2, 5, 11), (2, 3, 3), 1, 0, 0, 0, 1, 0),
    # GAD-7 +4 (10 -> 14), PHQ-9 +1: deterioration; caseness, not recovered
    ("E10", "B", True, (2, 12, 13), (2, 10, 14), 1, 1, 0, 0, 1, 0),
    # PHQ-9 +5 (4 -> 9), GAD-7 +3 (2 -> 5): not reliable either way
    ("E11", "B", True, (2, 4, 9), (2, 2, 5), 1, 0, 0, 0, 0, 0),
    # PHQ-9 20 -> 3, GAD-7 15 -> 2: recovered, improved, reliably recovered
    ("E12", "B", True, (5, 20, 3), (5, 15, 2), 1, 1, 1, 1, 0, 1),
    # ended, no administrations at all: not finished
    ("E13", "C", True, None, None, 0, 0, 0, 0, 0, 0),
]
FLAG_COLS = ["finished", "at_caseness", "recovered", "reliably_improved",
             "reliably_deteriorated", "reliably_recovered"]


def case_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    eps, paired = [], []
    for ep, team, ended, dep, anx, *_ in CASES:
        eps.append({"episode_id": ep, "team": team,
                    "end_date": pd.Timestamp("2026-06-30") if ended else pd.NaT})
        for code, m in (("PHQ-9", dep), ("GAD-7", anx)):
            if m is None:
                continue
            n, first, last = m
            paired.append({"episode_id": ep, "measure": code, "n": n, "first_score": first,
                           "last_score": np.nan if last is None else last})
    # unrelated measures of the same episodes must be ignored
    paired.append({"episode_id": "E05", "measure": "CORE-10", "n": 3, "first_score": 30,
                   "last_score": 2})
    return pd.DataFrame(eps), pd.DataFrame(paired)


def flags() -> pd.DataFrame:
    eps, paired = case_tables()
    return episode_service_outcomes(eps, paired, depression="PHQ-9", anxiety="GAD-7",
                                    dep_caseness=10, anx_caseness=8, dep_points=6,
                                    anx_points=4)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_episode_flags(case: tuple[Any, ...]) -> None:
    out = flags().set_index("episode_id")
    expected = dict(zip(FLAG_COLS, case[5:], strict=True))
    got = {c: int(bool(out.loc[case[0], c])) for c in FLAG_COLS}
    assert got == expected


def test_paired_changes() -> None:
    out = flags().set_index("episode_id")
    # change = last - first
    assert_allclose(out.loc["E06", ["dep_change", "anx_change"]].to_numpy(dtype=float),
                    [-6, -4])
    assert_allclose(out.loc["E08", ["dep_change", "anx_change"]].to_numpy(dtype=float),
                    [-6, 4])
    assert np.isnan(out.loc["E13", "dep_change"])


def test_gad7_caseness_setting() -> None:
    # With Spitzer's GAD-7 >= 10: E04 (PHQ-9 9, GAD-7 8) is no longer at caseness, and
    # E07 (GAD-7 last 8 < 10, PHQ-9 last 12) still not recovered; E08 stays (PHQ-9 15).
    eps, paired = case_tables()
    out = episode_service_outcomes(eps, paired, depression="PHQ-9", anxiety="GAD-7",
                                   dep_caseness=10, anx_caseness=10, dep_points=6,
                                   anx_points=4).set_index("episode_id")
    assert not out.loc["E04", "at_caseness"]
    assert not out.loc["E04", "recovered"]
    assert out.loc["E08", "at_caseness"]


# ------------------------------------------------------------------ service_metrics

# Hand tally over CASES. Finished: E03-E12 = 10. At caseness: E03 E04 E06 E07 E08 E10 E12
# = 7. Recovered: E03 E04 E12 = 3 (/7). Reliably improved: E03 E06 E07 E12 = 4 (/10).
# Reliably deteriorated: E09 E10 = 2 (/10). Reliably recovered: E03 E12 = 2 (/7).
OVERALL = {"finished_episodes": 10, "at_caseness": 7, "recovered": 3,
           "reliably_improved": 4, "reliably_deteriorated": 2, "reliably_recovered": 2}
DENOM = {"recovered": "at_caseness", "reliably_improved": "finished_episodes",
         "reliably_deteriorated": "finished_episodes", "reliably_recovered": "at_caseness"}
# By team. A: E01 (open) E03 E04 E05 E06 -> finished 4, caseness E03 E04 E06 = 3,
# recovered E03 E04 = 2, improved E03 E06 = 2, deteriorated 0, reliably recovered E03 = 1.
# B: E07-E12 -> finished 6, caseness E07 E08 E10 E12 = 4, recovered E12 = 1,
# improved E07 E12 = 2, deteriorated E09 E10 = 2, reliably recovered E12 = 1.
# C: E02 E13, neither finished -> all 0, every rate NaN.
BY_TEAM = {
    "A": {"finished_episodes": 4, "at_caseness": 3, "recovered": 2, "reliably_improved": 2,
          "reliably_deteriorated": 0, "reliably_recovered": 1},
    "B": {"finished_episodes": 6, "at_caseness": 4, "recovered": 1, "reliably_improved": 2,
          "reliably_deteriorated": 2, "reliably_recovered": 1},
    "C": {"finished_episodes": 0, "at_caseness": 0, "recovered": 0, "reliably_improved": 0,
          "reliably_deteriorated": 0, "reliably_recovered": 0},
}


def check_row(row: pd.Series | dict[str, Any], expected: dict[str, int]) -> None:
    for key, value in expected.items():
        assert int(row[key]) == value, key
    for metric, den in DENOM.items():
        k, n = expected[metric], expected[den]
        if n == 0:  # no denominator: rate and interval undefined
            for suffix in ("_rate", "_ci_low", "_ci_high"):
                v = row[f"{metric}{suffix}"]
                assert v is None or np.isnan(v)
            continue
        assert_allclose(row[f"{metric}_rate"], k / n, rtol=1e-12)
        assert_allclose([row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]],
                        scipy_wilson(k, n), rtol=1e-9, atol=1e-12)


def test_metric_denominators() -> None:
    assert METRICS == {
        "recovered": ("recovered", "at_caseness"),
        "reliably_improved": ("reliably_improved", "finished"),
        "reliably_deteriorated": ("reliably_deteriorated", "finished"),
        "reliably_recovered": ("reliably_recovered", "at_caseness"),
    }


def test_service_metrics_overall() -> None:
    m = service_metrics(flags())
    assert len(m) == 1
    check_row(m.iloc[0], OVERALL)
    # 3/7 = .428571, 4/10, 2/10, 2/7 = .285714
    assert_allclose(m.iloc[0][[f"{k}_rate" for k in DENOM]].to_numpy(dtype=float),
                    [3 / 7, 0.4, 0.2, 2 / 7], rtol=1e-12)


def test_service_metrics_by_team() -> None:
    m = service_metrics(flags(), by=["team"]).set_index("team")
    assert sorted(m.index) == ["A", "B", "C"]
    for team, expected in BY_TEAM.items():
        check_row(m.loc[team], expected)


def test_metrics_record_json_ready() -> None:
    rec = metrics_record(service_metrics(flags()))
    check_row(rec, OVERALL)
    assert all(type(rec[k]) is int for k in OVERALL)
    assert type(rec["recovered_rate"]) is float
    empty = metrics_record(service_metrics(flags()[flags()["team"] == "C"]))
    assert empty["finished_episodes"] == 0
    assert empty["recovered_rate"] is None and empty["recovered_ci_low"] is None
