"""The ``ontrack`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import ADM_HEADER, adm_row, write_csv, write_entities

CODES = ["CORE-10", "GAD-7", "ORS", "PCL-5", "PHQ-8", "PHQ-9", "WSAS"]


@pytest.fixture(autouse=True)
def _hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ontrack.toml or ONTRACK_* variable of the caller leaks into the command."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("ONTRACK_")]:
        monkeypatch.delenv(name)


def test_ingest_json_prints_one_object(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "in"
    d.mkdir()
    write_entities(d)
    write_csv(d / "administrations.csv", ADM_HEADER, [
        adm_row(when="2025-02-01"),                       # accepted
        adm_row(when="2025-02-01"),                       # duplicate
        adm_row(when="2025-02-08", measure="PHQ9"),       # unknown_measure
        adm_row(when="2025-02-15", items=None, total=30),  # total_out_of_range
    ])
    url = f"sqlite:///{tmp_path}/cli.db"
    rc = main(["--database-url", url, "ingest", "--json", str(d)])
    out, err = capsys.readouterr()
    assert rc == 0
    report = json.loads(out)  # the whole of stdout is one JSON document
    assert isinstance(report, dict)
    assert {"records", "accepted", "duplicates", "quarantined", "by_reason", "warnings",
            "files"} <= set(report)
    # 2 therapists + 2 clients + 2 episodes + 4 administrations
    assert report["records"] == 10
    assert (report["accepted"], report["duplicates"], report["quarantined"]) == (7, 1, 2)
    assert report["records"] == report["accepted"] + report["duplicates"] + \
        report["quarantined"]
    assert report["by_reason"] == {"total_out_of_range": 1, "unknown_measure": 1}
    assert [f["kind"] for f in report["files"]] == ["therapists", "clients", "episodes",
                                                   "administrations"]
    assert (tmp_path / "cli.db").exists()

    # Again: nothing new, the same two records quarantined.
    rc = main(["--database-url", url, "ingest", "--json", str(d)])
    again = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert (again["accepted"], again["duplicates"], again["quarantined"]) == (0, 8, 2)


def test_ingest_human_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "in"
    d.mkdir()
    write_entities(d)
    rc = main(["--database-url", f"sqlite:///{tmp_path}/h.db", "ingest", str(d)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "total: 6 records = 6 accepted + 0 duplicates + 0 quarantined" in out


def test_scales_lists_the_seven_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scales"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "code"
    assert sorted(line.split()[0] for line in lines[1:]) == CODES


def test_scales_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scales", "--json"]) == 0
    scales = json.loads(capsys.readouterr().out)
    assert sorted(s["code"] for s in scales) == CODES
    ors = next(s for s in scales if s["code"] == "ORS")
    assert ors["direction"] == "higher_is_better"
    assert ors["total_range"] == [0, 40]


def test_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope" / "administrations.csv"
    rc = main(["--database-url", f"sqlite:///{tmp_path}/e.db", "ingest", "--json",
               str(missing)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert err.startswith("ontrack: error:")
    assert "no such file" in err and str(missing) in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--config", str(tmp_path / "absent.toml"), "scales"])
    assert rc == 2
    assert "settings file not found" in capsys.readouterr().err


def test_init_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["--database-url", url, "init"]) == 0
    assert "schema version 1" in capsys.readouterr().out
    assert main(["--database-url", url, "summary", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["administrations"] == 0 and counts["batches"] == 0


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_only_the_console_script_freezes_the_loaded_objects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    gc.unfreeze()
    try:
        assert main(["scales"]) == 0
        assert gc.get_freeze_count() == 0  # in-process: pending garbage stays collectable
        monkeypatch.setattr(sys, "argv", ["ontrack", "scales"])
        assert main() == 0
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
