"""``compute`` end to end on a tiny store: outcomes against hand-computed values
(SPEC §4-§6), the stalled rule at its exact edges, the incremental identity and the
``ontrack report --json`` service metrics (SPEC §5).

Scores are PHQ-9 / GAD-7 / ORS totals at day offsets from 2026-01-05 (see
``tests.stats_helpers.series``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from scipy import stats

from pipeline import cli
from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.store import Store
from tests.stats_helpers import (
    ADMIN_HEADER,
    entity_files,
    episode,
    ingest,
    outcomes_table,
    series,
    write_csv,
)

WEEKLY_11 = [7 * w for w in range(11)]  # days 0, 7, ..., 70

# episode -> team, ended, [(measure, days, scores)]
DATA: dict[str, tuple[str, bool, list[tuple[str, list[int], list[int]]]]] = {
    # the hand-checked episode
    "EA": ("North", True, [("PHQ-9", [0, 7, 14, 28], [18, 15, 12, 4]),
                           ("GAD-7", [0, 28], [12, 6])]),
    # flat over 4 weeks, 5 administrations: stalled
    "ES": ("North", True, [("PHQ-9", [0, 7, 14, 21, 28], [15, 15, 16, 15, 15]),
                           ("GAD-7", [0, 28], [10, 10])]),
    # 4 administrations over exactly 28 days (weeks = 4.0): eligible, stalled
    "ES4": ("North", True, [("PHQ-9", [0, 9, 18, 28], [12, 12, 13, 12])]),
    # flat but only 21 days: not eligible
    "EN": ("North", False, [("PHQ-9", [0, 7, 14, 21], [15, 15, 15, 15])]),
    # noisy but reliably improved (20 -> 13, -7): not stalled
    "EI": ("North", True, [("PHQ-9", [0, 7, 14, 28], [20, 12, 20, 13])]),
    # near miss: exactly -0.3/week, tight CI, change -3: not stalled
    "ENM": ("South", True, [("PHQ-9", WEEKLY_11, [16, 16, 15, 15, 15, 15, 14, 14, 14, 13,
                                                  13])]),
    # exactly -0.25/week, CI excluding 0: not stalled (-0.25 is not above -0.25)
    "ET": ("South", True, [("PHQ-9", [0, 20, 25, 33, 40, 51, 65, 74],
                            [14, 13, 13, 13, 13, 12, 12, 11])]),
    # exactly -0.25/week, CI including 0: stalled (by the CI clause only)
    "EW": ("South", True, [("PHQ-9", [0, 4, 45, 56, 61, 68], [14, 16, 12, 13, 14, 12])]),
    # ORS (higher is better) rising: improved
    "EO": ("North", True, [("ORS", [0, 7, 14, 28], [15, 20, 25, 30])]),
    # ORS flat: stalled (mirrored threshold +0.25)
    "EOF": ("North", True, [("ORS", [0, 7, 14, 21, 28], [20, 20, 21, 20, 20])]),
    # ORS rising +0.3/week exactly (mirror of ENM), change +3 < 5: not stalled
    "EOR": ("South", True, [("ORS", WEEKLY_11, [24, 24, 25, 25, 25, 25, 26, 26, 26, 27,
                                                27])]),
    # ORS falling 30 -> 24: deteriorated
    "EOD": ("South", True, [("ORS", [0, 14], [30, 24])]),
}

# First PHQ-9 scores of every episode: EA 18, ES 15, ES4 12, EN 15, EI 20, ENM 16, ET 14,
# EW 14 -> mean 15.5, squared deviations 6.25 + .25 + 12.25 + .25 + 20.25 + .25 + 2.25 +
# 2.25 = 44, SD (n-1) = sqrt(44/7) = 2.50714.
PHQ9_FIRSTS = [18, 15, 12, 15, 20, 16, 14, 14]
PHQ9_SD = math.sqrt(44 / 7)
# First GAD-7 scores: EA 12, ES 10 -> SD sqrt(2) = 1.41421.
GAD7_SD = math.sqrt(2)
R_PHQ9, R_GAD7 = 0.89, 0.92  # registry reliability (Kroenke 2001; Spitzer 2006)


def admin_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for ep, (_team, _ended, measures) in data.items():
        for measure, days, scores, *sessions in measures:
            rows.extend(series(ep, measure, days, scores,
                               sessions=sessions[0] if sessions else None))
    return rows


def build_store(tmp_path: Path, data: dict[str, Any], settings: Settings,
                registry: Registry) -> Store:
    store = Store(f"sqlite:///{tmp_path}/t.db")
    store.init()
    d = tmp_path / "in"
    eps = [episode(ep, team, ended) for ep, (team, ended, _m) in data.items()]
    paths = entity_files(d, eps)
    adm = write_csv(d / "administrations.csv", ADMIN_HEADER, admin_rows(data))
    ingest([*paths, adm], store, settings, registry)
    return store


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory,
             registry: Registry) -> Iterator[pd.DataFrame]:
    tmp = tmp_path_factory.mktemp("compute")
    settings = Settings()
    store = build_store(tmp, DATA, settings, registry)
    rep = compute(store, settings, registry, full=True)
    assert rep.mode == "full" and rep.reference_rebuilt
    assert rep.episodes == len(DATA)
    yield outcomes_table(store)
    store.engine.dispose()


# ------------------------------------------------------------------ hand-checked outcomes


def test_reference_sd(computed: pd.DataFrame) -> None:
    assert_allclose(statistics.stdev(PHQ9_FIRSTS), PHQ9_SD, rtol=1e-12)
    phq = computed.xs("PHQ-9", level="measure")
    assert_allclose(phq["sd_used"].to_numpy(dtype=float), PHQ9_SD, rtol=1e-9)
    assert_allclose(phq["r_used"].to_numpy(dtype=float), R_PHQ9)
    gad = computed.xs("GAD-7", level="measure")
    assert_allclose(gad["sd_used"].to_numpy(dtype=float), GAD7_SD, rtol=1e-9)


def test_phq9_hand_episode(computed: pd.DataFrame) -> None:
    row = computed.loc[("EA", "PHQ-9")]
    # days 0, 7, 14, 28; scores 18, 15, 12, 4
    assert (row["n"], row["first_score"], row["last_score"]) == (4, 18, 4)
    assert (row["min_score"], row["max_score"]) == (4, 18)
    assert row["first_at"] == pd.Timestamp("2026-01-05 10:00")
    assert row["last_at"] == pd.Timestamp("2026-02-02 10:00")
    assert_allclose(row["weeks"], 4.0)
    # change 4 - 18 = -14; pct -14/18 = -77.778%
    assert_allclose(row["change"], -14.0)
    assert_allclose(row["pct_change"], -1400 / 18, rtol=1e-12)
    # RCI = -14 / (2.50714 * sqrt(.11) * sqrt(2)) = -14 / 1.17595 = -11.905
    s_diff = row["sd_used"] * math.sqrt(1 - R_PHQ9) * math.sqrt(2)
    assert_allclose(row["rci"], row["change"] / s_diff, rtol=1e-9)
    assert_allclose(row["rci"], -14 / (PHQ9_SD * math.sqrt(0.11) * math.sqrt(2)), rtol=1e-9)
    assert_allclose(row["rci"], -11.905, rtol=1e-4)
    # cut-off 9.5 (caseness 10 - .5): 18 > 9.5 clinical, 4 < 9.5 functional -> recovered
    assert_allclose(row["clinical_cutoff"], 9.5)
    assert row["jt_direction"] == "improved"
    assert row["jt_category"] == "recovered"
    assert_allclose(row["rc_points"], 6.0)
    assert row["fixed_change"] == "improved"  # -14 <= -6
    assert bool(row["caseness_first"]) and not bool(row["caseness_last"])  # 18 >= 10; 4
    assert bool(row["response"])  # 14 >= 50% of 18 = 9
    assert bool(row["remission"])  # 4 < 5
    # n 4, Σd 49, Σy 49, Σdy 0 + 105 + 168 + 112 = 385, Σd² 1029:
    # slope/day = (4*385 - 49*49) / (4*1029 - 49²) = -861/1715 = -123/245;
    # per week -123/35 = -3.5142857
    assert_allclose(row["slope_week"], -123 / 35, rtol=1e-12)
    ref = stats.linregress([0, 7, 14, 28], [18, 15, 12, 4])
    t = stats.t.ppf(0.975, 2)
    assert_allclose(row["slope_se_week"], 7 * ref.stderr, rtol=1e-8)
    assert_allclose([row["slope_ci_low"], row["slope_ci_high"]],
                    [7 * (ref.slope - t * ref.stderr), 7 * (ref.slope + t * ref.stderr)],
                    rtol=1e-8)
    # Theil-Sen: pair slopes -3/7, -3/7, -1/2, -3/7, -11/21, -4/7; median of six
    # = (-1/2 - 3/7)/2 = -13/28 a day = -3.25 a week
    assert_allclose(row["theil_sen_week"], -3.25, rtol=1e-12)
    assert row["trend_status"] == "ok"
    assert not bool(row["stalled"])
    assert row["band"] == "moderately severe"  # 15-19
    assert row["k_last"] == 4


def test_gad7_two_administrations(computed: pd.DataFrame) -> None:
    row = computed.loc[("EA", "GAD-7")]
    # 12 -> 6: change -6, -50%; RCI -6 / (1.41421 * sqrt(.08) * sqrt(2)) = -6/.565685
    # = -10.6066; fixed points 4: improved; caseness 12 >= 8, 6 < 8; response 6 >= 6;
    # remission (by analogy) 6 < 5 false; trend: 2 points -> insufficient data.
    assert_allclose([row["change"], row["pct_change"]], [-6.0, -50.0])
    assert_allclose(row["rci"], row["change"] / (row["sd_used"] * math.sqrt(1 - R_GAD7)
                                                 * math.sqrt(2)), rtol=1e-9)
    assert_allclose(row["rci"], -10.6066, rtol=1e-4)
    assert row["fixed_change"] == "improved"
    assert bool(row["caseness_first"]) and not bool(row["caseness_last"])
    assert bool(row["response"]) and not bool(row["remission"])
    assert row["trend_status"] == "insufficient data"
    assert pd.isna(row["slope_week"]) and pd.isna(row["theil_sen_week"])
    assert not bool(row["stalled"])


def test_ors_direction(computed: pd.DataFrame) -> None:
    row = computed.loc[("EO", "ORS")]
    # 15 -> 30: +15 (+100%), rising is better: fixed (5 points) improved; caseness
    # (<= 25) at first, not at last; response 15 >= 7.5; no remission rule; no reliability
    # in the registry -> no RCI.
    assert_allclose([row["change"], row["pct_change"]], [15.0, 100.0])
    assert row["fixed_change"] == "improved"
    assert bool(row["caseness_first"]) and not bool(row["caseness_last"])
    assert bool(row["response"])
    assert row["remission"] is None
    assert pd.isna(row["rci"]) and pd.isna(row["sd_used"])
    assert_allclose(row["rc_points"], 5.0)
    assert_allclose(row["clinical_cutoff"], 25.5)
    # slope: Σy 90, Σdy 0 + 140 + 350 + 840 = 1330; (4*1330 - 49*90)/1715 = 910/1715
    # a day -> 26/7 = 3.7142857 a week
    assert_allclose(row["slope_week"], 26 / 7, rtol=1e-12)
    assert not bool(row["stalled"])
    down = computed.loc[("EOD", "ORS")]
    # 30 -> 24: -6 on a higher-is-better scale: deteriorated; 30 not <= 25, 24 <= 25;
    # no response (the change is in the worse direction).
    assert down["fixed_change"] == "deteriorated"
    assert not bool(down["caseness_first"]) and bool(down["caseness_last"])
    assert not bool(down["response"])


# ------------------------------------------------------------------ stalled

# (episode, measure, stalled, slow slope, CI includes 0, exact slope per week)
STALLED = [
    # Σd 70, Σy 76, Σdy 1064, Σd² 1470: 5*1064 - 70*76 = 0 -> slope 0 > -0.25
    ("ES", "PHQ-9", True, True, True, 0.0),
    # d 0 9 18 28, y 12 12 13 12: Σd 55, Σy 49, Σdy 0 + 108 + 234 + 336 = 678,
    # Σd² 1189: (4*678 - 55*49)/(4*1189 - 55²) = 17/1731 a day -> 119/1731 = .068746 a week
    ("ES4", "PHQ-9", True, True, True, 119 / 1731),
    # span 21 days < 4 weeks: not eligible (slope 0)
    ("EN", "PHQ-9", False, True, True, 0.0),
    # reliably improved (-7): never stalled
    ("EI", "PHQ-9", False, None, None, None),
    # weeks -5..5: Σ(w-5)y = -33, Σ(w-5)² = 110: -0.3 a week (< -0.25), tight CI
    ("ENM", "PHQ-9", False, False, False, -0.3),
    # n 8, Σd 308, Σy 101, Σdy 3740, Σd² 16016: 7(8*3740 - 308*101)/(8*16016 - 308²)
    # = 7 * -1188 / 33264 = -0.25 exactly; CI excludes 0 -> not stalled (strict)
    ("ET", "PHQ-9", False, False, False, -0.25),
    # n 6, Σd 234, Σy 81, Σdy 3002, Σd² 13522: 7(6*3002 - 234*81)/(6*13522 - 234²)
    # = 7 * -942 / 26376 = -0.25 exactly; CI includes 0 -> stalled
    ("EW", "PHQ-9", True, False, True, -0.25),
    # ORS mirrored: flat (slope 0 < +0.25) -> stalled
    ("EOF", "ORS", True, True, True, 0.0),
    # ORS +0.3 a week (mirror of ENM), tight CI, change +3 < 5 -> not stalled
    ("EOR", "ORS", False, False, False, 0.3),
]


@pytest.mark.parametrize(("ep", "measure", "stalled", "slow", "ci_zero", "slope"), STALLED,
                         ids=[s[0] for s in STALLED])
def test_stalled(computed: pd.DataFrame, ep: str, measure: str, stalled: bool,
                 slow: bool | None, ci_zero: bool | None, slope: float | None) -> None:
    row = computed.loc[(ep, measure)]
    assert bool(row["stalled"]) is stalled
    if slow is not None:
        assert bool(row["stalled_slow_slope"]) is slow
    if ci_zero is not None:
        assert bool(row["stalled_ci_includes_zero"]) is ci_zero
        assert bool(row["slope_ci_low"] <= 0 <= row["slope_ci_high"]) is ci_zero
    if slope is not None:
        assert_allclose(row["slope_week"], slope, rtol=1e-9, atol=1e-12)


def test_stalled_exact_sums_stored(computed: pd.DataFrame) -> None:
    # Cross-check the ET construction against scipy (independent): -0.25 a week.
    days, ys = DATA["ET"][2][0][1], DATA["ET"][2][0][2]
    assert_allclose(7 * stats.linregress(days, ys).slope, -0.25, rtol=1e-12)
    assert computed.loc[("EI", "PHQ-9"), "fixed_change"] == "improved"
    assert computed.loc[("ENM", "PHQ-9"), "fixed_change"] == "unchanged"  # -3
    assert computed.loc[("EOR", "ORS"), "fixed_change"] == "unchanged"  # +3 < 5


# ------------------------------------------------------------------ sudden gains, JT rule

WEEKLY_6 = [0, 7, 14, 21, 28, 35]
EXTRA: dict[str, Any] = {
    # sudden gain at sessions 3 -> 4: 19 -> 10 (9 >= 6, >= 4.75); pre [20, 21, 19] mean 20
    # var 1, post [10, 9, 8] mean 9 var 1, pooled SD 1: 11 > 2.7764
    "EG": ("North", True, [("PHQ-9", WEEKLY_6, [20, 21, 19, 10, 9, 8]),
                           ("GAD-7", [0, 35], [7, 5])]),
    # the same scores with session 4 missing (sessions 1 2 3 5 6 7): the drop 19 -> 10
    # crosses the gap and is not evaluated; no other pair qualifies
    "EGap": ("North", True, [("PHQ-9", WEEKLY_6, [20, 21, 19, 10, 9, 8],
                              [1, 2, 3, 5, 6, 7]),
                             ("GAD-7", [0, 35], [8, 4])]),
    # sudden loss at 3 -> 4: 11 -> 20 (+9 >= 6); pre mean 10, post mean 20, pooled SD 1
    "EL": ("South", True, [("PHQ-9", WEEKLY_6, [10, 9, 11, 20, 21, 19])]),
    # ORS: the rise 11 -> 20 is the sudden gain (9 >= 5 points, >= 2.75)
    "EOG": ("South", True, [("ORS", WEEKLY_6, [10, 9, 11, 20, 21, 19])]),
    # change -5: not reliable by fixed points (6), reliable by JT (see below); slope
    # -1.1 a week with CI including 0 (Σd 70, Σy 71, Σdy 917, Σd² 1470:
    # 7(5*917 - 70*71)/(5*1470 - 70²) = 7 * -385 / 2450 = -1.1; residuals -1.4 1.7 -1.2
    # 2.9 -2.0, RSS 18.7, SE/day sqrt(18.7/3/490) = .11279, t(3) 3.1824:
    # -.15714 +- .35894 a day includes 0) -> stalled by the fixed rule only
    "EJ": ("North", True, [("PHQ-9", [0, 7, 14, 21, 28], [15, 17, 13, 16, 10]),
                           ("GAD-7", [0, 14], [0, 0])]),
}
# JT on EXTRA: PHQ-9 firsts 20 20 10 15 -> mean 16.25, SS 14.0625*2 + 39.0625 + 1.5625
# = 68.75, SD sqrt(68.75/3) = 4.78714; S_diff = 4.78714 * sqrt(.11) * sqrt(2) = 2.24536;
# EJ RCI -5 / 2.24536 = -2.2268 < -1.959964: reliable improvement.
EXTRA_SD = math.sqrt(68.75 / 3)


@pytest.fixture(scope="module")
def extra_store(tmp_path_factory: pytest.TempPathFactory,
                registry: Registry) -> Iterator[Store]:
    tmp = tmp_path_factory.mktemp("extra")
    store = build_store(tmp, EXTRA, Settings(), registry)
    compute(store, Settings(), registry, full=True)
    yield store
    store.engine.dispose()


def test_sudden_changes_table(extra_store: Store) -> None:
    sc = extra_store.read_table("sudden_changes")
    got = sorted((r.episode_id, r.measure, r.kind, int(r.pregain_session),
                  float(r.score_before), float(r.score_after), float(r.size), int(r.n_pre),
                  int(r.n_post), bool(r.crit3_adjusted)) for r in sc.itertuples())
    assert got == [
        ("EG", "PHQ-9", "gain", 3, 19.0, 10.0, 9.0, 3, 3, False),
        ("EL", "PHQ-9", "loss", 3, 11.0, 20.0, 9.0, 3, 3, False),
        ("EOG", "ORS", "gain", 3, 11.0, 20.0, 9.0, 3, 3, False),
    ]
    out = outcomes_table(extra_store)
    assert (out.loc[("EG", "PHQ-9"), "sudden_gains"], out.loc[("EG", "PHQ-9"),
            "first_sudden_gain"]) == (1, 3)
    assert (out.loc[("EL", "PHQ-9"), "sudden_losses"], out.loc[("EL", "PHQ-9"),
            "first_sudden_loss"]) == (1, 3)
    assert out.loc[("EL", "PHQ-9"), "sudden_gains"] == 0
    assert out.loc[("EGap", "PHQ-9"), "sudden_gains"] == 0
    assert out.loc[("EOG", "ORS"), "sudden_gains"] == 1


@pytest.mark.parametrize(("ep", "measure", "case_first", "case_last", "response",
                          "remission"), [
    # GAD-7 7 -> 5: 7 < 8 not a case; 5 not < 5: no remission; -2/7 = 29% < 50%
    ("EG", "GAD-7", False, False, False, False),
    # GAD-7 8 -> 4: exactly 8 is a case; 4 < 5 remission; -4/8 = exactly 50%: response
    ("EGap", "GAD-7", True, False, True, True),
    # PHQ-9 20 -> 8: case at 20, not at 8; 8 not < 5; -12/20 = 60% >= 50%
    ("EG", "PHQ-9", True, False, True, False),
    # PHQ-9 15 -> 10: exactly 10 is still a case; -5/15 = 33%
    ("EJ", "PHQ-9", True, True, False, False),
    # ORS 10 -> 19: <= 25 both times; +9/10 = 90% in the better direction
    ("EOG", "ORS", True, True, True, None),
    # GAD-7 0 -> 0: a 50% reduction of a baseline of 0 is undefined (as pct_change is):
    # response missing, not True; 0 < 5 remission
    ("EJ", "GAD-7", False, False, None, True),
])
def test_caseness_response_remission_edges(extra_store: Store, ep: str, measure: str,
                                           case_first: bool, case_last: bool,
                                           response: bool | None,
                                           remission: bool | None) -> None:
    row = outcomes_table(extra_store).loc[(ep, measure)]
    assert bool(row["caseness_first"]) is case_first
    assert bool(row["caseness_last"]) is case_last
    if response is None:
        assert row["response"] is None
        assert pd.isna(row["pct_change"])
    else:
        assert bool(row["response"]) is response
    if remission is None:
        assert row["remission"] is None
    else:
        assert bool(row["remission"]) is remission


def test_stalled_follows_reliable_change_method(extra_store: Store,
                                                registry: Registry) -> None:
    fixed = outcomes_table(extra_store).loc[("EJ", "PHQ-9")]
    assert fixed["fixed_change"] == "unchanged"  # -5 > -6
    assert bool(fixed["stalled"])  # CI includes 0, no reliable improvement (fixed)
    assert_allclose(fixed["slope_week"], -1.1, rtol=1e-12)
    assert_allclose(fixed["sd_used"], EXTRA_SD, rtol=1e-9)
    assert_allclose(fixed["rci"], -2.2268, rtol=1e-4)
    assert fixed["jt_direction"] == "improved"
    # pre 15 > 9.5 clinical, post 10 not < 9.5: improved, not recovered
    assert fixed["jt_category"] == "improved"
    jt = Settings(reliable_change_method="jt")
    compute(extra_store, jt, registry, full=True)
    try:
        row = outcomes_table(extra_store).loc[("EJ", "PHQ-9")]
        assert not bool(row["stalled"])  # reliable improvement by JT
        assert bool(row["stalled_ci_includes_zero"])
    finally:
        compute(extra_store, Settings(), registry, full=True)


# ------------------------------------------------------------------ incremental identity

FIRST: dict[str, Any] = {k: DATA[k] for k in ("EA", "ES", "ENM", "ET", "EW", "EO", "EOD")}
# A second administrations file: new scores for EA and EO, and a new episode EZ.
SECOND_ADMINS = [*series("EA", "PHQ-9", [35, 42], [5, 3], first_session=5),
                 *series("EO", "ORS", [35], [32], first_session=5),
                 *series("EZ", "PHQ-9", [0, 7, 14, 21, 28, 35], [22, 21, 23, 12, 11, 13])]
# EZ has a sudden gain at sessions 3 -> 4: 23 -> 12 = 11 >= 6, >= 25% of 23; pre
# [22, 21, 23] mean 22 var 1, post [12, 11, 13] mean 12 var 1, pooled SD 1:
# 10 > 2.7764.


def test_incremental_equals_full_with_kept_reference(tmp_path: Path,
                                                     registry: Registry) -> None:
    settings = Settings(curve_min_stratum=2)  # small enough for curves on tiny data
    store = build_store(tmp_path, FIRST, settings, registry)
    first = compute(store, settings, registry, full=True)
    assert first.mode == "full"
    before = outcomes_table(store)
    assert not store.read_table("expected_curves").empty

    d = tmp_path / "in2"
    paths = entity_files(d, [episode("EZ", "South")], name="episodes2.csv")
    adm = write_csv(d / "administrations2.csv", ADMIN_HEADER, SECOND_ADMINS)
    ingest([*paths, adm], store, settings, registry)
    inc = compute(store, settings, registry)
    assert inc.mode == "incremental" and not inc.reference_rebuilt
    assert inc.episodes == 3  # EA, EO, EZ
    after_inc = outcomes_table(store)
    # the touched episodes were recomputed ...
    assert after_inc.loc[("EA", "PHQ-9"), "n"] == 6 and before.loc[("EA", "PHQ-9"), "n"] == 4
    assert after_inc.loc[("EO", "ORS"), "last_score"] == 32
    assert ("EZ", "PHQ-9") in after_inc.index
    # ... the others kept
    assert after_inc.loc[("ES", "PHQ-9"), "run_id"] == first.run_id
    sudden_inc = store.read_table("sudden_changes")
    ez = sudden_inc[sudden_inc["episode_id"] == "EZ"]
    assert ez[["kind", "pregain_session", "score_before", "score_after"]].values.tolist() \
        == [["gain", 3, 23.0, 12.0]]
    assert_allclose(ez["size"].to_numpy(dtype=float), [11.0])

    full = compute(store, settings, registry, full=True, keep_reference=True)
    assert full.mode == "full" and not full.reference_rebuilt
    after_full = outcomes_table(store)
    pd.testing.assert_frame_equal(after_inc.drop(columns="run_id"),
                                  after_full.drop(columns="run_id"))
    sudden_full = store.read_table("sudden_changes")
    key = ["episode_id", "measure", "kind", "pregain_session"]
    pd.testing.assert_frame_equal(
        sudden_inc.drop(columns="run_id").sort_values(key).reset_index(drop=True),
        sudden_full.drop(columns="run_id").sort_values(key).reset_index(drop=True))
    # The rebuilt reference differs (EZ's first score 22 joins the PHQ-9 SD), which is
    # why keep_reference matters:
    compute(store, settings, registry, full=True)
    rebuilt = outcomes_table(store)
    firsts = [18, 15, 16, 14, 14, 22]  # EA ES ENM ET EW EZ
    assert_allclose(rebuilt.loc[("EA", "PHQ-9"), "sd_used"], statistics.stdev(firsts),
                    rtol=1e-9)
    assert_allclose(after_full.loc[("EA", "PHQ-9"), "sd_used"],
                    statistics.stdev([18, 15, 16, 14, 14]), rtol=1e-9)
    store.engine.dispose()


# ------------------------------------------------------------------ ontrack report --json

# (episode, team, ended, PHQ-9 scores, GAD-7 scores), all at days 0 / 14 (/ 28)
REPORT_DATA: dict[str, Any] = {
    # caseness (15), recovered (5 < 10, 4 < 8), reliably improved (-10): reliably recovered
    "R1": ("North", True, [("PHQ-9", [0, 14], [15, 5]), ("GAD-7", [0, 14], [10, 4])]),
    # caseness (12), deteriorated (+6)
    "R2": ("North", True, [("PHQ-9", [0, 14], [12, 18]), ("GAD-7", [0, 14], [9, 9])]),
    # open: excluded however good
    "R3": ("North", False, [("PHQ-9", [0, 14], [20, 5]), ("GAD-7", [0, 14], [15, 3])]),
    # not caseness (9, 7), reliably improved (PHQ-9 -6)
    "R4": ("South", True, [("PHQ-9", [0, 14], [9, 3]), ("GAD-7", [0, 14], [7, 6])]),
    # caseness (14, 10), no reliable change (-2, -1), not recovered
    "R5": ("South", True, [("PHQ-9", [0, 14, 28], [14, 13, 12]),
                           ("GAD-7", [0, 14], [10, 9])]),
    # one GAD-7 only: not finished
    "R6": ("South", True, [("PHQ-9", [0, 14], [20, 2]), ("GAD-7", [0], [15])]),
}
# Overall: finished R1 R2 R4 R5 = 4; caseness R1 R2 R5 = 3; recovered R1 = 1 (/3);
# improved R1 R4 = 2 (/4); deteriorated R2 = 1 (/4); reliably recovered R1 = 1 (/3).
# North: finished R1 R2 = 2, caseness 2, recovered 1, improved 1, deteriorated 1, rr 1.
# South: finished R4 R5 = 2, caseness R5 = 1, recovered 0, improved R4 = 1, det 0, rr 0.
REPORT_EXPECTED = {
    None: {"finished_episodes": 4, "at_caseness": 3, "recovered": 1, "reliably_improved": 2,
           "reliably_deteriorated": 1, "reliably_recovered": 1},
    "North": {"finished_episodes": 2, "at_caseness": 2, "recovered": 1,
              "reliably_improved": 1, "reliably_deteriorated": 1, "reliably_recovered": 1},
    "South": {"finished_episodes": 2, "at_caseness": 1, "recovered": 0,
              "reliably_improved": 1, "reliably_deteriorated": 0, "reliably_recovered": 0},
}
REPORT_DENOM = {"recovered": "at_caseness", "reliably_improved": "finished_episodes",
                "reliably_deteriorated": "finished_episodes",
                "reliably_recovered": "at_caseness"}


@pytest.fixture(scope="module")
def report_url(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("report")
    settings = Settings()
    store = build_store(tmp, REPORT_DATA, settings, registry)
    compute(store, settings, registry, full=True)
    store.engine.dispose()
    yield f"sqlite:///{tmp}/t.db"


@pytest.mark.parametrize("team", [None, "North", "South"])
def test_report_json(report_url: str, team: str | None, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                     ) -> None:
    monkeypatch.chdir(tmp_path)  # no stray ontrack.toml
    for name in [k for k in os.environ if k.startswith("ONTRACK_")]:
        monkeypatch.delenv(name)
    argv = ["--database-url", report_url, "report", "--json"]
    if team:
        argv += ["--team", team]
    assert cli.main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    expected = REPORT_EXPECTED[team]
    for key, value in expected.items():
        assert rep[key] == value, key
    for metric, den in REPORT_DENOM.items():
        k, n = expected[metric], expected[den]
        assert {f"{metric}_rate", f"{metric}_ci_low", f"{metric}_ci_high"} <= set(rep)
        assert_allclose(rep[f"{metric}_rate"], k / n, rtol=1e-12)
        ci = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert_allclose([rep[f"{metric}_ci_low"], rep[f"{metric}_ci_high"]],
                        [ci.low, ci.high], rtol=1e-9, atol=1e-12)
    assert rep["filters"]["team"] == team


ZERO = dict.fromkeys(REPORT_EXPECTED[None], 0)


@pytest.mark.parametrize(("extra", "expected"), [
    (["--therapist", "T2"], REPORT_EXPECTED["South"]),  # T2 is South's therapist
    (["--therapist", "T1"], REPORT_EXPECTED["North"]),
    (["--to", "2026-06-30"], REPORT_EXPECTED[None]),  # every end date is 2026-06-30: inclusive
    (["--from", "2026-06-30"], REPORT_EXPECTED[None]),
    (["--from", "2026-07-01"], ZERO),
    (["--to", "2026-06-29"], ZERO),
    (["--team", "Nowhere"], ZERO),
])
def test_report_filters(report_url: str, extra: list[str], expected: dict[str, int],
                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("ONTRACK_")]:
        monkeypatch.delenv(name)
    assert cli.main(["--database-url", report_url, "report", "--json", *extra]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {k: rep[k] for k in expected} == expected
    if expected["finished_episodes"] == 0:
        assert rep["reliably_improved_rate"] is None
        assert rep["reliably_improved_ci_low"] is None


# ------------------------------------------------------------------ committed sample

SAMPLE_INPUT = Path(__file__).resolve().parents[1] / "data" / "sample" / "input"


def naive_sudden(x: list[float], cutoff: float, higher: bool, losses: bool) -> list[int]:
    """Tang & DeRubeis criteria written out pair by pair (SPEC §6), for cross-checking."""
    sign = (1 if losses else -1) if higher else (-1 if losses else 1)
    found = []
    for j in range(len(x) - 1):
        a, b = x[j], x[j + 1]
        if math.isnan(a) or math.isnan(b):
            continue
        change = sign * (a - b)
        pre = [v for v in x[max(j - 2, 0):j + 1] if not math.isnan(v)]
        post = [v for v in x[j + 1:j + 4] if not math.isnan(v)]
        if len(pre) < 2 or len(post) < 2:
            continue
        n1, n2 = len(pre), len(post)
        pooled = math.sqrt(((n1 - 1) * statistics.variance(pre)
                            + (n2 - 1) * statistics.variance(post)) / (n1 + n2 - 2))
        crit3 = sign * (statistics.mean(pre) - statistics.mean(post)) > \
            stats.t.ppf(0.975, n1 + n2 - 2) * pooled
        if change >= cutoff and (losses or change >= 0.25 * a) and crit3:
            found.append(j + 1)
    return found


@pytest.fixture(scope="module")
def sample_computed(tmp_path_factory: pytest.TempPathFactory,
                    registry: Registry) -> Iterator[Store]:
    from pipeline.ingest.batch import ingest_paths
    from tests.stats_helpers import NOW

    tmp = tmp_path_factory.mktemp("sample_compute")
    store = Store(f"sqlite:///{tmp}/t.db")
    store.init()
    ingest_paths([SAMPLE_INPUT], store, Settings(), registry, now=NOW)
    compute(store, Settings(), registry, full=True)
    yield store
    store.engine.dispose()


def test_sample_outcomes_against_naive_reimplementation(sample_computed: Store,
                                                        registry: Registry) -> None:
    """Every episode x measure of the committed sample, re-derived one by one with
    scipy (linregress, theilslopes), exact fractions for the stalled threshold and the
    criteria of SPEC §6 written out: an independent check of the vectorised code."""
    adm = sample_computed.read_table("administrations")
    adm["administered_at"] = pd.to_datetime(adm["administered_at"])
    adm = adm.sort_values(["episode_id", "measure", "administered_at"], kind="stable")
    out = outcomes_table(sample_computed)
    sc = sample_computed.read_table("sudden_changes")
    sudden = {k: sorted(g["pregain_session"].astype(int))
              for k, g in sc.groupby(["episode_id", "measure", "kind"])}
    assert len(out) == adm.groupby(["episode_id", "measure"]).ngroups > 500
    from fractions import Fraction

    for (ep, m), g in adm.groupby(["episode_id", "measure"], sort=False):
        o = out.loc[(ep, m)]
        scale = registry[m]
        y = g["score"].astype(int).tolist()
        dates = g["administered_at"].dt.normalize()
        d = (dates - dates.iloc[0]).dt.days.astype(int).tolist()
        n = len(y)
        assert (o["n"], o["first_score"], o["last_score"]) == (n, y[0], y[-1]), (ep, m)
        assert (o["min_score"], o["max_score"]) == (min(y), max(y))
        den = n * sum(v * v for v in d) - sum(d) ** 2
        if n >= 3 and den > 0:
            ref = stats.linregress(d, y)
            assert_allclose(o["slope_week"], 7 * ref.slope, rtol=1e-9, atol=1e-12)
            assert_allclose(o["theil_sen_week"], 7 * stats.theilslopes(y, d).slope,
                            rtol=1e-12, atol=1e-12)
            t = stats.t.ppf(0.975, n - 2)
            se = 0.0 if math.isnan(ref.stderr) else ref.stderr
            ci_zero = bool(ref.slope - t * se <= 0 <= ref.slope + t * se)
        else:
            ci_zero = False
        # stalled: >= 4 administrations over >= 28 days, no fixed-point improvement, and
        # CI including 0 or a slope above -0.25 a week (below +0.25 for ORS), exactly.
        change = y[-1] - y[0]
        pts = scale.reliable_change_points
        improved = change >= pts if scale.higher_is_better else change <= -pts
        slow = False
        if den > 0:
            slope = Fraction(7 * (n * sum(a * b for a, b in zip(d, y, strict=True))
                                  - sum(d) * sum(y)), den)
            slow = slope < Fraction(1, 4) if scale.higher_is_better else slope > Fraction(-1, 4)
        expected = n >= 4 and d[-1] >= 28 and not improved and (slow or ci_zero)
        assert bool(o["stalled"]) is expected, (ep, m)
        # sudden gains / losses, placed by session number when complete and distinct
        sn = g["session_number"].tolist()
        if all(pd.notna(v) for v in sn) and len(set(sn)) == n:
            x = [math.nan] * int(max(sn))
            for s_, v in zip(sn, y, strict=True):
                x[int(s_) - 1] = float(v)
        else:
            x = [float(v) for v in y]
        for kind, losses in (("gain", False), ("loss", True)):
            assert sudden.get((ep, m, kind), []) == naive_sudden(
                x, pts, scale.higher_is_better, losses), (ep, m, kind)


def test_sample_service_report_against_naive_counts(sample_computed: Store,
                                                    registry: Registry) -> None:
    from pipeline.report import service_report

    adm = sample_computed.read_table("administrations")
    adm["administered_at"] = pd.to_datetime(adm["administered_at"])
    adm = adm.sort_values("administered_at", kind="stable")
    scores = {k: g["score"].astype(int).tolist()
              for k, g in adm.groupby(["episode_id", "measure"])}
    eps = sample_computed.read_table("episodes")
    for team in [None, *sorted(eps["team"].dropna().unique())]:
        c = dict.fromkeys(["finished_episodes", "at_caseness", "recovered",
                           "reliably_improved", "reliably_deteriorated",
                           "reliably_recovered"], 0)
        for e in eps.itertuples():
            if (team and e.team != team) or pd.isna(e.end_date):
                continue
            p, g = scores.get((e.episode_id, "PHQ-9"), []), scores.get((e.episode_id, "GAD-7"), [])
            if len(p) < 2 or len(g) < 2:
                continue
            case = p[0] >= 10 or g[0] >= 8
            rec = case and p[-1] < 10 and g[-1] < 8
            fall = p[-1] - p[0] <= -6 or g[-1] - g[0] <= -4
            rise = p[-1] - p[0] >= 6 or g[-1] - g[0] >= 4
            c["finished_episodes"] += 1
            c["at_caseness"] += case
            c["recovered"] += rec
            c["reliably_improved"] += fall and not rise
            c["reliably_deteriorated"] += rise and not fall
            c["reliably_recovered"] += rec and fall and not rise
        rep = service_report(sample_computed, Settings(), registry, team=team)
        assert {k: rep[k] for k in c} == c, team
        assert c["finished_episodes"] > 0


@pytest.mark.parametrize("values", [
    pd.Series([1, 0, None, 1.0, np.nan], dtype=object),  # SQLite raw: 0/1/None
    pd.Series([1.0, 0.0, np.nan]),
    pd.Series([True, False, None], dtype=object),  # PostgreSQL raw
    pd.Series([1, 0], dtype="int64"),  # nothing missing: a bool column
    pd.Series([None, None], dtype=object),
    pd.Series([], dtype=object),
])
def test_boolean_columns_convert_as_value_by_value(values: pd.Series) -> None:
    """_bools converts whole columns; the column it assigns must equal, dtype and each
    value's Python type included, the value-by-value conversion it replaced."""
    from pipeline.compute import _as_bools

    expected = pd.DataFrame({"x": values.copy()})
    expected["x"] = [None if v is None or v != v else bool(v) for v in expected["x"]]
    got = pd.DataFrame({"x": values.copy()})
    got["x"] = _as_bools(got["x"])
    pd.testing.assert_frame_equal(got, expected)
    assert [type(v) for v in got["x"]] == [type(v) for v in expected["x"]]


def _service_rows(**columns: list[Any]) -> pd.DataFrame:
    base: dict[str, list[Any]] = {"episode_id": ["E1", "E2", "E3"],
                                  "team": ["A", "A", None],
                                  "end_month": ["2025-01", None, None],
                                  "recovered": [1, 0, 0]}
    base.update(columns)
    return pd.DataFrame(base)


@pytest.mark.parametrize(("after", "expected"), [
    # As read back (object, None) against as computed (str dtype, NaN, int64): equal.
    (pd.DataFrame({"episode_id": pd.Series(["E3", "E1", "E2"], dtype="str"),
                   "team": pd.Series([np.nan, "A", "A"], dtype="str"),
                   "end_month": [np.nan, "2025-01", np.nan],
                   "recovered": np.array([0, 1, 0], dtype="int64")}), []),
    (_service_rows(recovered=[1, 1, 0]), ["E2"]),
    (_service_rows(team=["A", "B", None]), ["E2"]),
    (_service_rows(team=["A", "A", "A"]), ["E3"]),  # missing -> a value
    (_service_rows(end_month=[None, None, None]), ["E1"]),  # a value -> missing
    (_service_rows(recovered=[1.0, 0.0, 0.0]), []),  # 1 == 1.0
    (_service_rows(recovered=["1", 0, 0]), ["E1"]),  # text is not a number
    (_service_rows().iloc[[0, 2]], ["E2"]),  # a row gone
    (pd.concat([_service_rows(), _service_rows().iloc[[0]].assign(episode_id="E9")]),
     ["E9"]),  # a row added
    (_service_rows(recovered=[0, 1, 1], end_month=["2025-02", None, None]),
     ["E1", "E2", "E3"]),
])
def test_changed_episodes_compares_values_not_forms(after: pd.DataFrame,
                                                     expected: list[str]) -> None:
    """An incremental run rewrites only the episode_service rows that changed: a row
    that differs in any value, or exists on one side only, must be found (a miss leaves
    a stale row behind); the read-back form of an unchanged row must not."""
    from pipeline.compute import changed_episodes

    before = _service_rows().astype(object)
    assert changed_episodes(before, after, ["team", "end_month", "recovered"]) == expected
    assert changed_episodes(before.iloc[::-1], after, ["team", "end_month",
                                                       "recovered"]) == expected
