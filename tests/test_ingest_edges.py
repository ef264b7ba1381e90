"""Edge cases found in review: implausible dates, administrations before the episode
started, and FHIR quarantine locations naming the Bundle entry."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.ingest import batch
from pipeline.scales import Registry
from pipeline.store import Store
from tests.conftest import ADM_HEADER, adm_row, ingest, quarantine, write_csv


def test_year_one_is_bad_date(indir: Path, entities: list[Path], store: Store,
                              settings: Settings, registry: Registry, now: datetime) -> None:
    path = write_csv(indir / "a.csv", ADM_HEADER, [adm_row(when="0001-01-01")])
    rep = ingest([*entities, path], store, settings, registry, now)
    assert rep.as_dict()["by_reason"] == {"bad_date": 1}
    assert "implausible" in quarantine(store)["detail"].iloc[0]


@pytest.mark.parametrize("lookup_limit", [None, 0])
def test_before_episode_start_is_a_warning_not_a_rejection(
        indir: Path, entities: list[Path], store: Store, settings: Settings,
        registry: Registry, now: datetime, monkeypatch: pytest.MonkeyPatch,
        lookup_limit: int | None) -> None:
    # E1 starts 2025-01-01: an assessment on 2024-12-20 is accepted with a warning.
    # Both ways of knowing the start: read for the chunk's few episodes, or (limit 0)
    # every episode's, kept from the episodes file written earlier in the run.
    if lookup_limit is not None:
        monkeypatch.setattr(batch, "LOOKUP_LIMIT", lookup_limit)
    path = write_csv(indir / "a.csv", ADM_HEADER, [
        adm_row(when="2024-12-20T09:00:00"), adm_row(when="2025-01-01T09:00:00")])
    d = ingest([*entities, path], store, settings, registry, now).as_dict()
    adm_file = [f for f in d["files"] if f["kind"] == "administrations"][0]
    assert adm_file["accepted"] == 2
    assert adm_file["warnings"].get("before_episode_start") == 1


def test_fhir_quarantine_names_bundle_entry(indir: Path, entities: list[Path], store: Store,
                                            settings: Settings, registry: Registry,
                                            now: datetime) -> None:
    good = {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
            "encounter": {"reference": "EpisodeOfCare/E1"},
            "effectiveDateTime": "2025-02-01T10:00:00Z", "valueInteger": 12}
    bad = dict(good, valueInteger=99)  # PHQ-9 total out of range
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": good}, {"resource": bad}]}
    path = indir / "b.json"
    path.write_text(json.dumps(bundle), encoding="utf-8")
    ingest([*entities, path], store, settings, registry, now)
    q = quarantine(store)
    assert q["reason"].tolist() == ["total_out_of_range"]
    assert q["location"].tolist() == ["entry 2"]


def test_whole_number_parsing_matches_the_python_pattern() -> None:
    """validate._ints (Arrow's RE2 on stripped text) against Python's re on the same
    pattern, over signs, zeros, decimals, exponents, Unicode digits and spaces."""
    import re

    from pipeline.validate import _INT_RE, _ints

    values = ["7", " 7 ", "+07", "-3", "007", "7.0", "7.000", "7.5", "7.", ".7", "1e3",
              "", " ", "\u00a07\u00a0", "\u20037", "7\n", "\t7\t", "²", "٣", "１", "0",
              "-0", "+", "-", "123456789", "1234567890", "12 3", "7,0", "0x7"]
    s = pd.Series(values, dtype="str")
    parsed, bad = _ints(s)
    for v, p, b in zip(values, parsed, bad, strict=True):
        text = v.strip()
        good = bool(re.match(_INT_RE, text))
        assert bool(b) is (text != "" and not good), repr(v)
        if good:
            assert p == int(float(text)), repr(v)
        else:
            assert pd.isna(p), repr(v)
