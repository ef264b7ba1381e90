"""How good are the flags? Replay the rules session by session on a synthetic cohort
whose true trajectory types are known (issue 4, SPEC §6).

The reference (baseline SDs, expected recovery curves) comes from a separate *training*
cohort (another seed), so the curves are never fitted to the cohort they are judged on.
Each episode x measure is cut after every administration (a "prefix": what a clinician
would have seen that day), the production statistics and flag rules run on all prefixes
at once, and for each rule we report:

- sensitivity and specificity at the episode level (cases: non-responders and
  deteriorators; a case is detected when the rule fired on any prefix of either measure);
- median sessions between the first firing and the episode's last session (lead time);
- alert burden: new flags raised per therapist per week over the cohort's span.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.columns import to_datetimes
from pipeline.compute import build_reference
from pipeline.config import Settings
from pipeline.flags import RuleInput, rule_not_on_track, rule_reliable_deterioration, rule_stalled
from pipeline.scales import Registry
from pipeline.stats.outcomes import episode_outcomes
from pipeline.synth import Dataset, SynthConfig, generate

__all__ = ["CASE_TYPES", "evaluate_flags"]

CASE_TYPES = ("non_responder", "deteriorator")
_RULES = {"stalled": rule_stalled, "not_on_track": rule_not_on_track,
          "reliable_deterioration": rule_reliable_deterioration}


def _scored(data: Dataset) -> pd.DataFrame:
    """Administrations with scores as ingest would compute them (items sum; totals)."""
    a = data.administrations
    a = a[a["measure"].isin(["PHQ-9", "GAD-7"]) & a["episode_id"].isin(
        data.episodes["episode_id"])]
    items = a[[f"item_{i}" for i in range(1, 10)]].apply(pd.to_numeric, errors="coerce")
    total = pd.to_numeric(a["total"], errors="coerce")
    score = total.where(total.notna(), items.sum(axis=1, min_count=1))
    out = pd.DataFrame({
        "episode_id": a["episode_id"].astype("str"), "measure": a["measure"].astype("str"),
        "administered_at": to_datetimes(a["administered_at"]).astype("datetime64[us]"),
        "session_number": pd.to_numeric(a["session_number"]).astype("Int64"),
        "score": score})
    out = out[out["score"].notna()]
    out["score"] = out["score"].round().astype("int64")
    return out.drop_duplicates(["episode_id", "measure", "administered_at"])


def _prefixes(adm: pd.DataFrame) -> pd.DataFrame:
    """Every administration repeated into each later prefix of its episode x measure."""
    a = adm.sort_values(["episode_id", "measure", "administered_at"]).reset_index(drop=True)
    g = a.groupby(["episode_id", "measure"], sort=False)
    k = g.cumcount().to_numpy() + 1
    n = g["score"].transform("size").to_numpy()
    reps = n - k + 1
    idx = np.repeat(np.arange(len(a)), reps)
    offset = np.arange(idx.size) - np.repeat(np.cumsum(reps) - reps, reps)
    s = k[idx] + offset  # the prefix length this copy belongs to
    p = a.iloc[idx].reset_index(drop=True)
    p["prefix"] = s
    p["true_episode"] = p["episode_id"]
    p["episode_id"] = p["episode_id"] + "#" + pd.Series(s).astype(str)
    return p


def evaluate_flags(registry: Registry, settings: Settings, episodes: int = 1500,
                   seed: int = 4242, training_seed: int = 1717) -> dict[str, Any]:
    """Sensitivity, specificity, lead time and alert burden of three flag rules."""
    train = generate(SynthConfig(episodes=max(episodes, 1500), seed=training_seed))
    train_adm = _scored(train)
    ended = train.episodes.loc[train.episodes["end_date"] != "", "episode_id"]
    reference, _ = build_reference(train_adm, ended, registry, settings, use_defaults=False)

    test = generate(SynthConfig(episodes=episodes, seed=seed, therapists=15))
    adm = _scored(test)
    pre = _prefixes(adm)
    out, _ = episode_outcomes(pre.drop(columns=["prefix", "true_episode"]), registry, settings,
                              reference)
    meta = pre.drop_duplicates("episode_id").set_index("episode_id")[["true_episode", "prefix"]]
    inp = RuleInput(outcomes=out, administrations=pd.DataFrame(), episodes=pd.DataFrame(),
                    sudden=pd.DataFrame(), goals=pd.DataFrame(), reviews=pd.DataFrame(),
                    registry=registry, settings=settings, today=pd.Timestamp.now())

    truth = test.truth.set_index("episode_id")
    sessions = adm.groupby("episode_id")["administered_at"].nunique()
    eps = test.episodes.set_index("episode_id")
    is_case = truth["trajectory"].isin(CASE_TYPES)
    span_weeks = (adm["administered_at"].max() - adm["administered_at"].min()).days / 7
    n_ther = test.episodes["therapist_id"].nunique()
    rows = []
    firings = {}
    for name, rule in _RULES.items():
        fired = rule(inp)[["episode_id"]].join(meta, on="episode_id")
        first = fired.groupby("true_episode")["prefix"].min()
        firings[name] = first
    firings["any of the three"] = pd.concat(list(firings.values())).groupby(level=0).min()
    for name, first in firings.items():
        detected = truth.index.isin(first.index)
        tp = int((detected & is_case).sum())
        fn = int((~detected & is_case).sum())
        fp = int((detected & ~is_case).sum())
        tn = int((~detected & ~is_case).sum())
        case_first = first[first.index.isin(truth.index[is_case])]
        lead = (sessions.reindex(case_first.index) - case_first).median()
        rows.append({
            "rule": name, "sensitivity": tp / max(tp + fn, 1),
            "specificity": tn / max(tn + fp, 1), "tp": tp, "fn": fn, "fp": fp, "tn": tn,
            "median_sessions_before_end": float(lead) if pd.notna(lead) else None,
            "flags_per_therapist_week": len(first) / max(n_ther * span_weeks, 1e-9),
        })
    return {
        "cohort": {"episodes": episodes, "seed": seed, "training_seed": training_seed,
                   "cases": int(is_case.sum()), "therapists": int(n_ther),
                   "weeks": round(span_weeks, 1),
                   "open_episodes": int(eps["end_date"].eq("").sum())},
        "settings": {"stalled_slope_per_week": settings.stalled_slope_per_week,
                     "curve_percentile": settings.curve_percentile,
                     "reliable_change_method": settings.reliable_change_method},
        "rules": rows,
    }


def write_default_curves(path: str, registry: Registry, settings: Settings,
                         episodes: int = 5000, seed: int = 2026) -> pd.DataFrame:
    """Build the shipped default curves from a synthetic cohort and write them as CSV."""
    data = generate(SynthConfig(episodes=episodes, seed=seed, therapists=60))
    adm = _scored(data)
    ended = data.episodes.loc[data.episodes["end_date"] != "", "episode_id"]
    reference, _ = build_reference(adm, ended, registry, settings, use_defaults=False)
    curves = reference.curves.drop(columns="source")
    curves.to_csv(path, index=False, float_format="%.4g")
    return curves
