"""``ontrack compute``: read the store, run the statistics, write the outcome tables.

Incremental by default: only episodes with administrations or episode records from
batches newer than the last run's watermark are recomputed; their flags and goal status
are re-evaluated with those of the open episodes whose date-based rules (review due,
no recent score, goal due date) crossed a boundary since the last run's clock, or that
got a plan review or a new plan. The *reference* (baseline
SD per measure for the RCI, expected recovery curves) is a whole-store statistic: a full
compute rebuilds it, an incremental run uses the stored one, so an incremental run gives
the same outcomes as a full compute that keeps the reference (``keep_reference=True``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from pipeline import flags as flag_rules
from pipeline.columns import to_datetimes
from pipeline.config import Settings
from pipeline.faults import crash_point
from pipeline.goals import goal_status
from pipeline.memory import trim_heap
from pipeline.report import caseload_summary, episode_flags_from
from pipeline.scales import Registry
from pipeline.stats.groups import Grouped, group_administrations
from pipeline.stats.outcomes import Reference, episode_outcomes_in_parts
from pipeline.stats.reference import partials, reference_from_partials
from pipeline.store import (
    CELL_KEY,
    SERVICE_COUNTS,
    Store,
    administrations,
    batches,
    bulk_insert,
    bulk_read,
    compute_runs,
    episode_clock,
    episodes,
    expected_curves,
    goals,
    outcomes,
    plans,
    read_frame,
    reference_norms,
    refresh_service_cells,
    reviews,
    stored_frame,
    sudden_changes,
    update_service_cells,
    utcnow,
)
from pipeline.store import caseload as caseload_table
from pipeline.store import episode_service as episode_service_table
from pipeline.store import goal_status as goal_status_table

__all__ = ["ComputeReport", "build_reference", "compute", "last_clock"]

_ADMIN_COLS = ["episode_id", "measure", "administered_at", "session_number", "score",
               "risk", "risk_value"]


@dataclass
class ComputeReport:
    """What a compute run did, with timings in seconds."""

    run_id: int
    mode: str
    episodes: int
    outcome_rows: int
    sudden_rows: int
    reference_rebuilt: bool
    flags: dict[str, int] = field(default_factory=dict)
    #: Episodes whose flags, goal status and summaries were re-evaluated (all: None).
    rule_scope: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "mode": self.mode, "episodes": self.episodes,
                "outcome_rows": self.outcome_rows, "sudden_rows": self.sudden_rows,
                "reference_rebuilt": self.reference_rebuilt, "flags": self.flags,
                "rule_scope": self.rule_scope,
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


def _read_admins(conn: sa.Connection, episode_ids: list[str] | None) -> pd.DataFrame:
    df = bulk_read(conn, administrations, _ADMIN_COLS,
                   where_in=None if episode_ids is None else ("episode_id", episode_ids))
    df["administered_at"] = to_datetimes(df["administered_at"]).astype("datetime64[us]")
    df["score"] = df["score"].astype("int64")
    df["session_number"] = df["session_number"].astype("Int64")
    df["episode_id"] = df["episode_id"].astype("str")
    df["measure"] = df["measure"].astype("str")
    df["risk"] = df["risk"].astype("str")
    df["risk_value"] = df["risk_value"].astype("float64")
    return df


def build_reference(admins: pd.DataFrame, ended: pd.Series, registry: Registry,
                    settings: Settings, use_defaults: bool = True,
                    grouped: Grouped | None = None) -> tuple[Reference, pd.DataFrame]:
    """Baseline SDs (n-1, over every episode's first score) and expected recovery curves.

    The whole store as one partition of :func:`pipeline.stats.reference.partials`; the
    Dask engine sums the same aggregates over many partitions and gets the same result.

    Parameters
    ----------
    admins
        Every scored administration in the store.
    ended
        Episode ids with an end date (curves come from finished episodes only).
    grouped
        ``admins`` already ordered by :func:`group_administrations`, if at hand.

    Returns
    -------
    (reference, norms table)
    """
    # One call, not parts in threads: split, it took longer (1.6 s instead of 1.1 s at
    # 9.7M rows), each part hashing the ended ids and gathering its group heads again.
    return reference_from_partials(partials(admins, ended, registry, grouped), registry,
                                   settings, use_defaults=use_defaults)


def _stored_reference(conn: sa.Connection) -> Reference:
    norms = pd.DataFrame(conn.execute(sa.select(reference_norms)).mappings().all(),
                         columns=list(reference_norms.c.keys()))
    curves = pd.DataFrame(conn.execute(sa.select(expected_curves)).mappings().all(),
                          columns=list(expected_curves.c.keys()))
    return Reference(sd=dict(zip(norms["measure"], norms["sd"].astype(float), strict=True)),
                     sd_source=dict(zip(norms["measure"], norms["source"], strict=True)),
                     curves=curves.drop(columns="run_id"))


def _insert(conn: sa.Connection, table: sa.Table, frame: pd.DataFrame, run_id: int,
            keep: bool = False, upsert: bool = False) -> pd.DataFrame:
    """Insert a result frame (stamped with the run) by the store's bulk path; with
    ``keep``, return what reading it back would give (:func:`stored_frame`), else an
    empty frame. ``upsert``: see :func:`bulk_insert`."""
    cols = [c.name for c in table.c]
    f = frame.assign(run_id=run_id)
    f = f[[c for c in cols if c in f.columns]]
    bulk_insert(conn, table, f, upsert=upsert)
    return stored_frame(table, f, conn.dialect.name) if keep else pd.DataFrame()


def _scoped(conn: sa.Connection, table: sa.Table, columns: list[str] | None,
            ids: list[str] | None, columnar: bool = False) -> pd.DataFrame:
    """A table (some columns), restricted to some episodes when ``ids`` is given.
    ``columnar``: by :func:`bulk_read` (all rows, or ``where_in`` the episodes), for a
    table whose text columns never hold an empty string and whose dates the callers
    convert with pandas (the PostgreSQL path gives them as text, not date objects)."""
    cols = [table.c[c] for c in columns] if columns else list(table.c)
    names = [c.name for c in cols]
    # Raw DBAPI values (dates as the driver gives them), read the same way for every
    # episode or some: callers convert with pandas. (SQLAlchemy's per-row date
    # processing took 8.8 of the 10.6 s of a full read of 1.4M goals and 560k episodes.)
    if columnar:
        return bulk_read(conn, table, names, where_in=None if ids is None else
                         ("episode_id", ids)).reindex(columns=names)
    if ids is None:
        return read_frame(conn, sa.select(*cols), raw=True).reindex(columns=names)
    parts = [read_frame(conn, sa.select(*cols).where(table.c.episode_id.in_(ids[i:i + 900])),
                        raw=True)
             for i in range(0, len(ids), 900)]
    if not parts:
        return pd.DataFrame(columns=names)
    return pd.concat(parts, ignore_index=True).reindex(columns=names)


def _bools(frame: pd.DataFrame, table: sa.Table) -> pd.DataFrame:
    """Boolean columns as Python bools/None whichever way they were read (raw DBAPI
    reads give SQLite's 0/1), so evidence and rules never depend on the read path."""
    for c in table.c:
        if isinstance(c.type, sa.Boolean) and c.name in frame.columns:
            frame[c.name] = _as_bools(frame[c.name])
    return frame


def _as_bools(values: pd.Series) -> Any:
    """Python bools, None where missing: what ``[None if v is None or v != v else
    bool(v) for v in values]`` gives, and the same column dtype once assigned (bool
    without a missing value, else object), converted as arrays (1.1M rows x 8 columns
    took 1.7 s value by value)."""
    if values.empty:
        return []
    arr = values.to_numpy(dtype=object)
    missing = pd.isna(arr)
    b = np.where(missing, False, arr).astype(bool)
    if not missing.any():
        return b
    out = b.astype(object)
    out[missing] = None
    return out


def _outcome_frame(frame: pd.DataFrame) -> pd.DataFrame:
    frame = _bools(frame, outcomes)
    for c in ("first_at", "last_at"):
        frame[c] = to_datetimes(frame[c])
    return frame


def _plus(held: pd.DataFrame, rest: list[str], read: Callable[[list[str]], pd.DataFrame]
          ) -> pd.DataFrame:
    """Rows held for some episodes, plus those read for the ``rest``."""
    if not rest:
        return held
    if held.empty:  # its columns' dtypes (from no rows) would sway the concatenation's
        return read(rest)
    return pd.concat([held, read(rest)], ignore_index=True)


def rule_input(conn: sa.Connection, registry: Registry, settings: Settings,
               today: datetime, episode_ids: list[str] | None = None,
               admins: pd.DataFrame | None = None,
               written: tuple[pd.DataFrame, pd.DataFrame] | None = None,
               held: set[str] | None = None,
               grouped: Grouped | None = None) -> flag_rules.RuleInput:
    """Read what the flag rules need from the store (outcomes must be current), for
    every episode or only ``episode_ids``. ``admins`` (as :func:`_read_admins` gives
    them), when the caller already holds those episodes' administrations, and
    ``written``, the (outcomes, sudden changes) rows it has just stored for them (in
    their :func:`stored_frame` form), save reading them again: they cover the episodes
    ``held``, or every episode in scope when ``held`` is None; the rest are read.
    ``grouped``, the group order of ``admins``, serves the goal status when nothing
    else was read."""
    rest: list[str] = [] if held is None or episode_ids is None else \
        sorted(set(episode_ids) - held)
    if written is None:
        out = _outcome_frame(_scoped(conn, outcomes, None, episode_ids))
        sud = _bools(_scoped(conn, sudden_changes, None, episode_ids), sudden_changes)
    else:  # converted part by part: the two read paths give dates in different forms
        out = _plus(_outcome_frame(written[0]), rest,
                    lambda ids: _outcome_frame(_scoped(conn, outcomes, None, ids)))
        sud = _plus(_bools(written[1], sudden_changes), rest,
                    lambda ids: _bools(_scoped(conn, sudden_changes, None, ids),
                                       sudden_changes))
    cols = ["episode_id", "measure", "administered_at", "session_number", "score", "risk",
            "risk_value"]
    # No .copy(): pandas 3 copies on write, so the column set below never reaches the
    # caller's frame, and the rest share its buffers (a copy was ~1 GB at 10M rows).
    adm = _plus(admins[cols], rest, lambda ids: _read_admins(conn, ids)[cols]) \
        if admins is not None else _scoped(conn, administrations, cols, episode_ids)
    adm["administered_at"] = to_datetimes(adm["administered_at"])
    # Columnar (a full run's 560k episodes: 0.95 s by rows): a blank team is stored as
    # missing, and the rules convert the dates (text on either path but PostgreSQL's
    # rows, whose date objects the evidence writes as the same text).
    eps = _scoped(conn, episodes, ["episode_id", "therapist_id", "team", "start_date",
                                   "end_date"], episode_ids, columnar=True)
    # Columnar (a full run's 1.4M goals: 6.7 s by rows): every text column of a goal is
    # required or blank-as-missing at validation, and goal_status converts the dates.
    gl = _scoped(conn, goals, None, episode_ids, columnar=True)
    if not gl.empty:
        latest = gl.groupby("episode_id")["plan_version"].transform("max")
        gl = gl[gl["plan_version"] == latest]
        gl = gl.merge(eps[["episode_id", "end_date"]], on="episode_id", how="left")
        gl = goal_status(gl, adm, out, registry, settings, today,
                         grouped=grouped if admins is not None and not rest else None)
        gl = gl.merge(out[["episode_id", "measure", "last_at"]].rename(
            columns={"last_at": "_last"}), on=["episode_id", "measure"], how="left")
        if "last_at" not in gl.columns:
            gl["last_at"] = gl["_last"]
        gl = gl.drop(columns="_last")
    rev = _scoped(conn, reviews, None, episode_ids)
    return flag_rules.RuleInput(outcomes=out, administrations=adm, episodes=eps, sudden=sud,
                                goals=gl, reviews=rev, registry=registry, settings=settings,
                                today=today)


def _previous_state(conn: sa.Connection) -> dict[str, Any] | None:
    """The scope state recorded by the latest completed run (None before this field)."""
    raw = conn.execute(sa.select(compute_runs.c.scope_state).where(
        compute_runs.c.status == "done").order_by(compute_runs.c.run_id.desc()).limit(1)
    ).scalar_one_or_none()
    return json.loads(raw) if raw else None


def _clock(state: dict[str, Any]) -> datetime:
    """The rules' clock a run recorded in its scope state."""
    return datetime.fromisoformat(state["clock"])


def last_clock(conn: sa.Connection) -> datetime | None:
    """The clock of the latest completed compute run: every live flag holds as of it
    (see :mod:`pipeline.flags`). None before the first run that recorded it."""
    previous = _previous_state(conn)
    return None if previous is None else _clock(previous)


def _moved_on(conn: sa.Connection, previous: dict[str, Any] | None,
              state: dict[str, Any], now: datetime, watermark: int) -> set[str]:
    """Open episodes whose flags or goal status may differ from the last run's, though
    no administration or episode record of theirs arrived: the date-based rules moved
    on, or a plan review or a plan (batch after ``watermark``) was added (for these
    two, and for an end date still ahead, closed episodes too).

    Every rule output is a function of the episode's records, the stored reference,
    the settings and the clock; the clock enters only through comparisons with dates
    (see :func:`pipeline.flags.stable_until`). Each run stores, per open episode it
    evaluated, the last instant at or after its clock at which all of them still give
    what they gave (:data:`pipeline.store.episode_clock`). An episode whose instant lies
    in [last run's clock, this clock) may give something else now and is re-evaluated;
    the others give the same results as then. The windows of successive runs tile the
    time line, so a stored instant is never before the last run's clock. Without a
    recorded state every open episode is re-evaluated; so it is, besides the new
    reviews, plans and closed episodes ending ahead, when the last run stored no
    instants or the clock went back. (A changed setting or scale definition makes the
    run a full one: see :func:`compute`.)
    """
    is_open = episodes.c.end_date.is_(None)
    every_open = sa.select(episodes.c.episode_id).where(is_open)
    if previous is None:  # a run older than the recorded state
        return {r[0] for r in conn.execute(every_open)}
    then = _clock(previous)
    # New reviews and plans of any episode: a "revise" review of a closed episode
    # brings a plan version whose goals need a status too.
    changed = {r[0] for r in conn.execute(sa.select(reviews.c.episode_id).where(
        reviews.c.review_id > int(previous["review_id"])))}
    changed |= {r[0] for r in conn.execute(sa.select(plans.c.episode_id).where(
        plans.c.batch_id > watermark))}
    if then == now:
        return changed
    # A closed episode's goals are judged as of the earlier of its end and the clock:
    # with an end date still ahead of the earlier clock's date, they move with the clock.
    lo_day = pd.Timestamp(min(then, now)).normalize()
    if lo_day != pd.Timestamp(max(then, now)).normalize():
        changed |= {r[0] for r in conn.execute(sa.select(episodes.c.episode_id).where(
            episodes.c.end_date > lo_day.date()))}
    if now < then or not previous.get("stable_until"):
        # The stored instants look forward from the last run's clock only.
        return changed | {r[0] for r in conn.execute(every_open)}
    changed |= {r[0] for r in conn.execute(sa.select(episode_clock.c.episode_id).where(
        (episode_clock.c.stable_until >= then) & (episode_clock.c.stable_until < now)))}
    return changed


def _replace(conn: sa.Connection, table: sa.Table, frame: pd.DataFrame,
             scope: list[str] | None, run_id: int, keep: bool = False) -> pd.DataFrame:
    """Replace a per-episode table's rows for the scope (all rows when None); return
    what :func:`_insert` returns.

    On SQLite a scope's rows are updated in place where their key is already stored,
    then the scope's rows this run did not write are deleted. Deleting them all and
    inserting afresh wrote every key into the primary-key index twice and every row to
    a new page: 13.7k of the 49.7k pages a 10M cycle's compute (9,945 episodes) wrote
    to the WAL, each written again at the checkpoint.
    """
    if scope is not None and conn.dialect.name == "sqlite":
        stored = _insert(conn, table, frame, run_id, keep=keep, upsert=True)
        for i in range(0, len(scope), 900):
            conn.execute(table.delete().where(table.c.episode_id.in_(scope[i:i + 900]),
                                              table.c.run_id != run_id))
        return stored
    rebuilt: list[sa.Index] = []
    if scope is None:
        conn.execute(table.delete())
        if conn.dialect.name == "sqlite":
            # Every row is new: the secondary indexes are built once from the rows,
            # not entry by entry in the rows' (episode) order (episode_service's
            # therapist index, 560k rows: insert 2.95 -> 1.40 s, the build included).
            # Inside the run's transaction, so a reader sees the old table and its
            # indexes until the commit. (PostgreSQL would lock its readers out.)
            rebuilt = list(table.indexes)
            for index in rebuilt:
                index.drop(conn)
    else:
        for i in range(0, len(scope), 900):
            conn.execute(table.delete().where(table.c.episode_id.in_(scope[i:i + 900])))
    stored = _insert(conn, table, frame, run_id, keep=keep)
    for index in rebuilt:
        index.create(conn)
    return stored


def changed_episodes(before: pd.DataFrame, after: pd.DataFrame, values: list[str]
                     ) -> list[str]:
    """Episodes (sorted) whose one row differs between ``before`` (as read back) and
    ``after`` (as computed), or that have a row in only one of them.

    Each frame has an ``episode_id`` column (unique) and the ``values`` columns, text or
    integer. Values are compared as Python objects, missing equal to missing only (None,
    NaN, NaT alike): ``1`` equals ``1.0`` and ``"1"`` does not. Rows are never compared
    by position, so the frames' orders do not matter.
    """
    def plain(frame: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame({c: frame[c].astype(object).where(frame[c].notna(), None)
                            for c in ["episode_id", *values]})
        return out.set_index("episode_id")

    b, a = plain(before), plain(after)
    ids = b.index.union(a.index)
    b, a = b.reindex(ids), a.reindex(ids)
    differs = ids.isin(before["episode_id"]) != ids.isin(after["episode_id"])
    for c in values:
        x, y = a[c], b[c]
        differs |= ~((x == y).to_numpy(dtype=bool) | (x.isna() & y.isna()).to_numpy())
    return sorted(ids[differs].astype(str))


def compute(store: Store, settings: Settings, registry: Registry, *, full: bool = False,
            keep_reference: bool = False, now: datetime | None = None) -> ComputeReport:
    """Recompute outcomes (incrementally unless ``full``) and flags, atomically.

    ``now`` (naive UTC) is the clock of the date-based flag rules; default the current
    time.
    """
    now = now or utcnow()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with store.transaction() as conn:
        watermark = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(
            batches.c.batch_id), 0))).scalar_one())
        last = conn.execute(sa.select(sa.func.max(compute_runs.c.watermark)).where(
            compute_runs.c.status == "done")).scalar_one()
        has_reference = conn.execute(sa.select(sa.func.count()).select_from(
            reference_norms)).scalar_one() > 0
        state = {"clock": now.isoformat(), "review_id": int(conn.execute(sa.select(
            sa.func.coalesce(sa.func.max(reviews.c.review_id), 0))).scalar_one()),
            "settings": settings.fingerprint(),
            "registry": hashlib.sha256(repr(registry).encode()).hexdigest()[:16],
            # This run stores each evaluated open episode's stable_until (_moved_on).
            "stable_until": True}
        previous = _previous_state(conn)
        # Without a stored reference (first run, or an empty store before) the run is full
        # and builds one, whatever was asked: a reference from a partition would be wrong.
        # So it is after a setting or a scale definition changed: every episode's
        # statistics, reference and flags may differ, not only those with new records.
        reconfigured = previous is not None and any(
            previous.get(k) != state[k] for k in ("settings", "registry"))
        mode = "full" if full or last is None or not has_reference or reconfigured \
            else "incremental"
        if mode == "incremental":
            # No DISTINCT: SQLite would answer it by scanning the whole unique index
            # rather than searching the batch_id index for the few new rows.
            touched = {r[0] for r in conn.execute(sa.select(administrations.c.episode_id)
                                                  .where(administrations.c.batch_id > last))}
            touched |= {r[0] for r in conn.execute(sa.select(episodes.c.episode_id)
                                                   .where(episodes.c.batch_id > last))}
            ids: list[str] | None = sorted(touched)
        else:
            ids = None
        run_id = int(conn.execute(compute_runs.insert().values(
            started_at=utcnow(), mode=mode, watermark=watermark, status="running",
            scope_state=json.dumps(state))).inserted_primary_key[0])  # type: ignore[index]
        admins = _read_admins(conn, ids)
        timings["read"] = time.perf_counter() - t0

        rebuild = mode == "full" and (not keep_reference or not has_reference)
        t1 = time.perf_counter()
        # One sort into episode x measure groups serves the reference and the statistics.
        grouped = group_administrations(admins)
        timings["group"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        if rebuild:
            # Read whole by the columnar path and filtered here: SQLite answered the
            # WHERE through the end_date index, one table lookup per ended episode
            # (491k of 560k: 1.3-1.6 s, against 0.4 s for the whole table).
            ended_at = _scoped(conn, episodes, ["episode_id", "end_date"], None, columnar=True)
            ended = ended_at.loc[ended_at["end_date"].notna().to_numpy(), "episode_id"]
            reference, norms = build_reference(admins, ended, registry, settings,
                                               grouped=grouped)
        else:
            reference = _stored_reference(conn)
        timings["reference"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        out, sudden = episode_outcomes_in_parts(admins, registry, settings, reference,
                                                grouped, settings.threads())
        timings["statistics"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        # What was written goes to the flag rules rather than being read back.
        out_stored = _replace(conn, outcomes, out, ids, run_id, keep=True)
        sudden_stored = _replace(conn, sudden_changes, sudden, ids, run_id, keep=True)
        # The stored forms serve the rest of the run: the computed frames go (~0.5 GB at
        # 1.1M outcome rows, during the flag step's peak).
        n_episodes = int(out["episode_id"].nunique()) if not out.empty else 0
        n_rows, n_sudden = len(out), len(sudden)
        del out, sudden
        if rebuild:
            conn.execute(reference_norms.delete())
            conn.execute(expected_curves.delete())
            if not norms.empty:
                _insert(conn, reference_norms, norms, run_id)
            if not reference.curves.empty:
                _insert(conn, expected_curves, reference.curves, run_id)
        timings["write"] = time.perf_counter() - t3
        crash_point("compute.written")

        t4 = time.perf_counter()
        # Flags, goal status and the per-episode summaries: every episode on a full run;
        # otherwise the affected episodes plus the open ones whose date-based results
        # may have moved on since the last run (see _moved_on). The others cannot
        # change, so the result is the same as a full evaluation.
        if ids is None:
            scope: list[str] | None = None
        else:
            scope = sorted(set(ids) | _moved_on(conn, previous, state, now, int(last)))
        # The run holds the touched episodes' administrations and outcomes (a full run:
        # every episode's); the rules read the rest of the scope from the store.
        inp = rule_input(conn, registry, settings, now, scope, admins=admins,
                         written=(out_stored, sudden_stored),
                         held=None if ids is None else set(ids), grouped=grouped)
        # The group order served the statistics and the goal status; past them the
        # rules need only the risk items of the administrations (a full run's peak is
        # the flag step: 10M administrations were ~0.7 GB of it).
        del grouped, admins
        inp = inp.slim()
        flag_counts = flag_rules.refresh(
            conn, flag_rules.evaluate(inp), now, episodes=None if scope is None else set(scope),
            last_run=None if previous is None else _clock(previous))
        # The flags' text (messages, evidence: ~1 GB at 900k flags) is garbage now; give
        # the heap's free pages back before the per-episode tables are written.
        trim_heap()
        _replace(conn, goal_status_table, inp.goals, scope, run_id)
        _replace(conn, episode_clock, flag_rules.stable_until(inp), scope, run_id)
        open_eps = inp.episodes.loc[inp.episodes["end_date"].isna(), "episode_id"]
        summary = caseload_summary(inp.outcomes, inp.goals, open_eps, registry, settings)
        # The scope's rows; an episode that closed is in it and is not written back.
        _replace(conn, caseload_table, summary, scope, run_id)
        svc = episode_flags_from(inp.episodes, inp.outcomes, settings, registry)
        svc["end_month"] = to_datetimes(svc["end_date"]).dt.strftime("%Y-%m")
        svc = svc.astype({c: "int64" for c in SERVICE_COUNTS})
        if scope is None:
            _replace(conn, episode_service_table, svc, None, run_id)
            refresh_service_cells(conn)
        else:
            # Only the episodes whose row differs are rewritten: a cycle's new scores
            # seldom change an episode's service indicators (none of 9,945 did in a 10M
            # cycle), and rewriting the rest cost ~0.3 s and ~9k dirty pages.
            values = [*CELL_KEY, *SERVICE_COUNTS]
            before = _scoped(conn, episode_service_table, ["episode_id", *values], scope)
            changed = changed_episodes(before, svc, values)
            rows = svc[svc["episode_id"].isin(changed).to_numpy()]
            _replace(conn, episode_service_table, rows, changed, run_id)
            update_service_cells(
                conn, before[before["episode_id"].isin(changed).to_numpy()], rows)
        timings["flags"] = time.perf_counter() - t4
        conn.execute(compute_runs.update().where(compute_runs.c.run_id == run_id).values(
            finished_at=utcnow(), status="done", episodes=n_episodes))
        crash_point("compute.commit")
    timings["total"] = time.perf_counter() - t0
    return ComputeReport(run_id=run_id, mode=mode, episodes=n_episodes,
                         outcome_rows=n_rows, sudden_rows=n_sudden,
                         reference_rebuilt=rebuild, flags=flag_counts, timings=timings,
                         rule_scope=None if scope is None else len(scope))
