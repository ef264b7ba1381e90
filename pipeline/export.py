"""Anonymised research export (SPEC §10).

- No direct identifier leaves: episode and client ids become HMAC-SHA-256(key, id)
  surrogates (per-export key from ``ONTRACK_EXPORT_KEY``; without it a random key used
  once and never stored); names, birth dates, postcodes, record numbers and free text
  are dropped; dates become days since the episode's first administration, plus the
  start year; ages become bands (90+ never exact).
- k-anonymity over the quasi-identifiers (age band, sex, ethnicity, team, start year):
  generalise step by step (team -> service, then coarser age bands), then suppress the
  records of classes still smaller than k, and report what was done.
- Reproducible: same inputs and key -> byte-identical files (sorted rows, no timestamps);
  the manifest carries parameters, counts and SHA-256 of every file, never the key.
- CSV cells that a spreadsheet would execute (starting ``= + - @``) are neutralised.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import shutil
import zipfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from pipeline import __version__
from pipeline.columns import to_datetimes
from pipeline.config import Settings
from pipeline.errors import UsageError
from pipeline.faults import crash_point
from pipeline.report import episode_flags_from
from pipeline.scales import Registry
from pipeline.store import (
    Store,
    administrations,
    clients,
    episodes,
    exports_log,
    outcomes,
    read_frame,
    utcnow,
)

__all__ = ["QUASI_IDENTIFIERS", "ExportResult", "export_dataset", "log_export", "surrogate",
           "zip_export"]

QUASI_IDENTIFIERS = ["age_band", "sex", "ethnicity", "team", "start_year"]
_FINE_AGES = [(0, 17, "<18"), (18, 24, "18-24"), (25, 34, "25-34"), (35, 44, "35-44"),
              (45, 54, "45-54"), (55, 64, "55-64"), (65, 200, "65+")]
_COARSE_AGES = [(0, 17, "<18"), (18, 34, "18-34"), (35, 54, "35-54"), (55, 200, "55+")]
# OWASP CSV injection: the four formula starters, and tab and carriage return.
_DANGEROUS = ("=", "+", "-", "@", "\t", "\r")


def surrogate(key: bytes, kind: str, value: str) -> str:
    """HMAC-SHA-256 surrogate of an id (first 16 hex digits); unlinkable across keys."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:16]


def _bands(age: pd.Series, bands: list[tuple[int, int, str]]) -> pd.Series:
    out = pd.Series("unknown", index=age.index, dtype="object")
    for lo, hi, label in bands:
        out[(age >= lo) & (age <= hi)] = label
    return out


def _neutralise(frame: pd.DataFrame) -> pd.DataFrame:
    """Prefix text cells that start like a spreadsheet formula with a quote."""
    out = frame.copy()
    for c in out.columns:
        if out[c].dtype == object or pd.api.types.is_string_dtype(out[c]):
            s = out[c].astype("object")
            mask = s.map(lambda v: isinstance(v, str) and v.startswith(_DANGEROUS))
            out[c] = s.where(~mask, "'" + s.astype(str))
    return out


@dataclass
class ExportResult:
    """What an export wrote and did."""

    out_dir: Path
    files: dict[str, str] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def _k_anonymise(ep: pd.DataFrame, k: int) -> tuple[pd.DataFrame, list[str], int]:
    """Generalise then suppress until every quasi-identifier class has >= k records."""
    steps: list[str] = []
    ladder = [
        ("team generalised to the whole service", lambda d: d.assign(team="service")),
        ("age bands coarsened (18-34, 35-54, 55+)",
         lambda d: d.assign(age_band=_bands(d["_age"], _COARSE_AGES))),
    ]

    def small(d: pd.DataFrame) -> pd.Series:
        size = d.groupby(QUASI_IDENTIFIERS, dropna=False)["episode_sid"].transform("size")
        return size < k

    for label, step in ladder:
        if small(ep).mean() <= 0.05:  # few enough to suppress outright
            break
        ep = step(ep)
        steps.append(label)
    drop = small(ep)
    return ep[~drop], steps, int(drop.sum())


def export_dataset(store: Store, settings: Settings, registry: Registry, out_dir: Path, *,
                   date_from: date | None = None, date_to: date | None = None,
                   measures: list[str] | None = None, k: int = 5, fmt: str = "csv",
                   key: bytes | None = None, requested_by: str | None = None,
                   source: str = "cli") -> ExportResult:
    """Write the anonymised dataset (episodes, administrations, codebook, manifest).

    The cohort is the episodes that *started* within ``date_from``..``date_to``.
    With ``requested_by``, the export is recorded in the export log (who, when,
    parameters, row counts; never the key) once every file is written.
    """
    if fmt not in ("csv", "parquet"):
        raise UsageError("format must be csv or parquet", value=fmt)
    if k < 2:
        raise UsageError("k must be at least 2", value=k)
    measures = measures or [settings.depression_measure, settings.anxiety_measure]
    unknown = [m for m in measures if m not in registry]
    if unknown:
        raise UsageError(f"unknown measures {unknown}")
    env_key = os.environ.get("ONTRACK_EXPORT_KEY")
    key = key or (env_key.encode() if env_key else secrets.token_bytes(32))

    with store.engine.connect() as conn:
        ep = read_frame(conn, sa.select(
            episodes.c.episode_id, episodes.c.client_id, episodes.c.team,
            episodes.c.start_date, episodes.c.end_date, episodes.c.end_reason,
            clients.c.birth_date, clients.c.sex, clients.c.ethnicity)
            .join(clients, clients.c.client_id == episodes.c.client_id))
        oc = read_frame(conn, sa.select(outcomes))
        adm = read_frame(conn, sa.select(
            administrations.c.episode_id, administrations.c.measure,
            administrations.c.administered_at, administrations.c.session_number,
            administrations.c.score,
            *[administrations.c[f"item_{i}"] for i in range(1, 21)])
            .where(administrations.c.measure.in_(measures)))
    start = to_datetimes(ep["start_date"])
    keep = pd.Series(True, index=ep.index)
    if date_from:
        keep &= start >= pd.Timestamp(date_from)
    if date_to:
        keep &= start <= pd.Timestamp(date_to)
    ep = ep[keep].copy()
    start = to_datetimes(ep["start_date"])
    birth = to_datetimes(ep["birth_date"])
    age = ((start - birth).dt.days // 365.25).astype("float")
    flags = episode_flags_from(ep[["episode_id", "end_date"]], oc, settings, registry)

    out = pd.DataFrame({
        "episode_sid": [surrogate(key, "episode", e) for e in ep["episode_id"]],
        "client_sid": [surrogate(key, "client", c) for c in ep["client_id"]],
        "age_band": _bands(age, _FINE_AGES).to_numpy(),
        "sex": ep["sex"].fillna("unknown").to_numpy(),
        "ethnicity": ep["ethnicity"].fillna("unknown").to_numpy(),
        "team": ep["team"].fillna("unknown").to_numpy(),
        "start_year": start.dt.year.to_numpy(),
        "end_reason": ep["end_reason"].fillna("open").to_numpy(),
        "_age": age.to_numpy(),
        "_episode_id": ep["episode_id"].to_numpy(),
    })
    f = flags.set_index("episode_id")
    for col in ("finished", "at_caseness", "recovered", "reliably_improved",
                "reliably_deteriorated", "reliably_recovered"):
        out[col] = out["_episode_id"].map(f[col]).fillna(False).astype(bool).to_numpy()
    for m in measures:
        o = oc[oc["measure"] == m].set_index("episode_id")
        tag = m.lower().replace("-", "")
        out[f"{tag}_n"] = out["_episode_id"].map(o["n"]).astype("Int64")
        out[f"{tag}_first"] = out["_episode_id"].map(o["first_score"]).astype("Int64")
        out[f"{tag}_last"] = out["_episode_id"].map(o["last_score"]).astype("Int64")
        out[f"{tag}_rci"] = out["_episode_id"].map(o["rci"]).astype(float).round(4)
        out[f"{tag}_category"] = out["_episode_id"].map(o["jt_category"])
        out[f"{tag}_weeks"] = out["_episode_id"].map(o["weeks"]).astype(float).round(2)
    out, steps, suppressed = _k_anonymise(out, k)
    exported_ids = set(out["_episode_id"])
    sid = dict(zip(out["_episode_id"], out["episode_sid"], strict=True))

    a = adm[adm["episode_id"].isin(exported_ids)].copy()
    a["administered_at"] = to_datetimes(a["administered_at"])
    first_day = a.groupby("episode_id")["administered_at"].transform("min").dt.normalize()
    a_out = pd.DataFrame({
        "episode_sid": a["episode_id"].map(sid),
        "measure": a["measure"],
        "day": (a["administered_at"].dt.normalize() - first_day).dt.days.astype("int64"),
        "session_number": pd.to_numeric(a["session_number"]).astype("Int64"),
        "total": pd.to_numeric(a["score"]).astype("Int64"),
        **{f"item_{i}": pd.to_numeric(a[f"item_{i}"]).astype("Int64")
           for i in range(1, max(registry[m].items for m in measures) + 1)},
    })
    a_out = a_out.sort_values(["episode_sid", "measure", "day"], kind="stable")
    episodes_out = out.drop(columns=["_age", "_episode_id"]).sort_values(
        "episode_sid", kind="stable")

    # Files are written into a staging directory beside the target and moved into place
    # only when complete (and logged), so a process killed half-way never leaves an
    # export that looks finished.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    files: dict[str, str] = {}
    for name, frame in (("episodes", episodes_out), ("administrations", a_out),
                        ("codebook", _codebook(measures))):
        if files:
            crash_point("export.files")
        path = stage / f"{name}.{fmt if name != 'codebook' else 'csv'}"
        frame = frame.reset_index(drop=True)
        if path.suffix == ".csv":
            _neutralise(frame).to_csv(path, index=False, lineterminator="\n")
        else:
            frame.to_parquet(path, index=False)
        files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    achieved = int(episodes_out.groupby(QUASI_IDENTIFIERS, dropna=False).size().min()) \
        if len(episodes_out) else None
    manifest = {
        "generator": f"ontrack {__version__}", "spec": "SPEC §10",
        "parameters": {"from": date_from.isoformat() if date_from else None,
                       "to": date_to.isoformat() if date_to else None,
                       "measures": measures, "k": k, "format": fmt,
                       "key": "from ONTRACK_EXPORT_KEY" if env_key else "random, not stored"},
        "rows": {"episodes": len(episodes_out), "administrations": len(a_out)},
        "quasi_identifiers": QUASI_IDENTIFIERS, "k_achieved": achieved,
        "generalisation": steps, "records_suppressed": suppressed, "cells_suppressed": 0,
        "files": files,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (stage / "manifest.json").write_text(text, encoding="utf-8")
    # Logged before it is published: an export on disk is never missing from the log.
    if requested_by is not None:
        log_export(store, requested_by, source, manifest,
                   hashlib.sha256(text.encode()).hexdigest())
    _publish(stage, out_dir)
    return ExportResult(out_dir=out_dir, files=files, manifest=manifest)


def _publish(stage: Path, out_dir: Path) -> None:
    """Move a complete staged export to ``out_dir`` (replacing an earlier export there)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        stage.rename(out_dir)
        shutil.rmtree(old)
    else:
        stage.rename(out_dir)


def log_export(store: Store, username: str, source: str, manifest: dict[str, Any],
               manifest_sha256: str) -> int:
    """Record an export in the export log; return its id."""
    with store.transaction() as conn:
        new = conn.execute(exports_log.insert().values(
            at=utcnow(), username=username, source=source,
            parameters=json.dumps(manifest["parameters"], sort_keys=True),
            episodes=manifest["rows"]["episodes"],
            administrations=manifest["rows"]["administrations"],
            records_suppressed=manifest["records_suppressed"],
            k_achieved=manifest["k_achieved"],
            generalisation=", ".join(manifest["generalisation"]) or "none",
            manifest_sha256=manifest_sha256))
        return int(new.inserted_primary_key[0])  # type: ignore[index]


def zip_export(out_dir: Path) -> bytes:
    """The export's files as one zip, deterministic (sorted names, fixed timestamps)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(out_dir.iterdir()):
            info = zipfile.ZipInfo(f"ontrack-export/{path.name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def _codebook(measures: list[str]) -> pd.DataFrame:
    rows = [
        ("episodes", "episode_sid", "surrogate episode id: HMAC-SHA-256(export key, id)",
         "text", "", "16 hex digits", "SPEC §10"),
        ("episodes", "client_sid", "surrogate client id (same client, same id within an "
         "export)", "text", "", "16 hex digits", "SPEC §10"),
        ("episodes", "age_band", "age at episode start, banded", "text", "years",
         "<18, 18-24, 25-34, 35-44, 45-54, 55-64, 65+ (or 18-34, 35-54, 55+ when "
         "generalised), unknown", "SPEC §10"),
        ("episodes", "sex", "sex as recorded", "text", "", "as recorded, unknown", ""),
        ("episodes", "ethnicity", "ethnic group as recorded", "text", "", "as recorded",
         ""),
        ("episodes", "team", "team (or 'service' when generalised)", "text", "", "", ""),
        ("episodes", "start_year", "calendar year the episode started", "integer", "year",
         "", "SPEC §10"),
        ("episodes", "end_reason", "how the episode ended", "text", "",
         "completed, dropped_out, referred_on, other, open", "SPEC §2"),
        ("episodes", "finished", "ended with >= 2 PHQ-9 and >= 2 GAD-7 scores", "boolean",
         "", "True, False", "SPEC §5"),
        ("episodes", "at_caseness", "finished and PHQ-9 first >= 10 or GAD-7 first >= 8",
         "boolean", "", "True, False", "SPEC §5"),
        ("episodes", "recovered", "at caseness, PHQ-9 last < 10 and GAD-7 last < 8",
         "boolean", "", "True, False", "SPEC §5"),
        ("episodes", "reliably_improved", "finished; reliable fall on either measure, no "
         "reliable rise", "boolean", "", "True, False", "SPEC §5"),
        ("episodes", "reliably_deteriorated", "finished; reliable rise, no reliable fall",
         "boolean", "", "True, False", "SPEC §5"),
        ("episodes", "reliably_recovered", "recovered and reliably improved", "boolean", "",
         "True, False", "SPEC §5"),
    ]
    for m in measures:
        tag = m.lower().replace("-", "")
        rows += [
            ("episodes", f"{tag}_n", f"{m} administrations", "integer", "count", "", ""),
            ("episodes", f"{tag}_first", f"first {m} total", "integer", "points", "", "SPEC §5"),
            ("episodes", f"{tag}_last", f"last {m} total", "integer", "points", "", "SPEC §5"),
            ("episodes", f"{tag}_rci", f"{m} Jacobson-Truax RCI (last - first)/S_diff",
             "number", "", "", "SPEC §4"),
            ("episodes", f"{tag}_category", f"{m} Jacobson-Truax category", "text", "",
             "recovered, improved, unchanged, deteriorated, harmed", "SPEC §4"),
            ("episodes", f"{tag}_weeks", f"weeks from first to last {m}", "number", "weeks",
             "", "SPEC §6"),
        ]
    rows += [
        ("administrations", "episode_sid", "surrogate episode id", "text", "", "", "SPEC §10"),
        ("administrations", "measure", "questionnaire", "text", "", ", ".join(measures), ""),
        ("administrations", "day", "days since the episode's first administration",
         "integer", "days", ">= 0", "SPEC §10"),
        ("administrations", "session_number", "session number as recorded", "integer", "",
         "", "SPEC §11"),
        ("administrations", "total", "total score (prorated where items were missing)",
         "integer", "points", "", "SPEC §3"),
        ("administrations", "item_N", "item responses as given (blank when missing)",
         "integer", "points", "", "SPEC §3"),
    ]
    return pd.DataFrame(rows, columns=["file", "column", "meaning", "type", "unit",
                                       "allowed_values", "rule"])
