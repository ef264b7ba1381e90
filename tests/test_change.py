"""Reliable and clinically significant change (SPEC §4) against hand-computed values.

Every expected number is worked out in the comment beside it (Jacobson & Truax 1991:
SE = SD sqrt(1 - r), S_diff = sqrt(2) SE, RCI = (post - pre) / S_diff).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from pipeline.errors import UsageError
from pipeline.scales import Registry
from pipeline.stats.change import (
    clinical_cutoff,
    clinical_significance,
    fixed_point_change,
    jt_cutoffs,
    reliable_change,
)

# Phi^-1(0.975) and Phi^-1(0.995), published to 6 decimals (R: qnorm(0.975) = 1.959964,
# qnorm(0.995) = 2.575829).
Z_05 = 1.959964
Z_01 = 2.575829

# ------------------------------------------------------------------ reliable_change


def test_rci_sd5_r80_changes_of_plus_minus_8() -> None:
    # SE = 5 * sqrt(1 - .8) = 5 * 0.4472136 = 2.2360680
    # S_diff = sqrt(2) * 2.2360680 = 3.1622777 (= sqrt(10))
    # RCI = -8 / 3.1622777 = -2.5298221 ; +8 / 3.1622777 = +2.5298221
    res = reliable_change([20, 20], [12, 28], sd=5, reliability=0.8)
    assert_allclose(res.standard_error, 2.2360680, rtol=1e-4)
    assert_allclose(res.s_diff, 3.1623, rtol=1e-4)
    assert_allclose(res.rci, [-2.5298, 2.5298], rtol=1e-4)
    assert list(res.direction) == ["improved", "deteriorated"]


@pytest.mark.parametrize(("alpha", "z"), [(0.05, Z_05), (0.01, Z_01), (0.10, 1.644854)])
def test_critical_value_is_exact_normal_quantile(alpha: float, z: float) -> None:
    # qnorm(1 - alpha/2): .05 -> 1.959964 (not the rounded 1.96), .01 -> 2.575829,
    # .10 -> 1.644854.
    res = reliable_change([10], [10], sd=5, reliability=0.8, alpha=alpha)
    assert_allclose(res.critical_value, z, atol=1e-6)
    assert abs(res.critical_value - 1.96) > 1e-5  # never the rounded value


def test_critical_value_1_96_vs_exact() -> None:
    # A change whose RCI is 1.95999 (between 1.959964 and 1.96) is reliable with the exact
    # critical value and would not be with 1.96. With sd = 1/sqrt(2) and r = 0,
    # S_diff = sqrt(2)/sqrt(2) = 1, so RCI = change.
    sd = 1 / math.sqrt(2)
    res = reliable_change([0.0, 0.0], [1.95999, -1.95999], sd=sd, reliability=0.0)
    assert_allclose(res.rci, [1.95999, -1.95999], rtol=1e-12)
    assert list(res.direction) == ["deteriorated", "improved"]


# sd = float(1/sqrt(2)) = 0.7071067811865475; in IEEE doubles sqrt(2) * sd rounds to
# exactly 1.0 (r = 0) and sqrt(2) * sd * sqrt(.25) to exactly 0.5 (r = .75), so
# RCI = change / S_diff reproduces z bit for bit when change = z * S_diff (a power of 2).
@pytest.mark.parametrize(("reliability", "s_diff"), [(0.0, 1.0), (0.75, 0.5)])
@pytest.mark.parametrize(("alpha", "z"), [(0.05, Z_05), (0.01, Z_01)])
def test_rci_exactly_at_critical_value_is_unchanged(reliability: float, s_diff: float,
                                                    alpha: float, z: float) -> None:
    sd = 1 / math.sqrt(2)
    res0 = reliable_change([0.0], [0.0], sd=sd, reliability=reliability, alpha=alpha)
    assert res0.s_diff == s_diff  # the construction: S_diff is exact
    zc = res0.critical_value
    assert_allclose(zc, z, atol=1e-6)
    below = np.nextafter(zc, 0.0) * s_diff
    above = np.nextafter(zc, np.inf) * s_diff
    at = zc * s_diff
    # Rises (deterioration on a lower-is-better scale) and falls (improvement).
    pre = [0.0, 0.0, 0.0, at, below, above]
    post = [at, below, above, 0.0, 0.0, 0.0]
    res = reliable_change(pre, post, sd=sd, reliability=reliability, alpha=alpha)
    assert res.rci[0] == zc and res.rci[3] == -zc  # exactly at the critical value
    assert list(res.direction) == ["unchanged", "unchanged", "deteriorated",
                                   "unchanged", "unchanged", "improved"]
    # Mirrored for a higher-is-better scale: the rise is the improvement.
    res_h = reliable_change(pre, post, sd=sd, reliability=reliability, alpha=alpha,
                            higher_is_better=True)
    assert list(res_h.direction) == ["unchanged", "unchanged", "improved",
                                     "unchanged", "unchanged", "deteriorated"]


def test_rci_higher_is_better_mirrors_direction() -> None:
    # Same RCI values (+-2.5298 with sd 5, r .8), opposite meaning on ORS-like scales.
    res = reliable_change([20, 20, 20], [12, 28, 21], sd=5, reliability=0.8,
                          higher_is_better=True)
    assert_allclose(res.rci, [-2.5298, 2.5298, 0.3162], rtol=1e-4)  # 1/3.16228 = .31623
    assert list(res.direction) == ["deteriorated", "improved", "unchanged"]


@pytest.mark.parametrize(("pre", "post"), [([np.nan], [10.0]), ([10.0], [np.nan]),
                                           ([np.nan], [np.nan])])
def test_rci_missing_scores_give_none(pre: list[float], post: list[float]) -> None:
    res = reliable_change(pre, post, sd=5, reliability=0.8)
    assert np.isnan(res.rci[0])
    assert res.direction[0] is None


@pytest.mark.parametrize("kwargs", [
    {"sd": 0, "reliability": 0.8}, {"sd": -1, "reliability": 0.8},
    {"sd": 5, "reliability": 1.0}, {"sd": 5, "reliability": -0.1},
    {"sd": 5, "reliability": 0.8, "alpha": 0.0}, {"sd": 5, "reliability": 0.8, "alpha": 1.0},
])
def test_rci_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        reliable_change([10], [5], **kwargs)


# ------------------------------------------------------------------ jt_cutoffs


def test_jt_cutoffs_core10_norms() -> None:
    # CORE-10 manual norms: Mc 19.7 SDc 7.7, Mf 4.7 SDf 4.8
    # a = 19.7 - 2 * 7.7 = 4.3
    # b = 4.7 + 2 * 4.8 = 14.3   (functional SD, as Jacobson & Truax; with SDc it would be 20.1)
    # c = (7.7 * 4.7 + 4.8 * 19.7) / (7.7 + 4.8) = (36.19 + 94.56) / 12.5 = 10.46
    cut = jt_cutoffs(19.7, 7.7, 4.7, 4.8)
    assert_allclose([cut.a, cut.b, cut.c], [4.3, 14.3, 10.46], atol=1e-9)
    assert_allclose(cut.recommended, 10.46, atol=1e-9)


def test_jt_cutoffs_higher_is_better_mirrors_a_and_b() -> None:
    # a = 19.7 + 2 * 7.7 = 35.1 ; b = 4.7 - 2 * 4.8 = -4.9 ; c is symmetric: 10.46
    cut = jt_cutoffs(19.7, 7.7, 4.7, 4.8, higher_is_better=True)
    assert_allclose([cut.a, cut.b, cut.c], [35.1, -4.9, 10.46], atol=1e-9)


@pytest.mark.parametrize(("higher", "a"), [(False, 4.3), (True, 35.1)])
def test_jt_cutoffs_clinical_norms_only_recommends_a(higher: bool, a: float) -> None:
    cut = jt_cutoffs(19.7, 7.7, higher_is_better=higher)
    assert cut.b is None and cut.c is None
    assert_allclose(cut.recommended, a, atol=1e-9)


def test_jt_cutoffs_other_numbers() -> None:
    # Mc 30 SDc 10, Mf 10 SDf 5: a = 10, b = 20, c = (10*10 + 5*30) / 15 = 250/15 = 16.6667
    cut = jt_cutoffs(30, 10, 10, 5)
    assert_allclose([cut.a, cut.b, cut.c], [10.0, 20.0, 16.666667], rtol=1e-6)


@pytest.mark.parametrize("args", [(19.7, 0, 4.7, 4.8), (19.7, -1, 4.7, 4.8),
                                  (19.7, 7.7, 4.7, 0)])
def test_jt_cutoffs_rejects_non_positive_sd(args: tuple[float, ...]) -> None:
    with pytest.raises(UsageError):
        jt_cutoffs(*args)


def test_clinical_cutoff_from_registry(registry: Registry) -> None:
    # PHQ-9: no clinical norms -> caseness 10 moved half a point toward health: 9.5
    # GAD-7: caseness 8 (NHS TT default) -> 7.5; with Spitzer's 10 -> 9.5
    # CORE-10: both norms -> c = 10.46 (above); ORS (higher is better): 25 + 0.5 = 25.5
    assert_allclose(clinical_cutoff(registry["PHQ-9"]), 9.5)
    assert_allclose(clinical_cutoff(registry["GAD-7"]), 7.5)
    assert_allclose(clinical_cutoff(registry["GAD-7"], caseness=10), 9.5)
    assert_allclose(clinical_cutoff(registry["CORE-10"]), 10.46, atol=1e-9)
    assert_allclose(clinical_cutoff(registry["ORS"]), 25.5)
    assert clinical_cutoff(registry["WSAS"]) is None


# ------------------------------------------------------------------ clinical_significance

# sd 5, r .8: S_diff = 3.16228, so a change is reliable when |change| > 1.959964 * 3.16228
# = 6.198; changes of 7 or more points are reliable, 6 or fewer are not. Cut-off 10.
LOWER_CASES = [
    # pre, post, category, clinical_pre (pre > 10), functional_post (post < 10)
    (20, 8, "recovered", True, True),        # -12: RCI -3.795, 20 > 10, 8 < 10
    (20, 12, "improved", True, False),       # -8: RCI -2.530, post 12 not < 10
    (9, 2, "improved", False, True),         # -7: RCI -2.214, pre 9 not > 10
    (10, 3, "improved", False, True),        # -7: pre exactly 10 is not clinical (strict)
    (20, 10, "improved", True, False),       # -10: post exactly 10 is not functional (strict)
    (20, 14, "unchanged", True, False),      # -6: RCI -1.897 > -1.959964
    (14, 20, "unchanged", True, False),      # +6: RCI +1.897
    (12, 20, "deteriorated", True, False),   # +8: clinical at pre -> not harmed
    (0, 7, "deteriorated", False, True),     # +7: functional at post -> not harmed
    (8, 16, "harmed", False, False),         # +8: functional at pre, clinical at post
    (10, 18, "harmed", False, False),        # +8: pre exactly 10 is not clinical -> harmed
    (3, 10, "harmed", False, False),         # +7: post exactly 10 is not functional -> harmed
]


@pytest.mark.parametrize(("pre", "post", "category", "clinical_pre", "functional_post"),
                         LOWER_CASES)
def test_clinical_significance_categories(pre: int, post: int, category: str,
                                          clinical_pre: bool, functional_post: bool) -> None:
    cs = clinical_significance([pre], [post], sd=5, reliability=0.8, cutoff=10)
    row = cs.iloc[0]
    assert row["category"] == category
    assert bool(row["clinical_pre"]) is clinical_pre
    assert bool(row["functional_post"]) is functional_post
    assert_allclose(row["change"], post - pre)
    assert_allclose(row["rci"], (post - pre) / math.sqrt(10), rtol=1e-12)


def test_clinical_significance_vectorised_in_order() -> None:
    pre = [c[0] for c in LOWER_CASES]
    post = [c[1] for c in LOWER_CASES]
    cs = clinical_significance(pre, post, sd=5, reliability=0.8, cutoff=10)
    assert cs["category"].tolist() == [c[2] for c in LOWER_CASES]


def test_clinical_significance_precedence() -> None:
    # recovered before improved: a reliable fall that crosses the cut-off is "recovered",
    # never "improved"; harmed before deteriorated: a reliable rise from the functional to
    # the clinical side is "harmed", never "deteriorated".
    cs = clinical_significance([25, 2], [2, 25], sd=5, reliability=0.8, cutoff=10)
    assert cs["direction"].tolist() == ["improved", "deteriorated"]
    assert cs["category"].tolist() == ["recovered", "harmed"]


# ORS-like (higher is better), cut-off 25.5: clinical at pre = pre < 25.5, functional at
# post = post > 25.5; reliable at |change| >= 7 (sd 5, r .8).
HIGHER_CASES = [
    (18, 30, "recovered"),      # +12 RCI +3.795, 18 < 25.5, 30 > 25.5
    (18, 25, "improved"),       # +7, post 25 is not functional
    (27, 35, "improved"),       # +8, pre 27 is not clinical
    (20, 24, "unchanged"),      # +4
    (24, 20, "unchanged"),      # -4
    (20, 12, "deteriorated"),   # -8, clinical at pre
    (35, 28, "deteriorated"),   # -7, functional at post
    (30, 22, "harmed"),         # -8, functional at pre and clinical at post
]


@pytest.mark.parametrize(("pre", "post", "category"), HIGHER_CASES)
def test_clinical_significance_higher_is_better(pre: int, post: int, category: str) -> None:
    cs = clinical_significance([pre], [post], sd=5, reliability=0.8, cutoff=25.5,
                               higher_is_better=True)
    assert cs["category"].iloc[0] == category


def test_clinical_significance_missing_gives_none() -> None:
    cs = clinical_significance([np.nan, 20], [8, np.nan], sd=5, reliability=0.8, cutoff=10)
    assert cs["category"].tolist() == [None, None]
    assert cs["direction"].tolist() == [None, None]
    # the side flags are missing too (None or pd.NA, whichever the column's dtype uses)
    assert all(pd.isna(v) for v in cs["clinical_pre"].tolist())
    assert all(pd.isna(v) for v in cs["functional_post"].tolist())


def test_clinical_significance_alpha_01() -> None:
    # alpha .01: z = 2.575829, threshold 2.575829 * 3.16228 = 8.145 points: -8 is no longer
    # reliable (RCI -2.530), -9 is (RCI -2.846).
    cs = clinical_significance([20, 20], [12, 11], sd=5, reliability=0.8, cutoff=10,
                               alpha=0.01)
    assert cs["category"].tolist() == ["unchanged", "improved"]


# ------------------------------------------------------------------ fixed points


@pytest.mark.parametrize(("pre", "post", "expected"), [
    (15, 9, "improved"),       # PHQ-9 change -6: exactly the 6 points -> improved
    (15, 10, "unchanged"),     # -5
    (15, 21, "deteriorated"),  # +6
    (15, 20, "unchanged"),     # +5
    (15, 15, "unchanged"),
    (27, 0, "improved"),
])
def test_fixed_point_change_phq9(pre: int, post: int, expected: str) -> None:
    assert fixed_point_change([pre], [post], points=6).tolist() == [expected]


@pytest.mark.parametrize(("pre", "post", "expected"), [
    (20, 25, "improved"),      # ORS +5: rising is better
    (20, 24, "unchanged"),
    (20, 15, "deteriorated"),  # ORS -5
    (20, 16, "unchanged"),
])
def test_fixed_point_change_higher_is_better(pre: int, post: int, expected: str) -> None:
    assert fixed_point_change([pre], [post], points=5, higher_is_better=True).tolist() == \
        [expected]


def test_fixed_point_change_nan_gives_none() -> None:
    out = fixed_point_change([np.nan, 15, 15], [9, np.nan, 9], points=6)
    assert out.tolist() == [None, None, "improved"]


def test_clinical_significance_codes_name_the_same_categories() -> None:
    """The code form used by the outcomes pass: sd 5, r .8, S_diff = sqrt(2) * 5 *
    sqrt(.2) = 3.1623; 20 -> 8 RCI -3.79 (reliable, clinical to functional: recovered),
    20 -> 12 RCI -2.53 (improved, still above 10), 8 -> 20 RCI +3.79 (harmed), 15 -> 14
    (unchanged), a missing score: no category."""
    from pipeline.stats.change import (
        CATEGORY_BY_CODE,
        DIRECTION_BY_CODE,
        clinical_significance_codes,
    )

    pre, post = [20, 20, 8, 15, np.nan], [8, 12, 20, 14, 10]
    rci, direction, category = clinical_significance_codes(pre, post, sd=5, reliability=0.8,
                                                           cutoff=10)
    assert_allclose(rci[:4], [-3.7947, -2.5298, 3.7947, -0.3162], atol=1e-4)
    assert CATEGORY_BY_CODE[category].tolist() == ["recovered", "improved", "harmed",
                                                   "unchanged", None]
    assert DIRECTION_BY_CODE[direction].tolist() == ["improved", "improved", "deteriorated",
                                                     "unchanged", None]
    frame = clinical_significance(pre, post, sd=5, reliability=0.8, cutoff=10)
    assert frame["category"].tolist()[:4] == CATEGORY_BY_CODE[category].tolist()[:4]
    assert pd.isna(frame["category"].iloc[4])
