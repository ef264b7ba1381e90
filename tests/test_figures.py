"""Figures are pure functions: check what they draw without a browser."""

from __future__ import annotations

import pandas as pd

from dashboard.figures import funnel_figure, trajectory_figure
from pipeline.scales import load_registry
from pipeline.stats.service import funnel_limits


def test_trajectory_has_bands_caseness_rc_band_curve_goal_and_risk() -> None:
    phq9 = load_registry()["PHQ-9"]
    admins = pd.DataFrame({
        "administered_at": pd.to_datetime(["2026-01-05", "2026-01-12", "2026-01-19"]),
        "score": [18, 16, 12], "session_number": [1, 2, 3], "risk": ["no", "yes", "unknown"],
        "risk_value": [0, 1, None], "has_items": [True, True, False], "prorated": [False] * 3,
        "item_1": [2, 2, None]})
    curve = pd.DataFrame({"k": [1, 2, 3], "median": [18.0, 15.0, 12.0],
                          "upper": [20.0, 18.0, 16.0]})
    goals = pd.DataFrame({"goal_id": ["G1"], "boundary": [10.0], "status": ["on_track"],
                          "due_at": [pd.Timestamp("2026-03-01")]})
    sudden = pd.DataFrame({"kind": ["gain"], "pregain_session": [2]})
    fig = trajectory_figure(phq9, admins, {"first_score": 18, "rc_points": 6.0}, curve, goals,
                            sudden, caseness=10)
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(rects) == 5 + 1  # five severity bands + the reliable-change band
    rc = rects[-1]
    assert (rc.y0, rc.y1) == (12.0, 24.0)  # baseline 18 +/- 6
    assert any(ln.y0 == 9.5 for ln in lines)  # caseness >= 10 drawn between 9 and 10
    assert any(ln.y0 == 10.0 for ln in lines)  # goal boundary
    names = [t.name for t in fig.data]
    assert {"expected median", "expected (upper)", "PHQ-9", "risk item > 0",
            "sudden gain"} <= set(names)
    risk = fig.data[names.index("risk item > 0")]
    assert list(risk.y) == [16]
    assert pd.Timestamp(fig.layout.xaxis.range[1]) >= pd.Timestamp("2026-03-01")


def test_funnel_has_limits_and_points() -> None:
    groups = pd.DataFrame({"therapist_id": ["T1", "T2"], "n": [10, 40], "rate": [0.3, 0.6]})
    fig = funnel_figure(groups, funnel_limits(0.5, list(range(1, 41))), 0.5, "recovered")
    assert len(fig.data) == 5  # 2 levels x 2 sides + the therapists
    assert list(fig.data[-1].text) == ["T1", "T2"]


def test_funnel_limits_match_exact_binomial_definition() -> None:
    from scipy import stats

    lim = funnel_limits(0.3, [50], levels=(0.95,))
    # Spiegelhalter 2005 A.1.1: r = smallest r with F(r) >= p, interpolated by alpha.
    for side, p in (("lo", 0.025), ("hi", 0.975)):
        r = stats.binom.ppf(p, 50, 0.3)
        f_r, f_r1 = stats.binom.cdf(r, 50, 0.3), stats.binom.cdf(r - 1, 50, 0.3)
        expected = (r - (f_r - p) / (f_r - f_r1)) / 50
        assert abs(float(lim[f"{side}_95"].iloc[0]) - expected) < 1e-12
    assert lim["lo_95"].iloc[0] < 0.3 < lim["hi_95"].iloc[0]
