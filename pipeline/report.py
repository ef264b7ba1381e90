"""Service outcome report (SPEC §5) over the stored outcomes, for any filter."""

from __future__ import annotations

from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from pipeline.columns import is_in, to_datetimes
from pipeline.config import Settings
from pipeline.scales import Registry
from pipeline.stats.service import episode_service_outcomes, metrics_record, service_metrics
from pipeline.store import Store, episodes, outcomes, read_frame

__all__ = ["GOAL_STATUS_ORDER", "caseload_summary", "episode_flags", "episode_flags_from",
           "service_report"]

#: Worst first: the caseload shows an episode's most pressing goal status.
GOAL_STATUS_ORDER = {"overdue": 0, "at_risk": 1, "no_data": 2, "on_track": 3, "met": 4}


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
    return episode_flags_from(ep, paired, settings, registry)


def episode_flags_from(ep: pd.DataFrame, paired: pd.DataFrame, settings: Settings,
                       registry: Registry) -> pd.DataFrame:
    """:func:`episode_flags` on frames already read (episodes; per episode x measure
    ``n``, ``first_score``, ``last_score``)."""
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
    end = to_datetimes(flags["end_date"])
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


def caseload_summary(outcomes_df: pd.DataFrame, goals_df: pd.DataFrame,
                     open_episodes: pd.Series, registry: Registry,
                     settings: Settings) -> pd.DataFrame:
    """Per open episode: latest depression/anxiety score, its band, change since the
    first score, trend label, and the worst goal status (for the caseload grid).

    Trend: ``improving`` when the slope's 95% CI lies wholly on the improving side,
    ``worsening`` when wholly on the other, ``flat`` otherwise, ``too few`` below 3
    administrations.
    """
    out = pd.DataFrame({"episode_id": open_episodes.astype("str").to_numpy()})
    # Only the open episodes' rows and the columns read here: filtering every column of
    # 1.1M outcome rows (and sorting 1.4M goals) was most of this at 10M administrations.
    mine = is_in(outcomes_df["episode_id"], out["episode_id"])
    cols = ["episode_id", "measure", "last_score", "change", "slope_ci_low", "slope_ci_high",
            "slope_week"]
    for side, code in (("dep", settings.depression_measure), ("anx", settings.anxiety_measure)):
        scale = registry[code]
        o = outcomes_df.loc[mine & (outcomes_df["measure"] == code).to_numpy(), cols] \
            .set_index("episode_id")
        latest = out["episode_id"].map(o["last_score"])
        out[f"{side}_latest"] = latest.astype("Int64")
        out[f"{side}_change"] = pd.to_numeric(out["episode_id"].map(o["change"]),
                                              errors="coerce").astype(float)
        if scale.bands:
            mins = np.array([b.min for b in scale.bands])
            labels = np.array([b.label for b in scale.bands], dtype=object)
            idx = np.clip(np.searchsorted(mins, latest.fillna(0).to_numpy(float), "right") - 1,
                          0, len(labels) - 1)
            out[f"{side}_band"] = pd.Series(labels[idx], dtype="object").where(
                latest.notna().to_numpy())
        else:
            out[f"{side}_band"] = None
        lo = pd.to_numeric(o["slope_ci_low"], errors="coerce").astype(float)
        hi = pd.to_numeric(o["slope_ci_high"], errors="coerce").astype(float)
        better_lo = -hi if not scale.higher_is_better else lo
        better_hi = -lo if not scale.higher_is_better else hi
        trend = pd.Series("flat", index=o.index, dtype="object")
        trend[better_lo > 0] = "improving"
        trend[better_hi < 0] = "worsening"
        trend[pd.to_numeric(o["slope_week"], errors="coerce").isna()] = "too few"
        out[f"{side}_trend"] = out["episode_id"].map(trend)
    if goals_df.empty:
        out["goal_status"] = None
    else:
        g = goals_df.loc[is_in(goals_df["episode_id"], out["episode_id"]),
                         ["episode_id", "status"]]
        g = g.assign(rank=g["status"].map(GOAL_STATUS_ORDER)) \
            .sort_values("rank").drop_duplicates("episode_id").set_index("episode_id")
        out["goal_status"] = out["episode_id"].map(g["status"])
    return out
