"""The flag evaluation replays the rules on prefixes of a synthetic cohort."""

from __future__ import annotations

import pandas as pd

from pipeline.config import Settings
from pipeline.evaluation import _prefixes, evaluate_flags
from pipeline.scales import load_registry


def test_prefixes_cut_after_every_administration() -> None:
    adm = pd.DataFrame({"episode_id": ["E"] * 3, "measure": ["PHQ-9"] * 3,
                        "administered_at": pd.to_datetime(["2026-01-01", "2026-01-08",
                                                           "2026-01-15"]),
                        "score": [20, 18, 15]})
    p = _prefixes(adm)
    # 3 administrations -> prefixes of length 1, 2, 3 holding 1 + 2 + 3 = 6 rows.
    assert sorted(p["episode_id"].unique()) == ["E#1", "E#2", "E#3"]
    assert p.groupby("episode_id")["score"].apply(list).to_dict() == {
        "E#1": [20], "E#2": [20, 18], "E#3": [20, 18, 15]}


def test_confusion_counts_reconcile_and_rules_beat_chance() -> None:
    res = evaluate_flags(load_registry(), Settings(), episodes=300, seed=11)
    cases = res["cohort"]["cases"]
    for r in res["rules"]:
        assert r["tp"] + r["fn"] == cases
        assert r["tp"] + r["fn"] + r["fp"] + r["tn"] == 300
        # Better than a coin that fires with the same rate (Youden's J > 0).
        assert r["sensitivity"] + r["specificity"] > 1.0
    det = {r["rule"]: r for r in res["rules"]}["reliable_deterioration"]
    assert det["specificity"] > 0.9
