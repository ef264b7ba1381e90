"""Sudden gains placed by session number in the production pass (``episode_outcomes``).

Scores go into their session's column when every administration of the group has a
distinct session number (a missing session leaves a gap), else into administration
order. Only groups with a change of at least the scale's points between two
consecutive sessions are scanned, so these cases include groups whose big change is
between sessions that are *not* neighbours in time order (a session entered late), and
each is checked against the pair-by-pair criteria written out (``naive_sudden``) and
against the session the criteria select, worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.stats.curves import default_curves
from pipeline.stats.outcomes import Reference, episode_outcomes
from tests.test_compute import naive_sudden

NA = None
# episode -> (measure, session numbers in time order, scores in time order, expected
# gains, expected losses); sessions of pre-gain scores are 1-based.
CASES: dict[str, tuple[str, list[int | None], list[int], list[int], list[int]]] = {
    # Sessions in time order: the gain 19 -> 10 between sessions 3 and 4.
    "in-order": ("PHQ-9", [1, 2, 3, 4, 5, 6], [20, 21, 19, 10, 9, 8], [3], []),
    # Sessions 2 and 3 entered last: by session the scores are 20 20 20 10 10 10 10 10,
    # a gain at 3 -> 4 that is never between neighbours in time order.
    "late-entry": ("PHQ-9", [1, 4, 5, 6, 7, 8, 2, 3], [20, 10, 10, 10, 10, 10, 20, 20], [3], []),
    # The same for a loss (a rise of 10 between sessions 3 and 4).
    "late-loss": ("PHQ-9", [1, 4, 5, 6, 7, 8, 2, 3], [5, 15, 15, 15, 15, 15, 5, 5], [], [3]),
    # A repeated session number: scores in administration order (the drop 20 -> 10 is
    # between administrations 3 and 4).
    "repeated": ("PHQ-9", [1, 2, 2, 3, 4, 5], [20, 20, 20, 10, 10, 10], [3], []),
    # A missing session number: administration order as well.
    "missing": ("PHQ-9", [1, 2, NA, 4, 5, 6], [20, 20, 20, 10, 10, 10], [3], []),
    # Session 4 missing: the drop from session 3 to 5 spans a gap and is not a pair.
    "gap": ("PHQ-9", [1, 2, 3, 5, 6, 7], [20, 20, 20, 10, 10, 10], [], []),
    # Higher is better (ORS, 5 points): a rise of 10 is a gain, by session order.
    "ors-late": ("ORS", [1, 4, 5, 6, 2, 3], [10, 20, 20, 20, 10, 10], [3], []),
    # No change of 6 anywhere: nothing, whatever the order.
    "small": ("PHQ-9", [3, 1, 2, 4], [12, 10, 11, 9], [], []),
}


@pytest.fixture(scope="module")
def result(registry: Registry) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = []
    for ep, (measure, sessions, scores, _, _) in CASES.items():
        for i, (s, y) in enumerate(zip(sessions, scores, strict=True)):
            rows.append({"episode_id": ep, "measure": measure,
                         "administered_at": pd.Timestamp("2026-01-05") + pd.Timedelta(weeks=i),
                         "score": y, "session_number": s})
    a = pd.DataFrame(rows)
    a["episode_id"] = a["episode_id"].astype("str")
    a["measure"] = a["measure"].astype("str")
    a["administered_at"] = a["administered_at"].astype("datetime64[us]")
    a["session_number"] = a["session_number"].astype("Int64")
    # Shuffled rows: the pass orders them itself.
    a = a.sample(frac=1.0, random_state=3).reset_index(drop=True)
    ref = Reference(sd={"PHQ-9": 5.0, "ORS": 7.0}, curves=default_curves())
    return episode_outcomes(a, registry, Settings(), ref)


def found(sudden: pd.DataFrame, ep: str, kind: str) -> list[int]:
    hit = sudden[(sudden["episode_id"] == ep) & (sudden["kind"] == kind)]
    return sorted(int(v) for v in hit["pregain_session"])


def by_session(sessions: list[int | None], scores: list[int]) -> list[float]:
    if None in sessions or len(set(sessions)) != len(sessions):
        return [float(v) for v in scores]
    x = [math.nan] * max(s for s in sessions if s is not None)
    for s, v in zip(sessions, scores, strict=True):
        x[int(s) - 1] = float(v)  # type: ignore[arg-type]
    return x


@pytest.mark.parametrize("ep", list(CASES))
def test_sudden_changes_by_session(result: tuple[pd.DataFrame, pd.DataFrame], ep: str,
                                   registry: Registry) -> None:
    measure, sessions, scores, gains, losses = CASES[ep]
    _, sudden = result
    scale = registry[measure]
    x = by_session(sessions, scores)
    for kind, expected, is_loss in (("gain", gains, False), ("loss", losses, True)):
        naive = naive_sudden(x, scale.reliable_change_points, scale.higher_is_better, is_loss)
        assert naive == expected, (ep, kind)  # the hand answer, by the written-out rules
        assert found(sudden, ep, kind) == expected, (ep, kind)


def test_counts_in_outcomes(result: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    out, _ = result
    out = out.set_index("episode_id")
    for ep, (_, _, _, gains, losses) in CASES.items():
        assert out.loc[ep, "sudden_gains"] == len(gains), ep
        assert out.loc[ep, "sudden_losses"] == len(losses), ep
        first = out.loc[ep, "first_sudden_gain"]
        assert (pd.isna(first) and not gains) or first == gains[0], ep
    assert np.array_equal(out["n"].to_numpy(),
                          [len(CASES[ep][1]) for ep in out.index])


def test_sessions_beyond_the_scan_limit_are_not_scanned(registry: Registry) -> None:
    """Sessions numbered past ``max_gain_columns`` (200) are left out of the scan.

    By session: 195-200 = 20 21 19 10 9 8, then 201-203 = 1 0 1. By the written-out
    rules there are two gains, 197 -> 198 and 200 -> 201 (drop 7 >= 6 and >= 2; pre mean
    9, post mean 0.67, pooled SD 0.82 x t 2.776 = 2.27 < 8.33). The second pair crosses
    the limit, so only the first is reported."""
    from pipeline.stats.outcomes import max_gain_columns

    sessions = list(range(195, 204))
    scores = [20, 21, 19, 10, 9, 8, 1, 0, 1]
    x = [math.nan] * 194 + [float(v) for v in scores]
    assert naive_sudden(x, 6, False, False) == [197, 200]
    assert max_gain_columns == 200
    a = pd.DataFrame({
        "episode_id": pd.array(["long"] * len(scores), dtype="str"),
        "measure": pd.array(["PHQ-9"] * len(scores), dtype="str"),
        "administered_at": (pd.Timestamp("2026-01-05") + pd.to_timedelta(
            np.arange(len(scores)) * 7, unit="D")).astype("datetime64[us]"),
        "score": scores, "session_number": pd.array(sessions, dtype="Int64")})
    _, sudden = episode_outcomes(a, registry, Settings(),
                                 Reference(sd={"PHQ-9": 5.0}, curves=default_curves()))
    assert found(sudden, "long", "gain") == [197]


def test_fractional_session_numbers_fall_back_to_administration_order(
        registry: Registry) -> None:
    """Validation accepts only whole session numbers; a caller's 3.5 would share session
    3's column, so such a group is read in administration order: 20 21 19 2 10 9 8 has a
    gain at administrations 3 -> 4 (drop 17 >= 6 and >= 4.75; pre mean 20, var 1; post
    mean 7, var 19; pooled SD sqrt(10) = 3.16 x t 2.776 = 8.78 < 13)."""
    scores = [20, 21, 19, 2, 10, 9, 8]
    assert naive_sudden([float(v) for v in scores], 6, False, False) == [3]
    a = pd.DataFrame({
        "episode_id": pd.array(["frac"] * 7, dtype="str"),
        "measure": pd.array(["PHQ-9"] * 7, dtype="str"),
        "administered_at": (pd.Timestamp("2026-01-05") + pd.to_timedelta(
            np.arange(7) * 7, unit="D")).astype("datetime64[us]"),
        "score": scores, "session_number": [1, 2, 3, 3.5, 4, 5, 6]})
    _, sudden = episode_outcomes(a, registry, Settings(),
                                 Reference(sd={"PHQ-9": 5.0}, curves=default_curves()))
    assert found(sudden, "frac", "gain") == [3]
