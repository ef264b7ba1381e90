"""Read-only queries for the dashboard, through :mod:`pipeline.store` tables and the
access rules of :mod:`dashboard.access`. No statistics are computed here: outcomes,
flags, goal status and curves come from ``ontrack compute``; service rates from
:mod:`pipeline.report`.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from flask import current_app
from sqlalchemy.sql import visitors

from dashboard.access import (
    Viewer,
    episode_clause,
    may_export,
    may_see_clients,
    may_see_service,
)
from dashboard.grid_query import GridColumn, grid_order, grid_where
from pipeline.columns import to_datetimes
from pipeline.config import Settings
from pipeline.errors import UsageError
from pipeline.export import export_dataset, zip_export
from pipeline.flags import review_due
from pipeline.scales import Registry
from pipeline.stats.service import METRICS, rates_from_counts
from pipeline.store import (
    Store,
    administrations,
    batches,
    clients,
    compute_runs,
    episodes,
    expected_curves,
    exports_log,
    flags,
    goal_status,
    job_runs,
    outcomes,
    quarantine,
    read_frame,
    reviews,
    service_cells,
    sudden_changes,
    therapists,
    utcnow,
)
from pipeline.store import (
    caseload as caseload_table,
)

__all__ = ["DataAccess", "get_data"]

SEVERITY_ORDER = {"urgent": 0, "review": 1, "info": 2}
MAX_BLOCK = 500  # rows per caseload block request
#: How the caseload shows a trend (and filters on it).
TREND_LABELS = {"improving": "↓ improving", "worsening": "↑ worsening", "flat": "→ flat",
                "too few": "· too few"}


#: A literal, not a bound parameter: SQLite uses a partial index only when the query's
#: condition matches the index's own (ix_flags_open_episode).
_FLAG_OPEN = flags.c.state == sa.literal_column("'open'")


def _flag_counts() -> dict[str, sa.ColumnElement[Any]]:
    """Aggregates over an episode's open flags: a count per severity, and ``risk`` (1
    when an endorsed risk item is among them)."""
    counts: dict[str, sa.ColumnElement[Any]] = {
        s: sa.func.sum(sa.case((flags.c.severity == s, 1), else_=0)) for s in SEVERITY_ORDER}
    counts["risk"] = sa.func.max(sa.case((flags.c.kind == "risk_item", 1), else_=0))
    return counts


def _open_flag_counts(where: sa.ColumnElement[bool]) -> sa.Select[Any]:
    """Open flags per episode (:func:`_flag_counts`), one row per episode."""
    return sa.select(flags.c.episode_id,
                     *[expr.label(name) for name, expr in _flag_counts().items()]) \
        .where(_FLAG_OPEN & where).group_by(flags.c.episode_id)


def _grid_columns(counts: dict[str, sa.ColumnElement[Any]], day: date
                  ) -> dict[str, GridColumn]:
    """The caseload grid's sortable and filterable columns, by AG Grid column id, for a
    query grouped by episode: ``counts`` are the open-flag aggregates; the other
    columns are one value per episode, sorted as max() (PostgreSQL wants an aggregate
    for a column of a joined table)."""
    def weeks(op: str, value: float) -> sa.ColumnElement[bool]:
        # weeks = whole weeks since the start date (floor), compared on the date itself.
        def started_by(w: int) -> date:  # latest start date with at least ``w`` weeks
            try:
                return day - timedelta(days=7 * w)
            except OverflowError:  # beyond the calendar: every date, or none
                return date.min if w > 0 else date.max
        lo = {"ge": math.ceil(value), "gt": math.floor(value) + 1}.get(op)
        hi = {"le": math.floor(value), "lt": math.ceil(value) - 1}.get(op)
        if op == "eq":
            if value != int(value):
                return sa.false()
            lo = hi = int(value)
        parts = []
        if lo is not None:
            parts.append(episodes.c.start_date <= started_by(lo))
        if hi is not None:
            parts.append(episodes.c.start_date > started_by(hi + 1))
        return sa.and_(*parts)

    text = {"team": episodes.c.team, "therapist_id": episodes.c.therapist_id,
            "therapist": therapists.c.name,
            "client_link": sa.func.trim(sa.func.coalesce(clients.c.given_name, "") + " " +
                                        sa.func.coalesce(clients.c.family_name, "")),
            # Filtered as shown ("↓ improving"), not as stored ("improving").
            "dep_trend_label": sa.case(TREND_LABELS, value=caseload_table.c.dep_trend),
            "goal_status": caseload_table.c.goal_status}
    numbers = {"dep_latest": caseload_table.c.dep_latest,
               "dep_change": caseload_table.c.dep_change,
               "anx_latest": caseload_table.c.anx_latest,
               "anx_change": caseload_table.c.anx_change}
    cols = {k: GridColumn(v, sort_expr=sa.func.max(v)) for k, v in text.items()}
    cols.update({k: GridColumn(v, "number", sort_expr=sa.func.max(v))
                 for k, v in numbers.items()})
    cols.update({f"flags_{s}": GridColumn(counts[s], "number", aggregate=True)
                 for s in SEVERITY_ORDER})
    cols["risk_label"] = GridColumn(sa.case((counts["risk"] > 0, "RISK"), else_=""),
                                    aggregate=True)
    cols["weeks"] = GridColumn(episodes.c.start_date, "number", compare=weeks,
                               descending_expr=True,
                               sort_expr=sa.func.max(episodes.c.start_date))
    return cols


def _ts(values: pd.Series) -> pd.Series:
    """Dates or datetimes (possibly None) as one datetime64[us] dtype."""
    return to_datetimes(values).astype("datetime64[us]")


def _frame(conn: sa.Connection, query: sa.Select[Any], raw: bool = False) -> pd.DataFrame:
    return read_frame(conn, query, raw=raw)


@dataclass
class DataAccess:
    """Every query the pages make; each one takes the viewer and applies the rules.

    Results of the expensive reads (caseload, service outcomes) are cached per viewer
    scope and *data version* (latest compute run, review and batch): any ingest, compute
    or review invalidates them, so a cached answer is never stale.
    """

    store: Store
    settings: Settings
    registry: Registry
    cache_size: int = 64
    _cache: OrderedDict[tuple[Any, ...], Any] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def data_version(self) -> tuple[int, int, int]:
        """(latest compute run, review, batch): changes whenever what we show may change."""
        with self.store.snapshot() as conn:
            return tuple(int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(c), 0)))
                             .scalar_one())
                         for c in (compute_runs.c.run_id, reviews.c.review_id,
                                   batches.c.batch_id))  # type: ignore[return-value]

    def _cached(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        key = (*key, self.data_version())
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = build()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return value

    # ------------------------------------------------------------------ caseload
    def options(self, viewer: Viewer) -> dict[str, list[str]]:
        """Teams and therapists of the open episodes the viewer may see (the caseload's
        filters)."""
        with self.store.snapshot() as conn:
            ep = _frame(conn, sa.select(episodes.c.team, episodes.c.therapist_id)
                        .where(episode_clause(viewer) & episodes.c.end_date.is_(None))
                        .distinct())
        return {"teams": sorted(ep["team"].dropna().unique().tolist()),
                "therapists": sorted(ep["therapist_id"].dropna().unique().tolist())}

    def caseload(self, viewer: Viewer, team: str | None = None,
                 therapist: str | None = None, today: datetime | None = None
                 ) -> pd.DataFrame:
        """Every open episode the viewer may see, one row each, most urgent first.

        For small scopes and tests; the grid reads :meth:`caseload_page` instead.
        """
        model = {k: {"filterType": "text", "type": "equals", "filter": v}
                 for k, v in (("team", team), ("therapist_id", therapist)) if v}
        order = self.caseload_order(viewer, None, model, today)
        parts = [self._caseload_rows(viewer, order[i:i + 900], today or utcnow())
                 for i in range(0, len(order), 900)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def caseload_page(self, viewer: Viewer, start: int, end: int, sort_model: Any = None,
                      filter_model: Any = None, today: datetime | None = None
                      ) -> tuple[pd.DataFrame, int]:
        """Rows ``start:end`` of the viewer's caseload as sorted and filtered, and the
        number of rows in all (AG Grid's infinite row model asks for one block at a
        time). Bad models raise :class:`~pipeline.errors.UsageError`."""
        if not may_see_clients(viewer):
            return pd.DataFrame(), 0
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
                and end - start <= MAX_BLOCK):
            raise UsageError("a block is 0 <= start <= end, at most 500 rows",
                             start=start, end=end)
        order = self._order(viewer, sort_model, filter_model, today)
        return (self._caseload_rows(viewer, order[start:end].tolist(), today or utcnow()),
                len(order))

    def caseload_order(self, viewer: Viewer, sort_model: Any, filter_model: Any,
                       today: datetime | None = None) -> list[str]:
        """Ids of the viewer's open episodes, filtered and in grid order (cached).

        Without a sort model: an endorsed risk item first, then urgent and review flag
        counts, then the longest in treatment; the episode id breaks ties, so blocks
        never overlap or skip a row.
        """
        if not may_see_clients(viewer):
            return []
        ids: list[str] = self._order(viewer, sort_model, filter_model, today).tolist()
        return ids

    def _order(self, viewer: Viewer, sort_model: Any, filter_model: Any,
               today: datetime | None) -> Any:
        day = (today or utcnow()).date()
        key = ("caseload-order", viewer.role, viewer.therapist_id,
               json.dumps(sort_model, sort_keys=True, default=str),
               json.dumps(filter_model, sort_keys=True, default=str), day)
        # Kept as one Arrow string array (under 1 MB for 69k ids, not 5 MB of objects):
        # the cache may hold many sort and filter variants.
        return self._cached(key, lambda: pd.array(
            self._caseload_order(viewer, sort_model, filter_model, day), dtype="str"))

    def _caseload_order(self, viewer: Viewer, sort_model: Any, filter_model: Any,
                        day: date) -> list[str]:
        cond = episode_clause(viewer) & episodes.c.end_date.is_(None)
        # One pass: each visible open episode (partial index, in id order) with its open
        # flags (covering partial index), grouped by episode; the counts are aggregates.
        counts = _flag_counts()
        cols = _grid_columns(counts, day)
        # Validated before any query runs; counts are filtered after grouping.
        where = grid_where(filter_model, cols, aggregate=False)
        having = grid_where(filter_model, cols, aggregate=True)
        order = grid_order(sort_model, cols)
        default = [counts["risk"].desc(), counts["urgent"].desc(), counts["review"].desc(),
                   sa.func.max(episodes.c.start_date).asc()]
        # Other tables are joined only when a filter or sort uses them (SQLite keeps
        # unused LEFT JOINs in a grouped query).
        joined = episodes.outerjoin(flags, (flags.c.episode_id == episodes.c.episode_id)
                                    & _FLAG_OPEN)
        used = {getattr(element, "table", None) for term in (*where, *having, *order)
                for element in visitors.iterate(term)}
        for table, on in ((clients, clients.c.client_id == episodes.c.client_id),
                          (therapists, therapists.c.therapist_id == episodes.c.therapist_id),
                          (caseload_table,
                           caseload_table.c.episode_id == episodes.c.episode_id)):
            if table in used:
                joined = joined.outerjoin(table, on)
        query = (sa.select(episodes.c.episode_id).select_from(joined).where(cond, *where)
                 .group_by(episodes.c.episode_id).having(sa.and_(sa.true(), *having))
                 .order_by(*order, *default, episodes.c.episode_id))
        with self.store.snapshot() as conn:
            return [r[0] for r in conn.execute(query)]

    def _caseload_rows(self, viewer: Viewer, ids: list[str], today: datetime
                       ) -> pd.DataFrame:
        """The grid's columns for these episodes, in this order (visibility re-checked)."""
        if not ids:
            return pd.DataFrame()
        cond = episode_clause(viewer) & episodes.c.end_date.is_(None) \
            & episodes.c.episode_id.in_(ids)
        with self.store.snapshot() as conn:
            out = _frame(conn, sa.select(
                episodes.c.episode_id, episodes.c.team, episodes.c.therapist_id,
                episodes.c.start_date, clients.c.given_name, clients.c.family_name,
                therapists.c.name.label("therapist"),
                *[c for c in caseload_table.c if c.name not in ("episode_id", "run_id")])
                # Outer joins, as in the ordering query: a block never comes back short.
                .outerjoin(clients, clients.c.client_id == episodes.c.client_id)
                .outerjoin(therapists, therapists.c.therapist_id == episodes.c.therapist_id)
                .outerjoin(caseload_table, caseload_table.c.episode_id == episodes.c.episode_id)
                .where(cond), raw=True)
            # Flags and reviews are read live: a review or a risk answer changes them
            # between computes.
            fl = _frame(conn, _open_flag_counts(flags.c.episode_id.in_(ids)), raw=True)
            rv = _frame(conn, sa.select(reviews.c.review_id, reviews.c.episode_id,
                                        reviews.c.reviewed_at, reviews.c.next_review)
                        .where(reviews.c.episode_id.in_(ids)))
        out["client"] = (out["given_name"].fillna("") + " " +
                         out["family_name"].fillna("")).str.strip()
        out["weeks"] = ((pd.Timestamp(today) - _ts(out["start_date"])).dt.days // 7) \
            .astype("Int64")
        fl = fl.set_index("episode_id")
        for sev in ("urgent", "review", "info"):
            out[f"flags_{sev}"] = out["episode_id"].map(fl[sev]).fillna(0).astype(int)
        out["risk"] = out["episode_id"].map(fl["risk"]).fillna(0).astype(int) > 0
        # The same due date the review_overdue rule judges by.
        _, due = review_due(out[["episode_id", "start_date"]], rv,
                            self.settings.review_overdue_weeks)
        out["next_review"] = due.dt.strftime("%Y-%m-%d").to_numpy()
        position = {e: i for i, e in enumerate(ids)}
        out = out.iloc[np.argsort(out["episode_id"].map(position).to_numpy(), kind="stable")]
        return out.drop(columns=["given_name", "family_name"]).reset_index(drop=True)

    # ------------------------------------------------------------------ client
    def episode(self, viewer: Viewer, episode_id: str) -> dict[str, Any] | None:
        """Everything the client page shows, or None when not visible (= not found)."""
        if not may_see_clients(viewer):
            return None
        with self.store.snapshot() as conn:
            head = conn.execute(sa.select(
                episodes, clients.c.given_name, clients.c.family_name, clients.c.birth_date,
                therapists.c.name.label("therapist"))
                .join(clients, clients.c.client_id == episodes.c.client_id)
                .join(therapists, therapists.c.therapist_id == episodes.c.therapist_id)
                .where(episode_clause(viewer) & (episodes.c.episode_id == episode_id))
            ).mappings().first()
            if head is None:
                return None
            adm = _frame(conn, sa.select(administrations).where(
                administrations.c.episode_id == episode_id)
                .order_by(administrations.c.administered_at))
            oc = _frame(conn, sa.select(outcomes).where(outcomes.c.episode_id == episode_id))
            fl = _frame(conn, sa.select(flags).where(flags.c.episode_id == episode_id)
                        .order_by(flags.c.first_raised))
            gs = _frame(conn, sa.select(goal_status).where(
                goal_status.c.episode_id == episode_id))
            sud = _frame(conn, sa.select(sudden_changes).where(
                sudden_changes.c.episode_id == episode_id))
            rv = _frame(conn, sa.select(reviews).where(reviews.c.episode_id == episode_id)
                        .order_by(reviews.c.reviewed_at.desc()))
            curves = _frame(conn, sa.select(expected_curves))
        fl["order"] = fl["severity"].map(SEVERITY_ORDER)
        return {"episode": dict(head), "administrations": adm, "outcomes": oc,
                "flags": fl.sort_values(["order", "first_raised"]), "goals": gs,
                "sudden": sud, "reviews": rv, "curves": curves}

    def may_see_episode(self, viewer: Viewer, episode_id: str) -> bool:
        """Whether the episode exists and the viewer may see it."""
        if not may_see_clients(viewer):
            return False
        with self.store.snapshot() as conn:
            row = conn.execute(sa.select(episodes.c.episode_id).where(
                episode_clause(viewer) & (episodes.c.episode_id == episode_id))).first()
        return row is not None

    def record_review(self, viewer: Viewer, episode_id: str, **kwargs: Any) -> Any:
        """Record a plan review if (and only if) the viewer may see the episode."""
        from pipeline.reviews import record_review

        visible = {episode_id} if self.may_see_episode(viewer, episode_id) else set()
        return record_review(self.store, episode_id, reviewer=viewer.username,
                             visible_episodes=visible, **kwargs)

    def audit(self, viewer: Viewer, action: str, target: str) -> None:
        from pipeline.users import audit

        audit(self.store, viewer.username, action, target)

    # ------------------------------------------------------------------ service
    def service(self, viewer: Viewer) -> dict[str, pd.DataFrame] | None:
        """SPEC §5 rates overall, by team, by therapist and by month (of the end date)."""
        if not may_see_service(viewer):
            return None
        result: dict[str, pd.DataFrame] = self._cached(("service",), self._service)
        return result

    def _service(self) -> dict[str, pd.DataFrame]:
        cols = ["finished", "at_caseness", *METRICS]
        with self.store.snapshot() as conn:
            # Per-episode SPEC §5 flags are written and summed to cells by compute
            # (team x therapist x month x finished); here the cells are only added up.
            ep = _frame(conn, sa.select(
                service_cells.c.team, service_cells.c.therapist_id,
                service_cells.c.end_month.label("month"), *[service_cells.c[c] for c in cols]),
                raw=True)
        ep[cols] = ep[cols].astype("int64")
        out: dict[str, pd.DataFrame] = {}
        total = ep[cols].sum().to_frame().T.rename(columns={"finished": "finished_episodes"})
        out["overall"] = rates_from_counts(total)
        done = ep[ep["finished"] > 0]
        for key in ("team", "therapist_id", "month"):
            agg = done.groupby(key)[cols].sum().reset_index() \
                .rename(columns={"finished": "finished_episodes"})
            out[key] = rates_from_counts(agg) if not agg.empty else pd.DataFrame()
        with self.store.snapshot() as conn:
            counts = _frame(conn, sa.select(flags.c.kind, flags.c.state,
                                            sa.func.count().label("n"))
                            .group_by(flags.c.kind, flags.c.state))
            acked = _frame(conn, sa.select(flags.c.kind, flags.c.first_raised,
                                           flags.c.acknowledged_at)
                           .where(flags.c.acknowledged_at.is_not(None)))
        table = counts.pivot_table(index="kind", columns="state", values="n",
                                   fill_value=0, aggfunc="sum")
        for state in ("open", "acknowledged", "resolved"):
            if state not in table.columns:
                table[state] = 0
        hours = (_ts(acked["acknowledged_at"]) - _ts(acked["first_raised"])) \
            .dt.total_seconds() / 3600
        table["median_hours_to_review"] = hours.groupby(acked["kind"]).median()
        out["flags"] = table[["open", "acknowledged", "resolved",
                              "median_hours_to_review"]].reset_index()
        return out

    # ------------------------------------------------------------------ quality
    def quality(self, viewer: Viewer) -> dict[str, pd.DataFrame] | None:
        """Batches, quarantine counts, paired-score completeness, compute runs."""
        if not may_see_service(viewer):
            return None
        with self.store.snapshot() as conn:
            bt = _frame(conn, sa.select(batches).order_by(batches.c.batch_id.desc()))
            q = _frame(conn, sa.select(quarantine.c.reason, sa.func.count().label("records"))
                       .group_by(quarantine.c.reason))
            runs = _frame(conn, sa.select(compute_runs).order_by(compute_runs.c.run_id.desc())
                          .limit(20))
            cycles = _frame(conn, sa.select(
                job_runs.c.run_id, job_runs.c.trigger, job_runs.c.status,
                job_runs.c.started_at, job_runs.c.finished_at, job_runs.c.records,
                job_runs.c.accepted, job_runs.c.duplicates, job_runs.c.quarantined,
                job_runs.c.flags_raised, job_runs.c.files, job_runs.c.error)
                .order_by(job_runs.c.run_id.desc()).limit(20))
            missing = _frame(conn, sa.select(flags.c.episode_id, flags.c.message).where(
                (flags.c.kind == "missing_measures") & (flags.c.state == "open")))
            sc = service_cells
            comp = _frame(conn, sa.select(
                sc.c.team, sa.func.sum(sc.c.episodes).label("ended"),
                sa.func.sum(sc.c.finished).label("with_paired_scores"))
                .where(sc.c.end_month.is_not(None)).group_by(sc.c.team).order_by(sc.c.team))
        comp[["ended", "with_paired_scores"]] = comp[["ended", "with_paired_scores"]] \
            .astype("int64")
        comp["completeness"] = comp["with_paired_scores"] / comp["ended"]
        cycles["files"] = [len(json.loads(f or "[]")) for f in cycles["files"]]
        return {"batches": bt, "quarantine": q, "completeness": comp, "runs": runs,
                "missing": missing, "cycles": cycles}

    def quarantined(self, viewer: Viewer, reason: str | None) -> pd.DataFrame:
        """Quarantined records (raw content may identify clients: directors/admins)."""
        if viewer.role not in ("director", "admin"):
            return pd.DataFrame()
        q = sa.select(quarantine.c.quarantine_id, quarantine.c.batch_id, quarantine.c.file,
                      quarantine.c.location, quarantine.c.reason, quarantine.c.detail,
                      quarantine.c.raw).order_by(quarantine.c.quarantine_id).limit(500)
        if reason:
            q = q.where(quarantine.c.reason == reason)
        with self.store.snapshot() as conn:
            return _frame(conn, q)

    # ------------------------------------------------------------------ export
    def export_options(self, viewer: Viewer) -> dict[str, Any] | None:
        """Measures with scores and the range of episode start dates, for the form."""
        if not may_export(viewer):
            return None
        with self.store.snapshot() as conn:
            lo, hi = conn.execute(sa.select(sa.func.min(episodes.c.start_date),
                                            sa.func.max(episodes.c.start_date))).one()
            measures = [r[0] for r in conn.execute(
                sa.select(outcomes.c.measure).distinct().order_by(outcomes.c.measure))]
        return {"first_start": lo, "last_start": hi,
                "measures": [m for m in measures if m in self.registry],
                "default_measures": [self.settings.depression_measure,
                                     self.settings.anxiety_measure]}

    def export(self, viewer: Viewer, *, date_from: date | None, date_to: date | None,
               measures: list[str], k: int, fmt: str) -> tuple[bytes, dict[str, Any]] | None:
        """Run an anonymised export for the viewer, log it, and return (zip, manifest).

        The dataset is what ``ontrack export`` writes (SPEC §10: surrogates, bands,
        k-anonymity); nothing identifiable is read by the page itself.
        """
        if not may_export(viewer):
            return None
        with tempfile.TemporaryDirectory(prefix="ontrack-export-") as tmp:
            res = export_dataset(self.store, self.settings, self.registry, Path(tmp),
                                 date_from=date_from, date_to=date_to, measures=measures,
                                 k=k, fmt=fmt, requested_by=viewer.username,
                                 source="dashboard")
            return zip_export(Path(tmp)), res.manifest

    def export_log(self, viewer: Viewer, limit: int = 20) -> pd.DataFrame:
        """Recent exports: directors and admins see everyone's, researchers their own."""
        if not may_export(viewer):
            return pd.DataFrame()
        q = sa.select(exports_log).order_by(exports_log.c.export_id.desc()).limit(limit)
        if viewer.role == "researcher":
            q = q.where(exports_log.c.username == viewer.username)
        with self.store.snapshot() as conn:
            return _frame(conn, q)


def get_data() -> DataAccess:
    """The app's data access object (set by :func:`dashboard.app.create_app`)."""
    data: DataAccess = current_app.config["ONTRACK_DATA"]
    return data
