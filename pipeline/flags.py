"""Flags (SPEC §8): small pure rules over the outcome tables, and their life cycle.

Each rule takes a :class:`RuleInput` and returns the episodes it fires on, one row per
flag, with the evidence that made it fire (scores, dates, thresholds, the rule and its
parameters) and a plain-words message for the clinician. :func:`refresh` merges a fresh
evaluation into the stored flags:

- a new firing is raised ``open`` (``first_raised`` = now);
- a stored flag that fires again updates ``last_seen`` (the last run that evaluated its
  episode: an incremental run evaluates only episodes whose result may have changed)
  and its evidence; if it was
  ``acknowledged`` by a plan review it reopens only when its evidence is newer than the
  review (a later administration still meets the rule);
- a stored open or acknowledged flag that no longer fires is ``resolved``;
- ``risk_item`` flags are never resolved or acknowledged by these rules: one flag per
  administration whose risk item was endorsed, open until a review records that risk was
  assessed. A missing risk item never clears a risk.

Flags are prompts for a clinician, never a diagnosis.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from scipy import stats

from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.store import bulk_insert, read_frame, to_records
from pipeline.store import flags as flags_table

__all__ = ["FLAG_COLUMNS", "KINDS", "RuleInput", "evaluate", "missing_threshold", "refresh",
           "review_due", "risk_flags"]

#: kind -> default severity (SPEC §8).
KINDS: dict[str, str] = {
    "risk_item": "urgent",
    "reliable_deterioration": "urgent",
    "sudden_loss": "review",
    "not_on_track": "review",
    "stalled": "review",
    "goal_at_risk": "review",
    "goal_overdue": "review",
    "review_overdue": "review",
    "missing_measures": "info",
}
FLAG_COLUMNS = ["episode_id", "measure", "kind", "key", "severity", "rule", "message",
                "evidence", "evidence_at"]


@dataclass
class RuleInput:
    """Everything the rules read. Frames come from the store (or a test)."""

    outcomes: pd.DataFrame  # per episode x measure (pipeline.store.outcomes)
    administrations: pd.DataFrame  # episode_id, measure, administered_at, session_number,
    #                                 score, risk, risk_value
    episodes: pd.DataFrame  # episode_id, therapist_id, start_date, end_date
    sudden: pd.DataFrame  # pipeline.store.sudden_changes
    goals: pd.DataFrame  # pipeline.goals.goal_status output
    reviews: pd.DataFrame  # episode_id, reviewed_at, next_review
    registry: Registry
    settings: Settings
    today: datetime


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    if isinstance(x, (float, np.floating)):
        return f"{x:.{nd}f}".replace("-", "\u2212")
    return str(x)


def _date(x: Any) -> str:
    return pd.Timestamp(x).strftime("%Y-%m-%d") if pd.notna(x) else "n/a"


def _or_none(x: Any) -> Any:
    """Missing (None, NaN or NaT, whichever the read path gave) as JSON null."""
    return None if x is None or x is pd.NaT or (isinstance(x, float) and x != x) else x


def _dt(values: pd.Series) -> pd.Series:
    """Dates/datetimes (possibly all missing) as datetime64[us]."""
    return pd.to_datetime(values.astype("object")).astype("datetime64[us]")


class _Row:
    """One row of :func:`_records`: ``r[column]`` and ``r.get(column)``."""

    __slots__ = ("_columns", "_i")

    def __init__(self, columns: _Columns, i: int) -> None:
        self._columns, self._i = columns, i

    def __getitem__(self, name: str) -> Any:
        return self._columns.values(name)[self._i]

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._columns.frame.columns else default


class _Columns:
    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self._cache: dict[str, list[Any]] = {}

    def values(self, name: str) -> list[Any]:
        if name not in self._cache:
            # The values to_dict(orient="records") gives, for this column only.
            self._cache[name] = self.frame[[name]].to_dict(orient="list")[name]
        return self._cache[name]


def _records(frame: pd.DataFrame) -> list[_Row]:
    """Rows of ``frame`` like ``to_dict(orient="records")``, converting only the columns
    a rule reads (a rule reads a handful of the outcome table's ~60 columns)."""
    columns = _Columns(frame)
    return [_Row(columns, i) for i in range(len(frame))]


def _frame(rows: list[dict[str, Any]], kind: str) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=FLAG_COLUMNS)
    df = pd.DataFrame(rows)
    df["kind"] = kind
    df["evidence"] = [json.dumps(e, sort_keys=True, default=str) for e in df["evidence"]]
    return df[FLAG_COLUMNS]


def _open_ids(inp: RuleInput) -> set[str]:
    e = inp.episodes
    return set(e.loc[e["end_date"].isna(), "episode_id"])


# ------------------------------------------------------------------ the rules

def rule_risk_item(inp: RuleInput) -> pd.DataFrame:
    """Urgent: a risk item (e.g. PHQ-9 item 9) answered above 0."""
    a = inp.administrations
    hit = a[a["risk"] == "yes"]
    rows = []
    for r in _records(hit):  # one row per flag raised, not per episode
        scale = inp.registry[r["measure"]]
        items = ", ".join(f"item {i}" for i in scale.risk_items)
        rows.append({
            "episode_id": r["episode_id"], "measure": r["measure"],
            "key": pd.Timestamp(r["administered_at"]).isoformat(), "severity": "urgent",
            "rule": f"{scale.code} risk item ({items}) > 0",
            "message": f"{scale.code} {items} answered {int(r['risk_value'])} on "
                       f"{_date(r['administered_at'])}"
                       + (f" (session {int(r['session_number'])})"
                          if pd.notna(r.get("session_number")) else "")
                       + ": check risk and the safety plan",
            "evidence": {"administered_at": r["administered_at"],
                         "risk_value": int(r["risk_value"]), "risk_items": list(scale.risk_items),
                         "score": int(r["score"]), "session_number": r.get("session_number")},
            "evidence_at": r["administered_at"],
        })
    return _frame(rows, "risk_item")


def rule_reliable_deterioration(inp: RuleInput) -> pd.DataFrame:
    """Urgent: reliable deterioration from the first to the latest score."""
    o = inp.outcomes
    method = inp.settings.reliable_change_method
    col = "fixed_change" if method == "fixed" else "jt_direction"
    hit = o[o[col] == "deteriorated"]
    z = float(stats.norm.ppf(1 - inp.settings.rci_alpha / 2))
    rows = []
    for r in _records(hit):
        rule = (f"change >= +{_fmt(r['rc_points'], 0)} points (fixed reliable-change rule)"
                if method == "fixed" else
                f"RCI > {z:.3f} (Jacobson-Truax, SD {_fmt(r['sd_used'], 2)}, "
                f"r {_fmt(r['r_used'], 2)})")
        rows.append({
            "episode_id": r["episode_id"], "measure": r["measure"], "key": "",
            "severity": "urgent", "rule": rule,
            "message": f"{r['measure']} has reliably deteriorated: {r['first_score']} on "
                       f"{_date(r['first_at'])} to {r['last_score']} on {_date(r['last_at'])} "
                       f"({_fmt(r['change'], 0)} points, RCI {_fmt(r['rci'], 2)})",
            "evidence": {k: r[k] for k in ("first_score", "first_at", "last_score", "last_at",
                                            "change", "rc_points", "rci", "sd_used", "r_used")},
            "evidence_at": r["last_at"],
        })
    return _frame(rows, "reliable_deterioration")


def rule_sudden_loss(inp: RuleInput) -> pd.DataFrame:
    """Review: a sudden loss (SPEC §6, criteria 1 and 3 mirrored)."""
    s = inp.sudden
    hit = s[s["kind"] == "loss"].merge(inp.outcomes[["episode_id", "measure", "last_at"]],
                                       on=["episode_id", "measure"], how="left")
    rows = [{
        "episode_id": r["episode_id"], "measure": r["measure"],
        "key": str(int(r["pregain_session"])), "severity": "review",
        "rule": "sudden loss: rise >= reliable-change points and t criterion (Lutz 2013)",
        "message": f"{r['measure']} rose suddenly from {_fmt(r['score_before'], 0)} to "
                   f"{_fmt(r['score_after'], 0)} between sessions {int(r['pregain_session'])} "
                   f"and {int(r['pregain_session']) + 1}",
        "evidence": {k: r[k] for k in ("pregain_session", "score_before", "score_after",
                                        "size", "n_pre", "n_post", "crit3_adjusted")},
        "evidence_at": r["last_at"],
    } for r in _records(hit)]
    return _frame(rows, "sudden_loss")


def rule_not_on_track(inp: RuleInput) -> pd.DataFrame:
    """Review (urgent when two consecutive): latest score beyond the expected curve."""
    o = inp.outcomes
    hit = o[o["not_on_track"].astype("boolean").fillna(False).astype(bool)]
    pct = int(round(100 * inp.settings.curve_percentile))
    rows = []
    for r in _records(hit):
        twice = bool(r["not_on_track_consecutive"])
        rows.append({
            "episode_id": r["episode_id"], "measure": r["measure"], "key": "",
            "severity": "urgent" if twice else "review",
            "rule": f"score above the {pct}th percentile of the expected recovery curve "
                    f"(from administration {inp.settings.not_on_track_from})",
            "message": f"{r['measure']} {r['last_score']} at administration {r['k_last']} is "
                       f"above the expected range (median {_fmt(r['expected_median'])}, "
                       f"{pct}th percentile {_fmt(r['expected_upper'])}, {r['band']} at start)"
                       + ("; also at the previous administration" if twice else ""),
            "evidence": {k: r[k] for k in ("k_last", "last_score", "last_at", "band",
                                            "expected_median", "expected_upper",
                                            "expected_lower", "curve_source",
                                            "not_on_track_consecutive")},
            "evidence_at": r["last_at"],
        })
    return _frame(rows, "not_on_track")


def rule_stalled(inp: RuleInput) -> pd.DataFrame:
    """Review: >= 4 administrations over >= 4 weeks, no reliable improvement, flat trend."""
    o = inp.outcomes
    st = inp.settings
    hit = o[o["stalled"].astype("boolean").fillna(False).astype(bool)]
    rows = [{
        "episode_id": r["episode_id"], "measure": r["measure"], "key": "", "severity": "review",
        "rule": f">= {st.stalled_min_administrations} administrations over >= "
                f"{_fmt(st.stalled_min_weeks, 0)} weeks, no reliable improvement, and slope "
                f"95% CI includes 0 or slope > {_fmt(st.stalled_slope_per_week, 2)}/week",
        "message": f"{r['measure']} has not reliably improved after {r['n']} administrations "
                   f"over {_fmt(r['weeks'], 0)} weeks; slope {_fmt(r['slope_week'])}/week, "
                   f"95% CI {_fmt(r['slope_ci_low'])} to {_fmt(r['slope_ci_high'])}",
        "evidence": {k: r[k] for k in ("n", "weeks", "first_score", "last_score", "change",
                                        "slope_week", "slope_ci_low", "slope_ci_high",
                                        "stalled_slow_slope", "stalled_ci_includes_zero")},
        "evidence_at": r["last_at"],
    } for r in _records(hit)]
    return _frame(rows, "stalled")


def _goal_rule(inp: RuleInput, status: str, kind: str) -> pd.DataFrame:
    g = inp.goals
    if g.empty:
        return _frame([], kind)
    hit = g[(g["status"] == status) & g["episode_id"].isin(_open_ids(inp))]
    rows = [{
        "episode_id": r["episode_id"], "measure": r["measure"], "key": str(r["goal_id"]),
        "severity": "review",
        "rule": f"goal {r['kind']} {_fmt(r['target'], 0)} on {r['measure']}, due "
                f"{_date(r['due_at'])}: status {status}",
        "message": f"Goal {r['goal_id']} ({r.get('description') or r['kind']}) is "
                   f"{status.replace('_', ' ')}: {r['status_reason']}"
                   + (f"; projected {_date(r['projected_at'])} (range "
                      f"{_date(r['projected_earliest'])} to {_date(r['projected_latest'])})"
                      if pd.notna(r["projected_at"]) else ""),
        # Scores are integers: written as such whether or not another goal of the batch
        # had no score (which would make the column float).
        "evidence": {**{k: r.get(k) for k in ("goal_id", "kind", "target", "boundary",
                                               "due_at", "slope_week", "projected_at",
                                               "projected_earliest", "projected_latest",
                                               "status_reason")},
                     "last_score": None if pd.isna(r.get("last_score"))
                     else int(r["last_score"])},
        "evidence_at": r["last_at"],
    } for r in _records(hit)]
    return _frame(rows, kind)


def rule_goal_at_risk(inp: RuleInput) -> pd.DataFrame:
    """Review: an open episode's goal is projected to miss its due date."""
    return _goal_rule(inp, "at_risk", "goal_at_risk")


def rule_goal_overdue(inp: RuleInput) -> pd.DataFrame:
    """Review: an open episode's goal is past due and not met."""
    return _goal_rule(inp, "overdue", "goal_overdue")


def rule_review_overdue(inp: RuleInput) -> pd.DataFrame:
    """Review: no plan review in N weeks (or past the next review date set)."""
    weeks = inp.settings.review_overdue_weeks
    e, due = review_due(inp.episodes[inp.episodes["end_date"].isna()], inp.reviews, weeks)
    today = pd.Timestamp(inp.today)
    hit = e[(due < today.normalize()).to_numpy()]
    due_hit = due[(due < today.normalize()).to_numpy()]
    rows = [{
        "episode_id": r["episode_id"], "measure": "", "key": "", "severity": "review",
        "rule": f"no plan review for {weeks} weeks, or past the next review date",
        "message": f"Plan review overdue since {_date(d)} (last review "
                   f"{_date(r['last_review']) if pd.notna(r['last_review']) else 'never'})",
        "evidence": {"last_review": _or_none(r["last_review"]), "start_date": r["start_date"],
                     "review_due": d, "weeks": weeks},
        "evidence_at": d,
    } for r, d in zip(_records(hit), due_hit, strict=True)]
    return _frame(rows, "review_overdue")


def review_due(episodes: pd.DataFrame, reviews: pd.DataFrame, weeks: float
               ) -> tuple[pd.DataFrame, pd.Series]:
    """When each episode's plan review falls due: the next review date set at the latest
    review, else ``weeks`` after the latest review (or the start). Returns the episodes
    with ``last_review``/``next_review`` and the due dates."""
    ordered = reviews.sort_values("review_id", kind="stable") if "review_id" in reviews \
        else reviews
    # The latest review's own next date: an earlier review's date is superseded even
    # when the latest one set none (groupby "last" would skip to it).
    latest = ordered.drop_duplicates("episode_id", keep="last").set_index("episode_id")
    last = pd.DataFrame({"last_review": ordered.groupby("episode_id")["reviewed_at"].max(),
                         "next_review": latest["next_review"]})
    e = episodes.merge(last, left_on="episode_id", right_index=True, how="left")
    since = _dt(e["last_review"]).fillna(_dt(e["start_date"]))
    return e, _dt(e["next_review"]).fillna(since + pd.Timedelta(weeks=weeks))


def missing_threshold(episodes: pd.DataFrame, last_score_at: pd.Series, weeks: float
                      ) -> tuple[pd.Series, pd.Series]:
    """(latest score or else start, the moment ``weeks`` after it) per episode row;
    ``last_score_at`` is indexed by episode id."""
    # reindex, not map: map of an empty datetime Series fails in pandas 3.
    last_of = pd.Series(last_score_at.reindex(episodes["episode_id"].to_numpy()).to_numpy(),
                        index=episodes.index)
    since = _dt(last_of).fillna(_dt(episodes["start_date"]))
    return since, since + pd.Timedelta(weeks=weeks)


def rule_missing_measures(inp: RuleInput) -> pd.DataFrame:
    """Info: an open episode with no score in N weeks."""
    e = inp.episodes[inp.episodes["end_date"].isna()]
    weeks = inp.settings.missing_measures_weeks
    last = inp.administrations.groupby("episode_id")["administered_at"].max()
    since, threshold = missing_threshold(e, last, weeks)
    hit_mask = (threshold < pd.Timestamp(inp.today)).to_numpy()
    rows = [{
        "episode_id": r["episode_id"], "measure": "", "key": "", "severity": "info",
        "rule": f"open episode with no score for {weeks} weeks",
        "message": f"No outcome measure since {_date(s)}",
        "evidence": {"last_administration": s, "weeks": weeks},
        "evidence_at": t,
    } for r, s, t in zip(_records(e[hit_mask]), since[hit_mask],
                         threshold[hit_mask], strict=True)]
    return _frame(rows, "missing_measures")


RULES: dict[str, Callable[[RuleInput], pd.DataFrame]] = {
    "risk_item": rule_risk_item,
    "reliable_deterioration": rule_reliable_deterioration,
    "sudden_loss": rule_sudden_loss,
    "not_on_track": rule_not_on_track,
    "stalled": rule_stalled,
    "goal_at_risk": rule_goal_at_risk,
    "goal_overdue": rule_goal_overdue,
    "review_overdue": rule_review_overdue,
    "missing_measures": rule_missing_measures,
}


def evaluate(inp: RuleInput, kinds: list[str] | None = None) -> pd.DataFrame:
    """Run the rules (all by default); one row per firing flag."""
    frames = [RULES[k](inp) for k in (kinds or list(RULES))]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=FLAG_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def risk_flags(accepted: pd.DataFrame, registry: Registry) -> pd.DataFrame:
    """``risk_item`` flags of freshly accepted administrations (used during ingest)."""
    a = accepted[accepted["risk"] == "yes"]
    if a.empty:
        return pd.DataFrame(columns=FLAG_COLUMNS)
    inp = RuleInput(outcomes=pd.DataFrame(), administrations=a, episodes=pd.DataFrame(),
                    sudden=pd.DataFrame(), goals=pd.DataFrame(), reviews=pd.DataFrame(),
                    registry=registry, settings=Settings(), today=datetime.now())
    return rule_risk_item(inp)


# ------------------------------------------------------------------ life cycle

_IDENTITY = ["episode_id", "measure", "kind", "key"]



def refresh(conn: sa.Connection, firing: pd.DataFrame, now: datetime,
            episodes: set[str] | None = None, kinds: list[str] | None = None,
            resolve_missing: bool = True) -> dict[str, int]:
    """Merge a fresh evaluation into the stored flags (see the module docstring).

    Parameters
    ----------
    firing
        Output of :func:`evaluate` (or :func:`risk_flags`).
    episodes, kinds
        The scope that was evaluated: stored flags outside it are left alone. None means
        everything.
    resolve_missing
        Resolve stored flags in scope that did not fire (False when only adding, e.g. the
        risk flags raised during ingest).

    Returns
    -------
    dict
        Counts: ``raised``, ``reopened``, ``updated``, ``resolved``.
    """
    cols = [flags_table.c[c] for c in ("flag_id", "episode_id", "measure", "kind", "key",
                                        "state", "acknowledged_at", "severity", "message",
                                        "evidence")]
    q = sa.select(*cols)
    if kinds is not None:
        q = q.where(flags_table.c.kind.in_(kinds))
    if episodes is None:
        stored = read_frame(conn, q)
    else:
        ids = sorted(episodes)
        parts = [read_frame(conn, q.where(flags_table.c.episode_id.in_(ids[i:i + 900])))
                 for i in range(0, len(ids), 900)]
        stored = pd.concat(parts, ignore_index=True) if parts else read_frame(
            conn, q.where(sa.false()))
    f = firing.copy()
    f["evidence_at"] = pd.to_datetime(f["evidence_at"])
    m = f.merge(stored[[*_IDENTITY, "flag_id", "state", "acknowledged_at"]].assign(
        _sig=stored["severity"].astype(str) + "|" + stored["message"].astype(str) + "|" +
        stored["evidence"].astype(str)), on=_IDENTITY, how="left")
    counts = {"raised": 0, "reopened": 0, "updated": 0, "resolved": 0}
    new = m[m["flag_id"].isna()]
    if not new.empty:
        rows = new[FLAG_COLUMNS].assign(first_raised=now, last_seen=now, state="open")
        bulk_insert(conn, flags_table, rows)  # the store's bulk path (COPY on PostgreSQL)
        counts["raised"] = len(new)
    old = m[m["flag_id"].notna()]
    if not old.empty:
        ack_at = pd.to_datetime(old["acknowledged_at"])
        reopen = ((old["state"] == "acknowledged") & (old["evidence_at"] > ack_at)) | \
            (old["state"] == "resolved")
        # Unchanged flags only get last_seen, in bulk; the others one executemany each.
        same = (old["severity"].astype(str) + "|" + old["message"].astype(str) + "|" +
                old["evidence"].astype(str)) == old["_sig"]
        quiet = [int(x) for x in old.loc[same & ~reopen, "flag_id"]]
        for i in range(0, len(quiet), 900):
            conn.execute(flags_table.update().where(flags_table.c.flag_id.in_(
                quiet[i:i + 900])).values(last_seen=now))
        old, reopen = old[~same | reopen], reopen[~same | reopen]
        recs = to_records(old[["flag_id", "severity", "rule", "message", "evidence",
                             "evidence_at"]])
        stmt = flags_table.update().where(flags_table.c.flag_id == sa.bindparam("fid"))
        keep: list[dict[str, Any]] = []
        reopened: list[dict[str, Any]] = []
        for rec, reo in zip(recs, reopen.to_numpy(), strict=True):
            params = {"fid": int(rec.pop("flag_id")), **rec, "last_seen": now}
            (reopened if reo else keep).append(params)
        if keep:
            conn.execute(stmt.values(
                severity=sa.bindparam("severity"), rule=sa.bindparam("rule"),
                message=sa.bindparam("message"), evidence=sa.bindparam("evidence"),
                evidence_at=sa.bindparam("evidence_at"),
                last_seen=sa.bindparam("last_seen")), keep)
        if reopened:
            conn.execute(stmt.values(
                severity=sa.bindparam("severity"), rule=sa.bindparam("rule"),
                message=sa.bindparam("message"), evidence=sa.bindparam("evidence"),
                evidence_at=sa.bindparam("evidence_at"), last_seen=sa.bindparam("last_seen"),
                state="open", resolved_at=None), reopened)
        counts["reopened"] = int(reopen.sum())
        counts["updated"] = len(old) - counts["reopened"] + len(quiet)
    if resolve_missing and not stored.empty:
        live = stored[(stored["state"] != "resolved") & (stored["kind"] != "risk_item")]
        key = [c for c in _IDENTITY]
        hit = live[key].astype(str).merge(f[key].astype(str).drop_duplicates(), on=key,
                                          how="left", indicator=True)["_merge"].to_numpy()
        gone = [int(x) for x in live["flag_id"].to_numpy()[hit == "left_only"]]
        for i in range(0, len(gone), 900):
            conn.execute(flags_table.update().where(flags_table.c.flag_id.in_(
                gone[i:i + 900])).values(state="resolved", resolved_at=now))
        counts["resolved"] = len(gone)
    return counts
