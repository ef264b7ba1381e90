"""Benchmark: vectorised outcome statistics vs a naive per-episode groupby.apply.

Generates synthetic administrations (default ~1M), times the production
``episode_outcomes`` on all of them and a naive ``groupby(...).apply`` of the same core
statistics on a random fraction of the episode x measure groups (the naive path costs
~100 s per million rows, so it is timed on a fraction and scaled by group count),
checks that both agree on the shared groups, and prints the ratio and peak memory.

Run: ``.venv/bin/python benchmarks/bench_compute.py [--episodes N] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import pandas as pd
from scipy import stats as sps

from pipeline.compute import build_reference
from pipeline.config import load_settings
from pipeline.scales import load_registry
from pipeline.stats.outcomes import episode_outcomes
from pipeline.synth import SynthConfig, generate


def naive_sudden(y: np.ndarray, points: float, losses: bool) -> int:
    """Count sudden gains (or losses) by the SPEC §6 rules, one pair at a time."""
    found = 0
    sign = -1 if losses else 1
    for j in range(len(y) - 1):
        drop = sign * (y[j] - y[j + 1])
        if drop < points or (not losses and drop < 0.25 * y[j]):
            continue
        pre = y[max(j - 2, 0):j + 1]
        post = y[j + 1:j + 4]
        if len(pre) < 2 or len(post) < 2:
            continue
        pooled = np.sqrt(((len(pre) - 1) * pre.var(ddof=1) + (len(post) - 1) *
                          post.var(ddof=1)) / (len(pre) + len(post) - 2))
        t = sps.t.ppf(0.975, len(pre) + len(post) - 2)
        if sign * (pre.mean() - post.mean()) > t * pooled:
            found += 1
    return found


def naive_one(g: pd.DataFrame, sd: float, r: float, points: float) -> pd.Series:
    """The readable reference: one episode x measure at a time."""
    g = g.sort_values("administered_at")
    y = g["score"].to_numpy(dtype=float)
    d = (g["administered_at"].dt.normalize() - g["administered_at"].dt.normalize().iloc[0]) \
        .dt.days.to_numpy(dtype=float)
    change = y[-1] - y[0]
    rci = change / (sd * np.sqrt(1 - r) * np.sqrt(2))
    fixed = "improved" if -change >= points else "deteriorated" if change >= points \
        else "unchanged"
    slope = ts = np.nan
    if len(y) >= 3 and np.ptp(d) > 0:
        slope = sps.linregress(d, y).slope * 7
        ts = sps.theilslopes(y, d)[0] * 7
    stalled = False
    if len(y) >= 4 and d[-1] >= 28 and fixed != "improved" and not np.isnan(slope):
        res = sps.linregress(d, y)
        half = sps.t.ppf(0.975, len(y) - 2) * res.stderr * 7
        stalled = bool((slope - half <= 0 <= slope + half) or slope > -0.25)
    return pd.Series({"n": len(y), "first_score": y[0], "last_score": y[-1],
                      "change": change, "rci": rci, "fixed_change": fixed,
                      "slope_week": slope, "theil_sen_week": ts, "stalled": stalled,
                      "sudden_gains": naive_sudden(y, points, False),
                      "sudden_losses": naive_sudden(y, points, True)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=55_000)
    ap.add_argument("--naive-fraction", type=float, default=0.02)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    reg = load_registry()
    settings = load_settings(env={})
    data = generate(SynthConfig(episodes=args.episodes, therapists=200, seed=7))
    adm = data.administrations
    adm = pd.DataFrame({
        "episode_id": adm["episode_id"].astype("str"), "measure": adm["measure"].astype("str"),
        "administered_at": pd.to_datetime(adm["administered_at"]).astype("datetime64[us]"),
        "session_number": adm["session_number"].astype("Int64"),
        "score": adm["total"].fillna(-1).astype("int64"),
    })
    # Scores from the items where no total was written (as ingest would score them).
    items = data.administrations[[f"item_{i}" for i in range(1, 10)]].astype("Float64")
    adm["score"] = np.where(adm["score"] >= 0, adm["score"],
                            items.sum(axis=1, skipna=True).round().to_numpy(dtype=float))
    adm["score"] = adm["score"].astype("int64")
    ended = data.episodes.loc[data.episodes["end_date"] != "", "episode_id"]
    reference, _ = build_reference(adm, ended, reg, settings)
    print(f"administrations: {len(adm):,}  episode x measure groups: "
          f"{adm.groupby(['episode_id', 'measure']).ngroups:,}")

    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        out, _sudden = episode_outcomes(adm, reg, settings, reference)
        times.append(time.perf_counter() - t)
    fast = statistics.median(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rng = np.random.default_rng(1)
    groups = out[["episode_id", "measure"]]
    pick = groups.sample(frac=args.naive_fraction, random_state=rng.integers(1 << 31))
    sub = adm.merge(pick, on=["episode_id", "measure"])
    t = time.perf_counter()
    naive = sub.groupby(["episode_id", "measure"]).apply(
        lambda g: naive_one(g, reference.sd[g.name[1]], reg[g.name[1]].reliability or 0.9,
                            reg[g.name[1]].reliable_change_points or 0),
        include_groups=False).reset_index()
    naive_t = time.perf_counter() - t
    naive_full = naive_t / len(pick) * len(groups)

    merged = naive.merge(out, on=["episode_id", "measure"], suffixes=("_naive", ""))
    for col in ("n", "first_score", "last_score", "change", "rci", "slope_week",
                "theil_sen_week", "sudden_gains", "sudden_losses", "stalled"):
        np.testing.assert_allclose(merged[col].astype(float), merged[col + "_naive"]
                                   .astype(float), rtol=1e-9, atol=1e-9, equal_nan=True)
    if not (merged["fixed_change"] == merged["fixed_change_naive"]).all():
        raise SystemExit("fixed-point change disagrees between naive and vectorised")
    print(f"vectorised episode_outcomes: median {fast:.2f} s over {args.repeat} runs "
          f"(min {min(times):.2f}, max {max(times):.2f}); peak RSS {peak_mb:,.0f} MB")
    print(f"naive groupby.apply: {naive_t:.1f} s on {len(pick):,} groups "
          f"-> {naive_full:,.0f} s extrapolated to {len(groups):,} groups")
    print(f"agreement on {len(merged):,} shared groups: OK")
    print(f"speed-up (naive / vectorised): {naive_full / fast:,.0f}x")


if __name__ == "__main__":
    main()
