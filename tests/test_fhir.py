"""FHIR R4 input (SPEC §11): a Bundle/NDJSON of QuestionnaireResponse and Observation
resources ingests to the same administrations as the equivalent CSV."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.ingest.batch import IngestReport
from pipeline.scales import Registry
from pipeline.store import Store
from tests.conftest import (
    SAMPLE_INPUT,
    administrations,
    ingest,
    quarantine,
    reconciles,
)

COMPARE = ["episode_id", "measure", "administered_at", "score", "risk", "prorated"]


def _refs(episode: str, client: str) -> dict[str, Any]:
    return {"subject": {"reference": f"Patient/{client}"},
            "encounter": {"reference": f"EpisodeOfCare/{episode}"}}


def questionnaire_response(registry: Registry, measure: str, episode: str, client: str,
                           when: str, items: dict[int, int],
                           total: int | None = None) -> dict[str, Any]:
    scale = registry[measure]
    answers: list[dict[str, Any]] = [{"linkId": scale.loinc_items[i - 1], "answer": [{"valueInteger": v}]}
               for i, v in sorted(items.items())]
    if total is not None:
        answers.append({"linkId": scale.loinc_total, "answer": [{"valueInteger": total}]})
    return {"resourceType": "QuestionnaireResponse", "status": "completed",
            "questionnaire": f"http://loinc.org/q/{scale.loinc_panel}", "authored": when,
            **_refs(episode, client), "item": answers}


def observation(registry: Registry, measure: str, episode: str, client: str, when: str,
                total: int, status: str = "final") -> dict[str, Any]:
    return {"resourceType": "Observation", "status": status,
            "code": {"coding": [{"system": "http://loinc.org",
                                 "code": registry[measure].loinc_total}]},
            "effectiveDateTime": when, "valueInteger": total, **_refs(episode, client)}


def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": r} for r in resources]}


def _fhir_time(naive_iso: str) -> str:
    """FHIR dateTime with a time needs an offset; the sample's naive times are UTC."""
    return naive_iso + "Z" if "T" in naive_iso else naive_iso


def sample_as_fhir(registry: Registry, expected_quarantine: pd.DataFrame
                   ) -> list[dict[str, Any]]:
    """The sample's administrations minus its planted faulty rows, as FHIR resources."""
    adm = pd.read_csv(SAMPLE_INPUT / "administrations.csv", dtype=str, keep_default_na=False)
    adm["line"] = range(2, len(adm) + 2)
    adm = adm[~adm["line"].isin(expected_quarantine["line"])]
    clients = pd.read_csv(SAMPLE_INPUT / "episodes.csv", dtype=str) \
        .set_index("episode_id")["client_id"]
    out = []
    for r in adm.to_dict(orient="records"):
        n = registry[r["measure"]].items
        items = {i: int(r[f"item_{i}"]) for i in range(1, n + 1) if r[f"item_{i}"] != ""}
        total = int(r["total"]) if r["total"] != "" else None
        when = _fhir_time(r["administered_at"])
        client = clients[r["episode_id"]]
        if items:
            out.append(questionnaire_response(registry, r["measure"], r["episode_id"], client,
                                              when, items, total))
        else:
            assert total is not None
            out.append(observation(registry, r["measure"], r["episode_id"], client, when,
                                   total))
    return out


def _entities_copy(dest: Path) -> list[Path]:
    out = []
    for name in ("therapists.csv", "clients.csv", "episodes.csv"):
        shutil.copy(SAMPLE_INPUT / name, dest / name)
        out.append(dest / name)
    return out


def _norm(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame[COMPARE].copy()
    out["administered_at"] = pd.to_datetime(out["administered_at"])
    out["prorated"] = out["prorated"].astype(bool)
    out["risk"] = out["risk"].astype(object).where(out["risk"].notna(), None)
    return out.sort_values(["episode_id", "measure", "administered_at"]).reset_index(drop=True)


def test_bundle_round_trip_matches_csv(indir: Path, store: Store, settings: Settings,
                                       registry: Registry,
                                       sample_ingested: tuple[Store, IngestReport],
                                       expected_quarantine: pd.DataFrame) -> None:
    csv_store, _ = sample_ingested
    resources = sample_as_fhir(registry, expected_quarantine)
    n_qr = sum(r["resourceType"] == "QuestionnaireResponse" for r in resources)
    assert 0 < n_qr < len(resources)  # both kinds are exercised
    path = indir / "bundle.json"
    path.write_text(json.dumps(bundle(resources)), encoding="utf-8")
    rep = ingest([*_entities_copy(indir), path], store, settings, registry)
    f = rep.files[-1]
    assert (f.kind, f.status) == ("administrations", "committed")
    assert (f.records, f.accepted, f.duplicates, f.quarantined) == (len(resources),
                                                                    len(resources), 0, 0)
    got = _norm(administrations(store))
    want = _norm(administrations(csv_store))
    assert len(got) == len(want) == len(resources)
    pd.testing.assert_frame_equal(got, want)
    # Item answers and supplied totals survive the trip as well.
    cols = ["episode_id", "measure", "administered_at", "total_supplied", "total_mismatch",
            *[f"item_{i}" for i in range(1, 10)]]
    a = administrations(store)[cols].sort_values(cols[:3]).reset_index(drop=True)
    b = administrations(csv_store)[cols].sort_values(cols[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


# ------------------------------------------------------------------ small FHIR files


@pytest.fixture
def fhir_dir(indir: Path, entities: list[Path], store: Store, settings: Settings,
             registry: Registry) -> Path:
    ingest(entities, store, settings, registry)
    return indir


def test_ndjson(fhir_dir: Path, store: Store, settings: Settings, registry: Registry) -> None:
    resources = [
        # 3+2+1+0+3+2+1+3+2 = 17; item 9 = 2 -> risk yes
        questionnaire_response(registry, "PHQ-9", "E1", "C1", "2025-02-01T10:00:00Z",
                               dict(enumerate([3, 2, 1, 0, 3, 2, 1, 3, 2], start=1))),
        # GAD-7, item 7 missing: 1+1+1+0+0+0 = 3 over 6 answered; 3 x 7 / 6 = 3.5 -> 4
        questionnaire_response(registry, "GAD-7", "E1", "C1", "2025-02-01T10:00:00+00:00",
                               dict(enumerate([1, 1, 1, 0, 0, 0], start=1))),
        # totals only: 12, risk unknown
        observation(registry, "PHQ-9", "E2", "C2", "2025-02-03T09:30:00+01:00", 12),
    ]
    path = fhir_dir / "resources.ndjson"
    path.write_text("\n".join(json.dumps(r) for r in resources) + "\n", encoding="utf-8")
    rep = ingest([path], store, settings, registry)
    f = rep.files[0]
    assert (f.records, f.accepted, f.quarantined) == (3, 3, 0)
    a = _norm(administrations(store))
    assert a["score"].tolist() == [4, 17, 12]
    assert a["measure"].tolist() == ["GAD-7", "PHQ-9", "PHQ-9"]
    assert a["risk"].tolist() == [None, "yes", "unknown"]
    assert a["prorated"].tolist() == [True, False, False]
    assert a["administered_at"].iloc[2] == pd.Timestamp("2025-02-03T08:30:00")


def test_single_resource_file(fhir_dir: Path, store: Store, settings: Settings,
                              registry: Registry) -> None:
    path = fhir_dir / "one.json"
    path.write_text(json.dumps(observation(registry, "GAD-7", "E2", "C2",
                                           "2025-03-01T10:00:00Z", 9)), encoding="utf-8")
    rep = ingest([path], store, settings, registry)
    assert rep.files[0].accepted == 1
    assert administrations(store)["score"].tolist() == [9]


@pytest.mark.parametrize(("resource", "reason"), [
    ({"resourceType": "Patient", "id": "C1"}, "unsupported_resource"),
    ("obs-bogus", "bad_value"),
    ("qr-in-progress", "bad_value"),
    ("obs-unknown-code", "unknown_measure"),
    ("qr-unknown-episode", "unknown_episode"),
    ("qr-other-client", "client_mismatch"),
    ("qr-item-4", "item_out_of_range"),
    ({"resourceType": "Observation", "status": 7}, "unparseable"),
])
def test_bad_resources(fhir_dir: Path, store: Store, settings: Settings, registry: Registry,
                       resource: Any, reason: str) -> None:
    good = observation(registry, "PHQ-9", "E1", "C1", "2025-02-01T10:00:00Z", 10)
    named = {
        "obs-bogus": {**observation(registry, "PHQ-9", "E1", "C1", "2025-02-08T10:00:00Z", 10),
                      "status": "bogus"},
        "qr-in-progress": {**questionnaire_response(
            registry, "GAD-7", "E1", "C1", "2025-02-08T10:00:00Z", {i: 1 for i in range(1, 8)}),
            "status": "in-progress"},
        "obs-unknown-code": {**observation(registry, "PHQ-9", "E1", "C1",
                                           "2025-02-08T10:00:00Z", 10),
                             "code": {"coding": [{"system": "http://loinc.org",
                                                  "code": "0000-0"}]}},
        "qr-unknown-episode": questionnaire_response(
            registry, "GAD-7", "E404", "C1", "2025-02-08T10:00:00Z", {i: 1 for i in range(1, 8)}),
        "qr-other-client": questionnaire_response(
            registry, "GAD-7", "E1", "C2", "2025-02-08T10:00:00Z", {i: 1 for i in range(1, 8)}),
        "qr-item-4": questionnaire_response(
            registry, "GAD-7", "E1", "C1", "2025-02-08T10:00:00Z", {1: 4, 2: 1, 3: 1, 4: 1,
                                                                    5: 1, 6: 1, 7: 1}),
    }
    bad = named[resource] if isinstance(resource, str) else resource
    path = fhir_dir / "bundle.json"
    path.write_text(json.dumps(bundle([good, bad])), encoding="utf-8")
    rep = ingest([path], store, settings, registry)
    f = rep.files[0]
    assert (f.status, f.records, f.accepted, f.quarantined) == ("committed", 2, 1, 1)
    q = quarantine(store)
    assert q["reason"].tolist() == [reason]
    assert q["file"].tolist() == [str(path)]
    assert q["line"].tolist() == [2]  # the bundle's second entry
    raw = json.loads(q["raw"].iloc[0])
    if "resourceType" in raw:  # failed in the reader: the resource as given
        assert raw == bad
    else:  # failed validation: the record read from the resource
        assert raw["administered_at"] == "2025-02-08T10:00:00Z"
        assert raw["episode_id"] == bad["encounter"]["reference"].split("/")[1]
    assert administrations(store)["score"].tolist() == [10]


def test_invalid_json_file_rejected(fhir_dir: Path, store: Store, settings: Settings,
                                    registry: Registry) -> None:
    bad = fhir_dir / "broken.json"
    bad.write_text('{"resourceType": "Bundle", "entry": [', encoding="utf-8")
    good = fhir_dir / "good.json"
    good.write_text(json.dumps(observation(registry, "PHQ-9", "E1", "C1",
                                           "2025-02-01T10:00:00Z", 10)), encoding="utf-8")
    rep = ingest([bad, good], store, settings, registry)
    by_file = {f.file: f for f in rep.files}
    f = by_file[str(bad)]
    assert f.status == "rejected"
    assert "not valid JSON" in (f.error or "") and str(bad) in (f.error or "")
    assert (f.records, f.quarantined) == (1, 1)
    assert quarantine(store)["reason"].tolist() == ["unreadable_file"]
    assert by_file[str(good)].accepted == 1
    assert reconciles(rep)


def test_json_that_is_not_fhir_rejected(fhir_dir: Path, store: Store, settings: Settings,
                                        registry: Registry) -> None:
    p = fhir_dir / "list.json"
    p.write_text("[1, 2, 3]", encoding="utf-8")
    rep = ingest([p], store, settings, registry)
    assert rep.files[0].status == "rejected"
    assert "resourceType" in (rep.files[0].error or "")


def test_ndjson_with_a_broken_line(fhir_dir: Path, store: Store, settings: Settings,
                                   registry: Registry) -> None:
    good = observation(registry, "PHQ-9", "E1", "C1", "2025-02-01T10:00:00Z", 10)
    p = fhir_dir / "r.ndjson"
    p.write_text(json.dumps(good) + "\n{broken\n", encoding="utf-8")
    rep = ingest([p], store, settings, registry)
    f = rep.files[0]
    assert (f.records, f.accepted, f.quarantined) == (2, 1, 1)
    q = quarantine(store)
    assert (q["reason"].tolist(), q["line"].tolist()) == (["unparseable"], [2])


@pytest.mark.parametrize("depth", [50, 300, 100_000])
def test_deeply_nested_json_is_handled(fhir_dir: Path, store: Store, settings: Settings,
                                       registry: Registry, depth: int) -> None:
    """Hostile nesting: quarantined or rejected, never an unhandled exception."""
    inner = '{"linkId": "x"}'
    for i in range(min(depth, 400)):
        inner = f'{{"linkId": "n{i}", "item": [{inner}]}}'
    if depth > 400:  # too deep for any JSON parser: plain nested arrays
        text = "[" * depth + "]" * depth
    else:
        head = json.dumps(questionnaire_response(registry, "PHQ-9", "E1", "C1",
                                                 "2025-02-01T10:00:00Z", {}))
        text = head[: -len("[]}")] + "[" + inner + "]}"
        json.loads(text)  # the file itself is valid JSON
    p = fhir_dir / "deep.json"
    p.write_text(text, encoding="utf-8")
    rep = ingest([p], store, settings, registry)
    f = rep.files[0]
    assert f.accepted == 0
    assert (f.records, f.quarantined) == (1, 1)
    assert reconciles(rep)
    assert administrations(store).empty
    if depth > 400:
        assert f.status == "rejected"
