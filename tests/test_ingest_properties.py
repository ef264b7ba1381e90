"""Property: whatever mix of valid and broken administration rows comes in, every record
ends in exactly one place (accepted, duplicate, quarantined) and the store agrees.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.store import Store
from tests.conftest import NOW, ingest

HEADER = ["episode_id", "measure", "administered_at", "session_number", "total",
          *[f"item_{i}" for i in range(1, 11)]]

EPISODES = ["E1", "E2", "E404", "", " E1 "]
MEASURES = ["PHQ-9", "GAD-7", "CORE-10", "WSAS", "ORS", "PHQ-8", "PHQ9", "", "phq-9"]
# A small pool of instants, so identities collide (duplicates and conflicts).
DATES = ["2025-02-01", "2025-02-01T10:00:00", "2025-02-01T11:00:00+01:00",
         "2025-02-08T10:00:00Z", "2025-02-30", "01/02/2025", "", "soon",
         (NOW + timedelta(days=3)).isoformat(), (NOW + timedelta(hours=1)).isoformat()]
ITEMS = ["", "", "0", "1", "2", "3", "4", "8", "10", "-1", "x", "2.0", " 1 ", "1.5",
         "99999999999999999999"]
TOTALS = ["", "", "", "0", "9", "27", "28", "-3", "abc", "40"]
SESSIONS = ["", "1", "2", "0", "x"]

row_strategy = st.fixed_dictionaries({
    "episode_id": st.sampled_from(EPISODES),
    "measure": st.sampled_from(MEASURES),
    "administered_at": st.sampled_from(DATES),
    "session_number": st.sampled_from(SESSIONS),
    "total": st.sampled_from(TOTALS),
    **{f"item_{i}": st.sampled_from(ITEMS) for i in range(1, 11)},
})


@st.composite
def files_strategy(draw: st.DrawFn) -> list[list[list[str]]]:
    """1-2 files; each a list of rows (field lists), some repeated, some truncated."""
    out = []
    for _ in range(draw(st.integers(1, 2))):
        rows = [[r[c] for c in HEADER] for r in draw(st.lists(row_strategy, max_size=25))]
        if rows:
            for i in draw(st.lists(st.integers(0, len(rows) - 1), max_size=5)):
                rows.append(list(rows[i]))  # a repeated record
            for i in draw(st.lists(st.integers(0, len(rows) - 1), max_size=2)):
                # wrong field count (at least 2 fields: a lone empty field is a blank line)
                rows[i] = rows[i][: draw(st.integers(2, len(HEADER) - 1))]
            rows = draw(st.permutations(rows))
        out.append(rows)
    return out


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(files=files_strategy())
def test_counts_reconcile(files: list[list[list[str]]], base_db: Path,
                          registry: Registry) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        shutil.copy(base_db, root / "t.db")
        store = Store(f"sqlite:///{root}/t.db")
        try:
            paths = []
            for n, rows in enumerate(files):
                p = root / f"adm{n}.csv"
                with p.open("w", encoding="utf-8", newline="") as fh:
                    w = csv.writer(fh, lineterminator="\n")
                    w.writerow(HEADER)
                    w.writerows(rows)
                paths.append(p)
            report = ingest(paths, store, Settings(), registry)

            written = {str(p): len(rows) for p, rows in zip(paths, files, strict=True)}
            d_ = report.as_dict()
            assert {f["file"]: f["records"] for f in d_["files"]} == written
            for f in d_["files"]:
                assert f["status"] == "committed"
                assert f["records"] == f["accepted"] + f["duplicates"] + f["quarantined"]
                assert sum(f["by_reason"].values()) == f["quarantined"]
            assert d_["records"] == sum(written.values())
            assert d_["records"] == d_["accepted"] + d_["duplicates"] + d_["quarantined"]

            counts = store.counts()
            assert counts["administrations"] == d_["accepted"]
            assert counts["quarantine"] == d_["quarantined"]
            q = store.read_table("quarantine")
            # Every quarantined record points at a real data line of its own file, once.
            assert not q.duplicated(["file", "line"]).any()
            for file, lines in q.groupby("file")["line"]:
                assert lines.between(2, written[str(file)] + 1).all()
            # The batch rows say the same as the report.
            b = store.read_table("batches").set_index("file")
            for f in d_["files"]:
                assert b.loc[f["file"], "records"] == f["records"]
                assert b.loc[f["file"], "accepted"] == f["accepted"]
        finally:
            store.engine.dispose()
