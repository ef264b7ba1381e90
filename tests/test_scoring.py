"""Scoring (SPEC §3) against hand-computed totals.

Each expected value is worked out in the comment beside it, never taken from the code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.ingest.batch import IngestReport
from pipeline.scales import Registry
from pipeline.scoring import round_half_up_ratio, score_administrations, score_items
from pipeline.store import Store
from tests.conftest import ADM_HEADER, adm_row, administrations, ingest, quarantine, write_csv

N = np.nan


def _score(registry: Registry, code: str, items: Sequence[float]) -> dict[str, object]:
    out = score_items(np.array([items], dtype=float), registry[code])
    return {k: v[0] for k, v in out.items()}


# ------------------------------------------------------------------ score_items


def test_round_half_up_ratio() -> None:
    # 9/2 = 4.5 -> 5 (banker's rounding would give 4); 5/2 = 2.5 -> 3; 7/3 = 2.33 -> 2;
    # 8/3 = 2.67 -> 3; 0/5 = 0.
    got = round_half_up_ratio(np.array([9, 5, 7, 8, 0]), np.array([2, 2, 3, 3, 5]))
    assert got.tolist() == [5, 3, 2, 3, 0]


def test_phq9_all_items_is_the_sum(registry: Registry) -> None:
    # 3+2+1+0+3+2+1+3+0 = 15
    r = _score(registry, "PHQ-9", [3, 2, 1, 0, 3, 2, 1, 3, 0])
    assert r["score"] == 15
    assert r["n_missing"] == 0
    assert not r["prorated"]
    assert r["risk"] == "no"


@pytest.mark.parametrize(("items", "expected", "n_missing"), [
    # 8 answered, sum 4: 4 x 9 / 8 = 4.5 -> 5 (half up; banker's would give 4)
    ([1, 1, 1, 1, 0, 0, 0, N, 0], 5, 1),
    # 8 answered, sum 20: 20 x 9 / 8 = 22.5 -> 23 (banker's would give 22)
    ([3, 3, 3, 3, 3, 3, 1, N, 1], 23, 1),
    # 8 answered, sum 1: 1 x 9 / 8 = 1.125 -> 1 (rounds down)
    ([0, 0, 0, 0, 0, 0, 1, N, 0], 1, 1),
    # 7 answered, sum 5: 5 x 9 / 7 = 6.43 -> 6 (rounds down)
    ([N, 1, 1, 1, 1, 1, 0, N, 0], 6, 2),
    # 7 answered, sum 10: 10 x 9 / 7 = 12.86 -> 13
    ([2, 2, 2, 2, 2, N, N, 0, 0], 13, 2),
])
def test_phq9_prorated_half_up(registry: Registry, items: list[float], expected: int,
                               n_missing: int) -> None:
    r = _score(registry, "PHQ-9", items)
    assert r["score"] == expected
    assert r["n_missing"] == n_missing
    assert r["prorated"]


def test_gad7_prorated(registry: Registry) -> None:
    # 6 answered, sum 3: 3 x 7 / 6 = 3.5 -> 4
    r = _score(registry, "GAD-7", [1, 1, 1, 0, 0, 0, N])
    assert (r["score"], r["n_missing"], r["prorated"]) == (4, 1, True)
    assert r["risk"] is None  # GAD-7 has no risk item


@pytest.mark.parametrize(("items", "expected"), [
    # items 2 and 3 reversed (x -> 4 - x): 0 + 4 + 4 + 0*7 = 8
    ([0] * 10, 8),
    # all 4: 4*8 + 0 + 0 = 32
    ([4] * 10, 32),
    # 1 + (4-2) + (4-3) + 0 + 1 + 2 + 0 + 1 + 2 + 3 = 13
    ([1, 2, 3, 0, 1, 2, 0, 1, 2, 3], 13),
])
def test_core10_reverse_keyed(registry: Registry, items: list[float], expected: int) -> None:
    r = _score(registry, "CORE-10", items)
    assert r["score"] == expected
    assert not r["prorated"]


def test_core10_one_missing_prorated(registry: Registry) -> None:
    # items 2, 3 reversed to 4, 4: 1+4+4+1+1+1+0+1+1 = 14 over 9 answered;
    # 10 x 14 / 9 = 15.56 -> 16
    r = _score(registry, "CORE-10", [1, 0, 0, 1, 1, 1, 0, 1, 1, N])
    assert (r["score"], r["n_missing"], r["prorated"]) == (16, 1, True)
    assert r["risk"] == "yes"  # item 6 = 1


def test_core10_reverse_keyed_item_missing(registry: Registry) -> None:
    # item 2 missing (a missing reverse-keyed item stays missing, it is not 4 - blank);
    # item 3 = 1 reversed to 3: 2 + 3 + 2 + 2 + 0 + 2 + 2 + 2 + 2 = 17 over 9 answered;
    # 10 x 17 / 9 = 18.89 -> 19
    r = _score(registry, "CORE-10", [2, N, 1, 2, 2, 0, 2, 2, 2, 2])
    assert r["score"] == 19
    assert r["n_missing"] == 1
    assert r["risk"] == "no"


def test_ors_sums_higher_is_better(registry: Registry) -> None:
    # 7 + 8 + 9 + 10 = 34
    r = _score(registry, "ORS", [7, 8, 9, 10])
    assert r["score"] == 34
    assert r["risk"] is None


def test_wsas_work_item_blank_not_prorated(registry: Registry) -> None:
    # item 1 (work) not applicable: 8 + 6 + 4 + 2 = 20, no proration
    r = _score(registry, "WSAS", [N, 8, 6, 4, 2])
    assert (r["score"], r["n_missing"], r["prorated"]) == (20, 0, False)


def test_wsas_all_items(registry: Registry) -> None:
    # 1 + 8 + 6 + 4 + 2 = 21
    assert _score(registry, "WSAS", [1, 8, 6, 4, 2])["score"] == 21


@pytest.mark.parametrize(("item9", "risk", "risk_value"), [
    (2, "yes", 2), (1, "yes", 1), (0, "no", 0), (N, "unknown", None),
])
def test_phq9_risk_item(registry: Registry, item9: float, risk: str,
                        risk_value: int | None) -> None:
    r = _score(registry, "PHQ-9", [1, 1, 1, 1, 1, 1, 1, 1, item9])
    assert r["risk"] == risk
    if risk_value is None:
        assert np.isnan(float(r["risk_value"]))  # type: ignore[arg-type]
    else:
        assert r["risk_value"] == risk_value


def test_phq9_missing_risk_item_is_unknown_and_prorated(registry: Registry) -> None:
    # item 9 missing, others 1: 8 x 9 / 8 = 9; risk never imputed -> unknown, not "no"
    r = _score(registry, "PHQ-9", [1, 1, 1, 1, 1, 1, 1, 1, N])
    assert (r["score"], r["prorated"], r["risk"]) == (9, True, "unknown")


# ------------------------------------------------------------------ score_administrations


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows shaped like validate.check_administrations' accepted frame."""
    data: dict[str, Any] = {
        "episode_id": pd.Series([r.get("episode_id", "E1") for r in rows], dtype="str"),
        "measure": pd.Series([r["measure"] for r in rows], dtype="str"),
        "administered_at": pd.Series(pd.to_datetime(
            [f"2025-02-{i + 1:02d}" for i in range(len(rows))])).astype("datetime64[us]"),
        "session_number": pd.Series([1] * len(rows), dtype="Int64"),
        "total_supplied": pd.Series([r.get("total") for r in rows], dtype="Int64"),
    }
    for i in range(1, 21):
        data[f"item_{i}"] = pd.Series(
            [([*r.get("items", []), *[None] * 20])[i - 1] for r in rows], dtype="Int64")
    data["_line"] = np.arange(2, len(rows) + 2)
    return pd.DataFrame(data)


def test_score_administrations(registry: Registry) -> None:
    rows: list[dict[str, Any]] = [
        {"measure": "PHQ-9", "items": [3, 2, 1, 0, 3, 2, 1, 3, 2]},          # 17, risk yes
        {"measure": "PHQ-9", "total": 14},                                    # totals only
        {"measure": "PHQ-9", "items": [1, 1, 1, 1, 0, 0, 0, None, 0]},       # 4.5 -> 5
        {"measure": "PHQ-9", "items": [1, 1, 1, 1, 1, 1, 1, 1, 1], "total": 12},  # 9 vs 12
        {"measure": "GAD-7", "items": [3, 3, 3, 3, 3, 3, 3]},                 # 21
        {"measure": "GAD-7", "total": 6},                                     # totals only
        {"measure": "CORE-10", "items": [0] * 10},                            # 8
        {"measure": "ORS", "items": [7, 8, 9, 10]},                           # 34
        {"measure": "WSAS", "items": [None, 8, 6, 4, 2]},                     # 20
    ]
    out = score_administrations(_frame(rows), registry)
    assert out["score"].tolist() == [17, 14, 5, 9, 21, 6, 8, 34, 20]
    assert out["prorated"].tolist() == [False, False, True, False, False, False, False,
                                        False, False]
    assert out["n_missing"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert out["has_items"].tolist() == [True, False, True, True, True, False, True, True,
                                         True]
    risk = [None if pd.isna(v) else v for v in out["risk"]]
    # PHQ-9: item 9 = 2 -> yes; totals only -> unknown; item 9 = 0 -> no; item 9 = 1 -> yes.
    # CORE-10 item 6 = 0 -> no. GAD-7, ORS, WSAS have no risk item -> None.
    assert risk == ["yes", "unknown", "no", "yes", None, None, "no", None, None]
    assert out["total_mismatch"].tolist() == [False, False, False, True, False, False, False,
                                              False, False]
    assert out["total_supplied"].tolist()[3] == 12


# ------------------------------------------------------------------ through the real ingest


def _ingest_rows(indir: Path, entities: list[Path], store: Store, settings: Settings,
                 registry: Registry, rows: list[dict[str, object]],
                 header: list[str] = ADM_HEADER) -> IngestReport:
    p = write_csv(indir / "administrations.csv", header, rows)
    return ingest([*entities, p], store, settings, registry)


def test_ingest_scores_and_flags(indir: Path, entities: list[Path], store: Store,
                                 settings: Settings, registry: Registry) -> None:
    rows: list[dict[str, object]] = [
        adm_row(when="2025-02-01", items=[3, 2, 1, 0, 3, 2, 1, 3, 2]),              # 17 yes
        adm_row(when="2025-02-08", items=[1, 1, 1, 1, 0, 0, 0, None, 0]),          # 5, prorated
        adm_row(when="2025-02-15", items=[1, 1, 1, 1, 1, 1, 1, 1, None]),          # 9, unknown
        adm_row(when="2025-02-22", items=None, total=11),                          # 11 unknown
        adm_row(when="2025-03-01", items=[1, 1, 1, 1, 1, 1, 1, 1, 0], total=12),   # 8 vs 12
        adm_row(when="2025-03-01", measure="GAD-7", items=[2, 2, 2, 2, 2, 2, 2]),  # 14
    ]
    rep = _ingest_rows(indir, entities, store, settings, registry, rows)
    assert rep.files[-1].accepted == 6
    a = administrations(store).sort_values(["administered_at", "measure"])
    assert a["score"].tolist() == [17, 5, 9, 11, 14, 8]
    assert a["measure"].tolist() == ["PHQ-9", "PHQ-9", "PHQ-9", "PHQ-9", "GAD-7", "PHQ-9"]
    assert [None if pd.isna(v) else v for v in a["risk"]] == \
        ["yes", "no", "unknown", "unknown", None, "no"]
    assert a["prorated"].astype(bool).tolist() == [False, True, True, False, False, False]
    assert a["n_missing"].tolist() == [0, 1, 1, 0, 0, 0]
    assert a["total_mismatch"].astype(bool).tolist() == [False] * 5 + [True]
    assert a["total_supplied"].tolist()[-1] == 12
    w = rep.as_dict()["warnings"]
    assert w["total_items_mismatch"] == 1
    assert w["prorated"] == 2
    assert w["risk_item_missing"] == 1  # the items row without item 9 (not the totals-only row)


@pytest.mark.parametrize(("measure", "items"), [
    ("PHQ-9", [1, 1, 1, None, None, None, 1, 1, 0]),   # 3 missing > 2
    ("GAD-7", [None, None, None, 1, 1, 1, 1]),            # 3 missing > 2
    ("CORE-10", [1, 1, 1, 1, 1, 1, 1, 1, None, None]),    # 2 missing > 1
    ("PHQ-8", [1, 1, 1, 1, 1, 1, 1, None]),               # no proration at all
    ("WSAS", [1, None, 1, 1, 1]),                         # only item 1 may be blank
])
def test_too_many_missing_items_quarantined(indir: Path, entities: list[Path], store: Store,
                                            settings: Settings, registry: Registry,
                                            measure: str, items: list[int | None]) -> None:
    header = [*ADM_HEADER, "item_10"]
    rep = _ingest_rows(indir, entities, store, settings, registry,
                       [adm_row(measure=measure, items=items)], header)
    assert rep.files[-1].accepted == 0
    q = quarantine(store)
    assert q["reason"].tolist() == ["too_many_missing_items"]
    assert q["line"].tolist() == [2]
    assert administrations(store).empty


def _scored(registry: Registry, measures: list[str], scores: list[int]) -> pd.DataFrame:
    """Scored administrations as validate_scored receives them (totals only)."""
    n = len(measures)
    frame = pd.DataFrame({
        "episode_id": pd.array([f"E{i}" for i in range(n)], dtype="str"),
        "measure": pd.array(measures, dtype="str"),
        "administered_at": pd.to_datetime(["2026-01-05 10:00"] * n).astype("datetime64[us]"),
        "session_number": pd.array([1] * n, dtype="Int64"),
        "total_supplied": pd.array(scores, dtype="Int64"),
        **{f"item_{i}": pd.array([None] * n, dtype="Int64")
           for i in range(1, registry.max_items + 1)},
        "score": np.array(scores, dtype=np.int64), "prorated": False,
        "n_missing": np.zeros(n, dtype=np.int64), "has_items": False,
        "risk": pd.array(["unknown"] * n, dtype="str"),
        "risk_value": pd.array([None] * n, dtype="Int64"), "total_mismatch": False})
    return frame


def test_the_scored_schema_checks_each_score_against_its_scale(registry: Registry) -> None:
    """The boundary contract of scored rows: a score inside its own scale's range
    passes (PHQ-9 0-27, GAD-7 0-21, both ends); one outside it, or one within another
    scale's range only (GAD-7 27), is a bug that stops the batch."""
    from pipeline.errors import ValidationError
    from pipeline.validate import validate_scored

    ok = _scored(registry, ["PHQ-9", "PHQ-9", "GAD-7", "GAD-7"], [0, 27, 0, 21])
    assert (registry["PHQ-9"].total_max, registry["GAD-7"].total_max) == (27, 21)
    assert validate_scored(ok, registry)["score"].tolist() == [0, 27, 0, 21]
    for measures, scores in ((["PHQ-9", "GAD-7"], [27, 22]), (["PHQ-9", "GAD-7"], [-1, 3]),
                             (["GAD-7", "PHQ-9", "GAD-7"], [27, 5, 1])):
        with pytest.raises(ValidationError, match="score_in_scale_range"):
            validate_scored(_scored(registry, measures, scores), registry)
