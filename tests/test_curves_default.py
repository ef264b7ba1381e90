"""The shipped default curves serve a young service, stratum by stratum."""

from __future__ import annotations

import pandas as pd

from pipeline.stats.curves import default_curves, with_defaults


def test_shipped_defaults_cover_phq9_and_gad7_from_session_1() -> None:
    d = default_curves()
    assert set(d["measure"]) == {"PHQ-9", "GAD-7"}
    assert (d["source"] == "default").all()
    for measure in ("PHQ-9", "GAD-7"):
        ks = d.loc[d["measure"] == measure, "k"]
        assert ks.min() == 1 and ks.max() >= 10
    # Lower-is-better: the upper band sits at or above the median, the lower at or below.
    assert (d["upper"] >= d["median"]).all() and (d["lower"] <= d["median"]).all()


def test_own_points_win_and_gaps_are_filled() -> None:
    own = pd.DataFrame({"measure": ["PHQ-9"], "band": ["severe"], "k": [3], "n": [40],
                        "median": [99.0], "upper": [99.0], "lower": [99.0],
                        "source": ["service"]})
    defaults = pd.DataFrame({"measure": ["PHQ-9", "PHQ-9"], "band": ["severe", "severe"],
                             "k": [3, 4], "n": [500, 480], "median": [12.0, 11.0],
                             "upper": [15.0, 14.0], "lower": [9.0, 8.0],
                             "source": ["default", "default"]})
    out = with_defaults(own, defaults).set_index("k")
    assert out.loc[3, "median"] == 99.0 and out.loc[3, "source"] == "service"
    assert out.loc[4, "median"] == 11.0 and out.loc[4, "source"] == "default"
