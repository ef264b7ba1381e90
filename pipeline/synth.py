"""Seeded synthetic data: therapists, clients, episodes, plans, administrations.

Never real patients. Trajectory types in plausible proportions (responders, slow/late
responders, non-responders, reliable deteriorators, sudden gains, drop-outs; episodes
still running at the sample's end date are open), PHQ-9 and GAD-7 item responses that
sum to the simulated totals, a few missing items, totals-only rows, planted PHQ-9 item 9
answers, and optional faulty rows whose expected quarantine reason is written down.
Everything is vectorised over episodes, so millions of administrations are quick.

Outputs (``write_sample``): ``input/*.csv`` (what ``ontrack ingest`` reads) and
``truth/ground_truth.csv`` (episode -> simulated type) plus
``truth/expected_quarantine.csv`` (line -> reason of each planted faulty row).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["TYPES", "Dataset", "SynthConfig", "default_sample_config", "generate", "next_week",
           "write_sample"]

#: Trajectory type -> share of episodes. Proportions follow the usual picture of routine
#: primary-care psychological therapy: about half respond, a fifth do not change, ~5-8%
#: deteriorate, sudden gains in ~15% of responders, 10-20% drop out.
TYPES: dict[str, float] = {
    "responder": 0.36,
    "slow_responder": 0.14,
    "non_responder": 0.18,
    "deteriorator": 0.07,
    "sudden_gain": 0.10,
    "dropout": 0.15,
}

_GIVEN = ["Alex", "Sam", "Jordan", "Priya", "Chen", "Amara", "Olu", "Maria", "Tomasz", "Aisha",
          "Liam", "Noah", "Ella", "Grace", "Yusuf", "Mei", "Ravi", "Sofia", "Kwame", "Hannah",
          "Ibrahim", "Zofia", "Daniel", "Leah", "Omar", "Chloe", "Arjun", "Niamh", "Tariq", "Eve"]
_FAMILY = ["Smith", "Patel", "Okafor", "Nowak", "Jones", "Khan", "Williams", "Chen", "Garcia",
           "Brown", "Ahmed", "Taylor", "Murphy", "Silva", "Evans", "Ali", "Walker", "Kowalski",
           "Mensah", "Wright", "Hughes", "Begum", "Roberts", "Osei", "Green", "Hall", "Wood"]
_ETHNICITY = ["White", "Asian or Asian British", "Black or Black British", "Mixed",
              "Other ethnic group", "Not stated"]
_ETHNICITY_P = [0.72, 0.12, 0.06, 0.04, 0.03, 0.03]
_TEAMS = ["North", "South", "Central"]


@dataclass(frozen=True)
class SynthConfig:
    """Size and shape of a synthetic dataset."""

    episodes: int = 400
    therapists: int = 15
    months: int = 18
    end: date = date(2026, 10, 31)
    seed: int = 20261127
    risk_share: float = 0.06
    missing_item_share: float = 0.03
    totals_only_share: float = 0.05
    both_share: float = 0.15
    mismatch_share: float = 0.004
    faulty_rows: int = 0


@dataclass
class Dataset:
    """The generated tables."""

    therapists: pd.DataFrame
    clients: pd.DataFrame
    episodes: pd.DataFrame
    plans: pd.DataFrame
    administrations: pd.DataFrame
    truth: pd.DataFrame
    expected_quarantine: pd.DataFrame


def _items_summing_to(rng: np.random.Generator, totals: np.ndarray, n_items: int,
                      item_max: int) -> np.ndarray:
    """Integer item matrix (rows sum to ``totals``; each item 0..item_max)."""
    t = np.clip(totals, 0, n_items * item_max).astype(np.int64)
    base = t // n_items
    rem = t % n_items
    ranks = np.argsort(np.argsort(rng.random((t.size, n_items)), axis=1), axis=1)
    items = base[:, None] + (ranks < rem[:, None])
    # Two rounds of zero-sum moves give items their spread (one item high, another low).
    for _ in range(2):
        src = rng.integers(0, n_items, t.size)
        dst = rng.integers(0, n_items, t.size)
        rows = np.arange(t.size)
        ok = (src != dst) & (items[rows, src] > 0) & (items[rows, dst] < item_max)
        items[rows[ok], src[ok]] -= 1
        items[rows[ok], dst[ok]] += 1
    return items


def _trajectory(kind: np.ndarray, s: np.ndarray, n: np.ndarray, base: np.ndarray,
                p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """Expected score at session index ``s`` (0-based) by type; p1, p2 type parameters."""
    frac = s / np.maximum(n - 1, 1)
    out = base.astype(float).copy()
    responder = (kind == "responder") | (kind == "dropout")
    out = np.where(responder, base - (base - p1) * (1 - np.exp(-s / p2)), out)
    slow = kind == "slow_responder"
    out = np.where(slow, base - p1 / (1 + np.exp(-(s - (n - 1) * 0.55) / 1.2)), out)
    non = kind == "non_responder"
    out = np.where(non, base - p1 * frac, out)
    det = kind == "deteriorator"
    out = np.where(det, base + p1 * frac, out)
    gain = kind == "sudden_gain"
    out = np.where(gain, np.where(s >= p2, base - p1 - 0.3 * (s - p2), base - 0.3 * s), out)
    return out


def generate(cfg: SynthConfig = SynthConfig()) -> Dataset:
    """Generate a dataset from a config (same config -> identical tables)."""
    rng = np.random.default_rng(cfg.seed)
    n_ep = cfg.episodes

    # Therapists and teams.
    t_ids = np.array([f"T{i:03d}" for i in range(1, cfg.therapists + 1)])
    t_team = np.array([_TEAMS[i % len(_TEAMS)] for i in range(cfg.therapists)])
    therapists = pd.DataFrame({
        "therapist_id": t_ids,
        "name": [f"{rng.choice(_GIVEN)} {rng.choice(_FAMILY)}" for _ in t_ids],
        "team": t_team,
    })

    # Clients: one per episode; ~5% come back for a second episode.
    n_cl = max(1, int(round(n_ep * 0.95)))
    c_ids = np.array([f"C{i:06d}" for i in range(1, n_cl + 1)])
    age = rng.integers(18, 80, n_cl)
    age[rng.random(n_cl) < 0.01] = rng.integers(90, 97)  # a few very old clients
    birth = pd.to_datetime(cfg.end) - pd.to_timedelta(age * 365.25 + rng.integers(0, 365, n_cl),
                                                      unit="D")
    clients = pd.DataFrame({
        "client_id": c_ids,
        "given_name": rng.choice(_GIVEN, n_cl),
        "family_name": rng.choice(_FAMILY, n_cl),
        "birth_date": birth.strftime("%Y-%m-%d"),
        "sex": rng.choice(["F", "M"], n_cl, p=[0.64, 0.36]),
        "ethnicity": rng.choice(_ETHNICITY, n_cl, p=_ETHNICITY_P),
        # Q is never the first letter of a UK postcode: realistic shape, never real.
        "postcode": [f"Q{chr(65 + a)}{b} {c}{chr(65 + d)}{chr(65 + e)}" for a, b, c, d, e in
                     zip(rng.integers(0, 26, n_cl), rng.integers(1, 30, n_cl),
                         rng.integers(1, 10, n_cl), rng.integers(0, 26, n_cl),
                         rng.integers(0, 26, n_cl), strict=True)],
        "record_number": [f"MRN{v:07d}" for v in rng.choice(10**7, n_cl, replace=False)],
    })
    ep_client = np.concatenate([c_ids, rng.choice(c_ids, n_ep - n_cl)]) if n_ep > n_cl \
        else c_ids[:n_ep]

    # Episodes.
    e_ids = np.array([f"E{i:06d}" for i in range(1, n_ep + 1)])
    kinds = rng.choice(list(TYPES), n_ep, p=list(TYPES.values()))
    ther = rng.integers(0, cfg.therapists, n_ep)
    window = cfg.months * 30
    start = np.datetime64(cfg.end) - rng.integers(7, window, n_ep).astype("timedelta64[D]")
    n_sess = np.select(
        [kinds == "responder", kinds == "slow_responder", kinds == "non_responder",
         kinds == "deteriorator", kinds == "sudden_gain", kinds == "dropout"],
        [rng.integers(6, 13, n_ep), rng.integers(10, 17, n_ep), rng.integers(8, 17, n_ep),
         rng.integers(6, 13, n_ep), rng.integers(8, 15, n_ep), rng.integers(2, 5, n_ep)])
    base = np.clip(np.round(rng.normal(17, 4, n_ep)), 6, 27)
    below = rng.random(n_ep) < 0.08
    base[below] = rng.integers(5, 10, below.sum())
    p1 = np.select(
        [kinds == "responder", kinds == "dropout", kinds == "slow_responder",
         kinds == "non_responder", kinds == "deteriorator", kinds == "sudden_gain"],
        [rng.uniform(3, 7, n_ep), rng.uniform(8, 14, n_ep), rng.uniform(8, 12, n_ep),
         rng.uniform(0, 2, n_ep), rng.uniform(7, 10, n_ep), rng.uniform(7, 10, n_ep)])
    p2 = np.select([kinds == "sudden_gain"], [rng.integers(3, 6, n_ep)],
                   rng.uniform(2, 4, n_ep))
    gad_ratio = np.clip(rng.normal(0.72, 0.12, n_ep), 0.4, 1.0)
    risk_ep = rng.random(n_ep) < np.where(kinds == "deteriorator", cfg.risk_share * 3,
                                          cfg.risk_share)

    # Administrations: one row per episode x session, then per measure.
    rep = np.repeat(np.arange(n_ep), n_sess)
    s = np.arange(rep.size) - np.repeat(np.cumsum(n_sess) - n_sess, n_sess)
    gaps = np.where(rng.random(rep.size) < 0.12, 14, 7) + rng.integers(-1, 2, rep.size)
    gaps[s == 0] = 0
    day = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[np.cumsum(n_sess) - n_sess], n_sess)
    when = start[rep] + day.astype("timedelta64[D]")
    seen = when <= np.datetime64(cfg.end)
    mean_phq = _trajectory(kinds[rep], s, n_sess[rep], base[rep], p1[rep], p2[rep])
    phq = np.clip(np.round(mean_phq + rng.normal(0, 1.4, rep.size)), 0, 27).astype(np.int64)
    gad = np.clip(np.round(mean_phq * gad_ratio[rep] * 21 / 27 * 1.15 +
                           rng.normal(0, 1.2, rep.size)), 0, 21).astype(np.int64)

    # Planted risk: item 9 > 0 at one to three sessions of risk episodes.
    risk_at = risk_ep[rep] & (rng.random(rep.size) < 0.35)
    first_of_risk_ep = risk_ep[rep] & (s == np.minimum(1, n_sess[rep] - 1))
    risk_at |= first_of_risk_ep
    item9 = np.where(risk_at, rng.integers(1, 3, rep.size), 0)
    phq = np.maximum(phq, item9)
    phq_rest = np.minimum(phq - item9, 24)
    phq = phq_rest + item9
    phq_items = np.column_stack([_items_summing_to(rng, phq_rest, 8, 3), item9])
    gad_items = _items_summing_to(rng, gad, 7, 3)

    hour = rng.integers(8, 18, rep.size)
    stamp = pd.to_datetime(when) + pd.to_timedelta(hour, unit="h")
    ts = stamp.strftime("%Y-%m-%dT%H:%M:00")
    frames = []
    for code, totals, items in (("PHQ-9", phq, phq_items), ("GAD-7", gad, gad_items)):
        k = items.shape[1]
        df = pd.DataFrame({
            "episode_id": e_ids[rep], "measure": code, "administered_at": ts,
            "session_number": s + 1, "total": totals,
            **{f"item_{i}": items[:, i - 1] for i in range(1, k + 1)},
        })
        frames.append(df[seen])
    adm = pd.concat(frames, ignore_index=True)
    adm = adm.sort_values(["administered_at", "episode_id", "measure"], kind="stable")
    adm = adm.reset_index(drop=True)
    n_adm = len(adm)
    item_cols = [f"item_{i}" for i in range(1, 10)]
    adm[item_cols] = adm[item_cols].astype("Int64")
    adm.loc[adm["measure"] == "GAD-7", ["item_8", "item_9"]] = pd.NA
    # Shape what a service really sends: most rows items only, some both, some totals only.
    u = rng.random(n_adm)
    totals_only = u < cfg.totals_only_share
    both = (u >= cfg.totals_only_share) & (u < cfg.totals_only_share + cfg.both_share)
    adm["total"] = adm["total"].astype("Int64")
    adm.loc[~(totals_only | both), "total"] = pd.NA
    adm.loc[totals_only, item_cols] = pd.NA
    mismatch = both & (rng.random(n_adm) < cfg.mismatch_share / max(cfg.both_share, 1e-9))
    adm.loc[mismatch, "total"] = (adm.loc[mismatch, "total"] + 1).clip(upper=21)
    # 1-2 missing items (sometimes item 9 itself: risk then unknown, never "no").
    miss = ~totals_only & (rng.random(n_adm) < cfg.missing_item_share)
    n_items_row = np.where(adm["measure"] == "PHQ-9", 9, 7)
    for j in range(2):
        pick = miss & ((j == 0) | (rng.random(n_adm) < 0.4))
        which = (rng.random(n_adm) * n_items_row).astype(int) + 1
        for i in range(1, 10):
            adm.loc[pick & (which == i), f"item_{i}"] = pd.NA
    adm.loc[miss, "total"] = pd.NA

    # End dates: last session + a week unless the episode is still running.
    last_day = pd.Series(when[seen[: rep.size]]).groupby(rep[seen]).max()
    n_seen = pd.Series(seen).groupby(rep).sum()
    ended = (n_seen.to_numpy() == n_sess) & \
        ((last_day.reindex(range(n_ep)).to_numpy() + np.timedelta64(7, "D"))
         <= np.datetime64(cfg.end))
    end_date = np.where(ended, (last_day.reindex(range(n_ep)).to_numpy() +
                                np.timedelta64(7, "D")).astype("datetime64[D]").astype(str), "")
    end_reason = np.where(~ended, "", np.where(kinds == "dropout", "dropped_out", np.where(
        rng.random(n_ep) < 0.06, "referred_on", "completed")))
    episodes = pd.DataFrame({
        "episode_id": e_ids, "client_id": ep_client, "therapist_id": t_ids[ther],
        "team": t_team[ther], "start_date": start.astype("datetime64[D]").astype(str),
        "end_date": end_date, "end_reason": end_reason,
    })

    # Plans: SMART goals read against the measures.
    goal_rows = []
    for gi, (measure, kind, target, due) in enumerate([
            ("PHQ-9", "below", 10, "session:12"), ("GAD-7", "below", 8, "session:12"),
            ("PHQ-9", "reduction_pct", 50, "date:84"), ("PHQ-9", "reliable_improvement", 6,
                                                          "date:70")]):
        has = rng.random(n_ep) < (1.0 if gi == 0 else 0.5)
        due_txt = (due if due.startswith("session") else
                   (pd.to_datetime(start[has]) + pd.Timedelta(days=int(due[5:])))
                   .strftime("%Y-%m-%d"))
        goal_rows.append(pd.DataFrame({
            "episode_id": e_ids[has], "goal_id": f"G{gi + 1}", "measure": measure,
            "kind": kind, "target": target, "due": due_txt,
            "description": f"{measure} {kind.replace('_', ' ')} {target}", "sustain": 1,
        }))
    plans = pd.concat(goal_rows, ignore_index=True).sort_values(["episode_id", "goal_id"])

    truth = pd.DataFrame({"episode_id": e_ids, "trajectory": kinds, "risk_planted": risk_ep,
                          "open": ~ended, "sessions_planned": n_sess})
    adm, expected = _plant_faults(rng, adm, cfg, e_ids)
    return Dataset(therapists, clients, episodes, plans.reset_index(drop=True), adm, truth,
                   expected)


def _plant_faults(rng: np.random.Generator, adm: pd.DataFrame, cfg: SynthConfig,
                  e_ids: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Append faulty rows (cycling through the reasons) and say which reason each earns."""
    if cfg.faulty_rows <= 0:
        return adm, pd.DataFrame(columns=["line", "reason"])
    adm = adm.astype({c: "object" for c in adm.columns})
    item_cols = [f"item_{k}" for k in range(1, 10)]
    good = adm[adm[item_cols].notna().all(axis=1) & (adm["measure"] == "PHQ-9")]
    rows, reasons = [], []
    makers = ["unknown_measure", "future_date", "bad_date", "item_out_of_range",
              "too_many_missing_items", "total_out_of_range", "unknown_episode",
              "missing_field", "bad_value", "conflict", "duplicate"]
    for i in range(cfg.faulty_rows):
        reason = makers[i % len(makers)]
        r = good.iloc[int(rng.integers(0, len(good)))].copy()
        if reason == "unknown_measure":
            r["measure"] = "PHQ9"
        elif reason == "future_date":
            r["administered_at"] = f"{cfg.end.year + 1}-01-15T10:00:00"
        elif reason == "bad_date":
            r["administered_at"] = "15/03/2025"
        elif reason == "item_out_of_range":
            r["item_3"] = 4
        elif reason == "too_many_missing_items":
            r["item_1"] = r["item_2"] = r["item_4"] = None
            r["total"] = None
        elif reason == "total_out_of_range":
            r[[f"item_{k}" for k in range(1, 10)]] = None
            r["total"] = 31
        elif reason == "unknown_episode":
            r["episode_id"] = f"X{i:06d}"
        elif reason == "missing_field":
            r["episode_id"] = ""
        elif reason == "bad_value":
            r["item_2"] = "two"
        elif reason == "conflict":
            r["item_5"] = (int(r["item_5"]) + 1) % 4
            r["total"] = None
        rows.append(r)
        reasons.append(reason)
    faulty = pd.DataFrame(rows)
    out = pd.concat([adm, faulty], ignore_index=True)
    first_line = len(adm) + 2  # header is line 1
    expected = pd.DataFrame({"line": np.arange(first_line, first_line + len(faulty)),
                             "reason": reasons})
    return out, expected


def write_sample(out: Path, cfg: SynthConfig = SynthConfig()) -> Dataset:
    """Generate and write ``input/*.csv`` and ``truth/*.csv`` under ``out``."""
    data = generate(cfg)
    inp = out / "input"
    truth = out / "truth"
    inp.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    data.therapists.to_csv(inp / "therapists.csv", index=False)
    data.clients.to_csv(inp / "clients.csv", index=False)
    data.episodes.to_csv(inp / "episodes.csv", index=False)
    data.plans.to_csv(inp / "plans.csv", index=False)
    data.administrations.to_csv(inp / "administrations.csv", index=False)
    data.truth.to_csv(truth / "ground_truth.csv", index=False)
    data.expected_quarantine.to_csv(truth / "expected_quarantine.csv", index=False)
    return data


def default_sample_config() -> SynthConfig:
    """The configuration of the committed ``data/sample`` (400 episodes, 33 faulty rows)."""
    return SynthConfig(faulty_rows=33)


def next_week(administrations_csv: Path, n: int, seed: int = 1) -> pd.DataFrame:
    """``n`` new administrations for a scheduled cycle (benchmarks): the latest
    administration of randomly chosen episode x measures of a written dataset, a week
    later, as the next session; all fields as text, as the CSV holds them."""
    adm = pd.read_csv(administrations_csv, dtype="str", keep_default_na=False)
    last = adm.sort_values("administered_at").groupby(["episode_id", "measure"]).tail(1)
    new = last.sample(n=min(n, len(last)), random_state=seed).copy()
    new["administered_at"] = (pd.to_datetime(new["administered_at"]) +
                              pd.Timedelta(days=7)).dt.strftime("%Y-%m-%dT%H:%M:00")
    new["session_number"] = (pd.to_numeric(new["session_number"]) + 1).astype(str)
    return new
