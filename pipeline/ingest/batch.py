"""Ingest files into the store, one batch (one transaction) per file.

Every input record ends in exactly one place: accepted, duplicate of an accepted record,
or quarantined with a reason code. ``records == accepted + duplicates + quarantined``
holds per batch and overall, and is checked before each batch commits.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy.engine import Connection

from pipeline import flags
from pipeline.columns import is_in, to_datetimes
from pipeline.config import Settings
from pipeline.errors import IngestError, UnreadableFileError
from pipeline.faults import crash_point
from pipeline.ingest.csv_reader import open_csv
from pipeline.ingest.formats import INGEST_ORDER, QuarantineRecord, RawChunk
from pipeline.reasons import Reason, Warn
from pipeline.scales import Registry
from pipeline.scoring import score_administrations
from pipeline.store import MAX_ITEMS, MUTABLE_FIELDS, Store, utcnow
from pipeline.validate import Context, check_administrations, check_entities, validate_scored

__all__ = ["FileReport", "IngestReport", "content_hash", "ingest_paths", "plan_files"]

_ITEMS = [f"item_{i}" for i in range(1, MAX_ITEMS + 1)]
_CONTENT = ["session_number", "total_supplied", *_ITEMS]
_IDENTITY = ["episode_id", "measure", "administered_at"]
#: A chunk naming up to this many ids (episodes, clients, therapists) looks up just
#: those in the store; a larger one loads every id once for its file.
LOOKUP_LIMIT = 20_000


@dataclass
class FileReport:
    """What happened to one file."""

    file: str
    kind: str | None
    status: str  # committed | rejected | failed
    records: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    extra_columns: tuple[str, ...] = ()
    error: str | None = None
    batch_id: int | None = None
    episodes_touched: set[str] = field(default_factory=set)
    risk_flags: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "kind": self.kind, "status": self.status,
            "batch_id": self.batch_id, "records": self.records, "accepted": self.accepted,
            "duplicates": self.duplicates, "quarantined": self.quarantined,
            "by_reason": dict(sorted(self.by_reason.items())),
            "warnings": dict(sorted(self.warnings.items())),
            "extra_columns": list(self.extra_columns), "error": self.error,
            "risk_flags_raised": self.risk_flags,
        }


@dataclass
class IngestReport:
    """Totals over every file of one ``ontrack ingest`` call."""

    files: list[FileReport] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(f, name) for f in self.files)

    def counter(self, name: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for f in self.files:
            out.update(getattr(f, name))
        return out

    @property
    def episodes_touched(self) -> set[str]:
        return set().union(*(f.episodes_touched for f in self.files)) if self.files else set()

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.total("records"), "accepted": self.total("accepted"),
            "duplicates": self.total("duplicates"), "quarantined": self.total("quarantined"),
            "by_reason": dict(sorted(self.counter("by_reason").items())),
            "warnings": dict(sorted(self.counter("warnings").items())),
            "risk_flags_raised": self.total("risk_flags"),
            "files": [f.as_dict() for f in self.files],
        }


def content_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (a batch's identity for "already ingested")."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, plus every regular file (recursively, sorted) of directories named."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()
                              and not f.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise IngestError("no such file or directory", path=str(p))
    return out


def _looks_json(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] in (b"{", b"[")


class _Opened:
    """A file opened for ingest: its kind and a chunk source (or the reason it cannot be)."""

    def __init__(self, path: Path, settings: Settings, registry: Registry) -> None:
        self.path = path
        self.error: UnreadableFileError | None = None
        #: The quarantine reason of every record when the file is rejected.
        self.reason = Reason.UNREADABLE_FILE
        self.kind: str | None = None
        self._chunks: Iterator[RawChunk] | None = None
        size = path.stat().st_size
        if size > settings.max_file_bytes:
            # Checked before any parsing, so a huge (or hostile) file costs no memory.
            self.reason = Reason.FILE_TOO_LARGE
            self.error = UnreadableFileError(
                f"file is {size} bytes, over the {settings.max_file_bytes}-byte limit",
                file=str(path), size_bytes=size, limit_bytes=settings.max_file_bytes,
                fix="split the file, or raise the max_file_bytes setting "
                "(ONTRACK_MAX_FILE_BYTES or max_file_bytes in ontrack.toml)")
            return
        try:
            if _looks_json(path):
                # Imported here: the FHIR models take 0.2 s to load, CSV files need none.
                from pipeline.ingest.fhir_reader import read_fhir

                self.kind = "administrations"
                # read_fhir is a generator: materialise it here so an unreadable file
                # raises now (file rejected) rather than mid-batch (whole ingest aborted).
                self._chunks = iter(list(read_fhir(path, registry, settings.max_file_bytes)))
            else:
                csvf = open_csv(path, registry.max_items)
                self.kind = csvf.kind.name
                self._chunks = csvf.chunks(settings.chunk_rows, registry.max_items)
        except UnreadableFileError as exc:
            self.error = exc

    @property
    def order(self) -> int:
        return INGEST_ORDER.index(self.kind) if self.kind else len(INGEST_ORDER)

    def chunks(self) -> Iterator[RawChunk]:
        if self._chunks is None:
            raise IngestError("file was not opened", file=str(self.path))
        return self._chunks


def _rejected_records(path: Path, error: UnreadableFileError,
                      reason: Reason = Reason.UNREADABLE_FILE) -> list[QuarantineRecord]:
    """Quarantine a rejected file: one record per data line of text (in its first 64 MiB),
    else one record for the whole file."""
    with path.open("rb") as fh:
        data = fh.read(64 << 20)  # not read_bytes(): the file may be over max_file_bytes
    if b"\x00" in data[:65536] or not data.strip():
        raw = QuarantineRecord.raw_json(data[:2000].decode("utf-8", "backslashreplace"))
        return [QuarantineRecord(None, reason, str(error), raw, "file")]
    lines = data.decode("utf-8", "backslashreplace").splitlines()
    out = []
    for i, line in enumerate(lines[1:], start=2):
        if line.strip():
            out.append(QuarantineRecord(i, reason, str(error),
                                        QuarantineRecord.raw_json(line[:20000]), f"line {i}"))
    return out or [QuarantineRecord(1, reason, str(error),
                                    QuarantineRecord.raw_json(lines[0][:20000] if lines else ""),
                                    "line 1")]


def _fingerprint(frame: pd.DataFrame) -> pd.Series:
    """A string of an administration's answers (session, total, items); NA as ''."""
    # Joined by Arrow's kernels: pandas' string concatenation of the 23 columns took
    # ~2 s per million administrations.
    parts = [pc.cast(pa.array(pd.to_numeric(frame[col], errors="coerce").astype("Int64")),
                     pa.string()) for col in _CONTENT]
    joined = pc.binary_join_element_wise(*parts, "|", null_handling="replace",
                                         null_replacement="")
    return pd.Series(pd.array(joined, dtype="str"), index=frame.index)


class _Ingestor:
    def __init__(self, store: Store, settings: Settings, registry: Registry,
                 now: datetime | None) -> None:
        self.store = store
        self.settings = settings
        self.registry = registry
        self.now = now or utcnow()
        self._file_plans: set[str] = set()
        self._whole: Context | None = None

    def context(self, conn: Connection, frame: pd.DataFrame | None = None) -> Context:
        """What validation needs from the store for one chunk.

        A chunk naming at most :data:`LOOKUP_LIMIT` ids gets only those, read in this
        transaction (so it sees what earlier chunks of the file wrote): a cycle's small
        file into a large store reads a few thousand rows instead of every episode and
        client. A larger chunk gets every id, read once per file and kept up to date
        as the file's entities are written.
        """
        if frame is not None:
            need = {c: frame[c].astype("str").str.strip().unique().tolist()
                    for c in ("episode_id", "client_id", "therapist_id") if c in frame}
            if sum(len(v) for v in need.values()) <= LOOKUP_LIMIT:
                owners, starts = self.store.episode_clients_and_starts(
                    conn, need.get("episode_id", []))
                return self._context(
                    therapists=self.store.therapist_ids(conn, need.get("therapist_id", [])),
                    clients=self.store.client_ids(conn, need.get("client_id", [])),
                    episode_client=owners, episode_start=starts)
        if self._whole is None:
            owners, starts = self.store.episode_clients_and_starts(conn)
            self._whole = self._context(
                therapists=self.store.therapist_ids(conn), clients=self.store.client_ids(conn),
                episode_client=owners, episode_start=starts)
        return self._whole

    def _context(self, **lookups: Any) -> Context:
        return Context(registry=self.registry, now=self.now, timezone=self.settings.timezone,
                       future_tolerance_hours=self.settings.future_tolerance_hours,
                       max_field_chars=self.settings.max_field_chars, **lookups)

    def run(self, paths: Sequence[Path]) -> IngestReport:
        opened = sorted((_Opened(p, self.settings, self.registry) for p in paths),
                        key=lambda o: o.order)
        report = IngestReport()
        for op in opened:
            report.files.append(self.ingest_file(op))
        return report

    def ingest_file(self, op: _Opened) -> FileReport:
        rep = FileReport(file=str(op.path), kind=op.kind, status="committed")
        self._file_plans = set()  # episodes whose plan this file created
        self._whole = None  # every id, when a chunk names too many to look up
        digest = content_hash(op.path)
        with self.store.transaction(bulk=True) as conn:
            rep.batch_id = self.store.start_batch(conn, str(op.path), digest, op.kind, self.now)
            if op.error is not None:
                rep.status = "rejected"
                rep.error = str(op.error)
                self._quarantine(conn, rep, _rejected_records(op.path, op.error, op.reason))
            else:
                for chunk in op.chunks():
                    rep.records += chunk.n_records
                    rep.extra_columns = chunk.extra_columns
                    self._quarantine(conn, rep, chunk.failed)
                    if chunk.frame.empty:
                        continue  # every record of the chunk already failed in the reader
                    ctx = self.context(conn, chunk.frame)
                    if op.kind == "administrations":
                        self._administrations(conn, rep, chunk, ctx)
                    else:
                        self._entities(conn, rep, chunk, ctx)
                    crash_point("ingest.chunk")
            if op.error is not None:
                rep.records = rep.quarantined
            if rep.records != rep.accepted + rep.duplicates + rep.quarantined:
                raise IngestError("record counts do not reconcile; batch rolled back",
                                  file=str(op.path), records=rep.records,
                                  accepted=rep.accepted, duplicates=rep.duplicates,
                                  quarantined=rep.quarantined)
            self.store.finish_batch(
                conn, rep.batch_id, status=rep.status, records=rep.records,
                accepted=rep.accepted, duplicates=rep.duplicates, quarantined=rep.quarantined,
                by_reason=dict(rep.by_reason), warnings=dict(rep.warnings),
                extra_columns=rep.extra_columns, error=rep.error)
        return rep

    def _quarantine(self, conn: Connection, rep: FileReport,
                    records: Sequence[QuarantineRecord]) -> None:
        if not records:
            return
        rep.quarantined += len(records)
        rep.by_reason.update(r.reason.value for r in records)
        self.store.insert_quarantine(conn, (
            {"batch_id": rep.batch_id, "file": rep.file, "line": r.line,
             "location": r.location, "reason": r.reason.value, "detail": r.detail[:2000],
             "raw": r.raw} for r in records))

    # -------------------------------------------------------------- administrations
    def _administrations(self, conn: Connection, rep: FileReport, chunk: RawChunk,
                         ctx: Context) -> None:
        checked = check_administrations(chunk.frame, ctx)
        self._quarantine(conn, rep, checked.quarantined)
        frame = checked.accepted
        if frame.empty:
            return
        frame = score_administrations(frame, self.registry)
        frame = validate_scored(frame, self.registry)
        frame = frame.sort_values("_line", kind="stable").reset_index(drop=True)

        # Within the chunk: the first of an identity stands for the rest. Answers are
        # compared (by fingerprint) only where an identity repeats, in the chunk or
        # in the store: a chunk of new records needs none (~6 s of a 10M ingest).
        first = ~frame.duplicated(_IDENTITY, keep="first").to_numpy()
        later_same = np.zeros(len(frame), dtype=bool)
        later_diff = later_same.copy()
        if not first.all():
            frame["_fp"] = _fingerprint(frame)
            firsts = frame.loc[first, [*_IDENTITY, "_fp"]].rename(
                columns={"_fp": "_fp_first"})
            frame = frame.merge(firsts, on=_IDENTITY, how="left")
            later_same = ~first & (frame["_fp"] == frame["_fp_first"]).to_numpy()
            later_diff = ~first & ~later_same

        # Against the store. Where the store can skip an identity it holds (SQLite),
        # the chunk's first records go in at once, and the store is asked which were
        # already there only when some were skipped: new records (the usual batch)
        # need no lookup, which was ~19 s of a 10M ingest. Either way the same rows
        # are written and counted.
        written: int | None = None
        sent: pd.DataFrame | None = None  # the chunk's first records, as inserted
        if self.store.skips_stored(conn):
            before = self.store.last_admin_id(conn)
            sent = frame.loc[first].assign(batch_id=rep.batch_id)
            written = self.store.insert_administrations(conn, sent, skip_stored=True)
            stored = pd.DataFrame() if written == len(sent) else \
                self.store.administration_keys(conn, frame[_IDENTITY], up_to=before)
        else:
            stored = self.store.administration_keys(conn, frame[_IDENTITY])
        if not stored.empty:
            if "_fp" not in frame.columns:
                frame["_fp"] = _fingerprint(frame)
            stored["administered_at"] = to_datetimes(stored["administered_at"]) \
                .astype("datetime64[us]")
            stored["_fp_stored"] = _fingerprint(stored)
            frame = frame.merge(stored[[*_IDENTITY, "_fp_stored"]], on=_IDENTITY, how="left")
            in_store = frame["_fp_stored"].notna().to_numpy()
            store_same = in_store & \
                (frame["_fp"] == frame["_fp_stored"]).fillna(False).to_numpy()
        else:
            in_store = store_same = np.zeros(len(frame), dtype=bool)

        duplicate = (first & store_same) | (later_same & ~(in_store & ~store_same))
        conflict = (first & in_store & ~store_same) | later_diff | \
            (later_same & in_store & ~store_same)
        new = first & ~in_store

        rep.duplicates += int(duplicate.sum())
        if conflict.any():
            bad = frame.loc[conflict]
            self._quarantine(conn, rep, [
                QuarantineRecord(int(r["_line"]), Reason.CONFLICT,
                                 "same (episode_id, measure, administered_at) as an accepted "
                                 "record, different answers; the accepted one is kept",
                                 QuarantineRecord.raw_json(_plain(r)),
                                 f"{chunk.frame.attrs.get('location_label', 'line')} "
                                 f"{int(r['_line'])}")
                for r in bad.to_dict(orient="records")])
        # Nothing stored and no repeat: the rows just written are the accepted ones.
        accepted = sent if sent is not None and stored.empty else \
            frame.loc[new].assign(batch_id=rep.batch_id)
        del sent
        if written is None:
            self.store.insert_administrations(conn, accepted)
        elif written != len(accepted):
            # What was written is what the lookup calls new, or the counts would not
            # reconcile: stop the batch (its transaction rolls back) rather than count
            # records that are not stored.
            raise IngestError("administrations written and found new differ; batch "
                              "rolled back", file=rep.file, written=written,
                              new=len(accepted))
        rep.accepted += len(accepted)
        # Clinical safety: a risk item raises its flag in this batch's own transaction,
        # not at the next compute (SPEC §8).
        risky = flags.risk_flags(accepted, self.registry)
        if not risky.empty:
            # Only these episodes' stored risk flags can match (nothing is resolved).
            flags.refresh(conn, risky, self.now, episodes=set(risky["episode_id"]),
                          kinds=["risk_item"], resolve_missing=False)
            rep.risk_flags += len(risky)
        rep.episodes_touched.update(accepted["episode_id"].unique().tolist())
        rep.warnings[Warn.TOTAL_ITEMS_MISMATCH.value] += int(accepted["total_mismatch"].sum())
        rep.warnings[Warn.PRORATED.value] += int(accepted["prorated"].sum())
        rep.warnings[Warn.RISK_ITEM_MISSING.value] += int(
            ((accepted["risk"] == "unknown") & accepted["has_items"]).sum())
        start = to_datetimes(ctx.mapped("episode_start", accepted["episode_id"]))
        rep.warnings[Warn.BEFORE_EPISODE_START.value] += int(
            (accepted["administered_at"].dt.normalize() < start).fillna(False).sum())
        rep.warnings = +rep.warnings  # drop zero counts

    # -------------------------------------------------------------- entities
    def _entities(self, conn: Connection, rep: FileReport, chunk: RawChunk,
                  ctx: Context) -> None:
        kind = chunk.kind.name
        checked = check_entities(kind, chunk.frame, ctx)
        self._quarantine(conn, rep, checked.quarantined)
        frame = checked.accepted
        if frame.empty:
            return
        if kind == "plans":
            self._plans(conn, rep, frame)
            return
        key = {"therapists": "therapist_id", "clients": "client_id",
               "episodes": "episode_id"}[kind]
        fields = [c for c in frame.columns if c != "_line"]
        frame["_fp"] = _entity_fp(frame, fields)
        first = ~frame.duplicated(key, keep="first")
        fp_first = frame[key].map(frame.loc[first].set_index(key)["_fp"])
        stored = self.store.entities(conn, kind, frame[key].unique().tolist())
        stored_fp = pd.Series(_entity_fp(stored, fields).to_numpy(), index=stored[key]) \
            if not stored.empty else pd.Series(dtype="str")
        fp_stored = frame[key].map(stored_fp)
        in_store = fp_stored.notna()
        same_store = in_store & (frame["_fp"] == fp_stored)
        later = ~first
        duplicate = (first & same_store) | (later & (frame["_fp"] == fp_first) & ~in_store) | \
            (later & same_store)
        immutable = [f for f in fields if f not in MUTABLE_FIELDS[kind] and f != key]
        changed_immutable = pd.Series(False, index=frame.index)
        if in_store.any():
            merged = frame[[key, *immutable]].merge(
                stored[[key, *immutable]], on=key, how="left", suffixes=("", "_s"))
            for f in immutable:
                a = merged[f].astype("str").fillna("")
                b = merged[f + "_s"].astype("str").fillna("")
                changed_immutable |= (in_store.to_numpy() & (a != b).to_numpy())
        update = first & in_store & ~same_store & ~changed_immutable
        conflict = ~duplicate & ~update & ~(first & ~in_store)
        new = first & ~in_store
        rep.duplicates += int(duplicate.sum())
        if conflict.any():
            self._quarantine(conn, rep, [
                QuarantineRecord(int(r["_line"]), Reason.CONFLICT,
                                 f"{key} already known with different "
                                 f"{'fixed fields' if kind == 'episodes' else 'values'}; "
                                 "the accepted record is kept",
                                 QuarantineRecord.raw_json(_plain(r)), f"line {int(r['_line'])}")
                for r in frame.loc[conflict].to_dict(orient="records")])
        out = frame.drop(columns=["_fp", "_line"]).assign(batch_id=rep.batch_id)
        self.store.upsert_entities(conn, kind, out.loc[new], out.loc[update])
        rep.accepted += int(new.sum() + update.sum())
        if update.any():
            rep.warnings[Warn.UPDATED.value] += int(update.sum())
        if kind == "therapists":
            ctx.add("therapists", frame.loc[new, key])
        elif kind == "clients":
            ctx.add("clients", frame.loc[new, key])
        else:
            ctx.add("episode_client", frame.loc[new, key], frame.loc[new, "client_id"])
            ctx.add("episode_start", frame.loc[new, key], frame.loc[new, "start_date"])
            rep.episodes_touched.update(frame.loc[new | update, key])

    def _plans(self, conn: Connection, rep: FileReport, frame: pd.DataFrame) -> None:
        ident = ["episode_id", "goal_id"]
        fields = ["measure", "kind", "target", "due_date", "due_session", "sustain",
                  "description"]
        frame["_fp"] = _entity_fp(frame, fields)
        first = ~frame.duplicated(ident, keep="first")
        stored = self.store.plan_goals(conn, frame["episode_id"].unique().tolist())
        if not stored.empty:
            latest = stored.groupby("episode_id")["plan_version"].transform("max")
            stored = stored.loc[stored["plan_version"] == latest]
            stored["_fp_s"] = _entity_fp(stored, fields)
            frame = frame.merge(stored[[*ident, "_fp_s"]], on=ident, how="left")
            has_plan = is_in(frame["episode_id"], stored["episode_id"])
        else:
            frame["_fp_s"] = pd.Series(pd.NA, index=frame.index, dtype="str")
            has_plan = np.zeros(len(frame), dtype=bool)
        # Each row's goal against the first row of its (episode, goal): groups numbered
        # in order of first appearance, so group i's first row is the i-th first row.
        group = frame.groupby(ident, sort=False, observed=True, dropna=False).ngroup()
        fp = frame["_fp"].to_numpy(dtype=object)
        same_first = fp == fp[np.flatnonzero(first.to_numpy())[group.to_numpy()]]
        same_store = (frame["_fp"] == frame["_fp_s"]).fillna(False).to_numpy()
        f = first.to_numpy()
        # A plan whose first goals came earlier in this same file (an earlier chunk) is
        # still being read: its further goals belong to it. Without this, an episode whose
        # goals straddle a chunk boundary lost the later goals as "conflict".
        in_file = is_in(frame["episode_id"], self._file_plans) & has_plan
        goal_known = frame["_fp_s"].notna().to_numpy()
        duplicate = same_store | (~f & same_first & (~has_plan | (in_file & ~goal_known)))
        new = f & ~has_plan
        append = f & in_file & ~goal_known
        conflict = ~duplicate & ~new & ~append
        rep.duplicates += int(duplicate.sum())
        if conflict.any():
            self._quarantine(conn, rep, [
                QuarantineRecord(int(r["_line"]), Reason.CONFLICT,
                                 "the episode already has a plan with different goals; record a "
                                 "plan revision instead of re-importing", QuarantineRecord.raw_json(
                                     _plain(r)), f"line {int(r['_line'])}")
                for r in frame.loc[conflict].to_dict(orient="records")])
        goals = frame.loc[new].assign(plan_version=1)
        self.store.insert_goals(conn, goals, rep.batch_id or 0)
        if append.any():
            version = stored.groupby("episode_id")["plan_version"].max()
            more = frame.loc[append]
            more = more.assign(plan_version=more["episode_id"].map(version).astype("int64"))
            self.store.insert_goals(conn, more, rep.batch_id or 0, new_plans=False)
            rep.episodes_touched.update(more["episode_id"])
        self._file_plans.update(goals["episode_id"])
        rep.accepted += int(new.sum() + append.sum())
        rep.episodes_touched.update(goals["episode_id"])


def _entity_fp(frame: pd.DataFrame, fields: Sequence[str]) -> pd.Series:
    """A string of an entity's fields, each as :func:`_norm` writes it, joined by "|"."""
    parts = [_normed(frame[f]) for f in fields]
    joined = pc.binary_join_element_wise(*parts, "|") if parts else \
        pa.array([""] * len(frame), pa.string())
    return pd.Series(pd.array(joined, dtype="str"), index=frame.index)


#: What ``infer_dtype`` calls an object column whose values are all of one kind.
_ONE_KIND = frozenset({"string", "date", "datetime", "integer", "floating", "boolean",
                       "empty"})


def _normed(column: pd.Series) -> pa.Array:
    """:func:`_norm` of each value as Arrow text, worked out once per distinct value
    when the column holds one kind of value (equal values, equal text; 2.5M entity
    rows of a 10M ingest took ~2 us per value one by one), else value by value."""
    if isinstance(column.dtype, pd.StringDtype):
        # The text as it is (a missing value ""), without a Python object per value.
        return pc.cast(pc.fill_null(pa.array(column.array), ""), pa.string())
    if column.dtype == object and \
            pd.api.types.infer_dtype(column, skipna=True) not in _ONE_KIND:
        # e.g. 1 and True, equal as keys but written differently.
        return pa.array([_norm(v) for v in column], pa.string())
    codes, uniques = pd.factorize(column)  # a missing value: code -1, the last text
    text = np.array([*(_norm(u) for u in uniques), ""], dtype=object)
    return pa.array(text[codes], pa.string())


def _norm(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v is pd.NaT:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if hasattr(v, "isoformat"):
        return str(v.isoformat())[:10] if not isinstance(v, datetime) else v.isoformat()
    return str(v)


def _plain(d: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(k): (None if _norm(v) == "" else _norm(v)) for k, v in d.items()
            if not str(k).startswith("_")}


def plan_files(paths: Iterable[Path], settings: Settings, registry: Registry) -> list[Path]:
    """Files in the order an ingest takes them (therapists, clients, episodes, plans,
    administrations; unreadable files last), so referenced records go in first."""
    opened = sorted((_Opened(p, settings, registry) for p in paths), key=lambda o: o.order)
    return [o.path for o in opened]


def ingest_paths(paths: Iterable[str | Path], store: Store, settings: Settings,
                 registry: Registry, now: datetime | None = None) -> IngestReport:
    """Ingest files and directories; each file is one batch committed atomically.

    Parameters
    ----------
    paths
        Files or directories (directories are walked recursively).
    now
        The clock for ``future_date`` checks (naive UTC); default the current time.
    """
    files = expand_paths(paths)
    return _Ingestor(store, settings, registry, now).run(files)


def report_json(report: IngestReport) -> str:
    """The report as the one JSON object ``ontrack ingest --json`` prints."""
    return json.dumps(report.as_dict(), indent=2)
