"""One test per quarantine reason, through the real ingest (SPEC §11).

Each input file has its header on line 1; a quarantined record keeps its file, its line,
its reason and the raw record as read.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.store import Store
from pipeline.synth import SynthConfig, default_sample_config, write_sample
from tests.conftest import (
    ADM_HEADER,
    NOW,
    SAMPLE_INPUT,
    adm_row,
    administrations,
    ingest,
    quarantine,
    raw_of,
    reconciles,
    write_csv,
)


def _only_quarantined(store: Store) -> dict[str, Any]:
    q = quarantine(store)
    assert len(q) == 1, q[["line", "reason", "detail"]].to_string()
    return dict(q.iloc[0])


def _adm(indir: Path, rows: list[dict[str, Any]], header: list[str] = ADM_HEADER,
         name: str = "administrations.csv") -> Path:
    return write_csv(indir / name, header, rows)


GOOD = adm_row(when="2025-02-01T10:00:00")

# (id, reason, bad record, extra header columns, a value the raw record must contain)
CASES: list[tuple[str, str, dict[str, Any], list[str], str]] = [
    ("missing-episode", "missing_field", adm_row(episode=""), [], "PHQ-9"),
    ("missing-measure", "missing_field", adm_row(measure=""), [], "E1"),
    ("missing-date", "missing_field", adm_row(when=""), [], "E1"),
    ("no-items-no-total", "missing_field", adm_row(items=None, total=None), [], "E1"),
    ("bad-date", "bad_date", adm_row(when="15/03/2025"), [], "15/03/2025"),
    ("impossible-date", "bad_date", adm_row(when="2025-02-30"), [], "2025-02-30"),
    ("future-date", "future_date",
     adm_row(when=(NOW + timedelta(hours=25)).isoformat()), [],
     (NOW + timedelta(hours=25)).isoformat()),
    ("bad-item", "bad_value", adm_row(items=[1, "two", 1, 1, 1, 1, 1, 1, 0]), [], "two"),
    ("fractional-total", "bad_value", adm_row(items=None, total="12.5"), [], "12.5"),
    ("session-zero", "bad_value", adm_row(session="0"), [], "E1"),
    ("huge-number", "bad_value", adm_row(items=None, total="99999999999999999999"), [],
     "99999999999999999999"),
    ("unknown-measure", "unknown_measure", adm_row(measure="PHQ9"), [], "PHQ9"),
    ("unknown-episode", "unknown_episode", adm_row(episode="E999"), [], "E999"),
    ("item-4-on-phq9", "item_out_of_range", adm_row(items=[1, 1, 4, 1, 1, 1, 1, 1, 0]), [],
     "4"),
    ("item-minus-1", "item_out_of_range", adm_row(items=[1, 1, -1, 1, 1, 1, 1, 1, 0]), [],
     "-1"),
    ("item-10-on-phq9", "item_out_of_range", adm_row(item_10=1), ["item_10"], "E1"),
    ("too-many-missing", "too_many_missing_items",
     adm_row(items=[None, None, None, 1, 1, 1, 1, 1, 0]), [], "E1"),
    ("total-28", "total_out_of_range", adm_row(items=None, total=28), [], "28"),
    ("total-negative", "total_out_of_range", adm_row(items=None, total=-1), [], "-1"),
    ("client-mismatch", "client_mismatch", adm_row(client_id="C2"), ["client_id"], "C2"),
]


@pytest.mark.parametrize(("reason", "bad", "extra", "needle"),
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_administration_reason(indir: Path, entities: list[Path], store: Store,
                               settings: Settings, registry: Registry, reason: str,
                               bad: dict[str, Any], extra: list[str], needle: str) -> None:
    header = [*ADM_HEADER, *extra]
    path = _adm(indir, [GOOD, bad], header)
    rep = ingest([*entities, path], store, settings, registry)
    f = rep.files[-1]
    assert (f.records, f.accepted, f.duplicates, f.quarantined) == (2, 1, 0, 1)
    assert dict(f.by_reason) == {reason: 1}
    q = _only_quarantined(store)
    assert q["reason"] == reason
    assert q["file"] == str(path)
    assert q["line"] == 3  # header line 1, the good record line 2
    raw = raw_of(q)
    assert raw["episode_id"] == bad["episode_id"]
    assert raw["administered_at"] == bad["administered_at"]
    assert needle in raw.values()
    assert q["detail"]
    assert len(administrations(store)) == 1


def test_future_date_tolerance_is_24_hours(indir: Path, entities: list[Path], store: Store,
                                           settings: Settings, registry: Registry) -> None:
    rows = [adm_row(when=(NOW + timedelta(hours=23)).isoformat()),
            adm_row(when=(NOW + timedelta(hours=24, minutes=1)).isoformat())]
    rep = ingest([*entities, _adm(indir, rows)], store, settings, registry)
    assert rep.files[-1].accepted == 1
    assert _only_quarantined(store)["line"] == 3


def test_offset_is_converted_to_utc(indir: Path, entities: list[Path], store: Store,
                                    settings: Settings, registry: Registry) -> None:
    rows = [adm_row(when="2025-02-01T10:00:00+02:00")]
    ingest([*entities, _adm(indir, rows)], store, settings, registry)
    when = administrations(store)["administered_at"].iloc[0]
    assert pd.Timestamp(when) == pd.Timestamp("2025-02-01T08:00:00")


# ------------------------------------------------------------------ entity references


@pytest.mark.parametrize(("row", "reason", "needle"), [
    ("E3,C404,T1,North,2025-01-01,,", "unknown_client", "C404"),
    ("E3,C1,T404,North,2025-01-01,,", "unknown_therapist", "T404"),
    ("E3,C1,T1,North,2025-01-01,2024-12-01,completed", "bad_date", "2024-12-01"),
    ("E3,C1,T1,North,2025-01-01,2025-03-01,cured", "bad_value", "cured"),
])
def test_episode_reasons(indir: Path, entities: list[Path], store: Store, settings: Settings,
                         registry: Registry, row: str, reason: str, needle: str) -> None:
    episodes = entities[2]
    episodes.write_text(episodes.read_text(encoding="utf-8") + row + "\n", encoding="utf-8")
    rep = ingest(entities, store, settings, registry)
    f = rep.files[2]
    assert f.kind == "episodes"
    assert (f.records, f.accepted, f.quarantined) == (3, 2, 1)
    q = _only_quarantined(store)
    assert (q["reason"], q["file"], q["line"]) == (reason, str(episodes), 4)
    raw = raw_of(q)
    assert raw["episode_id"] == "E3"
    assert needle in raw.values()
    assert sorted(store.read_table("episodes")["episode_id"]) == ["E1", "E2"]


def test_episodes_all_open_are_accepted(indir: Path, entities: list[Path], store: Store,
                                        settings: Settings, registry: Registry) -> None:
    """Every end_date blank (all episodes open) must not break the date checks."""
    rep = ingest(entities, store, settings, registry)
    assert [f.accepted for f in rep.files] == [2, 2, 2]
    ep = store.read_table("episodes")
    assert ep["end_date"].isna().all()


def test_clients_without_birth_dates_are_accepted(indir: Path, store: Store,
                                                  settings: Settings,
                                                  registry: Registry) -> None:
    p = indir / "clients.csv"
    p.write_text("client_id,birth_date\nC1,\nC2,\nC3,2030-01-01\n", encoding="utf-8")
    rep = ingest([p], store, settings, registry)
    assert (rep.files[0].accepted, rep.files[0].quarantined) == (2, 1)
    assert _only_quarantined(store)["reason"] == "future_date"


# ------------------------------------------------------------------ conflicts


def test_conflict_in_the_same_file(indir: Path, entities: list[Path], store: Store,
                                   settings: Settings, registry: Registry) -> None:
    rows = [
        adm_row(items=[1, 1, 1, 1, 1, 1, 1, 1, 0]),   # accepted: 8
        adm_row(items=[1, 1, 1, 1, 1, 1, 1, 1, 0]),   # same answers: duplicate
        adm_row(items=[2, 1, 1, 1, 1, 1, 1, 1, 0]),   # same identity, other answers: conflict
    ]
    rep = ingest([*entities, _adm(indir, rows)], store, settings, registry)
    f = rep.files[-1]
    assert (f.records, f.accepted, f.duplicates, f.quarantined) == (3, 1, 1, 1)
    q = _only_quarantined(store)
    assert (q["reason"], q["line"]) == ("conflict", 4)
    assert raw_of(q)["item_1"] == "2"
    assert administrations(store)["score"].tolist() == [8]


def test_conflict_across_ingests(indir: Path, entities: list[Path], store: Store,
                                 settings: Settings, registry: Registry) -> None:
    first = _adm(indir, [adm_row(items=[1, 1, 1, 1, 1, 1, 1, 1, 0])], name="first.csv")
    ingest([*entities, first], store, settings, registry)
    second = _adm(indir, [adm_row(items=None, total=20),
                          adm_row(when="2025-02-08T10:00:00", items=None, total=20)],
                  name="second.csv")
    rep = ingest([second], store, settings, registry)
    f = rep.files[0]
    assert (f.records, f.accepted, f.duplicates, f.quarantined) == (2, 1, 0, 1)
    q = _only_quarantined(store)
    assert (q["reason"], q["file"], q["line"]) == ("conflict", str(second), 2)
    a = administrations(store).sort_values("administered_at")
    assert a["score"].tolist() == [8, 20]  # the accepted record is kept, not overwritten


def test_same_instant_written_differently_is_a_duplicate(indir: Path, entities: list[Path],
                                                         store: Store, settings: Settings,
                                                         registry: Registry) -> None:
    rows = [adm_row(when="2025-02-01T10:00:00"), adm_row(when="2025-02-01T11:00:00+01:00")]
    rep = ingest([*entities, _adm(indir, rows)], store, settings, registry)
    f = rep.files[-1]
    assert (f.accepted, f.duplicates, f.quarantined) == (1, 1, 0)


# ------------------------------------------------------------------ reader-level reasons


def test_bad_encoding(indir: Path, entities: list[Path], store: Store, settings: Settings,
                      registry: Registry) -> None:
    path = indir / "administrations.csv"
    good = ",".join(["E1", "PHQ-9", "2025-02-01", "1", "", *["1"] * 8, "0"])
    bad = ",".join(["E1", "PHQ-9", "2025-02-08", "1", "", *["1"] * 8, "0"]) + ",caf\xe9"
    path.write_bytes((",".join([*ADM_HEADER, "note"]) + "\n" + good + ",ok\n").encode() +
                     bad.encode("latin-1") + b"\n")
    rep = ingest([*entities, path], store, settings, registry)
    f = rep.files[-1]
    assert (f.records, f.accepted, f.quarantined) == (2, 1, 1)
    assert f.extra_columns == ("note",)
    q = _only_quarantined(store)
    assert (q["reason"], q["file"], q["line"]) == ("bad_encoding", str(path), 3)
    raw = raw_of(q)
    assert raw[:3] == ["E1", "PHQ-9", "2025-02-08"]
    assert raw[-1] == "caf\\xe9"


def test_unparseable_wrong_field_count(indir: Path, entities: list[Path], store: Store,
                                       settings: Settings, registry: Registry) -> None:
    path = indir / "administrations.csv"
    good = ",".join(["E1", "PHQ-9", "2025-02-01", "1", "", *["1"] * 8, "0"])
    short = "E1,PHQ-9,2025-02-08,1"
    path.write_text(",".join(ADM_HEADER) + "\n" + short + "\n" + good + "\n", encoding="utf-8")
    rep = ingest([*entities, path], store, settings, registry)
    f = rep.files[-1]
    assert (f.records, f.accepted, f.quarantined) == (2, 1, 1)
    q = _only_quarantined(store)
    assert (q["reason"], q["file"], q["line"]) == ("unparseable", str(path), 2)
    assert raw_of(q) == ["E1", "PHQ-9", "2025-02-08", "1"]


def test_line_numbers_count_physical_lines(indir: Path, entities: list[Path], store: Store,
                                           settings: Settings, registry: Registry) -> None:
    """A quoted field spanning two lines shifts later records' line numbers."""
    path = indir / "administrations.csv"
    header = ",".join([*ADM_HEADER, "note"])
    first = ",".join(["E1", "PHQ-9", "2025-02-01", "1", "", *["1"] * 8, "0"]) + ',"two\nlines"'
    bad = ",".join(["E1", "PHQ9", "2025-02-08", "1", "", *["1"] * 8, "0"]) + ",x"
    path.write_text(f"{header}\n{first}\n{bad}\n", encoding="utf-8")
    ingest([*entities, path], store, settings, registry)
    q = _only_quarantined(store)
    assert (q["reason"], q["line"]) == ("unknown_measure", 4)


def test_field_too_large(indir: Path, entities: list[Path], store: Store,
                         registry: Registry) -> None:
    settings = Settings(max_field_chars=50)
    header = [*ADM_HEADER, "note"]
    rows = [adm_row(note="x" * 50),                                  # at the limit: fine
            adm_row(when="2025-02-08", note="y" * 51)]               # one over
    path = _adm(indir, rows, header)
    rep = ingest([*entities, path], store, settings, registry)
    f = rep.files[-1]
    assert (f.records, f.accepted, f.quarantined) == (2, 1, 1)
    q = _only_quarantined(store)
    assert (q["reason"], q["line"]) == ("field_too_large", 3)
    assert raw_of(q)["note"] == "y" * 51
    assert "'note'" in q["detail"]


def test_semicolon_and_bom(indir: Path, entities: list[Path], store: Store,
                           settings: Settings, registry: Registry) -> None:
    path = indir / "adm.csv"
    lines = [";".join(ADM_HEADER), ";".join(["E1", "PHQ-9", "2025-02-01", "1", "", *["2"] * 9])]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    rep = ingest([*entities, path], store, settings, registry)
    assert rep.files[-1].accepted == 1
    assert administrations(store)["score"].tolist() == [18]  # 9 x 2


# ------------------------------------------------------------------ unreadable files


def test_missing_required_columns_rejects_file(indir: Path, entities: list[Path], store: Store,
                                               settings: Settings, registry: Registry) -> None:
    bad = indir / "broken.csv"
    bad.write_text("episode_id,measure,session_number,total\nE1,PHQ-9,1,10\nE1,PHQ-9,2,8\n",
                   encoding="utf-8")
    good = _adm(indir, [GOOD])
    rep = ingest([*entities, bad, good], store, settings, registry)
    by_file = {f.file: f for f in rep.files}
    f = by_file[str(bad)]
    assert f.status == "rejected"
    assert f.error is not None
    assert str(bad) in f.error and "administered_at" in f.error
    assert (f.records, f.accepted, f.quarantined) == (2, 0, 2)
    assert dict(f.by_reason) == {"unreadable_file": 2}
    # The other files of the same call still go in.
    assert by_file[str(good)].status == "committed"
    assert by_file[str(good)].accepted == 1
    assert len(administrations(store)) == 1
    assert len(store.read_table("episodes")) == 2
    q = quarantine(store)
    assert q["reason"].tolist() == ["unreadable_file"] * 2
    assert q["file"].tolist() == [str(bad)] * 2
    assert q["line"].tolist() == [2, 3]
    assert raw_of(dict(q.iloc[0])) == "E1,PHQ-9,1,10"
    batches = store.read_table("batches").set_index("file")
    assert batches.loc[str(bad), "status"] == "rejected"
    assert "administered_at" in str(batches.loc[str(bad), "error"])
    assert reconciles(rep)


def test_binary_file_rejected(indir: Path, entities: list[Path], store: Store,
                              settings: Settings, registry: Registry) -> None:
    blob = indir / "scan.csv"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    good = _adm(indir, [GOOD])
    rep = ingest([*entities, blob, good], store, settings, registry)
    f = {x.file: x for x in rep.files}[str(blob)]
    assert f.status == "rejected"
    assert "binary" in (f.error or "")
    assert (f.records, f.quarantined) == (1, 1)
    q = _only_quarantined(store)
    assert (q["reason"], q["file"]) == ("unreadable_file", str(blob))
    assert pd.isna(q["line"])
    assert len(administrations(store)) == 1


def test_file_over_size_limit_rejected(indir: Path, entities: list[Path], store: Store,
                                      registry: Registry) -> None:
    path = _adm(indir, [adm_row(when=f"2025-02-{d:02d}") for d in range(1, 11)])
    assert path.stat().st_size > 300
    rep = ingest([path], store, Settings(max_file_bytes=300), registry)
    f = rep.files[0]
    assert f.status == "rejected"
    assert "300-byte limit" in (f.error or "") and str(path) in (f.error or "")
    assert (f.records, f.accepted, f.quarantined) == (10, 0, 10)


def test_crlf_line_endings(indir: Path, entities: list[Path], store: Store,
                           settings: Settings, registry: Registry) -> None:
    path = indir / "administrations.csv"
    rows = [",".join(ADM_HEADER), ",".join(["E1", "PHQ-9", "2025-02-01", "1", "", *["3"] * 9]),
            ",".join(["E1", "PHQ-9", "2025-02-08", "2", "", *["2"] * 9])]
    path.write_bytes("\r\n".join(rows).encode() + b"\r\n")
    rep = ingest([*entities, path], store, settings, registry)
    assert rep.files[-1].accepted == 2
    assert administrations(store)["score"].tolist() == [27, 18]


def test_header_matching_no_kind_rejected(indir: Path, store: Store, settings: Settings,
                                          registry: Registry) -> None:
    p = indir / "notes.csv"
    p.write_text("foo,bar\n1,2\n", encoding="utf-8")
    rep = ingest([p], store, settings, registry)
    assert rep.files[0].status == "rejected"
    assert str(p) in (rep.files[0].error or "")
    assert rep.files[0].quarantined == 1


def test_empty_file_rejected(indir: Path, store: Store, settings: Settings,
                             registry: Registry) -> None:
    p = indir / "empty.csv"
    p.write_text("", encoding="utf-8")
    rep = ingest([p], store, settings, registry)
    assert rep.files[0].status == "rejected"
    assert (rep.files[0].records, rep.files[0].quarantined) == (1, 1)


def test_all_rows_unreadable_chunk(indir: Path, entities: list[Path], store: Store,
                                   settings: Settings, registry: Registry) -> None:
    """A file whose every record fails in the reader still commits its quarantine."""
    path = indir / "administrations.csv"
    path.write_text(",".join(ADM_HEADER) + "\nE1,PHQ-9\nE2\n", encoding="utf-8")
    rep = ingest([*entities, path], store, settings, registry)
    f = rep.files[-1]
    assert (f.status, f.records, f.quarantined) == ("committed", 2, 2)
    assert quarantine(store)["reason"].tolist() == ["unparseable", "unparseable"]


# ------------------------------------------------------------------ the committed sample


def test_sample_quarantine_as_planted(sample_ingested: tuple[Store, Any],
                                      expected_quarantine: pd.DataFrame) -> None:
    store, report = sample_ingested
    d = report.as_dict()
    assert d["records"] == d["accepted"] + d["duplicates"] + d["quarantined"]
    for f in d["files"]:
        assert f["records"] == f["accepted"] + f["duplicates"] + f["quarantined"], f["file"]
        assert f["status"] == "committed"
    planted = expected_quarantine[expected_quarantine["reason"] != "duplicate"]
    n_dup = int((expected_quarantine["reason"] == "duplicate").sum())
    q = quarantine(store)
    assert (q["file"] == str(SAMPLE_INPUT / "administrations.csv")).all()
    got = dict(zip(q["line"].astype(int), q["reason"], strict=True))
    assert got == dict(zip(planted["line"], planted["reason"], strict=True))
    adm = {f["kind"]: f for f in d["files"]}["administrations"]
    text = (SAMPLE_INPUT / "administrations.csv").read_text(encoding="utf-8")
    n_rows = len(text.splitlines()) - 1
    assert adm["records"] == n_rows
    assert adm["duplicates"] == n_dup
    assert adm["quarantined"] == len(planted)
    assert adm["accepted"] == n_rows - n_dup - len(planted)
    assert Counter(q["reason"]) == Counter(planted["reason"])
    assert store.counts()["administrations"] == adm["accepted"]


def test_file_of_only_unknown_measures(indir: Path, entities: list[Path], store: Store,
                                       settings: Settings, registry: Registry) -> None:
    """No known measure in a whole chunk: the per-scale lookups are all empty."""
    rows = [adm_row(measure="PHQ9"), adm_row(measure="BDI-II", when="2025-02-08")]
    rep = ingest([*entities, _adm(indir, rows)], store, settings, registry)
    f = rep.files[-1]
    assert (f.records, f.accepted, f.quarantined) == (2, 0, 2)
    assert dict(f.by_reason) == {"unknown_measure": 2}


def test_committed_sample_is_what_synth_writes(tmp_path: Path) -> None:
    write_sample(tmp_path, default_sample_config())
    for sub in ("input", "truth"):
        for f in sorted((SAMPLE_INPUT.parent / sub).iterdir()):
            assert (tmp_path / sub / f.name).read_bytes() == f.read_bytes(), f"{sub}/{f.name}"


@pytest.mark.parametrize("seed", [3, 11])
def test_synth_planted_faults_are_found(tmp_path: Path, store: Store, settings: Settings,
                                        registry: Registry, seed: int) -> None:
    data = write_sample(tmp_path / "s", SynthConfig(episodes=30, therapists=3, seed=seed,
                                                    faulty_rows=22))
    rep = ingest([tmp_path / "s" / "input"], store, settings, registry)
    assert reconciles(rep)
    eq = data.expected_quarantine
    planted = eq[eq["reason"] != "duplicate"]
    q = quarantine(store)
    assert dict(zip(q["line"].astype(int), q["reason"], strict=True)) == \
        dict(zip(planted["line"], planted["reason"], strict=True))
    adm = {f.kind: f for f in rep.files}["administrations"]
    assert adm.duplicates == int((eq["reason"] == "duplicate").sum()) == 2
    assert adm.records == len(data.administrations)
