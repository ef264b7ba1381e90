"""Sudden gains and losses (SPEC §6; Tang & DeRubeis 1999, suddengains 0.7.2).

Each criterion-3 computation is written out beside its test: window means, sample
variances (n-1), pooled SD = sqrt(((n1-1) v1 + (n2-1) v2) / (n1 + n2 - 2)) and the
two-sided t critical value with n1 + n2 - 2 df.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from scipy import stats

from pipeline.stats.gains import sudden_gains

N = np.nan

# Published |t(.025, df)| (R: qt(.975, df)): 3+3 values df 4, 5 values df 3, 4 values df 2.
T_DF4, T_DF3, T_DF2 = 2.7764, 3.1824, 4.3027


@pytest.mark.parametrize(("df", "t"), [(4, T_DF4), (3, T_DF3), (2, T_DF2)])
def test_t_constants(df: int, t: float) -> None:
    assert_allclose(stats.t.ppf(0.975, df), t, atol=1e-4)


def pair(res: pd.DataFrame, session: int, row: int = 0) -> pd.Series:
    """The result row of the pair (session, session + 1) of client ``row``."""
    hit = res[(res["row"] == row) & (res["pregain_session"] == session)]
    assert len(hit) == 1, hit
    return hit.iloc[0]


def test_clear_gain_all_three_criteria() -> None:
    # Pair 3 -> 4: 19 -> 10, change 9.
    # crit1: 9 >= 6. crit2: 9 >= .25 * 19 = 4.75.
    # crit3: pre [20, 21, 19] mean 20, var (0 + 1 + 1)/2 = 1; post [10, 9, 8] mean 9, var 1;
    #   pooled SD = sqrt((2*1 + 2*1)/4) = 1; t(df 4) = 2.7764; 20 - 9 = 11 > 2.7764.
    res = sudden_gains([[20, 21, 19, 10, 9, 8]], cutoff=6)
    p = pair(res, 3)
    assert p["change"] == 9
    assert p["crit1"] and p["crit2"] and p["crit3"] and p["gain"]
    assert (p["n_pre"], p["n_post"]) == (3, 3)
    assert_allclose(p["t_critical"], T_DF4, atol=1e-4)
    assert not p["crit3_adjusted"]
    # the only gain of the series
    assert res.loc[res["gain"].fillna(False).astype(bool), "pregain_session"].tolist() == [3]


def test_drop_failing_crit3_in_noisy_surroundings() -> None:
    # Pair 3 -> 4: 18 -> 10, change 8: crit1 8 >= 6; crit2 8 >= .25 * 18 = 4.5.
    # crit3: pre [10, 24, 18] mean 17.333, var ((-7.333)^2 + 6.667^2 + 0.667^2)/2 = 49.333;
    #   post [10, 22, 8] mean 13.333, var ((-3.333)^2 + 8.667^2 + (-5.333)^2)/2 = 57.333;
    #   pooled SD = sqrt((2*49.333 + 2*57.333)/4) = sqrt(53.333) = 7.303;
    #   17.333 - 13.333 = 4.0, not > 2.7764 * 7.303 = 20.28.
    res = sudden_gains([[10, 24, 18, 10, 22, 8]], cutoff=6)
    p = pair(res, 3)
    assert p["crit1"] and p["crit2"]
    assert p["crit3"] is not pd.NA and not p["crit3"]
    assert not p["gain"]
    assert_allclose(p["t_critical"], T_DF4, atol=1e-4)


@pytest.mark.parametrize(("scores", "crit1"), [
    # Pair 3 -> 4, 20 -> 14 = 6 = cutoff: inclusive. crit3: pre [19, 21, 20] mean 20 var 1,
    # post [14, 13, 15] mean 14 var 1, pooled 1: 6 > 2.7764. crit2: 6 >= 5.
    ([19, 21, 20, 14, 13, 15], True),
    # 20 -> 15 = 5 < 6. (crit3: 20 - 15 = 5 > 2.7764; crit2: 5 >= 5.)
    ([19, 21, 20, 15, 14, 16], False),
])
def test_crit1_inclusive_at_cutoff(scores: list[float], crit1: bool) -> None:
    p = pair(sudden_gains([scores], cutoff=6), 3)
    assert bool(p["crit1"]) is crit1
    assert p["crit2"] and p["crit3"]
    assert bool(p["gain"]) is crit1


@pytest.mark.parametrize(("scores", "crit2"), [
    # 24 -> 18: drop 6 = 25% of 24 exactly: inclusive. crit3: pre [23, 25, 24] mean 24 var 1,
    # post [18, 17, 19] mean 18 var 1, pooled 1: 6 > 2.7764.
    ([23, 25, 24, 18, 17, 19], True),
    # 28 -> 22: drop 6 < 25% of 28 = 7. crit3: 28 - 22 = 6 > 2.7764.
    ([27, 29, 28, 22, 21, 23], False),
])
def test_crit2_inclusive_at_25_percent(scores: list[float], crit2: bool) -> None:
    p = pair(sudden_gains([scores], cutoff=4), 3)
    assert p["crit1"] and p["crit3"]
    assert bool(p["crit2"]) is crit2
    assert bool(p["gain"]) is crit2


def test_pair_1_2_crit3_not_evaluable() -> None:
    # Pair 1 -> 2: 20 -> 10 (crit1 10 >= 6, crit2 10 >= 5) but only 1 value before: crit3
    # NA, so gain NA (not evaluable), not False.
    res = sudden_gains([[20, 10, 9, 8, 9, 10]], cutoff=6)
    p = pair(res, 1)
    assert p["crit1"] and p["crit2"]
    assert p["crit3"] is pd.NA
    assert p["gain"] is pd.NA
    assert p["n_pre"] == 1
    assert np.isnan(p["t_critical"])


def test_pair_1_2_gain_false_when_crit1_fails() -> None:
    # Pair 1 -> 2: 20 -> 18, change 2 < 6: gain False even though crit3 is NA (Kleene).
    p = pair(sudden_gains([[20, 18, 17, 16]], cutoff=6), 1)
    assert p["crit3"] is pd.NA
    assert not p["crit1"]
    assert p["gain"] is not pd.NA and not p["gain"]


def test_pair_2_3_complete_data_uses_5_values() -> None:
    # Pair 2 -> 3: 19 -> 10, change 9 (crit1; crit2 9 >= 4.75).
    # crit3: pre [21, 19] mean 20 var 2; post [10, 9, 8] mean 9 var 1;
    #   pooled SD = sqrt((1*2 + 2*1)/3) = sqrt(4/3) = 1.1547; df 3, t 3.1824;
    #   20 - 9 = 11 > 3.1824 * 1.1547 = 3.675.
    res = sudden_gains([[21, 19, 10, 9, 8, 9]], cutoff=6)
    p = pair(res, 2)
    assert (p["n_pre"], p["n_post"]) == (2, 3)
    assert_allclose(p["t_critical"], T_DF3, atol=1e-4)
    assert p["crit3_adjusted"]
    assert p["crit1"] and p["crit2"] and p["crit3"] and p["gain"]


def test_four_values_use_t_df2() -> None:
    # 4-session series, pair 2 -> 3: pre [21, 19] mean 20 var 2, post [10, 9] mean 9.5
    # var .5; pooled SD = sqrt((2 + .5)/2) = 1.1180; df 2, t 4.3027;
    # 20 - 9.5 = 10.5 > 4.3027 * 1.1180 = 4.811.
    p = pair(sudden_gains([[21, 19, 10, 9]], cutoff=6), 2)
    assert (p["n_pre"], p["n_post"]) == (2, 2)
    assert_allclose(p["t_critical"], T_DF2, atol=1e-4)
    assert p["crit3_adjusted"] and p["crit3"] and p["gain"]


def test_crit3_strict_and_threshold_by_hand() -> None:
    # Pair 2 -> 3 of [a, b, c, d]: pre [12, 14] mean 13 var 2, post [6, 8] mean 7 var 2;
    # pooled SD = sqrt((2 + 2)/2) = 1.41421; t(df 2) = 4.30265;
    # threshold 4.30265 * 1.41421 = 6.0849 > 6 = 13 - 7: crit3 False.
    # Widen the gap by one point ([12, 14, 5, 7]: 13 - 6 = 7 > 6.0849): crit3 True.
    res = sudden_gains([[12, 14, 6, 8], [12, 14, 5, 7]], cutoff=6)
    thr = stats.t.ppf(0.975, 2) * np.sqrt(2.0)
    assert_allclose(thr, 6.0849, atol=1e-4)
    assert not pair(res, 2, row=0)["crit3"]
    assert pair(res, 2, row=1)["crit3"]


def test_crit3_strict_at_equality() -> None:
    # Flat scores: pre and post means 10, pooled SD 0, so criterion 3 compares 0 > t * 0:
    # equal, and strict -> False (with >= it would be True).
    p = pair(sudden_gains([[10, 10, 10, 10, 10, 10]], cutoff=6), 3)
    assert p["crit3"] is not pd.NA and not p["crit3"]
    p = pair(sudden_gains([[10, 10, 10, 10, 10, 10]], cutoff=6, losses=True), 3)
    assert p["crit3"] is not pd.NA and not p["crit3"]


def test_missing_value_inside_window_is_dropped() -> None:
    # Pair 3 -> 4 of [20, NaN, 19, 10, 9, 8]: pre [20, 19] (NaN dropped) mean 19.5 var .5;
    # post [10, 9, 8] mean 9 var 1; df 3, t 3.1824, adjusted.
    # pooled SD = sqrt((.5 + 2)/3) = .9129; 10.5 > 2.905: gain.
    p = pair(sudden_gains([[20, N, 19, 10, 9, 8]], cutoff=6), 3)
    assert (p["n_pre"], p["n_post"]) == (2, 3)
    assert_allclose(p["t_critical"], T_DF3, atol=1e-4)
    assert p["crit3_adjusted"] and p["gain"]


def test_drop_across_missing_session_is_not_evaluated() -> None:
    # 20 -> (missing) -> 10: neither pair 2->3 nor 3->4 has both scores: no rows for them.
    res = sudden_gains([[20, 20, N, 10, 10, 10]], cutoff=6)
    assert sorted(res["pregain_session"].tolist()) == [1, 4, 5]
    assert not res["gain"].fillna(False).astype(bool).any()


def test_rows_are_per_client() -> None:
    # Client 0 has the clear gain at 3 -> 4; client 1 is flat; client 2 has no scores.
    res = sudden_gains([[20, 21, 19, 10, 9, 8], [15] * 6, [N] * 6], cutoff=6)
    assert set(res["row"]) == {0, 1}
    gains = res[res["gain"].fillna(False).astype(bool)]
    assert list(zip(gains["row"], gains["pregain_session"], strict=True)) == [(0, 3)]


def test_sudden_loss_mirrors_crit1_and_crit3_crit2_na() -> None:
    # Rise 11 -> 20 at pair 3 -> 4: change (as a loss) +9 >= 6; crit2 does not apply (NA).
    # crit3 mirrored: pre [10, 9, 11] mean 10 var 1, post [20, 21, 19] mean 20 var 1,
    # pooled 1; 20 - 10 = 10 > 2.7764.
    scores = [[10, 9, 11, 20, 21, 19]]
    res = sudden_gains(scores, cutoff=6, losses=True)
    p = pair(res, 3)
    assert p["change"] == 9
    assert p["crit1"] and p["crit3"] and p["gain"]
    assert res["crit2"].isna().all()
    # The same rise is no sudden gain.
    g = pair(sudden_gains(scores, cutoff=6), 3)
    assert g["change"] == -9
    assert not g["crit1"] and not g["gain"]


def test_sudden_loss_crit1_and_crit3_needed() -> None:
    # Rise of 5 < 6 (11 -> 16): crit1 False, no loss. Noisy rise of 8 (18 -> 26 with
    # pre [24, 10, 18] / post [26, 12, 28]): means 17.333 vs 22, pooled SD
    # sqrt((2*49.333 + 2*76)/4) = 7.916; 4.667 < 2.7764 * 7.916 = 21.98: crit3 False.
    res = sudden_gains([[10, 9, 11, 16, 17, 15], [24, 10, 18, 26, 12, 28]], cutoff=6,
                       losses=True)
    p0, p1 = pair(res, 3, row=0), pair(res, 3, row=1)
    assert not p0["crit1"] and not p0["gain"]
    assert p1["crit1"] and not p1["crit3"] and not p1["gain"]


def test_higher_is_better_mirrors_gains() -> None:
    # ORS-like: a rise 11 -> 20 is the gain: change 9 >= 5; crit2 9 >= .25 * 11 = 2.75;
    # crit3 as in the loss test above (10 > 2.7764).
    res = sudden_gains([[10, 9, 11, 20, 21, 19]], cutoff=5, higher_is_better=True)
    p = pair(res, 3)
    assert p["change"] == 9
    assert p["crit1"] and p["crit2"] and p["crit3"] and p["gain"]
    # ... and the fall 19 -> 10 is not a gain but a loss there.
    fall = [[20, 21, 19, 10, 9, 8]]
    assert not pair(sudden_gains(fall, cutoff=5, higher_is_better=True), 3)["gain"]
    loss = pair(sudden_gains(fall, cutoff=5, higher_is_better=True, losses=True), 3)
    assert loss["change"] == 9 and loss["gain"]


def test_higher_is_better_crit2_uses_score_at_n() -> None:
    # ORS rise 24 -> 30 = 6 = 25% of 24 (inclusive); 28 -> 34 = 6 < 7 = 25% of 28.
    res = sudden_gains([[25, 23, 24, 30, 31, 29], [29, 27, 28, 34, 35, 33]], cutoff=5,
                       higher_is_better=True)
    assert pair(res, 3, row=0)["crit2"]
    assert not pair(res, 3, row=1)["crit2"]


def test_no_pairs_gives_empty_frame() -> None:
    res = sudden_gains([[N, 10, N, 12]], cutoff=6)
    assert res.empty
    assert {"crit1", "crit2", "crit3", "gain"} <= set(res.columns)


@pytest.mark.parametrize("losses", [False, True])
@pytest.mark.parametrize("higher", [False, True])
def test_candidates_only_keeps_the_pairs_meeting_criteria_1_and_2(losses: bool,
                                                                 higher: bool) -> None:
    """The scan used in production returns exactly the pairs of the full result that meet
    criteria 1 and 2, each row unchanged, so its gains are the full result's gains."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 28, (300, 12)).astype(float)
    x[rng.random(x.shape) < 0.15] = np.nan
    full = sudden_gains(x, cutoff=6, higher_is_better=higher, losses=losses)
    some = sudden_gains(x, cutoff=6, higher_is_better=higher, losses=losses,
                        candidates_only=True)
    meets = full["crit1"].fillna(False).astype(bool)
    if not losses:
        meets &= full["crit2"].fillna(False).astype(bool)
    expected = full[meets].reset_index(drop=True)
    assert 20 < len(some) < len(full)
    pd.testing.assert_frame_equal(some, expected)
    assert full["gain"].fillna(False).astype(bool).sum() == \
        some["gain"].fillna(False).astype(bool).sum() > 0


@pytest.mark.parametrize("higher", [False, True])
def test_every_gain_and_loss_of_random_series_by_the_written_out_rules(higher: bool) -> None:
    """Random series with missing sessions: the gains and losses found equal the criteria
    of SPEC §6 applied pair by pair (``naive_sudden``), client by client."""
    from tests.test_compute import naive_sudden

    rng = np.random.default_rng(11)
    x = rng.integers(0, 28, (400, 14)).astype(float)
    x[rng.random(x.shape) < 0.12] = np.nan
    for losses in (False, True):
        res = sudden_gains(x, cutoff=6, higher_is_better=higher, losses=losses)
        hits = res[res["gain"].fillna(False).astype(bool)]
        found = {r: sorted(g["pregain_session"]) for r, g in hits.groupby("row")}
        expected = {r: s for r in range(len(x))
                    if (s := naive_sudden(list(x[r]), 6, higher, losses))}
        assert found == expected
        assert sum(map(len, expected.values())) > 5


def test_long_form_with_a_cutoff_and_direction_per_client() -> None:
    """``sudden_changes`` on scores in long form (only the scored sessions) with each
    client's own cut-off and direction finds what the matrix form finds for each client
    with its scale's settings alone."""
    from pipeline.stats.gains import sudden_changes

    rng = np.random.default_rng(12)
    x = rng.integers(0, 28, (300, 10)).astype(float)
    x[rng.random(x.shape) < 0.15] = np.nan
    cutoff = rng.choice([5.0, 6.0, np.nan], size=len(x))
    higher = rng.random(len(x)) < 0.4
    rows, cols = np.nonzero(~np.isnan(x))
    found = sudden_changes(rows, cols, x[rows, cols], cutoff=cutoff, higher_is_better=higher,
                           candidates_only=True)
    for kind in ("gain", "loss"):
        res = found[kind]
        hit = res["gain"].to_numpy(dtype=bool, na_value=False)
        got = sorted(zip(rows[res["at"]][hit], res["pregain_session"][hit], strict=True))
        expected = []
        for cut in (5.0, 6.0):
            for h in (False, True):
                who = np.flatnonzero((cutoff == cut) & (higher == h))
                one = sudden_gains(x[who], cutoff=cut, higher_is_better=h,
                                   losses=kind == "loss")
                one = one[one["gain"].fillna(False).astype(bool)]
                expected += [(who[r], s) for r, s in zip(one["row"], one["pregain_session"],
                                                         strict=True)]
        assert [(int(r), int(s)) for r, s in got] == sorted(
            (int(r), int(s)) for r, s in expected)
        assert len(got) > 3


def test_long_form_pairs_never_span_two_clients() -> None:
    """Client 0's sessions 1-3 end where client 1's sessions 4-9 begin: the 20 -> 2 step
    from one client's last score to the next client's first is not a pair (client 1 alone
    has no pair with a change of 6, so nothing is found)."""
    from pipeline.stats.gains import sudden_changes

    group = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1])
    column = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8])
    score = np.array([20, 21, 20, 2, 1, 2, 1, 2, 1])
    res = sudden_changes(group, column, score, cutoff=6)
    assert res["gain"]["at"].tolist() == [0, 1, 3, 4, 5, 6, 7]  # every pair within a client
    assert not res["gain"]["gain"].fillna(False).any()
    assert sudden_changes(group, column, score, cutoff=6,
                          candidates_only=True)["gain"]["at"].size == 0


def test_long_form_refuses_unsorted_entries_and_reads_unsigned_scores() -> None:
    """Entries must come sorted by group then column (each column once); unsigned
    integer scores are differenced as numbers (a rise is not a wrapped-around drop)."""
    from pipeline.errors import UsageError
    from pipeline.stats.gains import sudden_changes

    with pytest.raises(UsageError, match="sorted by group"):
        sudden_changes([0, 0, 0], [0, 2, 1], [20, 10, 12], cutoff=6)
    with pytest.raises(UsageError, match="sorted by group"):
        sudden_changes([1, 0], [0, 1], [20, 10], cutoff=6)
    with pytest.raises(UsageError, match="sorted by group"):
        sudden_changes([0, 0], [1, 1], [20, 10], cutoff=6)
    rising = np.arange(20, 28, dtype=np.uint8)
    res = sudden_changes(np.zeros(8, dtype=np.int64), np.arange(8), rising, cutoff=6)
    assert (res["gain"]["change"] == -1).all()
    assert not res["gain"]["crit1"].any()
    assert (res["loss"]["change"] == 1).all()
    assert sudden_changes(np.zeros(8, dtype=np.int64), np.arange(8), rising, cutoff=1,
                          candidates_only=True)["loss"]["at"].size == 7
