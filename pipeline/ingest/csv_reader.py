"""CSV reader: UTF-8 (BOM tolerated), comma/semicolon/tab delimited, streamed in chunks.

Every physical record ends up either in a chunk's frame or in its ``failed`` list with a
reason (wrong field count -> ``unparseable``, undecodable bytes or a NUL character ->
``bad_encoding``).
"""

from __future__ import annotations

import codecs
import csv
import gc
import io
import itertools
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from pipeline.errors import UnreadableFileError
from pipeline.ingest.formats import Kind, QuarantineRecord, RawChunk, detect_kind
from pipeline.reasons import Reason

__all__ = ["CsvFile", "open_csv"]

_DELIMITERS = (",", ";", "\t")
_SURROGATE = re.compile("[\udc80-\udcff]")
_LINE_END = re.compile(r"\r\n|\r|\n")
_BLOCK = 1 << 24
#: Bytes read to sniff a file (binary or text) and find its header line.
_HEAD = 65536


_LONE_CR = re.compile(rb"\r(?!\n)")


def _scan(path: Path) -> tuple[bool, bool, bool]:
    """(not valid UTF-8, holds a NUL byte, plain), read in blocks so memory stays
    bounded. Plain: no quote character and no carriage return but before a line feed,
    so every physical line is one record (a CR at a block's end counts as lone)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    bad_bytes = has_nul = False
    plain = True
    with path.open("rb") as fh:
        while block := fh.read(_BLOCK):
            has_nul = has_nul or b"\x00" in block
            plain = plain and b'"' not in block and _LONE_CR.search(block) is None
            if not bad_bytes:
                try:
                    decoder.decode(block)
                except UnicodeDecodeError:
                    bad_bytes = True
        if not bad_bytes:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                bad_bytes = True
    return bad_bytes, has_nul, plain and not bad_bytes and not has_nul


def _pick_delimiter(header_line: str) -> str:
    """The delimiter that splits the header into the most fields (ties: comma first)."""
    counts = [header_line.count(d) for d in _DELIMITERS]
    return _DELIMITERS[int(np.argmax(counts))]


class CsvFile:
    """An opened CSV input: its kind, header and a chunk iterator."""

    def __init__(self, path: Path, kind: Kind, header: list[str], delimiter: str,
                 extra_columns: tuple[str, ...], bad_bytes: bool,
                 has_nul: bool = False, plain: bool = False) -> None:
        self.path = path
        self.kind = kind
        self.header = header
        self.delimiter = delimiter
        self.extra_columns = extra_columns
        self.bad_bytes = bad_bytes
        self.has_nul = has_nul
        #: one record per physical line (see :func:`_scan`): read by Arrow's parser.
        self.plain = plain and len(header) >= 2

    def chunks(self, chunk_rows: int, max_items: int) -> Iterator[RawChunk]:
        """Yield :class:`RawChunk` objects of at most ``chunk_rows`` records."""
        csv.field_size_limit(sys.maxsize)
        if self.plain:
            yield from self._plain_chunks(chunk_rows, max_items)
            return
        with self.path.open("r", encoding="utf-8-sig", errors="surrogateescape",
                            newline="") as fh:
            reader = csv.reader(fh, delimiter=self.delimiter)
            try:
                next(reader)  # header, already parsed
            except (StopIteration, csv.Error):
                return
            yield from self._csv_chunks(reader, chunk_rows, max_items)

    def _plain_chunks(self, chunk_rows: int, max_items: int) -> Iterator[RawChunk]:
        """A plain file's chunks: ``chunk_rows`` lines at a time, split by Arrow's CSV
        parser (without quoting: the file has no quotes) when every line of the chunk
        is a record of the header's width. A chunk with any other line (blank, too few
        or too many fields) is read by the csv module instead, as a file that is not
        plain is, so quarantine reasons and line numbers come from one place. By the
        csv module, 9.9M records took ~26 s of a 10M ingest, most of it building the
        frame from the rows' lists."""
        with self.path.open("rb") as fh:
            fh.readline()  # the header: one line, already parsed
            line = 2
            while lines := list(itertools.islice(fh, chunk_rows)):
                data = b"".join(lines)
                frame = self._arrow_frame(data, len(lines))
                if frame is not None:
                    frame["_line"] = np.arange(line, line + len(lines), dtype=np.int64)
                    yield self._framed(frame, [], max_items)
                else:
                    reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""),
                                        delimiter=self.delimiter)
                    yield from self._csv_chunks(reader, chunk_rows, max_items,
                                                offset=line - 1)
                line += len(lines)

    def _arrow_frame(self, data: bytes, n_lines: int) -> pd.DataFrame | None:
        """The lines as a frame of text columns, or None unless each line is a record
        of the header's width (a blank line is dropped, a wrong width is invalid)."""
        invalid: list[int] = []

        def on_invalid(_row: Any) -> str:
            invalid.append(1)
            return "skip"

        try:
            table = pa_csv.read_csv(
                pa.py_buffer(data),
                read_options=pa_csv.ReadOptions(column_names=self.header),
                parse_options=pa_csv.ParseOptions(
                    delimiter=self.delimiter, quote_char=False, escape_char=False,
                    newlines_in_values=False, ignore_empty_lines=True,
                    invalid_row_handler=on_invalid),
                # Every value as its text: none is read as missing ("", "NA", "null" ...).
                convert_options=pa_csv.ConvertOptions(
                    column_types={c: pa.string() for c in self.header},
                    strings_can_be_null=False))
        except pa.ArrowInvalid:
            return None  # e.g. a line longer than Arrow's block (1 MB): the csv module reads it
        if invalid or table.num_rows != n_lines:
            return None
        text = pd.api.types.pandas_dtype("str")  # what the csv module's frames hold
        return table.to_pandas(types_mapper={pa.string(): text}.get)

    def _csv_chunks(self, reader: Any, chunk_rows: int, max_items: int,
                    offset: int = 0) -> Iterator[RawChunk]:
        """Chunks of the records ``reader`` (a csv reader past the header) gives; line
        numbers are the reader's plus ``offset``."""
        ncol = len(self.header)
        while True:
            rows: list[list[str]] = []
            lines: list[int] = []
            failed: list[QuarantineRecord] = []
            prev = reader.line_num + offset
            exhausted = False
            # Each record is a list, an object the cyclic garbage collector tracks
            # (and no list here can be part of a cycle): with it running, a chunk's
            # 200k live lists were traversed again and again as they aged. Paused
            # while a chunk is read and framed: reading 9.9M records 24.3 -> 18.1 s.
            collecting = gc.isenabled()
            gc.disable()
            try:
                while len(rows) + len(failed) < chunk_rows:
                    try:
                        row = next(reader)
                    except StopIteration:
                        exhausted = True
                        break
                    except csv.Error as exc:
                        line = prev + 1
                        prev = reader.line_num + offset
                        failed.append(QuarantineRecord(
                            line, Reason.UNPARSEABLE, f"CSV syntax error: {exc}",
                            QuarantineRecord.raw_json(None), f"line {line}"))
                        continue
                    line = prev + 1
                    prev = reader.line_num + offset
                    if not row or (len(row) == 1 and row[0].strip() == ""):
                        continue  # a blank line is not a record
                    if len(row) != ncol:
                        failed.append(QuarantineRecord(
                            line, Reason.UNPARSEABLE,
                            f"expected {ncol} fields (the header's), found {len(row)}",
                            _raw(row, self.bad_bytes), f"line {line}"))
                        continue
                    if self.bad_bytes and any(_SURROGATE.search(v) for v in row):
                        failed.append(QuarantineRecord(
                            line, Reason.BAD_ENCODING,
                            "bytes that are not UTF-8; re-save the file as UTF-8",
                            _raw(row, True), f"line {line}"))
                        continue
                    if self.has_nul and any("\x00" in v for v in row):
                        # A NUL past the binary sniff (first 64 KiB): corrupt text, and no
                        # PostgreSQL text column can hold it.
                        failed.append(QuarantineRecord(
                            line, Reason.BAD_ENCODING,
                            "a NUL character (binary data) in a text file",
                            _raw(row, self.bad_bytes), f"line {line}"))
                        continue
                    rows.append(row)
                    lines.append(line)
                chunk = self._chunk(rows, lines, failed, max_items) \
                    if rows or failed else None
                # The frame holds the values: the rows' lists go now, not when the
                # next chunk is read (kept alive through the caller's work on this
                # one, the collector traversed them there: ~5 s of a 10M ingest).
                rows.clear()
                lines.clear()
            finally:
                if collecting:
                    gc.enable()
            if chunk is not None:
                yield chunk
            if exhausted:
                return

    def _chunk(self, rows: list[list[str]], lines: list[int],
               failed: list[QuarantineRecord], max_items: int) -> RawChunk:
        frame = pd.DataFrame(rows, columns=self.header, dtype="str")
        frame["_line"] = np.asarray(lines, dtype=np.int64)
        return self._framed(frame, failed, max_items)

    def _framed(self, frame: pd.DataFrame, failed: list[QuarantineRecord],
                max_items: int) -> RawChunk:
        for col in self.kind.required + self.kind.optional:
            if col not in frame.columns:
                frame[col] = ""
        return RawChunk(kind=self.kind, frame=frame, failed=failed,
                        extra_columns=self.extra_columns)


def _raw(row: list[str], escape: bool) -> str:
    if escape:
        row = [v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
               for v in row]
    return QuarantineRecord.raw_json(row)


def open_csv(path: Path, max_items: int) -> CsvFile:
    """Open a CSV file, sniff its delimiter and recognise its kind by the header.

    Raises
    ------
    UnreadableFileError
        When the file is binary, has no header, or lacks a kind's required columns.
    """
    with path.open("rb") as fh:
        head = fh.read(_HEAD)
    if b"\x00" in head:
        raise UnreadableFileError(
            "file contains NUL bytes: it is binary, not a CSV text file",
            file=str(path), expected="UTF-8 CSV text")
    bad_bytes, has_nul, plain = _scan(path)
    text = head.decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    # The csv module ends a line at \r or \n only; str.splitlines() would also cut the
    # header at \x0c, \x1c, U+0085, U+2028 ..., and the header would lose columns.
    if len(head) == _HEAD and not _LINE_END.search(text):
        raise UnreadableFileError(f"header line is longer than {_HEAD} bytes", file=str(path),
                                  expected="a header line naming the columns (SPEC §11)")
    first = _LINE_END.split(text, maxsplit=1)[0] if text.strip() else ""
    if not first.strip():
        raise UnreadableFileError("file is empty or has no header line", file=str(path),
                                  expected="a header line naming the columns (SPEC §11)")
    if _SURROGATE.search(first):
        raise UnreadableFileError("header line is not UTF-8", file=str(path),
                                  expected="a UTF-8 header line; re-save the file as UTF-8")
    delimiter = _pick_delimiter(first)
    try:
        header = next(csv.reader(io.StringIO(first), delimiter=delimiter))
    except csv.Error as exc:
        raise UnreadableFileError(f"header line is not valid CSV: {exc}", file=str(path),
                                  expected="a header line naming the columns (SPEC §11)") \
            from exc
    if len(set(header)) != len(header):
        dupes = sorted({c for c in header if header.count(c) > 1})
        raise UnreadableFileError(f"header repeats columns {dupes}", file=str(path))
    kind, closest = detect_kind(header)
    if kind is None:
        if closest is None:
            raise UnreadableFileError(
                "header matches no known file kind", file=str(path), header=header[:12],
                expected="administrations (episode_id, measure, administered_at), episodes, "
                "clients, therapists or plans columns as in SPEC §11, lower case")
        missing = [c for c in closest.required if c not in header]
        raise UnreadableFileError(
            f"looks like a {closest.name} file but lacks required columns {missing}",
            file=str(path), expected=f"columns {list(closest.required)}",
            found=header[:12])
    extras = tuple(c for c in header if not kind.known(c, max_items))
    return CsvFile(path, kind, header, delimiter, extras, bad_bytes, has_nul, plain)
