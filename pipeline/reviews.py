"""Plan reviews (SPEC §2, §8): record one, acknowledge the episode's open flags, and
optionally revise the plan's goals (a new plan version; earlier versions are kept).

A review acknowledges every open non-risk flag of its episode. ``risk_item`` flags are
acknowledged only when the review says risk was assessed (``risk_assessed=True``); they
are never resolved by a review.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import pandas as pd
import sqlalchemy as sa

from pipeline.errors import UsageError
from pipeline.faults import crash_point
from pipeline.store import Store, episodes, flags, goals, plans, reviews, utcnow

__all__ = ["DECISIONS", "ReviewResult", "record_review"]

DECISIONS = ("continue", "revise", "step_up", "step_down", "refer", "discharge")
_GOAL_COLUMNS = ["goal_id", "measure", "kind", "target", "due_date", "due_session",
                 "sustain", "description"]


@dataclass(frozen=True)
class ReviewResult:
    """What recording a review did."""

    review_id: int
    flags_acknowledged: int
    plan_version: int | None


def record_review(store: Store, episode_id: str, *, reviewer: str, decision: str,
                  note: str | None = None, next_review: date | None = None,
                  risk_assessed: bool = False, new_goals: pd.DataFrame | None = None,
                  now: datetime | None = None, visible_episodes: set[str] | None = None
                  ) -> ReviewResult:
    """Record a plan review in one transaction.

    Parameters
    ----------
    episode_id
        The episode reviewed; must exist (and be in ``visible_episodes`` when given, so a
        caller that enforces access passes the episodes the user may see).
    decision
        One of :data:`DECISIONS`.
    new_goals
        With ``decision="revise"``: the revised goals (columns ``goal_id, measure, kind,
        target`` and ``due_date`` or ``due_session``, optional ``sustain, description``)
        become a new plan version.

    Raises
    ------
    UsageError
        Unknown episode (or not visible), unknown decision, goals without ``revise``.
    """
    if decision not in DECISIONS:
        raise UsageError(f"decision must be one of {', '.join(DECISIONS)}", value=decision)
    if not reviewer:
        raise UsageError("a review needs the reviewer's name or user id")
    if new_goals is not None and decision != "revise":
        raise UsageError("new goals come with decision 'revise'")
    now = now or utcnow()
    with store.transaction() as conn:
        found = conn.execute(sa.select(episodes.c.episode_id).where(
            episodes.c.episode_id == episode_id)).first()
        if found is None or (visible_episodes is not None
                             and episode_id not in visible_episodes):
            raise UsageError("episode not found", episode=episode_id)
        version = None
        if new_goals is not None:
            current = conn.execute(sa.select(sa.func.max(plans.c.version)).where(
                plans.c.episode_id == episode_id)).scalar_one()
            version = int(current or 0) + 1
            conn.execute(plans.insert().values(episode_id=episode_id, version=version,
                                               created_at=now, batch_id=None))
            g = new_goals.copy()
            for col in _GOAL_COLUMNS:
                if col not in g.columns:
                    g[col] = None
            g["sustain"] = pd.to_numeric(g["sustain"]).fillna(1).astype(int)
            rows = g[_GOAL_COLUMNS].astype(object).where(g[_GOAL_COLUMNS].notna(), None) \
                .to_dict(orient="records")
            conn.execute(goals.insert(), [dict({str(k): v for k, v in r.items()},
                                               episode_id=episode_id, plan_version=version)
                                          for r in rows])
        kinds_acked = flags.c.kind != "risk_item"
        if risk_assessed:
            kinds_acked = sa.true()
        review_id = int(conn.execute(reviews.insert().values(
            episode_id=episode_id, reviewed_at=now, reviewer=reviewer, decision=decision,
            note=note, next_review=next_review, risk_assessed=risk_assessed,
            plan_version=version, flags_acknowledged=0)).inserted_primary_key[0])  # type: ignore[index]
        crash_point("review.inserted")
        res = conn.execute(flags.update().where(
            (flags.c.episode_id == episode_id) & (flags.c.state == "open") & kinds_acked
        ).values(state="acknowledged", acknowledged_at=now, review_id=review_id))
        n = int(res.rowcount or 0)
        conn.execute(reviews.update().where(reviews.c.review_id == review_id)
                     .values(flags_acknowledged=n))
    return ReviewResult(review_id=review_id, flags_acknowledged=n, plan_version=version)
