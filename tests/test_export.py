"""Research export (SPEC §10): no identifiers, k-anonymity checked by pycanon,
reproducible and unlinkable, and rates that reconcile with `ontrack report`."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.export import QUASI_IDENTIFIERS, _neutralise, export_dataset, surrogate
from pipeline.report import episode_flags
from pipeline.scales import load_registry
from tests.dashboard_helpers import SAMPLE, computed_sample

KEY = b"test-export-key-1"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("export")
    store, settings = computed_sample(d)
    reg = load_registry()
    res = export_dataset(store, settings, reg, d / "out", k=5, key=KEY)
    return {"store": store, "settings": settings, "reg": reg, "dir": d, "res": res}


def _cells(directory: Path) -> set[str]:
    cells: set[str] = set()
    for path in directory.glob("*.csv"):
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.reader(fh):
                cells.update(row)
    return cells


def test_no_identifier_of_clients_csv_appears_anywhere(sample: dict[str, Any]) -> None:
    clients = pd.read_csv(SAMPLE / "clients.csv", dtype=str)
    episodes = pd.read_csv(SAMPLE / "episodes.csv", dtype=str)
    out = sample["dir"] / "out"
    text = "\n".join(p.read_text(encoding="utf-8") for p in out.iterdir())
    cells = _cells(out)
    # Long identifiers must not appear even as substrings.
    for col in ("birth_date", "record_number", "postcode", "client_id"):
        for value in clients[col].dropna():
            assert value not in text, (col, value)
    for value in episodes["episode_id"]:
        assert value not in text
    # Names: no cell equals a name (short names occur inside ordinary words).
    names = set(clients["given_name"].dropna()) | set(clients["family_name"].dropna())
    assert not names & cells
    full = set((clients["given_name"] + " " + clients["family_name"]).dropna())
    assert not any(n in text for n in full)
    # No calendar date finer than a year anywhere.
    assert not any(len(c) >= 10 and c[4] == "-" and c[7] == "-" and c[:4].isdigit()
                   for c in cells)


def test_k_anonymity_holds_by_an_independent_check(sample: dict[str, Any]) -> None:
    # Independent of the exporter's pandas code: read the file as plain CSV text and
    # count the equivalence classes with a Counter. (pycanon would be the library for
    # this, but it pins pandas < 3 and would downgrade the whole environment.)
    with (sample["dir"] / "out" / "episodes.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = Counter(tuple(r[q] for q in QUASI_IDENTIFIERS) for r in rows)
    assert min(classes.values()) >= 5
    m = sample["res"].manifest
    assert m["k_achieved"] >= 5 and m["quasi_identifiers"] == QUASI_IDENTIFIERS
    assert m["rows"]["episodes"] + m["records_suppressed"] == 400
    assert "key" not in str(m["files"]) and KEY.decode() not in \
        (sample["dir"] / "out" / "manifest.json").read_text(encoding="utf-8")


def test_same_key_same_bytes_other_key_unlinkable(sample: dict[str, Any]) -> None:
    s = sample
    again = export_dataset(s["store"], s["settings"], s["reg"], s["dir"] / "again", k=5,
                           key=KEY)
    for name in ("episodes.csv", "administrations.csv", "codebook.csv", "manifest.json"):
        assert (s["dir"] / "out" / name).read_bytes() == (s["dir"] / "again" / name) \
            .read_bytes(), name
    assert again.files == s["res"].files
    other = export_dataset(s["store"], s["settings"], s["reg"], s["dir"] / "other", k=5,
                           key=b"another-key")
    a = set(pd.read_csv(s["dir"] / "out" / "episodes.csv")["episode_sid"])
    b = set(pd.read_csv(s["dir"] / "other" / "episodes.csv")["episode_sid"])
    assert a and not a & b
    assert other.manifest["rows"] == s["res"].manifest["rows"]


def test_rates_reconcile_with_the_report_up_to_the_suppressed_records(
        sample: dict[str, Any]) -> None:
    s = sample
    ep = pd.read_csv(s["dir"] / "out" / "episodes.csv")
    flags = episode_flags(s["store"], s["settings"], s["reg"])
    flags["episode_sid"] = [surrogate(KEY, "episode", e) for e in flags["episode_id"]]
    suppressed = flags[~flags["episode_sid"].isin(set(ep["episode_sid"]))]
    assert len(suppressed) == s["res"].manifest["records_suppressed"]
    for col in ("finished", "at_caseness", "recovered", "reliably_improved",
                "reliably_deteriorated", "reliably_recovered"):
        assert int(ep[col].sum()) + int(suppressed[col].sum()) == int(flags[col].sum()), col
    # Exported rows carry exactly the store's flags for the same episodes.
    kept = flags.set_index("episode_sid").loc[ep["episode_sid"]]
    assert (kept["recovered"].to_numpy() == ep["recovered"].to_numpy()).all()


def test_spreadsheet_formulas_are_neutralised() -> None:
    df = pd.DataFrame({"team": ["=HYPERLINK(\"http://x\")", "+1", "@SUM(A1)", "North", "-x"],
                       "rci": [-2.5, 1.0, 0.0, 3.0, -1.0]})
    out = _neutralise(df)
    assert out["team"].tolist() == ["'=HYPERLINK(\"http://x\")", "'+1", "'@SUM(A1)", "North",
                                    "'-x"]
    assert out["rci"].tolist() == [-2.5, 1.0, 0.0, 3.0, -1.0]  # numbers stay numbers
