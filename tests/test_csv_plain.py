"""A plain CSV file (no quotes, no lone carriage return: one record per line) is split
by Arrow's parser; every other file by the csv module. Both must give the same chunks:
the same frames, line numbers and quarantined records, whatever the file holds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.ingest.csv_reader import open_csv
from pipeline.synth import SynthConfig, write_sample

HEADER = "episode_id,measure,administered_at,total,item_1"


def _chunks(path: Path, plain: bool, chunk_rows: int) -> list[tuple[pd.DataFrame, list]]:
    f = open_csv(path, max_items=20)
    assert f.plain, "the file should be plain"
    f.plain = plain
    return [(c.frame, [(q.line, q.reason, q.detail, q.raw, q.location) for q in c.failed])
            for c in f.chunks(chunk_rows, 20)]


def _same_either_way(path: Path, chunk_rows: int) -> list[tuple[pd.DataFrame, list]]:
    """The records of the chunks, in order, are the same either way. (Chunks are cut
    by lines on the plain path and by records on the csv module's, so a blank line
    can move a boundary; each holds at most ``chunk_rows`` records either way.)"""
    arrow, csv_module = _chunks(path, True, chunk_rows), _chunks(path, False, chunk_rows)
    for chunks in (arrow, csv_module):
        assert all(0 < len(f) + len(q) <= chunk_rows for f, q in chunks)
    pd.testing.assert_frame_equal(
        pd.concat([f for f, _ in arrow], ignore_index=True),
        pd.concat([f for f, _ in csv_module], ignore_index=True), check_exact=True)
    assert [q for _, qs in arrow for q in qs] == [q for _, qs in csv_module for q in qs]
    return arrow


@pytest.mark.parametrize("body", [
    # every line a record; values that a CSV reader might take for missing ones
    "E1,PHQ-9,2026-01-05T10:00,12,1\nE1,PHQ-9,2026-01-12T10:00,NA,\n"
    "E2,GAD-7,2026-01-05,null,N/A\nE3,PHQ-9,2026-01-05, 7 ,NaN\n",
    # Windows line ends, no end at the last line, text beyond ASCII
    "E1,PHQ-9,2026-01-05T10:00,12,1\r\nE\u00e9,PHQ-9,2026-01-12,3,0\r\nE2,GAD-7,x,y,z",
    # blank lines, a line of spaces, too few and too many fields, mixed with good ones
    "E1,PHQ-9,2026-01-05,12,1\n\nE2,PHQ-9,2026-01-05,3,0\n   \nE3,GAD-7,2026-01-05,4\n"
    "E4,GAD-7,2026-01-05,4,1,9\n\r\nE5,GAD-7,2026-01-06,5,1\n",
    # a trailing blank line only
    "E1,PHQ-9,2026-01-05,12,1\n\n",
    # formula-like text and separators of other files
    "=1+2,PHQ-9;x,2026-01-05\t10:00,@SUM(A1),-1\n",
    # a field longer than Arrow's 1 MB block
    "E1,PHQ-9,2026-01-05,12,1\nE2," + "x" * 1_500_000 + ",2026-01-05,3,0\n",
    # only delimiters
    ",,,,\n",
])
@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 1000])
def test_plain_files_read_the_same_by_arrow_and_by_the_csv_module(
        tmp_path: Path, body: str, chunk_rows: int) -> None:
    path = tmp_path / "administrations.csv"
    path.write_bytes(("\ufeff" + HEADER + "\n" + body).encode("utf-8"))
    chunks = _same_either_way(path, chunk_rows)
    assert sum(len(f) + len(q) for f, q in chunks) > 0


def test_blank_and_short_lines_keep_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "administrations.csv"
    path.write_text(HEADER + "\nE1,PHQ-9,2026-01-05,12,1\n\nE2,PHQ-9,2026-01-05,3\n"
                    "E3,GAD-7,2026-01-05,4,1\n", encoding="utf-8")
    (frame, failed), = _same_either_way(path, 1000)
    assert frame["_line"].tolist() == [2, 5] and frame["episode_id"].tolist() == ["E1", "E3"]
    assert [q[0] for q in failed] == [4] and "found 4" in failed[0][2]


def test_not_plain_files_go_to_the_csv_module(tmp_path: Path) -> None:
    """A quote anywhere, or a carriage return alone, and the file is not plain."""
    for i, body in enumerate(['E1,PHQ-9,2026-01-05,"1,2",1\n', "E1,PHQ-9,2026-01-05,1,1\r"
                              "E2,PHQ-9,2026-01-05,1,1\n"]):
        path = tmp_path / f"a{i}.csv"
        path.write_text(HEADER + "\n" + body, encoding="utf-8", newline="")
        assert not open_csv(path, max_items=20).plain


def test_a_generated_sample_reads_the_same(tmp_path: Path) -> None:
    """Every file of a generated sample, its faulty rows included, in chunks that end
    anywhere."""
    write_sample(tmp_path / "s", SynthConfig(episodes=30, therapists=3, seed=11,
                                             faulty_rows=15))
    files = sorted((tmp_path / "s" / "input").glob("*.csv"))
    plain = [p for p in files if open_csv(p, max_items=20).plain]
    assert len(plain) >= 3
    for path in plain:
        _same_either_way(path, 37)
