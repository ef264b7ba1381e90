"""Research export (SPEC §10): no identifiers, k-anonymity checked by pycanon,
reproducible and unlinkable, and rates that reconcile with `ontrack report`."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from collections import Counter
from typing import Any

import pandas as pd
import pytest

from pipeline.export import QUASI_IDENTIFIERS, _neutralise, export_dataset, surrogate
from pipeline.report import episode_flags
from pipeline.scales import load_registry
from tests.dashboard_helpers import assert_anonymous, computed_sample

KEY = b"test-export-key-1"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("export")
    store, settings = computed_sample(d)
    reg = load_registry()
    res = export_dataset(store, settings, reg, d / "out", k=5, key=KEY)
    return {"store": store, "settings": settings, "reg": reg, "dir": d, "res": res}


def test_no_identifier_of_clients_csv_appears_anywhere(sample: dict[str, Any]) -> None:
    assert_anonymous(sample["dir"] / "out")


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


def test_cli_export_is_logged_without_the_key(sample: dict[str, Any], capsys: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import main

    s = sample
    monkeypatch.setenv("ONTRACK_EXPORT_KEY", "cli-log-key-xyz")
    monkeypatch.setenv("ONTRACK_DATABASE_URL", s["settings"].resolved_database_url)
    before = len(s["store"].read_table("exports_log"))
    assert main(["export", "--out", str(s["dir"] / "cli"), "--k", "7", "--from", "2024-01-01",
                 "--measures", "PHQ-9", "--user", "dr-research"]) == 0
    log = s["store"].read_table("exports_log")
    assert len(log) == before + 1
    row = log.iloc[-1]
    manifest_text = (s["dir"] / "cli" / "manifest.json").read_text(encoding="utf-8")
    manifest = json.loads(manifest_text)
    assert row["username"] == "dr-research" and row["source"] == "cli"
    params = json.loads(row["parameters"])
    assert params == {"from": "2024-01-01", "to": None, "measures": ["PHQ-9"], "k": 7,
                      "format": "csv", "key": "from ONTRACK_EXPORT_KEY"}
    assert int(row["episodes"]) == manifest["rows"]["episodes"] > 0
    assert int(row["administrations"]) == manifest["rows"]["administrations"] > 0
    assert int(row["records_suppressed"]) == manifest["records_suppressed"]
    assert int(row["k_achieved"]) >= 7
    assert row["manifest_sha256"] == hashlib.sha256(manifest_text.encode()).hexdigest()
    assert "cli-log-key-xyz" not in log.to_csv()


def test_zip_is_deterministic_and_complete(sample: dict[str, Any]) -> None:
    from pipeline.export import zip_export

    out = sample["dir"] / "out"
    first, second = zip_export(out), zip_export(out)
    assert first == second
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        names = sorted(zf.namelist())
        assert names == [f"ontrack-export/{n}" for n in
                         ("administrations.csv", "codebook.csv", "episodes.csv",
                          "manifest.json")]
        assert zf.read("ontrack-export/episodes.csv") == (out / "episodes.csv").read_bytes()
