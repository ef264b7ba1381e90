"""Flags (SPEC §8): small pure rules over the outcome tables, and their life cycle.

Each rule takes a :class:`RuleInput` and returns the episodes it fires on, one row per
flag, with the evidence that made it fire (scores, dates, thresholds, the rule and its
parameters) and a plain-words message for the clinician. :func:`refresh` merges a fresh
evaluation into the stored flags:

- a new firing is raised ``open`` (``first_raised`` = now);
- a stored flag that fires again with another text (severity, rule, message, evidence)
  is rewritten, ``last_seen`` = now; if it was ``acknowledged`` by a plan review it
  reopens only when its evidence is newer than the review (a later administration
  still meets the rule). One that fires unchanged is not written;
- a stored open or acknowledged flag that no longer fires is ``resolved``, ``last_seen``
  = the clock of the run before (it fired then);
- so a live (open or acknowledged) flag holds as of the latest run: an incremental run
  leaves the store as a full evaluation at its clock would. Its ``last_seen`` is when
  it was last written; ``ontrack flags`` reports the latest run's clock for it;
- ``risk_item`` flags are never resolved or acknowledged by these rules: one flag per
  administration whose risk item was endorsed, open until a review records that risk was
  assessed. A missing risk item never clears a risk.

Flags are prompts for a clinician, never a diagnosis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, datetime
from functools import cached_property
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from scipy import special  # not scipy.stats: 0.15 s to load instead of 0.7 s

from pipeline.columns import is_in, one_chunk, to_datetimes
from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.store import bulk_insert, bulk_read, bulk_update, iter_frames
from pipeline.store import flags as flags_table

__all__ = ["FLAG_COLUMNS", "KINDS", "RuleInput", "encode_evidence", "evaluate",
           "missing_threshold", "refresh", "review_due", "risk_flags", "stable_until"]

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

    @cached_property
    def last_administered(self) -> pd.Series:
        """Latest administration per episode (indexed by episode id), grouped once for
        the rules and :func:`stable_until` that need it."""
        return self.administrations.groupby("episode_id")["administered_at"].max()

    def slim(self) -> RuleInput:
        """The same input holding only the administrations a rule reads row by row (an
        endorsed risk item: ``risk == "yes"``), with :attr:`last_administered` taken
        from all of them first. Every rule and :func:`stable_until` give the same result
        on it; a full compute's 10M administrations (~0.7 GB) need not outlive the
        goal status, which reads them all."""
        last = self.last_administered
        a = self.administrations
        out = replace(self, administrations=a[(a["risk"] == "yes").to_numpy()])
        out.__dict__["last_administered"] = last  # the cached_property's slot
        return out


def _fmt(x: Any, nd: int = 1) -> str:
    if isinstance(x, (float, np.floating)):
        # x != x: NaN (np.isnan on a Python float costs more than the formatting)
        return "n/a" if x != x else f"{x:.{nd}f}".replace("-", "\u2212")
    return "n/a" if x is None else str(x)


def _date(x: Any) -> str:
    # Timestamps and datetimes (nearly every value) from their fields: strftime took
    # ~4 us a value, 2.5 s over a full compute's 560k dates. NaT is a datetime too.
    if isinstance(x, datetime) and x is not pd.NaT:
        return f"{x.year}-{x.month:02d}-{x.day:02d}"  # as glibc's %Y: no padding < 1000
    return pd.Timestamp(x).strftime("%Y-%m-%d") if pd.notna(x) else "n/a"


def _or_none(x: Any) -> Any:
    """Missing (None, NaN or NaT, whichever the read path gave) as JSON null."""
    return None if x is None or x is pd.NaT or (isinstance(x, float) and x != x) else x


def _dt(values: pd.Series) -> pd.Series:
    """Dates/datetimes (possibly all missing) as datetime64[us]."""
    return to_datetimes(values.astype("object")).astype("datetime64[us]")


def _list(col: pd.Series) -> list[Any]:
    # numpy numbers, booleans and datetimes, and text: tolist gives the values to_dict
    # gives (Python scalars, Timestamps, NaN/NaT), without to_dict's per-value boxing.
    # Nullable and object columns go through to_dict: it gives None for a missing value
    # of a nullable column (tolist keeps pd.NA, which the evidence JSON would write as
    # "<NA>") and Python scalars for numpy ones in an object column.
    if (isinstance(col.dtype, np.dtype) and col.dtype.kind in "biufM") or col.dtype == "str":
        return col.tolist()
    if col.dtype == object:
        # Python scalars and None already (the stored booleans): to_dict boxes each
        # value again (0.5 s of a 10M full compute's rules) and gives the same list.
        values = col.to_numpy()
        if set(map(type, values)) <= _PLAIN:
            return values.tolist()
    return col.to_frame().to_dict(orient="list")[col.name]


#: Types that ``to_dict`` gives back unchanged from an object column.
_PLAIN = {bool, int, float, str, type(None)}


def _lists(frame: pd.DataFrame, names: list[str]) -> dict[str, list[Any]]:
    """The named columns as Python lists (the values ``to_dict(orient="records")``
    gives), converting only the columns a rule reads (of the outcome table's ~60)."""
    return {n: _list(frame[n]) if n in frame.columns else [None] * len(frame)
            for n in names}


def _frame(columns: dict[str, Any], evidence: list[dict[str, Any]], kind: str
           ) -> pd.DataFrame:
    """Flags of one rule from its columns (lists, arrays, Arrow text from
    :func:`_join`, or one value for every flag)."""
    if not evidence:
        return pd.DataFrame(columns=FLAG_COLUMNS)
    n = len(evidence)
    encode = _evidence_encoder()
    df = pd.DataFrame({
        **{k: pd.array(v, dtype="str") if isinstance(v, pa.Array | pa.ChunkedArray) else
           v.array if isinstance(v, pd.Series) else v for k, v in columns.items()},
        "kind": kind,
        # Straight to Arrow text: a list of Python str went through pandas' per-value
        # string checks (0.35 s for 320k flags).
        "evidence": pd.array(pa.array([encode(e) for e in evidence], type=pa.large_string()),
                             dtype="str")}, index=pd.RangeIndex(n))
    return df[FLAG_COLUMNS]


def _fmt_col(values: pd.Series, nd: int = 1) -> pa.Array:
    """:func:`_fmt` of every value of a column, as Arrow text: the same text (floats by
    ``str.format`` with ``nd`` decimals, a minus sign, ``n/a`` for NaN; integers as
    ``str``), made without a Python call per value for float and integer columns."""
    dtype = values.dtype
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        x = values.to_numpy()
        text = pa.array(list(map(f"{{:.{nd}f}}".format, x.tolist())), type=pa.large_string())
        text = pc.replace_substring(text, "-", "\u2212")
        return pc.if_else(pa.array(np.isnan(x)), pa.scalar("n/a", pa.large_string()), text)
    return _str_col(values, fmt=lambda v: _fmt(v, nd))


def _str_col(values: pd.Series, fmt: Callable[[Any], str] = str) -> pa.Array:
    """``fmt`` (``str`` by default, as an f-string's ``{value}``) of every value of a
    column as Arrow text; integers are cast by Arrow (the same decimal text)."""
    dtype = values.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "iu":
        return pc.cast(pa.array(values.to_numpy()), pa.large_string())
    if fmt is str and dtype == "str" and not values.isna().any():
        return pc.cast(pa.array(values.array), pa.large_string())  # the text itself
    return pa.array([fmt(v) for v in _list(values)], type=pa.large_string())


def _date_col(values: pd.Series) -> pa.Array:
    """:func:`_date` of every value of a column, as Arrow text (a datetime column of
    years 1000-9999, whose ISO text is the same, without a Python call per value)."""
    if isinstance(values.dtype, np.dtype) and values.dtype.kind == "M":
        x = values.to_numpy()
        ok = ~np.isnat(x)
        years = x[ok].astype("datetime64[Y]").astype(np.int64) + 1970
        if not years.size or (years.min() >= 1000 and years.max() <= 9999):
            text = pa.array(np.datetime_as_string(x, unit="D"), type=pa.large_string())
            return pc.if_else(pa.array(ok), text, pa.scalar("n/a", pa.large_string()))
    return pa.array([_date(v) for v in _list(values)], type=pa.large_string())


def _pick(mask: pa.Array, yes: str, no: str) -> pa.Array:
    """``yes`` where ``mask`` holds, else ``no``, as Arrow text."""
    return pc.if_else(mask, pa.scalar(yes, pa.large_string()), pa.scalar(no, pa.large_string()))


def _join(*parts: Any) -> pa.Array:
    """Texts joined flag by flag: each part an Arrow text array (one value per flag) or
    one ``str`` for all."""
    return pc.binary_join_element_wise(
        *(pa.scalar(p, pa.large_string()) if isinstance(p, str) else p for p in parts),
        pa.scalar("", pa.large_string()))


def _evidence_value(x: Any) -> Any:
    # orjson's fallback for what it does not write itself: a missing date is null (not
    # "NaT"); a date or time reads as str() gives it ("2026-01-05 10:00:00").
    if isinstance(x, np.datetime64):
        x = pd.Timestamp(x)
    if x is pd.NaT or x is pd.NA:
        return None
    if isinstance(x, (datetime, date)):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


_EVIDENCE_JSON = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


def encode_evidence(evidence: dict[str, Any]) -> str:
    """A flag's evidence as JSON text: keys sorted, a missing value (None, NaN, NaT) as
    ``null``, dates as ``YYYY-MM-DD[ HH:MM:SS]``. By orjson: json's encoder took 5.7 s of
    a 10M full compute for 919k flags. Unlike ``json.dumps`` it never writes ``NaN``,
    which is not JSON (a browser's ``JSON.parse`` rejects it)."""
    return orjson.dumps(evidence, default=_evidence_value, option=_EVIDENCE_JSON).decode()


def _evidence_encoder() -> Callable[[dict[str, Any]], str]:
    """:func:`encode_evidence` for one rule's flags, writing each distinct date once.

    ``str`` of a Timestamp takes ~2 us, and a rule's flags repeat few dates (scores are
    recorded to the hour): a dict with two dates took 4.8 us to encode, 1.1 us with
    their text remembered. Only dates are remembered: equal numbers of other types
    (``True == 1``) would share one text."""
    memo: dict[datetime, str] = {}

    def default(x: Any) -> Any:
        if isinstance(x, datetime) and x is not pd.NaT:
            text = memo.get(x)
            if text is None:
                text = memo[x] = str(x)
            return text
        return _evidence_value(x)

    def encode(evidence: dict[str, Any]) -> str:
        return orjson.dumps(evidence, default=default, option=_EVIDENCE_JSON).decode()

    return encode


def _open_ids(inp: RuleInput) -> set[str]:
    e = inp.episodes
    return set(e.loc[e["end_date"].isna(), "episode_id"])


# ------------------------------------------------------------------ the rules

def rule_risk_item(inp: RuleInput) -> pd.DataFrame:
    """Urgent: a risk item (e.g. PHQ-9 item 9) answered above 0."""
    a = inp.administrations
    hit = a[a["risk"] == "yes"]  # one row per flag raised, not per episode
    c = _lists(hit, ["episode_id", "measure", "administered_at", "risk_value", "score",
                     "session_number"])
    scales = {m: inp.registry[m] for m in set(c["measure"])}
    items = {m: ", ".join(f"item {i}" for i in s.risk_items) for m, s in scales.items()}
    at = c["administered_at"]
    return _frame({
        "episode_id": c["episode_id"], "measure": c["measure"],
        "key": [pd.Timestamp(t).isoformat() for t in at], "severity": "urgent",
        "rule": [f"{scales[m].code} risk item ({items[m]}) > 0" for m in c["measure"]],
        "message": [f"{scales[m].code} {items[m]} answered {int(v)} on {_date(t)}"
                    + (f" (session {int(sn)})" if pd.notna(sn) else "")
                    + ": check risk and the safety plan"
                    for m, v, t, sn in zip(c["measure"], c["risk_value"], at,
                                           c["session_number"], strict=True)],
        "evidence_at": at,
    }, [{"administered_at": t, "risk_value": int(v), "risk_items": list(scales[m].risk_items),
         "score": int(y), "session_number": sn}
        for m, v, t, y, sn in zip(c["measure"], c["risk_value"], at, c["score"],
                                  c["session_number"], strict=True)], "risk_item")


def rule_reliable_deterioration(inp: RuleInput) -> pd.DataFrame:
    """Urgent: reliable deterioration from the first to the latest score."""
    o = inp.outcomes
    method = inp.settings.reliable_change_method
    col = "fixed_change" if method == "fixed" else "jt_direction"
    hit = o[o[col] == "deteriorated"]
    z = float(special.ndtri(1 - inp.settings.rci_alpha / 2))  # norm.ppf
    keys = ("first_score", "first_at", "last_score", "last_at", "change", "rc_points", "rci",
            "sd_used", "r_used")
    c = _lists(hit, list(keys))
    rule = [f"change >= +{_fmt(p, 0)} points (fixed reliable-change rule)"
            for p in c["rc_points"]] if method == "fixed" else \
        [f"RCI > {z:.3f} (Jacobson-Truax, SD {_fmt(sd, 2)}, r {_fmt(r, 2)})"
         for sd, r in zip(c["sd_used"], c["r_used"], strict=True)]
    return _frame({
        "episode_id": hit["episode_id"], "measure": hit["measure"], "key": "",
        "severity": "urgent", "rule": rule,
        "message": _join(_str_col(hit["measure"]), " has reliably deteriorated: ",
                         _str_col(hit["first_score"]), " on ", _date_col(hit["first_at"]),
                         " to ", _str_col(hit["last_score"]), " on ",
                         _date_col(hit["last_at"]), " (", _fmt_col(hit["change"], 0),
                         " points, RCI ", _fmt_col(hit["rci"], 2), ")"),
        "evidence_at": hit["last_at"],
    }, _evidence(c, keys), "reliable_deterioration")


def _evidence(c: dict[str, list[Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """One evidence dict per flag from the columns ``keys`` of ``c``."""
    return [dict(zip(keys, values, strict=True))
            for values in zip(*(c[k] for k in keys), strict=True)]


def rule_sudden_loss(inp: RuleInput) -> pd.DataFrame:
    """Review: a sudden loss (SPEC §6, criteria 1 and 3 mirrored)."""
    s = inp.sudden
    hit = s[s["kind"] == "loss"].merge(inp.outcomes[["episode_id", "measure", "last_at"]],
                                       on=["episode_id", "measure"], how="left")
    keys = ("pregain_session", "score_before", "score_after", "size", "n_pre", "n_post",
            "crit3_adjusted")
    c = _lists(hit, ["episode_id", "measure", "last_at", *keys])
    return _frame({
        "episode_id": c["episode_id"], "measure": c["measure"],
        "key": [str(int(j)) for j in c["pregain_session"]], "severity": "review",
        "rule": "sudden loss: rise >= reliable-change points and t criterion (Lutz 2013)",
        "message": [f"{m} rose suddenly from {_fmt(b, 0)} to {_fmt(a, 0)} between sessions "
                    f"{int(j)} and {int(j) + 1}"
                    for m, b, a, j in zip(c["measure"], c["score_before"], c["score_after"],
                                          c["pregain_session"], strict=True)],
        "evidence_at": c["last_at"],
    }, _evidence(c, keys), "sudden_loss")


def rule_not_on_track(inp: RuleInput) -> pd.DataFrame:
    """Review (urgent when two consecutive): latest score beyond the expected curve."""
    o = inp.outcomes
    hit = o[o["not_on_track"].astype("boolean").fillna(False).astype(bool)]
    pct = int(round(100 * inp.settings.curve_percentile))
    keys = ("k_last", "last_score", "last_at", "band", "expected_median", "expected_upper",
            "expected_lower", "curve_source", "not_on_track_consecutive")
    c = _lists(hit, list(keys))
    twice = pa.array([bool(t) for t in c["not_on_track_consecutive"]], type=pa.bool_())
    # Column by column (the flags of a full run: ~190k).
    message = _join(_str_col(hit["measure"]), " ", _str_col(hit["last_score"]),
                    " at administration ", _str_col(hit["k_last"]),
                    " is above the expected range (median ", _fmt_col(hit["expected_median"]),
                    f", {pct}th percentile ", _fmt_col(hit["expected_upper"]), ", ",
                    _str_col(hit["band"]), " at start)",
                    _pick(twice, "; also at the previous administration", ""))
    return _frame({
        "episode_id": hit["episode_id"], "measure": hit["measure"], "key": "",
        "severity": _pick(twice, "urgent", "review"),
        "rule": f"score above the {pct}th percentile of the expected recovery curve "
                f"(from administration {inp.settings.not_on_track_from})",
        "message": message, "evidence_at": hit["last_at"],
    }, _evidence(c, keys), "not_on_track")


def rule_stalled(inp: RuleInput) -> pd.DataFrame:
    """Review: >= 4 administrations over >= 4 weeks, no reliable improvement, flat trend."""
    o = inp.outcomes
    st = inp.settings
    hit = o[o["stalled"].astype("boolean").fillna(False).astype(bool)]
    keys = ("n", "weeks", "first_score", "last_score", "change", "slope_week",
            "slope_ci_low", "slope_ci_high", "stalled_slow_slope", "stalled_ci_includes_zero")
    c = _lists(hit, list(keys))
    # The message column by column (the flags of a full run: ~320k).
    message = _join(_str_col(hit["measure"]), " has not reliably improved after ",
                    _str_col(hit["n"]), " administrations over ", _fmt_col(hit["weeks"], 0),
                    " weeks; slope ", _fmt_col(hit["slope_week"]), "/week, 95% CI ",
                    _fmt_col(hit["slope_ci_low"]), " to ", _fmt_col(hit["slope_ci_high"]))
    return _frame({
        "episode_id": hit["episode_id"], "measure": hit["measure"], "key": "",
        "severity": "review",
        "rule": f">= {st.stalled_min_administrations} administrations over >= "
                f"{_fmt(st.stalled_min_weeks, 0)} weeks, no reliable improvement, and slope "
                f"95% CI includes 0 or slope > {_fmt(st.stalled_slope_per_week, 2)}/week",
        "message": message, "evidence_at": hit["last_at"],
    }, _evidence(c, keys), "stalled")


def _goal_rule(inp: RuleInput, status: str, kind: str) -> pd.DataFrame:
    g = inp.goals
    if g.empty:
        return _frame({}, [], kind)
    hit = g[(g["status"] == status) & g["episode_id"].isin(_open_ids(inp))]
    keys = ("goal_id", "kind", "target", "boundary", "due_at", "slope_week", "projected_at",
            "projected_earliest", "projected_latest", "status_reason")
    c = _lists(hit, ["episode_id", "measure", "description", "last_score", "last_at",
                     *keys])
    evidence = _evidence(c, keys)
    # Scores are integers: written as such whether or not another goal of the batch had
    # no score (which would make the column float).
    for e, y in zip(evidence, c["last_score"], strict=True):
        e["last_score"] = None if pd.isna(y) else int(y)
    said = status.replace("_", " ")
    return _frame({
        "episode_id": c["episode_id"], "measure": c["measure"],
        "key": [str(x) for x in c["goal_id"]], "severity": "review",
        "rule": [f"goal {k} {_fmt(t, 0)} on {m}, due {_date(d)}: status {status}"
                 for k, t, m, d in zip(c["kind"], c["target"], c["measure"], c["due_at"],
                                       strict=True)],
        "message": [f"Goal {gid} ({desc or k}) is {said}: {why}"
                    + (f"; projected {_date(p)} (range {_date(pe)} to {_date(pl)})"
                       if pd.notna(p) else "")
                    for gid, desc, k, why, p, pe, pl in zip(
                        c["goal_id"], c["description"], c["kind"], c["status_reason"],
                        c["projected_at"], c["projected_earliest"], c["projected_latest"],
                        strict=True)],
        "evidence_at": c["last_at"],
    }, evidence, kind)


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
    late = (due < today.normalize()).to_numpy()
    c = _lists(e[late], ["episode_id", "last_review", "start_date"])
    due_hit = list(due[late])
    return _frame({
        "episode_id": c["episode_id"], "measure": "", "key": "", "severity": "review",
        "rule": f"no plan review for {weeks} weeks, or past the next review date",
        "message": [f"Plan review overdue since {_date(d)} (last review "
                    f"{_date(r) if pd.notna(r) else 'never'})"
                    for d, r in zip(due_hit, c["last_review"], strict=True)],
        "evidence_at": due_hit,
    }, [{"last_review": _or_none(r), "start_date": s, "review_due": d, "weeks": weeks}
        for r, s, d in zip(c["last_review"], c["start_date"], due_hit, strict=True)],
        "review_overdue")


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
    # As datetimes: the drivers give text (SQLite) or datetime objects (PostgreSQL), and
    # the evidence must read the same whichever store it came from.
    last = pd.DataFrame({"last_review": _dt(ordered.groupby("episode_id")["reviewed_at"].max()),
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
    last = inp.last_administered
    since, threshold = missing_threshold(e, last, weeks)
    hit_mask = (threshold < pd.Timestamp(inp.today)).to_numpy()
    since_hit = list(since[hit_mask])
    return _frame({
        "episode_id": e["episode_id"].to_numpy()[hit_mask].tolist(), "measure": "",
        "key": "", "severity": "info",
        "rule": f"open episode with no score for {weeks} weeks",
        "message": [f"No outcome measure since {_date(x)}" for x in since_hit],
        "evidence_at": list(threshold[hit_mask]),
    }, [{"last_administration": x, "weeks": weeks} for x in since_hit], "missing_measures")


def stable_until(inp: RuleInput) -> pd.DataFrame:
    """Until when each open episode's clock-dependent results hold (``stable_until``,
    NaT for ever), as of ``inp.today``; one row per open episode of ``inp.episodes``.

    The clock enters the rules only through three comparisons: a plan review's due date
    with the clock's date (``review_overdue``: due < date), the latest score plus N
    weeks with the clock itself (``missing_measures``: threshold < clock) and a goal's
    due date with the clock's date (goal status: due < date, hence the goal flags and
    the caseload's goal summary). A result of the first kind holds until the last
    microsecond of the due date, one of the second kind until the threshold itself
    (clocks are microseconds). The earliest such instant at or after this clock is
    returned: at any clock from this one up to it, every result of the episode is what
    this evaluation gave, as long as its records do not change (which puts it in an
    incremental run's scope anyway).
    """
    open_eps = inp.episodes[inp.episodes["end_date"].isna()]
    e, due = review_due(open_eps, inp.reviews, inp.settings.review_overdue_weeks)
    last = inp.last_administered
    _, threshold = missing_threshold(e, last, inp.settings.missing_measures_weeks)
    ids = e["episode_id"].to_numpy()
    day_end = pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
    at = [pd.DataFrame({"episode_id": ids,
                        "at": _dt(due).dt.normalize().to_numpy() + day_end}),
          pd.DataFrame({"episode_id": ids, "at": _dt(threshold).to_numpy()})]
    g = inp.goals
    if not g.empty:
        g = g[is_in(g["episode_id"], ids) & g["due_date"].notna().to_numpy()]
        at.append(pd.DataFrame({"episode_id": g["episode_id"].to_numpy(),
                                "at": _dt(g["due_date"]).dt.normalize().to_numpy() + day_end}))
    c = pd.concat(at, ignore_index=True)
    c = c[(c["at"] >= pd.Timestamp(inp.today)).to_numpy()]
    first = c.groupby("episode_id")["at"].min()
    return pd.DataFrame({"episode_id": ids,
                         "stable_until": first.reindex(ids).to_numpy(dtype="datetime64[us]")})


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
    out = pd.concat(frames, ignore_index=True)
    del frames
    # Text in one piece per column (see one_chunk): refresh gathers from it part by part.
    for c in out.columns:
        out[c] = one_chunk(out[c])
    return out


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



_TEXT = ("severity", "rule", "message", "evidence")
#: Flags whose text changed are updated this many at a time.
_UPDATE_CHUNK = 50_000


def _text(values: pd.Series) -> pd.Series:
    return values if values.dtype == "str" else values.astype(str)


class _Unchanged:
    """Whether a stored flag's text (severity, rule, message, evidence) is what fires
    now.

    Called on each part of the stored flags as it is read: when the firing flags'
    identities are unique (the store's constraint makes them so for any flag that is
    written), it compares each stored flag with its firing one by position and keeps a
    boolean ``_same`` instead of the text. Otherwise the text is kept and compared after
    the merge, as before.
    """

    def __init__(self, firing: pd.DataFrame) -> None:
        self.keys = pd.MultiIndex.from_frame(firing[_IDENTITY])
        self.slim = bool(self.keys.is_unique)
        # As text columns (Arrow-backed), not Python objects: those were ~0.5 GB. In one
        # piece each (as evaluate gives them): every part of the stored flags gathers
        # from them, and from the rules' frames chained a 10M full run's took 1.3 s.
        self.text = {c: one_chunk(_text(firing[c])) for c in _TEXT} if self.slim else {}
        self.columns = ["_same"] if self.slim else list(_TEXT)

    def __call__(self, stored: pd.DataFrame) -> pd.DataFrame:
        if not self.slim:
            return stored
        pos = self.keys.get_indexer(pd.MultiIndex.from_frame(stored[_IDENTITY]))
        hit = pos >= 0
        same = hit.copy()
        for c in _TEXT:
            now = self.text[c].iloc[pos[hit]].reset_index(drop=True)
            was = _text(stored[c])[hit].reset_index(drop=True)
            same[hit] &= (now == was).to_numpy(dtype=bool, na_value=False)
        return stored.drop(columns=list(_TEXT)).assign(_same=same, _pos=pos)

    def joined(self, firing: pd.DataFrame, stored: pd.DataFrame) -> pd.DataFrame:
        """``firing`` with its stored flag's ``flag_id`` (NaN when new), ``state``,
        ``acknowledged_at`` and the comparison: what a left merge on the identity gives.
        When slim, placed by the positions found while reading, so the firing flags'
        text is not copied (a merge copied all of it: ~0.5 GB at 900k flags)."""
        cols = ["flag_id", "state", "acknowledged_at"]
        if not self.slim:
            return firing.merge(stored[[*_IDENTITY, *cols, *self.columns]], on=_IDENTITY,
                                how="left", suffixes=("", "_was"))
        pos = stored["_pos"].to_numpy(dtype=np.int64)
        hit = pos >= 0
        at = pos[hit]
        n = len(firing)
        flag_id = np.full(n, np.nan)
        flag_id[at] = stored["flag_id"].to_numpy(dtype=float)[hit]
        placed: dict[str, Any] = {"flag_id": flag_id}
        for c in ("state", "acknowledged_at"):
            values = np.full(n, None, dtype=object)
            values[at] = stored[c].to_numpy(dtype=object)[hit]
            placed[c] = values
        same = np.zeros(n, dtype=bool)
        same[at] = stored["_same"].to_numpy(dtype=bool)[hit]
        # A fresh row index, as a merge gives: rows are picked again by label below.
        return firing.reset_index(drop=True).assign(**placed, _same=same)

    def unchanged(self, old: pd.DataFrame) -> pd.Series:
        """For the merged rows of stored flags that fire again."""
        if self.slim:
            return old["_same"].eq(True)
        same = pd.Series(True, index=old.index)
        for col in _TEXT:
            same &= (old[col].astype(str) == old[f"{col}_was"].astype(str)).to_numpy()
        return same


def refresh(conn: sa.Connection, firing: pd.DataFrame, now: datetime,
            episodes: set[str] | None = None, kinds: list[str] | None = None,
            resolve_missing: bool = True, last_run: datetime | None = None
            ) -> dict[str, int]:
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
    last_run
        The clock of the last run that evaluated every flag: a flag resolved now was
        last seen firing then (its ``last_seen``; not after ``now``). None: it keeps
        the ``last_seen`` it has.

    Returns
    -------
    dict
        Counts: ``raised``, ``reopened``, ``updated``, ``resolved``.
    """
    cols = [flags_table.c[c] for c in ("flag_id", "episode_id", "measure", "kind", "key",
                                        "state", "acknowledged_at", *_TEXT)]
    q = sa.select(*cols)
    if kinds is not None:
        q = q.where(flags_table.c.kind.in_(kinds))
    # assign, not copy(): the other columns (messages, evidence) are shared, not copied.
    f = firing.assign(evidence_at=to_datetimes(firing["evidence_at"]))
    compare = _Unchanged(f)
    # Raw driver values: every column is text or an integer but acknowledged_at, which
    # is parsed below (SQLAlchemy's per-row processing was half of reading 900k flags).
    # In chunks (every column but acknowledged_at is NOT NULL, so each chunk's dtypes are
    # the whole read's), each compared at once with what fires now and kept without its
    # text: 900k stored flags' messages and evidence were ~1 GB, the full run's peak.
    if episodes is None:
        parts = [compare(c) for c in iter_frames(conn, q, 50_000)]
    else:
        # By the columnar text path, 900 episodes a query as before (an ingest's refresh
        # of 10k new scores' episodes: 0.14 -> 0.10 s); the kinds picked afterwards.
        some = bulk_read(conn, flags_table, [c.name for c in cols],
                         where_in=("episode_id", sorted(episodes)))
        if kinds is not None:
            some = some[some["kind"].isin(list(kinds)).to_numpy()].reset_index(drop=True)
        parts = [compare(some)]
    stored = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    del parts
    m = compare.joined(f, stored)
    counts = {"raised": 0, "reopened": 0, "updated": 0, "resolved": 0}
    is_new = m["flag_id"].isna().to_numpy()
    # The stored flags that fire again: every other live one in scope is resolved below.
    fired = m["flag_id"].to_numpy()[~is_new].astype(np.int64)
    if is_new.any():
        # By the store's bulk path (COPY on PostgreSQL), the new ones picked chunk by
        # chunk rather than copied first (the new flags' text: ~0.5 GB at 800k).
        rows = m[FLAG_COLUMNS].assign(first_raised=now, last_seen=now, state="open")
        bulk_insert(conn, flags_table, rows,
                    positions=None if is_new.all() else np.flatnonzero(is_new))
        counts["raised"] = int(is_new.sum())
        del rows
    # The flags that fire again, without their text (only the changed ones need it).
    old = m.loc[~is_new, [c for c in m.columns if c not in _TEXT or not compare.slim]]
    if not old.empty:
        ack_at = to_datetimes(old["acknowledged_at"], format="ISO8601")
        reopen = ((old["state"] == "acknowledged") & (old["evidence_at"] > ack_at)) | \
            (old["state"] == "resolved")
        # Unchanged flags are not written: a live flag holds as of every run (see the
        # module docstring), so its last_seen needs no rewrite (919k rows and their
        # pages in a full run of the 10M store, 3.4 s). The others one executemany each.
        same = compare.unchanged(old)
        quiet = int((same & ~reopen).sum())
        old, reopen = old[~same | reopen], reopen[~same | reopen]
        # In chunks: when every flag's text changes (a new rule text, or evidence in a
        # new format), 919k flags' parameters at once took the run to 5.3 GB.
        reopens = reopen.to_numpy()
        for i in range(0, len(old), _UPDATE_CHUNK):
            part = m.loc[old.index[i:i + _UPDATE_CHUNK],
                         ["flag_id", "severity", "rule", "message", "evidence",
                          "evidence_at"]].astype({"flag_id": "int64"}).assign(last_seen=now)
            reo = reopens[i:i + _UPDATE_CHUNK]
            bulk_update(conn, flags_table, part[~reo], "flag_id")
            bulk_update(conn, flags_table, part[reo].assign(state="open", resolved_at=None),
                        "flag_id")
        counts["reopened"] = int(reopen.sum())
        counts["updated"] = len(old) - counts["reopened"] + quiet
    if resolve_missing and not stored.empty:
        live = (stored["state"] != "resolved") & (stored["kind"] != "risk_item")
        # Matched by the merge above (every identity column is NOT NULL text), not by a
        # second merge of the text keys (~0.4 GB at 900k flags, the full run's peak).
        live_ids = stored.loc[live, "flag_id"].to_numpy(dtype=np.int64)
        gone = [int(x) for x in live_ids[~np.isin(live_ids, fired)]]
        seen = {} if last_run is None else {"last_seen": min(last_run, now)}
        for i in range(0, len(gone), 900):
            conn.execute(flags_table.update().where(flags_table.c.flag_id.in_(
                gone[i:i + 900])).values(state="resolved", resolved_at=now, **seen))
        counts["resolved"] = len(gone)
    return counts
