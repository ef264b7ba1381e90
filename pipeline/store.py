"""The store: the only module that talks to the database (SQLAlchemy Core 2.x).

SQLite by default (WAL journal), any SQLAlchemy URL by ``ONTRACK_DATABASE_URL``. SQL is
kept dialect-neutral. The schema is versioned: :func:`init_store` creates it, and refuses
a database whose recorded version is not :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.columns import to_datetimes
from pipeline.errors import StoreError

__all__ = [
    "SCHEMA_VERSION",
    "SERVICE_COUNTS",
    "refresh_service_cells",
    "update_service_cells",
    "service_cells",
    "read_frame",
    "bulk_update",
    "to_records",
    "Store",
    "metadata",
]

SCHEMA_VERSION = 1
MAX_ITEMS = 20  # widest scale in the shipped registry (PCL-5)

metadata = sa.MetaData()

schema_info = sa.Table(
    "schema_info", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)

therapists = sa.Table(
    "therapists", metadata,
    sa.Column("therapist_id", sa.String(200), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("team", sa.String(200)),
    sa.Column("batch_id", sa.Integer),
)

clients = sa.Table(
    "clients", metadata,
    sa.Column("client_id", sa.String(200), primary_key=True),
    sa.Column("given_name", sa.String(200)),
    sa.Column("family_name", sa.String(200)),
    sa.Column("birth_date", sa.Date),
    sa.Column("sex", sa.String(50)),
    sa.Column("ethnicity", sa.String(200)),
    sa.Column("postcode", sa.String(20)),
    sa.Column("record_number", sa.String(100)),
    sa.Column("batch_id", sa.Integer),
)

episodes = sa.Table(
    "episodes", metadata,
    sa.Column("episode_id", sa.String(200), primary_key=True),
    sa.Column("client_id", sa.String(200), nullable=False, index=True),
    sa.Column("therapist_id", sa.String(200), nullable=False, index=True),
    sa.Column("team", sa.String(200)),
    sa.Column("start_date", sa.Date, nullable=False),
    sa.Column("end_date", sa.Date),
    sa.Column("end_reason", sa.String(50)),
    # Indexed: each cycle looks for the episodes and plans of the batches since the
    # last run (a scan of 560k episodes and their plans was ~0.06 s of a 10M cycle).
    sa.Column("batch_id", sa.Integer, index=True),
    # The caseload lists open episodes only: a partial index holding what it sorts and
    # filters on first reads just those.
    sa.Index("ix_episodes_open", "episode_id", "start_date", "therapist_id", "team",
             sqlite_where=sa.text("end_date IS NULL"),
             postgresql_where=sa.text("end_date IS NULL")),
    # The first cycle of a day looks for closed episodes whose end date is still ahead.
    # Partial, so queries of open episodes (end_date IS NULL) keep the index above.
    sa.Index("ix_episodes_ended", "end_date",
             sqlite_where=sa.text("end_date IS NOT NULL"),
             postgresql_where=sa.text("end_date IS NOT NULL")),
)

plans = sa.Table(
    "plans", metadata,
    sa.Column("episode_id", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("batch_id", sa.Integer, index=True),  # see episodes.batch_id
)

goals = sa.Table(
    "goals", metadata,
    sa.Column("episode_id", sa.String(200), primary_key=True),
    sa.Column("plan_version", sa.Integer, primary_key=True),
    sa.Column("goal_id", sa.String(200), primary_key=True),
    sa.Column("measure", sa.String(20), nullable=False),
    sa.Column("kind", sa.String(30), nullable=False),
    sa.Column("target", sa.Float, nullable=False),
    sa.Column("due_date", sa.Date),
    sa.Column("due_session", sa.Integer),
    sa.Column("sustain", sa.Integer, nullable=False),
    sa.Column("description", sa.Text),
)

_item_columns = [sa.Column(f"item_{i}", sa.SmallInteger) for i in range(1, MAX_ITEMS + 1)]

administrations = sa.Table(
    "administrations", metadata,
    sa.Column("admin_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("episode_id", sa.String(200), nullable=False),
    sa.Column("measure", sa.String(20), nullable=False),
    sa.Column("administered_at", sa.DateTime, nullable=False),
    sa.Column("session_number", sa.Integer),
    sa.Column("score", sa.Integer, nullable=False),
    sa.Column("total_supplied", sa.Integer),
    sa.Column("total_mismatch", sa.Boolean, nullable=False),
    sa.Column("prorated", sa.Boolean, nullable=False),
    sa.Column("n_missing", sa.Integer, nullable=False),
    sa.Column("has_items", sa.Boolean, nullable=False),
    sa.Column("risk", sa.String(10)),
    sa.Column("risk_value", sa.SmallInteger),
    *_item_columns,
    sa.Column("batch_id", sa.Integer, nullable=False, index=True),
    sa.UniqueConstraint("episode_id", "measure", "administered_at", name="uq_administration"),
)

batches = sa.Table(
    "batches", metadata,
    sa.Column("batch_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("file", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False, index=True),
    sa.Column("kind", sa.String(30)),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("records", sa.Integer, nullable=False, default=0),
    sa.Column("accepted", sa.Integer, nullable=False, default=0),
    sa.Column("duplicates", sa.Integer, nullable=False, default=0),
    sa.Column("quarantined", sa.Integer, nullable=False, default=0),
    sa.Column("by_reason", sa.Text),
    sa.Column("warnings", sa.Text),
    sa.Column("extra_columns", sa.Text),
    sa.Column("error", sa.Text),
)

quarantine = sa.Table(
    "quarantine", metadata,
    sa.Column("quarantine_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", sa.Integer, nullable=False, index=True),
    sa.Column("file", sa.Text, nullable=False),
    sa.Column("line", sa.Integer),
    sa.Column("location", sa.String(100)),
    sa.Column("reason", sa.String(40), nullable=False, index=True),
    sa.Column("detail", sa.Text),
    sa.Column("raw", sa.Text),
)

# ---------------------------------------------------------------- computed results
_F, _I, _B, _S = sa.Float, sa.Integer, sa.Boolean, sa.String(40)

outcomes = sa.Table(
    "outcomes", metadata,
    sa.Column("episode_id", sa.String(200), primary_key=True),
    sa.Column("measure", sa.String(20), primary_key=True),
    sa.Column("n", _I, nullable=False),
    sa.Column("first_score", _I, nullable=False),
    sa.Column("first_at", sa.DateTime, nullable=False),
    sa.Column("last_score", _I, nullable=False),
    sa.Column("last_at", sa.DateTime, nullable=False),
    sa.Column("min_score", _I), sa.Column("max_score", _I),
    sa.Column("weeks", _F), sa.Column("change", _F), sa.Column("pct_change", _F),
    sa.Column("sd_used", _F), sa.Column("r_used", _F), sa.Column("clinical_cutoff", _F),
    sa.Column("rci", _F), sa.Column("jt_direction", _S), sa.Column("jt_category", _S),
    sa.Column("rc_points", _F), sa.Column("fixed_change", _S),
    sa.Column("caseness_first", _B), sa.Column("caseness_last", _B),
    sa.Column("response", _B), sa.Column("remission", _B),
    sa.Column("slope_week", _F), sa.Column("slope_se_week", _F),
    sa.Column("slope_ci_low", _F), sa.Column("slope_ci_high", _F),
    sa.Column("theil_sen_week", _F), sa.Column("trend_status", _S),
    sa.Column("stalled", _B), sa.Column("stalled_slow_slope", _B),
    sa.Column("stalled_ci_includes_zero", _B),
    sa.Column("band", _S), sa.Column("k_last", _I),
    sa.Column("expected_median", _F), sa.Column("expected_upper", _F),
    sa.Column("expected_lower", _F), sa.Column("curve_source", _S),
    sa.Column("not_on_track", _B), sa.Column("not_on_track_consecutive", _B),
    sa.Column("sudden_gains", _I), sa.Column("first_sudden_gain", _I),
    sa.Column("sudden_losses", _I), sa.Column("first_sudden_loss", _I),
    sa.Column("run_id", _I, nullable=False),
)

sudden_changes = sa.Table(
    "sudden_changes", metadata,
    sa.Column("episode_id", sa.String(200), primary_key=True),
    sa.Column("measure", sa.String(20), primary_key=True),
    sa.Column("kind", sa.String(10), primary_key=True),
    sa.Column("pregain_session", _I, primary_key=True),
    sa.Column("size", _F), sa.Column("score_before", _F), sa.Column("score_after", _F),
    sa.Column("n_pre", _I), sa.Column("n_post", _I), sa.Column("crit3_adjusted", _B),
    sa.Column("run_id", _I, nullable=False),
)

reference_norms = sa.Table(
    "reference_norms", metadata,
    sa.Column("measure", sa.String(20), primary_key=True),
    sa.Column("sd", _F, nullable=False),
    sa.Column("n", _I, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("run_id", _I, nullable=False),
)

expected_curves = sa.Table(
    "expected_curves", metadata,
    sa.Column("measure", sa.String(20), primary_key=True),
    sa.Column("band", sa.String(40), primary_key=True),
    sa.Column("k", _I, primary_key=True),
    sa.Column("n", _I, nullable=False),
    sa.Column("median", _F), sa.Column("upper", _F), sa.Column("lower", _F),
    sa.Column("source", sa.String(40)),
    sa.Column("run_id", _I, nullable=False),
)

compute_runs = sa.Table(
    "compute_runs", metadata,
    sa.Column("run_id", _I, primary_key=True, autoincrement=True),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("mode", sa.String(20), nullable=False),
    sa.Column("watermark", _I, nullable=False),  # highest batch_id included
    sa.Column("episodes", _I),
    sa.Column("status", sa.String(20), nullable=False),
    # JSON: the rules' clock, the last review id and a fingerprint of the settings
    # (what the next incremental run compares against; see pipeline.compute).
    sa.Column("scope_state", sa.Text),
)

flags = sa.Table(
    "flags", metadata,
    sa.Column("flag_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("episode_id", sa.String(200), nullable=False, index=True),
    sa.Column("measure", sa.String(20), nullable=False),  # "" when not about one measure
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("key", sa.String(100), nullable=False),  # e.g. the administration or goal
    sa.Column("severity", sa.String(10), nullable=False),
    sa.Column("rule", sa.Text, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),  # JSON
    sa.Column("evidence_at", sa.DateTime),
    sa.Column("first_raised", sa.DateTime, nullable=False),
    sa.Column("last_seen", sa.DateTime, nullable=False),
    sa.Column("state", sa.String(20), nullable=False),  # open | acknowledged | resolved
    sa.Column("acknowledged_at", sa.DateTime),
    sa.Column("review_id", sa.Integer),
    sa.Column("resolved_at", sa.DateTime),
    sa.UniqueConstraint("episode_id", "measure", "kind", "key", name="uq_flag"),
    sa.Index("ix_flags_kind_state", "kind", "state"),
    # Open-flag counts per episode (caseload ordering) come from this index alone
    # (``state`` listed too, or SQLite reads each row to check the condition).
    sa.Index("ix_flags_open_episode", "episode_id", "state", "severity", "kind",
             sqlite_where=sa.text("state = 'open'"), postgresql_where=sa.text("state = 'open'")),
    # Time to review reads the few acknowledged flags, not the whole table.
    sa.Index("ix_flags_acknowledged", "acknowledged_at",
             sqlite_where=sa.text("acknowledged_at IS NOT NULL"),
             postgresql_where=sa.text("acknowledged_at IS NOT NULL")),
)

reviews = sa.Table(
    "reviews", metadata,
    sa.Column("review_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("episode_id", sa.String(200), nullable=False, index=True),
    sa.Column("reviewed_at", sa.DateTime, nullable=False),
    sa.Column("reviewer", sa.String(200), nullable=False),
    sa.Column("decision", sa.String(20), nullable=False),
    sa.Column("note", sa.Text),
    sa.Column("next_review", sa.Date),
    sa.Column("risk_assessed", sa.Boolean, nullable=False),
    sa.Column("plan_version", sa.Integer),
    sa.Column("flags_acknowledged", sa.Integer, nullable=False),
)

goal_status = sa.Table(
    "goal_status", metadata,
    sa.Column("episode_id", sa.String(200), primary_key=True),
    sa.Column("goal_id", sa.String(200), primary_key=True),
    sa.Column("plan_version", sa.Integer, nullable=False),
    sa.Column("measure", sa.String(20), nullable=False),
    sa.Column("kind", sa.String(30), nullable=False),
    sa.Column("target", sa.Float),
    sa.Column("description", sa.Text),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("status_reason", sa.Text),
    sa.Column("boundary", sa.Float),
    sa.Column("met_at", sa.DateTime),
    sa.Column("due_at", sa.DateTime),
    sa.Column("projected_at", sa.DateTime),
    sa.Column("projected_earliest", sa.DateTime),
    sa.Column("projected_latest", sa.DateTime),
    sa.Column("run_id", sa.Integer, nullable=False),
)

caseload = sa.Table(
    "caseload", metadata,
    # One row per open episode, written by compute: what the caseload grid shows about
    # outcomes and goals (flags and reviews are read live, they change between computes).
    sa.Column("episode_id", sa.String(200), primary_key=True),
    *[sa.Column(f"{side}_{col}", typ) for side in ("dep", "anx") for col, typ in (
        ("latest", sa.Integer), ("band", sa.String(40)), ("change", sa.Float),
        ("trend", sa.String(20)))],
    sa.Column("goal_status", sa.String(20)),
    sa.Column("run_id", sa.Integer, nullable=False),
)

#: Until when each open episode's clock-dependent results (plan review due, no recent
#: score, a goal's due date) hold, as of the compute that last evaluated it
#: (:func:`pipeline.flags.stable_until`). An incremental compute re-evaluates the open
#: episodes whose instant lies between the last run's clock and its own, found through
#: the index rather than by re-deriving every open episode's dates. NULL: for ever.
episode_clock = sa.Table(
    "episode_clock", metadata,
    sa.Column("episode_id", sa.String(200), primary_key=True),
    sa.Column("stable_until", sa.DateTime, index=True),
    sa.Column("run_id", sa.Integer, nullable=False),
)

#: Per-episode SPEC §5 indicators (0/1) behind the service outcomes.
SERVICE_COUNTS = ("finished", "at_caseness", "recovered", "reliably_improved",
                  "reliably_deteriorated", "reliably_recovered")

episode_service = sa.Table(
    "episode_service", metadata,
    # Per episode, written by compute: the SPEC §5 flags behind the service outcomes.
    sa.Column("episode_id", sa.String(200), primary_key=True),
    sa.Column("team", sa.String(200)),
    sa.Column("therapist_id", sa.String(200), index=True),
    sa.Column("end_month", sa.String(7)),
    *[sa.Column(c, sa.Integer, nullable=False) for c in SERVICE_COUNTS],
    sa.Column("run_id", sa.Integer, nullable=False),
)

#: The service page's cells, summed by compute from :data:`episode_service` down to
#: team x therapist x month-of-end x finished cells (tens of thousands of rows at 10M
#: administrations instead of one row per episode).
service_cells = sa.Table(
    "service_cells", metadata,
    # Every compute re-inserts the cells: 64-bit ids on PostgreSQL (a 32-bit serial would
    # run out after a year or so of 15-minute cycles); SQLite reuses its row ids.
    sa.Column("cell_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
              primary_key=True, autoincrement=True),
    sa.Column("team", sa.String(200)),
    sa.Column("therapist_id", sa.String(200)),
    sa.Column("end_month", sa.String(7)),
    sa.Column("episodes", sa.Integer, nullable=False),
    *[sa.Column(c, sa.Integer, nullable=False) for c in SERVICE_COUNTS],
)


def refresh_service_cells(conn: Connection) -> None:
    """Re-sum :data:`service_cells` from :data:`episode_service`, in the database."""
    es = episode_service
    conn.execute(service_cells.delete())
    conn.execute(service_cells.insert().from_select(
        ["team", "therapist_id", "end_month", "episodes", *SERVICE_COUNTS],
        # Grouped by ``finished`` too, so a cell is either all finished or none.
        sa.select(es.c.team, es.c.therapist_id, es.c.end_month,
                  sa.func.count(), *[sa.func.sum(es.c[c]) for c in SERVICE_COUNTS])
        .group_by(es.c.team, es.c.therapist_id, es.c.end_month, es.c.finished)))



#: A service cell's key (with whether its episodes are finished).
CELL_KEY = ("team", "therapist_id", "end_month")


def update_service_cells(conn: Connection, before: pd.DataFrame, after: pd.DataFrame
                         ) -> None:
    """Apply a change of some episodes' :data:`episode_service` rows (``before``, as
    read; ``after``, as written) to :data:`service_cells`, by integer sums.

    A cell is a sum over its episodes, so the new sum is the old one minus the
    ``before`` rows plus the ``after`` rows, exactly: an incremental compute changes a
    few thousand cells instead of re-summing every episode. A cell left with no
    episode is deleted. Should the cells not hold what the rows imply (a count would
    go negative), every cell is re-summed instead (:func:`refresh_service_cells`).
    """
    counts = ["episodes", *SERVICE_COUNTS]
    key = [*CELL_KEY, "_finished"]

    def signed(rows: pd.DataFrame, sign: int) -> pd.DataFrame:
        out = pd.DataFrame({c: rows[c].astype(object).where(rows[c].notna(), None)
                            for c in CELL_KEY})
        out["_finished"] = (pd.to_numeric(rows["finished"]) > 0).to_numpy(dtype=int)
        out["episodes"] = sign
        for c in SERVICE_COUNTS:
            out[c] = sign * pd.to_numeric(rows[c]).to_numpy(dtype="int64")
        return out

    def nulls_as_none(frame: pd.DataFrame) -> pd.DataFrame:
        # A key column with no value (every episode open: no month of end) comes out of
        # groupby as float NaN; merged with text it would fail, and stored as NaN,
        # PostgreSQL would keep the text 'NaN'. Missing keys are None, as read.
        for c in CELL_KEY:
            frame[c] = frame[c].astype(object).where(frame[c].notna(), None)
        return frame

    delta = nulls_as_none(
        pd.concat([signed(after, 1), signed(before, -1)], ignore_index=True)
        .groupby(key, dropna=False, sort=False)[counts].sum().reset_index())
    delta = delta[(delta[counts] != 0).any(axis=1).to_numpy()].reset_index(drop=True)
    if delta.empty:
        return
    cells = read_frame(conn, sa.select(service_cells))
    cells["_finished"] = (pd.to_numeric(cells["finished"]) > 0).to_numpy(dtype=int)
    m = delta.merge(nulls_as_none(cells), on=key, how="left", suffixes=("", "_was"))
    has = m["cell_id"].notna().to_numpy()
    total = m[counts].to_numpy(dtype="int64")
    total[has] += m.loc[has, [f"{c}_was" for c in counts]].to_numpy(dtype="int64")
    if (total < 0).any() or (total[~has, 0] == 0).any():
        refresh_service_cells(conn)
        return
    empty = has & (total[:, 0] == 0)
    ids = m["cell_id"].to_numpy()
    gone = [int(x) for x in ids[empty]]
    for i in range(0, len(gone), 900):
        conn.execute(service_cells.delete().where(service_cells.c.cell_id.in_(gone[i:i + 900])))
    change = has & ~empty
    if change.any():
        conn.execute(service_cells.update().where(
            service_cells.c.cell_id == sa.bindparam("cid")).values(
            **{c: sa.bindparam(f"v_{c}") for c in counts}),
            [{"cid": int(i), **{f"v_{c}": int(v) for c, v in zip(counts, row, strict=True)}}
             for i, row in zip(ids[change], total[change], strict=True)])
    if (~has).any():
        keys = nulls_as_none(m[list(CELL_KEY)].copy())
        conn.execute(service_cells.insert(), [
            {**{c: keys.at[j, c] for c in CELL_KEY},
             **{c: int(v) for c, v in zip(counts, total[j], strict=True)}}
            for j in np.flatnonzero(~has)])


job_runs = sa.Table(
    "job_runs", metadata,
    sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("status", sa.String(20), nullable=False),  # running|done|stopped|failed
    sa.Column("trigger", sa.String(20), nullable=False),  # manual|schedule
    sa.Column("files", sa.Text),  # JSON: [{file, outcome, batch_id, records, ...}]
    sa.Column("records", sa.Integer, nullable=False, default=0),
    sa.Column("accepted", sa.Integer, nullable=False, default=0),
    sa.Column("duplicates", sa.Integer, nullable=False, default=0),
    sa.Column("quarantined", sa.Integer, nullable=False, default=0),
    sa.Column("flags_raised", sa.Integer, nullable=False, default=0),
    sa.Column("compute_run_id", sa.Integer),
    sa.Column("error", sa.Text),
)

users = sa.Table(
    "users", metadata,
    sa.Column("user_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(100), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(300), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),  # therapist|director|researcher|admin
    sa.Column("therapist_id", sa.String(200)),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

audit_log = sa.Table(
    "audit_log", metadata,
    sa.Column("audit_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("username", sa.String(100), nullable=False),
    sa.Column("action", sa.String(40), nullable=False),
    sa.Column("target", sa.String(200)),
)

#: Failed sign-ins, for throttling across every dashboard worker process. The key is an
#: HMAC of ``user:<name>`` or ``addr:<address>`` (what was typed as a username may be a
#: password): never readable, only countable. Rows older than the window are deleted.
login_failures = sa.Table(
    "login_failures", metadata,
    sa.Column("failure_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Index("ix_login_failures_key_at", "key_hash", "at"),
)

#: The export log (issue #7): who exported what, when, with which parameters and counts.
exports_log = sa.Table(
    "exports_log", metadata,
    sa.Column("export_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("username", sa.String(100), nullable=False),
    sa.Column("source", sa.String(20), nullable=False),  # cli | dashboard
    sa.Column("parameters", sa.Text, nullable=False),  # JSON, never the key
    sa.Column("episodes", sa.Integer, nullable=False),
    sa.Column("administrations", sa.Integer, nullable=False),
    sa.Column("records_suppressed", sa.Integer, nullable=False),
    sa.Column("k_achieved", sa.Integer),
    sa.Column("generalisation", sa.String(200), nullable=False),
    sa.Column("manifest_sha256", sa.String(64), nullable=False),
)

ENTITY_TABLES = {"therapists": therapists, "clients": clients, "episodes": episodes}
ENTITY_KEYS = {"therapists": "therapist_id", "clients": "client_id", "episodes": "episode_id"}
#: Fields that may change on a later export of the same entity (anything else conflicts).
MUTABLE_FIELDS = {
    "therapists": {"name", "team"},
    "clients": {"given_name", "family_name", "birth_date", "sex", "ethnicity", "postcode",
                "record_number"},
    "episodes": {"team", "end_date", "end_reason", "therapist_id"},
}


def utcnow() -> datetime:
    """Current time as naive UTC (how the store keeps every timestamp)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # The driver's own transaction handling never BEGINs before a SELECT, so two reads
    # of one request could see two different commits. We emit BEGIN ourselves (see
    # _sqlite_begin): SQLAlchemy's documented recipe for pysqlite.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


#: SQLite's default page cache, in KiB (``PRAGMA cache_size=-2000``).
SQLITE_DEFAULT_CACHE_KIB = 2000


def _sqlite_begin(conn: Connection) -> None:
    # Writers take the write lock up front (BEGIN IMMEDIATE) and wait for it through
    # busy_timeout; a deferred writer that read first could fail with SQLITE_BUSY when
    # another writer commits in between. Readers BEGIN deferred: a WAL snapshot.
    options = conn.get_execution_options()
    # Every transaction sets its page cache (see Store.transaction), so a pooled
    # connection never keeps a bulk writer's (SQLite frees the excess pages).
    kib = int(options.get("ontrack_cache_kib", SQLITE_DEFAULT_CACHE_KIB))
    conn.exec_driver_sql(f"PRAGMA cache_size=-{kib}")
    conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("ontrack_write") else "BEGIN")


#: Key of the PostgreSQL advisory lock that serialises OnTrack's write transactions
#: (as SQLite does): a cycle and a plan review never interleave their reads and writes.
WRITE_LOCK_KEY = 0x0A7_7AC4


class Store:
    """A handle on the database: schema, transactions, and every query OnTrack makes."""

    def __init__(self, url: str, bulk_cache_mb: int = 512) -> None:
        """Open the database at ``url``; ``bulk_cache_mb``: SQLite's page cache of a
        bulk write transaction (``Settings.sqlite_bulk_cache_mb``; 0: SQLite's default;
        see :meth:`transaction`)."""
        self.url = url
        self._bulk_cache_kib = bulk_cache_mb * 1024 if bulk_cache_mb > 0 else \
            SQLITE_DEFAULT_CACHE_KIB
        try:
            if url.startswith("sqlite:///"):
                path = Path(url.removeprefix("sqlite:///"))
                if str(path) not in ("", ":memory:"):
                    path.parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = sa.create_engine(url, future=True)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise StoreError(f"cannot open database URL: {exc}",
                             fix="set ONTRACK_DATABASE_URL to a valid SQLAlchemy URL") from exc
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            sa.event.listen(self.engine, "begin", _sqlite_begin)

    @property
    def dialect(self) -> str:
        """Database dialect name (``sqlite``, ``postgresql`` ...)."""
        return self.engine.dialect.name

    # ------------------------------------------------------------------ schema
    def init(self) -> int:
        """Create the schema if absent; return its version. Idempotent."""
        try:
            metadata.create_all(self.engine)
            with self.engine.begin() as conn:
                versions = [r[0] for r in conn.execute(sa.select(schema_info.c.version))]
                if not versions:
                    conn.execute(schema_info.insert().values(version=SCHEMA_VERSION,
                                                             applied_at=utcnow()))
                    versions = [SCHEMA_VERSION]
            if max(versions) != SCHEMA_VERSION:
                raise StoreError(
                    f"store schema version {max(versions)} is not {SCHEMA_VERSION}",
                    url=self.safe_url, fix="run the matching OnTrack version or migrate")
            # Under the write lock: a dashboard and a scheduler starting together after
            # an upgrade must not both add the same column.
            with self.transaction() as conn:
                self._upgrade(conn)
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot reach the store: {exc.orig}", url=self.safe_url) from exc
        return SCHEMA_VERSION

    @staticmethod
    def _upgrade(conn: Connection) -> None:
        """Additive upgrades within schema version 1, idempotent.

        ``create_all`` adds missing tables but not columns or indexes added later to
        existing tables; derived tables added later are filled from what compute wrote.
        """
        have = {c["name"] for c in sa.inspect(conn).get_columns("compute_runs")}
        if "scope_state" not in have:
            conn.execute(sa.text("ALTER TABLE compute_runs ADD COLUMN scope_state TEXT"))
        conn.execute(sa.text("DROP INDEX IF EXISTS ix_flags_open"))  # superseded
        for table in metadata.sorted_tables:
            for index in table.indexes:
                index.create(conn, checkfirst=True)
        empty = conn.execute(sa.select(service_cells.c.cell_id).limit(1)).first() is None
        if empty and conn.execute(sa.select(episode_service.c.episode_id).limit(1)).first():
            refresh_service_cells(conn)

    @property
    def safe_url(self) -> str:
        """The URL with any password masked (for messages and logs)."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def transaction(self, bulk: bool = False) -> Iterator[Connection]:
        """One write transaction: committed on success, rolled back on any error.

        Write transactions are serialised (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a
        transaction-scoped advisory lock), so two writers, say a cycle and a plan review,
        never lose each other's writes; a process killed inside one leaves nothing.

        ``bulk``: the transaction inserts many rows into large indexes (an ingest). On
        SQLite it gets a larger page cache: with the 2 MB default the inserts into the
        unique index of 10M administrations re-read its pages from the OS, and 256 MB
        took the 10M ingest from 472 s to 420 s (system time 80 -> 28 s). Not for every
        writer: the cache's fresh memory made a cycle's compute ~0.5 s slower.
        """
        with self.engine.connect() as conn:
            conn.execution_options(ontrack_write=True, ontrack_cache_kib=(
                self._bulk_cache_kib if bulk else SQLITE_DEFAULT_CACHE_KIB))
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"),
                                 {"k": WRITE_LOCK_KEY})
                yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read-only connection whose every query sees one committed state.

        SQLite: a deferred transaction in WAL mode; PostgreSQL: REPEATABLE READ, READ
        ONLY. The dashboard reads through this, so a page never mixes two compute runs.
        """
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ",
                                       postgresql_readonly=True)
            yield conn

    # ------------------------------------------------------------------ reads
    # The lookups validation needs: every id, or (``ids``) only those asked for.
    def therapist_ids(self, conn: Connection, ids: Sequence[str] | None = None) -> set[str]:
        return {r[0] for r in _rows(conn, sa.select(therapists.c.therapist_id),
                                    therapists.c.therapist_id, ids)}

    def client_ids(self, conn: Connection, ids: Sequence[str] | None = None) -> set[str]:
        return {r[0] for r in _rows(conn, sa.select(clients.c.client_id),
                                    clients.c.client_id, ids)}

    def episode_clients_and_starts(self, conn: Connection, ids: Sequence[str] | None = None
                                   ) -> tuple[dict[str, str], dict[str, Any]]:
        """Episode id -> client id, and episode id -> start date, from one read of the
        episodes (two reads took ~0.2 s of a 10M cycle's ingest)."""
        q = sa.select(episodes.c.episode_id, episodes.c.client_id, episodes.c.start_date)
        clients: dict[str, str] = {}
        starts: dict[str, Any] = {}
        for episode_id, client_id, start in _rows(conn, q, episodes.c.episode_id, ids):
            clients[episode_id] = client_id
            starts[episode_id] = start
        return clients, starts

    def entities(self, conn: Connection, kind: str, ids: Sequence[str]) -> pd.DataFrame:
        """Stored rows of an entity kind for the given ids."""
        table = ENTITY_TABLES[kind]
        key = table.c[ENTITY_KEYS[kind]]
        frames = [read_frame(conn, sa.select(table).where(key.in_(part)))
                  for part in _parts(ids)]
        return pd.concat(frames, ignore_index=True) if frames else \
            pd.DataFrame(columns=list(table.c.keys()))

    def administration_keys(self, conn: Connection, identities: pd.DataFrame,
                            up_to: int | None = None) -> pd.DataFrame:
        """Identity and content of the stored administrations with these identities
        (``episode_id, measure, administered_at``), found through the unique index.

        ``up_to`` (SQLite only): only rows whose ``admin_id`` is at most this, i.e. those
        stored before a later insert (:meth:`last_admin_id`).
        """
        cols = [administrations.c.episode_id, administrations.c.measure,
                administrations.c.administered_at, administrations.c.session_number,
                administrations.c.total_supplied,
                *[administrations.c[f"item_{i}"] for i in range(1, MAX_ITEMS + 1)]]
        names = [c.name for c in cols]
        ident = identities.drop_duplicates()
        if conn.dialect.name == "sqlite":
            return self._keys_by_join(conn, ident, names, up_to)
        if up_to is not None:
            raise ValueError("administration_keys(up_to=...) is for SQLite")
        # Episode IN (...) AND time IN (...), 2,000 identities at a time: a superset of
        # the identities (the caller matches them exactly) that the unique index answers
        # by itself, reading table rows only for matches. (A row-value IN list makes
        # SQLite scan the table.) Fewer, larger groups: each query costs ~1 ms of Python
        # whatever its size (300 at a time: 3.3 s for a 200k-row chunk; 2,000: 2.1 s).
        ident = ident.sort_values("episode_id")
        eps = ident["episode_id"].tolist()
        when = to_datetimes(ident["administered_at"]).dt.to_pydatetime().tolist()
        frames = [read_frame(conn, sa.select(*cols).where(
            administrations.c.episode_id.in_(sorted(set(eps[i:i + 2000])))
            & administrations.c.administered_at.in_(sorted(set(when[i:i + 2000])))), raw=True)
            for i in range(0, len(eps), 2000)]
        frames = [f for f in frames if not f.empty]
        if not frames:
            return pd.DataFrame(columns=names)
        # An episode split across two groups can return a row twice.
        return pd.concat(frames, ignore_index=True).drop_duplicates(
            ["episode_id", "measure", "administered_at"], ignore_index=True)

    @staticmethod
    def _keys_by_join(conn: Connection, ident: pd.DataFrame, names: list[str],
                      up_to: int | None = None) -> pd.DataFrame:
        """:meth:`administration_keys` on SQLite: the identities go into a temporary
        table, joined to the store through the unique index, one lookup each. The
        IN-list query visits every stored administration of each listed episode (10k
        new identities on a 10M store: 0.8 s; by the join: a few ms per thousand)."""
        dbapi = conn.connection.driver_connection
        cur = dbapi.cursor()  # type: ignore[union-attr]
        try:
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS _ontrack_identities "
                        "(episode_id, measure, administered_at)")
            cur.execute("DELETE FROM temp._ontrack_identities")
            # In the unique index's order, so consecutive lookups read neighbouring
            # pages: records arrive by date, and in file order each lookup lands on
            # another leaf (200k identities against the 10M store: 1.55-1.65 s in file
            # order, 1.29-1.39 s sorted, the sort included; with a cold cache 2.45 and
            # 5.37 s against 1.38 and 1.32 s). Nothing reads the result's order.
            ident = ident.sort_values(["episode_id", "measure", "administered_at"])
            # Times as the store writes them (SQLAlchemy's SQLite text form), compared
            # as text: equal instants, equal text.
            when = _formatted(ident["administered_at"], _SQL_DATETIME)
            cur.executemany("INSERT INTO temp._ontrack_identities VALUES (?, ?, ?)",
                            zip(ident["episode_id"].tolist(), ident["measure"].tolist(),
                                when.tolist(), strict=True))
            # CROSS JOIN: SQLite keeps the identities as the outer loop.
            rows = cur.execute(
                f"SELECT {', '.join(f'a.{n}' for n in names)} "
                "FROM temp._ontrack_identities i CROSS JOIN administrations a "
                "ON a.episode_id = i.episode_id AND a.measure = i.measure "
                "AND a.administered_at = i.administered_at"
                + ("" if up_to is None else " WHERE a.admin_id <= ?"),
                () if up_to is None else (int(up_to),)).fetchall()
            cur.execute("DELETE FROM temp._ontrack_identities")
        finally:
            cur.close()
        return pd.DataFrame.from_records(rows, columns=names, coerce_float=False) if rows \
            else pd.DataFrame(columns=names)

    def plan_goals(self, conn: Connection, episode_ids: Sequence[str]) -> pd.DataFrame:
        """Goals of the latest plan version of the given episodes."""
        frames = []
        for part in _parts(episode_ids):
            frames.append(read_frame(conn, sa.select(goals).where(
                goals.c.episode_id.in_(part))))
        return pd.concat(frames, ignore_index=True) if frames else \
            pd.DataFrame(columns=list(goals.c.keys()))

    def counts(self) -> dict[str, int]:
        """Row counts of the main tables."""
        out = {}
        with self.engine.connect() as conn:
            for name in ("therapists", "clients", "episodes", "goals", "administrations",
                         "batches", "quarantine"):
                table = metadata.tables[name]
                out[name] = int(conn.execute(sa.select(sa.func.count()).select_from(table))
                                .scalar_one())
        return out

    def read_table(self, name: str) -> pd.DataFrame:
        """A whole table as a DataFrame (small tables and tests)."""
        table = metadata.tables[name]
        with self.engine.connect() as conn:
            return pd.DataFrame(conn.execute(sa.select(table)).mappings().all(),
                                columns=list(table.c.keys()))

    # ------------------------------------------------------------------ writes
    def start_batch(self, conn: Connection, file: str, content_hash: str, kind: str | None,
                    started_at: datetime) -> int:
        res = conn.execute(batches.insert().values(
            file=file, content_hash=content_hash, kind=kind, status="running",
            started_at=started_at, records=0, accepted=0, duplicates=0, quarantined=0))
        return int(res.inserted_primary_key[0])  # type: ignore[index]

    def finish_batch(self, conn: Connection, batch_id: int, *, status: str, records: int,
                     accepted: int, duplicates: int, quarantined: int,
                     by_reason: dict[str, int], warnings: dict[str, int],
                     extra_columns: Sequence[str], error: str | None) -> None:
        conn.execute(batches.update().where(batches.c.batch_id == batch_id).values(
            status=status, finished_at=utcnow(), records=records, accepted=accepted,
            duplicates=duplicates, quarantined=quarantined,
            by_reason=json.dumps(by_reason, sort_keys=True),
            warnings=json.dumps(warnings, sort_keys=True),
            extra_columns=json.dumps(list(extra_columns)), error=error))

    def insert_quarantine(self, conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if rows:
            conn.execute(quarantine.insert(), rows)

    @staticmethod
    def skips_stored(conn: Connection) -> bool:
        """Whether :meth:`insert_administrations` can skip identities already stored
        (``skip_stored``) on this connection: SQLite, by ``ON CONFLICT DO NOTHING``.
        PostgreSQL's COPY cannot; there the caller looks them up first."""
        return conn.dialect.name == "sqlite"

    @staticmethod
    def last_admin_id(conn: Connection) -> int:
        """The largest ``admin_id`` stored (0 for none): rows inserted later have larger
        ids (SQLite's rowid is the largest one plus one)."""
        return int(conn.execute(sa.select(sa.func.max(administrations.c.admin_id)))
                   .scalar_one() or 0)

    def insert_administrations(self, conn: Connection, frame: pd.DataFrame,
                               skip_stored: bool = False) -> int | None:
        """Insert accepted administrations; with ``skip_stored`` (see
        :meth:`skips_stored`) one whose identity is already stored is skipped.

        Returns the number of rows written on SQLite, else None.
        """
        if frame.empty:
            return 0 if conn.dialect.name == "sqlite" else None
        # Item columns no row of the frame answers are left out of the INSERT: they are
        # NULL all the same (no default), and each bound NULL costs (11 of a PHQ-9 or
        # GAD-7 row's 33 values).
        cols = [c.name for c in administrations.c if c.name != "admin_id" and not (
            c.name.startswith("item_") and not frame[c.name].notna().any())]
        # In the unique index's order: records arrive by date, so in file order each
        # insert lands on a different leaf of the (episode, measure, time) index; sorted,
        # consecutive inserts share leaves. Nothing reads the row ids' order.
        key = ["episode_id", "measure", "administered_at"]
        order = frame[key].reset_index(drop=True).sort_values(key).index.to_numpy()
        return bulk_insert(conn, administrations, frame[cols], positions=order,
                           skip_stored=key if skip_stored else ())

    def upsert_entities(self, conn: Connection, kind: str, new: pd.DataFrame,
                        updated: pd.DataFrame) -> None:
        table = ENTITY_TABLES[kind]
        key = ENTITY_KEYS[kind]
        cols = [c.name for c in table.c]
        if not new.empty:
            bulk_insert(conn, table, new[cols])
        bulk_update(conn, table, updated[cols], key)

    def insert_goals(self, conn: Connection, frame: pd.DataFrame, batch_id: int,
                     new_plans: bool = True) -> None:
        """Insert goals; with ``new_plans``, also their plan rows (else the plans exist)."""
        if frame.empty:
            return
        now = utcnow()
        if new_plans:
            plan_rows = frame[["episode_id", "plan_version"]].drop_duplicates() \
                .rename(columns={"plan_version": "version"}) \
                .assign(created_at=now, batch_id=batch_id)
            bulk_insert(conn, plans, plan_rows)
        bulk_insert(conn, goals, frame[[c.name for c in goals.c]])


def _rows(conn: Connection, query: sa.Select[Any], key: sa.ColumnElement[Any],
          ids: Sequence[str] | None) -> Iterator[Any]:
    """The query's rows, restricted to ``key IN ids`` (in lists of 900) when given."""
    if ids is None:
        yield from conn.execute(query)
        return
    ids = list(ids)
    for i in range(0, len(ids), 900):
        yield from conn.execute(query.where(key.in_(ids[i:i + 900])))


def read_frame(conn: Connection, query: Any, raw: bool = False) -> pd.DataFrame:
    """Run a SELECT and return a DataFrame, fast.

    Rows become plain tuples first: pandas treats SQLAlchemy ``Row`` objects as mappings
    and probes their keys, which costs several times the query itself. With ``raw`` the
    DBAPI's own tuples are used, skipping SQLAlchemy's type processing: dates and
    booleans then arrive as the driver gives them (SQLite: ISO strings and 0/1), for
    callers that convert columns with pandas anyway.
    """
    res = conn.execute(query)
    cols = list(res.keys())
    if raw:
        rows = res.cursor.fetchall()
        res.close()
    else:
        rows = [tuple(r) for r in res.fetchall()]
    return pd.DataFrame.from_records(rows, columns=cols, coerce_float=False) if rows \
        else pd.DataFrame(columns=cols)


def iter_frames(conn: Connection, query: Any, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """:func:`read_frame` ``raw``, ``chunk_rows`` rows at a time (at least one frame,
    empty with the query's columns when it has no rows), so only one chunk exists as
    Python tuples (900k stored flags with their evidence were ~1.3 GB of them).

    Each frame's dtypes are inferred on its own: a nullable column can be ``object`` in
    an all-NULL chunk and ``str`` or ``float64`` in another. Use it where every column is
    NOT NULL, or where the caller converts the column in a way the dtype does not change.
    """
    res = conn.execute(query)
    cols = list(res.keys())
    any_rows = False
    try:
        while rows := res.cursor.fetchmany(chunk_rows):
            any_rows = True
            yield pd.DataFrame.from_records(rows, columns=cols, coerce_float=False)
    finally:
        res.close()
    if not any_rows:
        yield pd.DataFrame(columns=cols)


def _arrow_types(table: sa.Table, names: list[str]) -> dict[str, Any]:
    import pyarrow as pa

    return {n: (pa.int64() if isinstance(table.c[n].type, sa.Integer) else
                pa.float64() if isinstance(table.c[n].type, sa.Float) else
                pa.bool_() if isinstance(table.c[n].type, sa.Boolean) else pa.string())
            for n in names}


def _sqlite_parts(conn: Connection, table: sa.Table, names: list[str], types: dict[str, Any],
                  parts: list[tuple[str, dict[str, Any]]], counted: bool = False) -> list[Any]:
    """:func:`bulk_read`'s SQLite path: one Arrow table per part that has rows, in the
    order of ``parts``, each part a ``WHERE`` condition with its parameters (ranges of
    ``rowid``, or lists of key values). Rows of a part come in the order SQLite scans
    them, as a plain ``SELECT`` with that condition gives them. With ``counted``, each
    part's rows are counted in the same query and a parse that gives another number
    raises ``ArrowInvalid`` (the caller then reads row by row)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # A REAL's text form keeps 15 digits, not every bit: floats come as the driver's
    # own values, fetched beside the text with their rowid (a narrow read) and matched
    # to the text rows by it.
    floats = [n for n in names if types[n] == pa.float64()]
    texts = [n for n in names if n not in floats]
    # One printf per row (NULL prints as ''), not a chain of || that builds a string per
    # field: 11 of the 12.7 s of formatting 10M administrations went to the chain.
    # printf takes at most 127 arguments (SQLITE_MAX_FUNCTION_ARG). The rowid is
    # printed only to match floats, or beside a lone column (whose missing value would
    # be an empty text): formatting it was 0.75 s of reading 10M rows.
    lead = ["rowid"] if floats or len(texts) == 1 else []
    if len(texts) < 120:
        fields = "printf('{}', {})".format(chr(31).join(["%s"] * (len(lead) + len(texts))),
                                           ", ".join([*lead, *(f'"{n}"' for n in texts)]))
    else:
        fields = " || char(31) || ".join([*lead, *(f"coalesce(\"{n}\", '')" for n in texts)])
    text_types = {**({"_rowid": pa.int64()} if lead else {}),
                  **{n: types[n] for n in texts}}
    # Only an empty field is missing: pyarrow's default null markers ("NA", "null",
    # "N/A" ...) are values here (an episode or goal id may be one).
    convert = pacsv.ConvertOptions(column_types=text_types, null_values=[""],
                                   strings_can_be_null=True,
                                   quoted_strings_can_be_null=False)
    parse = pacsv.ParseOptions(delimiter="\x1f", quote_char=False)
    float_list = ", ".join(f'"{n}"' for n in floats)
    out = []
    for where, params in parts:
        n_rows, text = conn.execute(sa.text(
            f'SELECT count(*), group_concat({fields}, char(10)) FROM "{table.name}" '
            f"WHERE {where}"), params).one()
        if not text:  # no rows in this part
            continue
        part = pacsv.read_csv(io.BytesIO(text.encode()), parse_options=parse,
                              convert_options=convert,
                              read_options=pacsv.ReadOptions(column_names=list(text_types)))
        if counted and part.num_rows != n_rows:
            raise pa.ArrowInvalid("a value holds a line break")
        if floats:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                got = cur.execute(f'SELECT rowid, {float_list} FROM "{table.name}" '
                                  f"WHERE {where}", params).fetchall()
            finally:
                cur.close()
            cols: list[Sequence[Any]] = list(zip(*got, strict=True)) if got else \
                [()] * (len(floats) + 1)
            rowid = part.column("_rowid").to_numpy()
            got_rowid = np.asarray(cols[0], dtype=np.int64)
            at = None  # the float rows in text-row order (None: already so)
            if not np.array_equal(rowid, got_rowid):
                by_text, by_got = np.argsort(rowid), np.argsort(got_rowid)
                if rowid.size != got_rowid.size or \
                        not np.array_equal(rowid[by_text], got_rowid[by_got]):
                    raise pa.ArrowInvalid("rows out of step")
                at = np.empty(rowid.size, dtype=np.int64)
                at[by_text] = by_got
            for n, values in zip(floats, cols[1:], strict=True):
                array = pa.array(values, type=pa.float64())
                part = part.append_column(n, array if at is None else array.take(at))
        out.append(part.select(names))
    return out


def bulk_read(conn: Connection, table: sa.Table, columns: Sequence[str],
              chunk_rows: int = 500_000, where_in: tuple[str, Sequence[str]] | None = None
              ) -> pd.DataFrame:
    """Some columns of a whole table, in table order, by a columnar path, in the
    caller's transaction (so it sees the caller's snapshot).

    ``where_in`` ``(column, values)`` reads only the rows whose ``column`` is one of
    ``values`` (900 values a query, in the order a plain ``SELECT ... WHERE column IN``
    gives them, as :func:`read_frame` would read them): on SQLite by the same text
    path, each query's rows counted; elsewhere row by row.

    Fetching one Python tuple per row costs most of a large read. Instead the database
    writes the rows as delimited text and pyarrow parses it: PostgreSQL by
    ``COPY ... TO STDOUT (FORMAT csv)``; SQLite by ``group_concat`` over ranges of
    ``rowid`` (one string per ``chunk_rows`` rows, fields separated by the unit
    separator U+001F). A text value containing a newline or U+001F, or a parse that does
    not give every row, falls back to :func:`read_frame` ``raw``, as does any other
    database; so do tables with ``Boolean`` columns on SQLite (their text form is not
    typed). ``Float`` columns on SQLite, whose text form keeps 15 digits, are fetched
    as the driver's values beside the text, matched by ``rowid``.

    Values arrive as the driver stores them, as with ``read_frame(raw=True)``: datetimes
    as text, nullable integers as float. An empty text value reads as missing in a
    nullable column (SQLite's text form cannot tell them apart), so use this for
    nullable columns where an empty string is not a value (ids, codes, timestamps); a
    ``NOT NULL`` text column reads it as the empty string it must be.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = [str(c) for c in columns]
    types = _arrow_types(table, names)
    if where_in is not None:
        return _bulk_read_in(conn, table, names, types, *where_in)
    quoted = ", ".join(f'"{n}"' for n in names)
    dialect = conn.dialect.name
    # Only an empty field is missing: pyarrow's default null markers ("NA", "null",
    # "N/A" ...) are values here (an episode or goal id may be one).
    convert = pacsv.ConvertOptions(column_types=types, true_values=["t"], false_values=["f"],
                                   null_values=[""], strings_can_be_null=True,
                                   quoted_strings_can_be_null=False)
    tables: list[Any] = []
    if dialect == "postgresql":
        buf = io.BytesIO()
        dbapi = conn.connection.driver_connection
        with dbapi.cursor() as cur, cur.copy(  # type: ignore[union-attr]
                f'COPY (SELECT {quoted} FROM "{table.name}") TO STDOUT WITH (FORMAT csv)'
                ) as copy:
            for block in copy:
                buf.write(block)
        if buf.getbuffer().nbytes:
            buf.seek(0)
            # A lone column's NULL is an empty line, which is a row here, not nothing.
            tables.append(pacsv.read_csv(
                buf, read_options=pacsv.ReadOptions(column_names=names),
                parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
                convert_options=convert))
    elif dialect == "sqlite" and all(t in (pa.int64(), pa.string(), pa.float64())
                                     for t in types.values()):
        top = conn.execute(sa.text(f'SELECT max(rowid) FROM "{table.name}"')).scalar() or 0
        ranges = [(lo, lo + chunk_rows) for lo in range(0, int(top), chunk_rows)]
        try:
            tables = _sqlite_parts(conn, table, names, types, [
                ("rowid > :lo AND rowid <= :hi", {"lo": lo, "hi": hi}) for lo, hi in ranges])
        except pa.ArrowInvalid:  # a separator inside a value: the row-by-row path
            tables = []
        count = conn.execute(sa.text(f'SELECT count(*) FROM "{table.name}"')).scalar_one()
        if sum(t.num_rows for t in tables) != count:
            tables = []
        elif count == 0:
            return pd.DataFrame(columns=names)
        if not tables:
            return read_frame(conn, sa.select(*[table.c[n] for n in names]), raw=True)
    else:
        return read_frame(conn, sa.select(*[table.c[n] for n in names]), raw=True)
    if not tables:
        return pd.DataFrame(columns=names)
    return _empty_text(table, pa.concat_tables(tables).to_pandas())


def _empty_text(table: sa.Table, frame: pd.DataFrame) -> pd.DataFrame:
    """The text path's missing values in ``NOT NULL`` text columns as the empty strings
    they stand for (SQLite writes NULL and '' alike; a flag's ``key`` is often '')."""
    for n in frame.columns:
        c = table.c[n]
        if not c.nullable and isinstance(c.type, sa.String) and frame[n].hasnans:
            frame[n] = frame[n].fillna("")
    return frame


def _bulk_read_in(conn: Connection, table: sa.Table, names: list[str], types: dict[str, Any],
                  key: str, values: Sequence[str]) -> pd.DataFrame:
    """:func:`bulk_read` of the rows whose ``key`` is one of ``values``."""
    import pyarrow as pa

    chunks = list(_parts(values))

    def row_by_row() -> pd.DataFrame:
        cols = [table.c[n] for n in names]
        frames = [read_frame(conn, sa.select(*cols).where(table.c[key].in_(part)), raw=True)
                  for part in chunks]
        return pd.concat(frames, ignore_index=True) if frames else \
            pd.DataFrame(columns=names)

    if conn.dialect.name != "sqlite" or \
            not all(t in (pa.int64(), pa.string(), pa.float64()) for t in types.values()):
        return row_by_row()
    parts = [(f'"{key}" IN ({", ".join(f":k{j}" for j in range(len(part)))})',
              {f"k{j}": v for j, v in enumerate(part)}) for part in chunks]
    try:
        tables = _sqlite_parts(conn, table, names, types, parts, counted=True)
    except pa.ArrowInvalid:  # a separator or line break inside a value
        return row_by_row()
    if not tables:
        return pd.DataFrame(columns=names)
    return _empty_text(table, pa.concat_tables(tables).to_pandas())


def _parts(ids: Sequence[str], size: int = 900) -> Iterator[list[str]]:
    """Split an id list into parts that fit a bound-parameter limit."""
    ids = list(dict.fromkeys(ids))
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


#: How SQLAlchemy's DateTime stores a value in SQLite (and a valid PostgreSQL literal).
_SQL_DATETIME = "%Y-%m-%d %H:%M:%S.%f"
#: How SQLAlchemy's Date stores a value in SQLite (and a valid PostgreSQL literal).
_SQL_DATE = "%Y-%m-%d"


def _formatted(col: pd.Series, fmt: str) -> np.ndarray:
    """Dates or datetimes as text in ``fmt`` (an object array, NaN where missing).

    Each distinct value is formatted once: scores are recorded to the hour or the
    minute, so a column of dates repeats (1.1M outcome dates hold ~26k distinct ones:
    strftime of every value 0.86 s, of the distinct ones 0.11 s). A column of mostly
    distinct values is formatted value by value, which is then the cheaper way.
    """
    at = to_datetimes(col)
    codes, distinct = pd.factorize(at)
    if len(distinct) > len(at) // 2:
        return at.dt.strftime(fmt).to_numpy(dtype=object, copy=True)
    text = pd.Series(distinct).dt.strftime(fmt).to_numpy(dtype=object)
    out = text.take(np.maximum(codes, 0)) if len(text) else \
        np.full(len(codes), np.nan, dtype=object)
    out[codes < 0] = np.nan
    return out


def _column_values(col: pd.Series, kind: sa.types.TypeEngine[Any], dialect: str,
                   missing_as: Any = None) -> list[Any]:
    """One column as plain Python values the driver takes directly (NA -> ``missing_as``,
    None unless the caller knows the driver stores another value as NULL)."""
    missing = col.isna().to_numpy()
    # Each branch gives an object array of Python values; missing ones are set to
    # ``missing_as`` in one masked assignment (a Python loop over them cost seconds at 10M rows).
    if isinstance(kind, sa.DateTime):
        values = _formatted(col, _SQL_DATETIME)
    elif isinstance(kind, sa.Date):  # dates or datetimes, stored as SQLAlchemy does
        values = _formatted(col, _SQL_DATE)
    elif isinstance(kind, sa.Boolean):
        b = col.fillna(False).astype(bool).to_numpy()
        values = (b.astype(np.int64) if dialect == "sqlite" else b).astype(object)
    elif isinstance(kind, sa.Integer):
        num = pd.to_numeric(col)
        whole = num.dropna()
        if pd.api.types.is_float_dtype(num) and not (whole == whole.round()).all():
            values = num.astype(float).to_numpy().astype(object)  # never truncate
        else:
            values = num.fillna(0).to_numpy(dtype=np.int64).astype(object)
    elif isinstance(kind, sa.Float):
        values = pd.to_numeric(col).astype(float).to_numpy().astype(object)
    else:
        values = col.to_numpy(dtype=object, copy=True)
    if missing.any():
        values[missing] = missing_as
    return list(values.tolist())


def _stored_column(col: pd.Series, kind: sa.types.TypeEngine[Any], dialect: str
                   ) -> pd.Series:
    """What the DataFrame constructor infers from :func:`_column_values`' list for a
    column (that list read back), computed on arrays where the result is certain.

    Lists of Python values cost most of a full compute's write step (~10 s for 1.1M
    outcome rows); the cases below give the same dtype and values without them:
    datetimes as text (``str``, NaN where missing), numbers and SQLite's 0/1 booleans as
    ``int64`` without a missing value or ``float64`` with one, text columns as they are.
    The rest (a column all missing, which infers ``object``; PostgreSQL booleans with a
    missing one; non-text objects) takes the list.
    """
    missing = col.isna().to_numpy()
    some = bool(missing.any())
    if len(col) and not missing.all():
        values: np.ndarray | pd.Series | None = None
        if isinstance(kind, (sa.DateTime, sa.Date)):
            fmt = _SQL_DATETIME if isinstance(kind, sa.DateTime) else _SQL_DATE
            values = pd.Series(_formatted(col, fmt), dtype="str")
        elif isinstance(kind, sa.Boolean) and (dialect == "sqlite" or not some):
            b = col.fillna(False).astype(bool).to_numpy()
            values = b.astype(np.int64) if dialect == "sqlite" else b
            if some:
                values = np.where(missing, np.nan, values)
        elif isinstance(kind, sa.Integer):
            num = pd.to_numeric(col)
            whole = num.dropna()
            fractional = pd.api.types.is_float_dtype(num) and \
                not (whole == whole.round()).all()
            values = num.astype("float64").to_numpy() if fractional or some else \
                num.to_numpy(dtype=np.int64)
        elif isinstance(kind, sa.Float):
            values = pd.to_numeric(col).astype("float64").to_numpy()
        elif col.dtype == "str":
            values = col
        if isinstance(values, pd.Series):
            out = values.reset_index(drop=True)
            out.name = col.name
            return out
        if values is not None:
            return pd.Series(values, name=col.name)
    return pd.DataFrame({col.name: _column_values(col, kind, dialect)})[col.name]


def stored_frame(table: sa.Table, frame: pd.DataFrame, dialect: str) -> pd.DataFrame:
    """A frame as reading it back from ``table`` would give it, for a frame
    :func:`bulk_insert` has just stored there: the table's columns (absent ones None).

    Each column is what the values the insert gave the driver (:func:`_column_values`)
    read back as: the dtypes and values ``DataFrame.from_records`` gives in
    :func:`read_frame` for the same rows, computed on arrays (:func:`_stored_column`)
    without reading or transposing rows. A caller that has just written a frame uses
    this instead of reading the table again; the consumers convert datetime columns
    with pandas and booleans to ``bool`` (SQLite stores 0/1), as they do after a read.
    """
    names = [c.name for c in table.c]
    if frame.empty:
        return pd.DataFrame(columns=names)
    # copy=False: the columns are new (or the caller's, which pandas copies on write);
    # gathering 60 columns of 1.1M outcomes into blocks took 0.75 s of fresh memory.
    out = pd.DataFrame({n: _stored_column(frame[n], table.c[n].type, dialect)
                        for n in names if n in frame.columns}, copy=False)
    for n in names:
        if n not in out.columns:
            out[n] = None
    return out[names]


#: What bulk_insert binds for a missing value on SQLite: a NaN, which SQLite stores as
#: NULL (``sqlite3VdbeMemSetDouble`` in its vdbemem.c), so a NOT NULL column refuses it
#: as it refuses None. Binding None is the slow path of Python's sqlite3 (3.11): each
#: None goes through its adapter look-up (~0.35 us). 990k administrations (16 of 33
#: values missing) into the 10M store's table: executemany 11.9 s with None, 5.9 s
#: with NaN.
_SQLITE_NULL = float("nan")


def _nan_is_null(dbapi: Any) -> bool:
    """Whether this SQLite connection stores a bound NaN as NULL (checked, not assumed:
    a build without floating point, or a future SQLite, falls back to None)."""
    cur = dbapi.cursor()
    try:
        return bool(cur.execute("SELECT typeof(?)", (_SQLITE_NULL,)).fetchone()[0] == "null")
    finally:
        cur.close()


def _missing_as(conn: Connection) -> Any:
    """What the driver path binds for a missing value on this connection (see
    :data:`_SQLITE_NULL`)."""
    sqlite = conn.dialect.name == "sqlite"
    return _SQLITE_NULL if sqlite and _nan_is_null(conn.connection.driver_connection) \
        else None


def _driver_rows(frame: pd.DataFrame, table: sa.Table, names: Sequence[str], dialect: str,
                 missing_as: Any) -> Iterator[tuple[Any, ...]]:
    """The frame's columns ``names`` as rows of plain values the driver binds, stored
    as SQLAlchemy stores them (:func:`_column_values`). A lazy iterator: the driver
    takes rows one at a time, so a chunk's tuples never exist all at once."""
    columns = [_column_values(frame[n], table.c[n].type, dialect, missing_as)
               for n in names]
    return zip(*columns, strict=True)


def bulk_insert(conn: Connection, table: sa.Table, frame: pd.DataFrame,
                chunk_rows: int = 100_000, positions: np.ndarray | None = None,
                upsert: bool = False, skip_stored: Sequence[str] = ()) -> int | None:
    """Insert a frame's rows in the connection's transaction, by the driver's fastest
    path: SQLite ``executemany`` of plain tuples, PostgreSQL ``COPY ... FROM STDIN``.

    Values are stored exactly as SQLAlchemy would store them (datetimes as SQLAlchemy's
    SQLite text format, booleans 0/1 on SQLite), so every reader sees the same rows;
    SQLAlchemy's per-row parameter processing, most of an ingest's time, is skipped.
    :func:`stored_frame` gives what reading them back would give.

    The rows go ``chunk_rows`` at a time, so only one chunk's values exist as Python
    objects (1.4M goal-status rows were ~0.6 GB of them at once). Chunking stores the
    same values: each conversion in :func:`_column_values` gives a value the database
    stores identically whichever chunk it is in. ``positions`` (row positions in
    ``frame``) inserts only those rows, in that order, taken a chunk at a time (no
    filtered copy of the whole frame).

    ``upsert`` (SQLite only): a row whose primary key is already stored updates that
    row in place (``ON CONFLICT DO UPDATE``) instead of failing. Two rows of the frame
    with one key are refused all the same (:class:`StoreError`), as a plain insert
    refuses them: the second must not silently overwrite the first.

    ``skip_stored`` (SQLite only): the columns of a unique key; a row whose key is
    already stored is skipped (``ON CONFLICT (key) DO NOTHING``), not refused. Only that
    key's conflicts are skipped: a NOT NULL or other violation still fails the insert.

    Returns
    -------
    int or None
        On SQLite the number of rows written (the frame's rows, less any skipped);
        elsewhere None.
    """
    if (upsert or skip_stored) and conn.dialect.name != "sqlite":
        raise ValueError("bulk_insert(upsert=True or skip_stored) is for SQLite; "
                         "elsewhere delete or look up first")
    if upsert and skip_stored:
        raise ValueError("bulk_insert: upsert and skip_stored are exclusive")
    if positions is not None:
        positions = np.asarray(positions, dtype=np.int64)
    dialect = conn.dialect.name
    if frame.empty or (positions is not None and not len(positions)):
        return 0 if dialect == "sqlite" else None
    names = [str(c) for c in frame.columns]
    if dialect not in ("postgresql", "sqlite"):  # any other database: SQLAlchemy's path
        conn.execute(table.insert(), to_records(
            frame if positions is None else frame.iloc[positions]))
        return None
    dbapi = conn.connection.driver_connection
    changes_before = dbapi.total_changes if dialect == "sqlite" else 0  # type: ignore[union-attr]
    quoted = ", ".join(f'"{n}"' for n in names)
    step = max(1, chunk_rows)
    missing_as = _missing_as(conn)
    conflict = ""
    if upsert:
        key = [c.name for c in table.primary_key.columns]
        rows = frame if positions is None else frame.iloc[positions]
        if rows.duplicated(key).any():
            raise StoreError(f"rows with the same key ({', '.join(key)}) twice in one "
                             f"write to {table.name}",
                             fix="this is a bug in OnTrack; please report it")
        values = [f'"{n}" = excluded."{n}"' for n in names if n not in key]
        conflict = " ON CONFLICT ({}) DO {}".format(
            ", ".join(f'"{k}"' for k in key),
            f"UPDATE SET {', '.join(values)}" if values else "NOTHING")
    elif skip_stored:
        conflict = " ON CONFLICT ({}) DO NOTHING".format(
            ", ".join(f'"{k}"' for k in skip_stored))
    for lo in range(0, len(frame) if positions is None else len(positions), step):
        part = frame.iloc[lo:lo + step] if positions is None else \
            frame.iloc[positions[lo:lo + step]]
        tuples = _driver_rows(part, table, names, dialect, missing_as)
        if dialect == "postgresql":
            with dbapi.cursor() as cur, cur.copy(  # type: ignore[union-attr]
                    f'COPY "{table.name}" ({quoted}) FROM STDIN') as copy:
                for row in tuples:
                    copy.write_row(row)
        else:
            cur = dbapi.cursor()  # type: ignore[union-attr]
            try:
                cur.executemany(f'INSERT INTO "{table.name}" ({quoted}) VALUES '
                                f'({", ".join("?" * len(names))}){conflict}', tuples)
            finally:
                cur.close()
    if dialect != "sqlite":
        return None
    # No trigger writes in these tables, so the connection's count of changed rows
    # grew by the rows this insert wrote (an upsert's updates included).
    return int(dbapi.total_changes - changes_before)  # type: ignore[union-attr]


def bulk_update(conn: Connection, table: sa.Table, frame: pd.DataFrame, key: str) -> None:
    """Update the rows named by the frame's ``key`` column with its other columns, in
    the connection's transaction.

    SQLite: ``executemany`` of plain tuples, the values as :func:`bulk_insert` binds
    them; SQLAlchemy's per-row parameter processing was most of updating a cycle's 6.5k
    changed flags. Elsewhere SQLAlchemy's ``executemany``.
    """
    if frame.empty:
        return
    names = [str(c) for c in frame.columns if c != key]
    if conn.dialect.name != "sqlite":
        stmt = table.update().where(table.c[key] == sa.bindparam("_key")).values(
            {n: sa.bindparam(n) for n in names})
        conn.execute(stmt, [{**{n: r[n] for n in names}, "_key": r[key]}
                            for r in to_records(frame)])
        return
    settings = ", ".join(f'"{n}" = ?' for n in names)
    cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cur.executemany(f'UPDATE "{table.name}" SET {settings} WHERE "{key}" = ?',
                        _driver_rows(frame, table, [*names, key], "sqlite",
                                     _missing_as(conn)))
    finally:
        cur.close()


def to_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as dicts of plain Python values (NA -> None) for the DBAPI.

    Column by column: numeric and boolean columns box to Python scalars through
    ``astype(object)``; datetime columns become ``datetime`` (to the microsecond); only
    object columns are scanned for stray numpy scalars.
    """
    out = frame.astype(object).where(frame.notna(), None)
    for c in frame.columns:
        col = frame[c]
        if pd.api.types.is_datetime64_any_dtype(col):
            out[c] = pd.Series([None if pd.isna(v) else v.to_pydatetime()
                                for v in col.dt.floor("us")], index=out.index, dtype=object)
        elif col.dtype == object:
            out[c] = pd.Series([v.item() if isinstance(v, np.generic) else
                                (v.to_pydatetime(warn=False) if isinstance(v, pd.Timestamp)
                                 else v) for v in out[c]], index=out.index, dtype=object)
    names = [str(c) for c in out.columns]
    return [dict(zip(names, row, strict=True))
            for row in out.itertuples(index=False, name=None)]

