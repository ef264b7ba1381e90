"""Service outcome report (SPEC §5) over the stored outcomes, for any filter."""

from __future__ import annotations

from datetime import date
from typing import Any

import pandas as pd
import sqlalchemy as sa

from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.stats.service import episode_service_outcomes, metrics_record, service_metrics
from pipeline.store import Store, episodes, outcomes, read_frame

__all__ = ["episode_flags", "service_report"]


def episode_flags(store: Store, settings: Settings, registry: Registry) -> pd.DataFrame:
    """Per-episode SPEC §5 flags for every episode, with team/therapist/end date."""
    with store.engine.connect() as conn:
        ep = read_frame(conn, sa.select(
            episodes.c.episode_id, episodes.c.therapist_id, episodes.c.team,
            episodes.c.start_date, episodes.c.end_date, episodes.c.end_reason))
        paired = read_frame(conn, sa.select(
            outcomes.c.episode_id, outcomes.c.measure, outcomes.c.n, outcomes.c.first_score,
            outcomes.c.last_score).where(outcomes.c.measure.in_(
                [settings.depression_measure, settings.anxiety_measure])))
    dep = registry[settings.depression_measure]
    anx = registry[settings.anxiety_measure]
    dep_case = settings.caseness(dep.caseness_setting, dep.caseness_cutoff)
    anx_case = settings.caseness(anx.caseness_setting, anx.caseness_cutoff)
    if dep_case is None or anx_case is None or dep.reliable_change_points is None or \
            anx.reliable_change_points is None:
        raise ValueError("service metrics need caseness and reliable-change points")
    return episode_service_outcomes(
        ep, paired, depression=dep.code, anxiety=anx.code, dep_caseness=dep_case,
        anx_caseness=anx_case, dep_points=dep.reliable_change_points,
        anx_points=anx.reliable_change_points)


def service_report(store: Store, settings: Settings, registry: Registry, *,
                   team: str | None = None, therapist: str | None = None,
                   date_from: date | None = None, date_to: date | None = None
                   ) -> dict[str, Any]:
    """SPEC §5 counts, rates and Wilson 95% intervals for the filtered episodes.

    The period filter applies to the episode's end date (finished episodes).
    """
    flags = episode_flags(store, settings, registry)
    keep = pd.Series(True, index=flags.index)
    if team:
        keep &= flags["team"] == team
    if therapist:
        keep &= flags["therapist_id"] == therapist
    end = pd.to_datetime(flags["end_date"])
    if date_from:
        keep &= end >= pd.Timestamp(date_from)
    if date_to:
        keep &= end <= pd.Timestamp(date_to)
    out = metrics_record(service_metrics(flags[keep]))
    out["filters"] = {"team": team, "therapist": therapist,
                      "from": date_from.isoformat() if date_from else None,
                      "to": date_to.isoformat() if date_to else None}
    out["definitions"] = {
        "depression_measure": settings.depression_measure, "anxiety_measure": settings.anxiety_measure,
        "source": "SPEC §5 (NHS Talking Therapies); Wilson 95% intervals",
    }
    return out
