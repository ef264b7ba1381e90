"""Flags, goals and plan reviews (SPEC §7-8): each rule fires on a constructed episode
and stays silent on its near miss; the review/reopen life cycle; risk flags at ingest."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import goals as goals_module
from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.flags import encode_evidence, risk_flags
from pipeline.goals import goal_status
from pipeline.ingest.batch import ingest_paths
from pipeline.reviews import record_review
from pipeline.scales import Registry, load_registry
from pipeline.stats.groups import group_administrations
from pipeline.stats.outcomes import Reference, episode_outcomes
from pipeline.store import Store
from tests.stats_helpers import (
    ADMIN_HEADER,
    DAY0,
    NOW,
    entity_files,
    episode,
    series,
    write_csv,
)

ITEM_HEADER = ["episode_id", "measure", "administered_at", "session_number",
               *[f"item_{i}" for i in range(1, 10)]]


@pytest.fixture
def reg() -> Registry:
    return load_registry()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path}/f.db")
    s.init()
    return s


def flags_of(store: Store) -> pd.DataFrame:
    return store.read_table("flags")


def run(tmp_path: Path, store: Store, reg: Registry, episodes: list[dict],
        admins: list[dict], settings: Settings | None = None, name: str = "a",
        now: datetime = NOW) -> pd.DataFrame:
    settings = settings or Settings()
    paths = entity_files(tmp_path / name, episodes)
    paths.append(write_csv(tmp_path / name / "adm.csv", ADMIN_HEADER, admins))
    rep = ingest_paths(paths, store, settings, reg, now=now).as_dict()
    assert rep["quarantined"] == 0, rep
    compute(store, settings, reg, now=now)
    return flags_of(store)


def kinds_for(flags: pd.DataFrame, episode_id: str) -> set[str]:
    f = flags[(flags["episode_id"] == episode_id) & (flags["state"] == "open")]
    return set(f["kind"])


# ------------------------------------------------------------------ rules


def test_reliable_deterioration_fires_at_plus_six_not_plus_five(tmp_path: Path, store: Store,
                                                               reg: Registry) -> None:
    eps = [episode("UP6", ended=False), episode("UP5", ended=False)]
    adm = series("UP6", "PHQ-9", [0, 7], [10, 16]) + series("UP5", "PHQ-9", [0, 7], [10, 15])
    f = run(tmp_path, store, reg, eps, adm)
    assert "reliable_deterioration" in kinds_for(f, "UP6")
    assert "reliable_deterioration" not in kinds_for(f, "UP5")
    row = f[(f["episode_id"] == "UP6") & (f["kind"] == "reliable_deterioration")].iloc[0]
    ev = json.loads(row["evidence"])
    assert (ev["first_score"], ev["last_score"], ev["change"], ev["rc_points"]) == \
        (10, 16, 6.0, 6.0)
    assert row["severity"] == "urgent"
    assert "10" in row["message"] and "16" in row["message"]


def test_stalled_fires_on_a_plateau_not_on_steady_improvement(tmp_path: Path, store: Store,
                                                             reg: Registry) -> None:
    eps = [episode("FLAT", ended=False), episode("DOWN", ended=False)]
    days = [0, 7, 14, 21, 28, 35]
    # FLAT: slope ~0, no reliable improvement. DOWN: -0.5/week with a tight CI, change -3
    # (not reliable): the slope is below -0.25 and its CI excludes 0 -> not stalled.
    adm = series("FLAT", "PHQ-9", days, [15, 16, 15, 15, 16, 15]) + \
        series("DOWN", "PHQ-9", days, [16, 15, 15, 14, 14, 13])
    f = run(tmp_path, store, reg, eps, adm)
    assert "stalled" in kinds_for(f, "FLAT")
    assert "stalled" not in kinds_for(f, "DOWN")
    msg = f[(f["episode_id"] == "FLAT") & (f["kind"] == "stalled")].iloc[0]["message"]
    assert "not reliably improved after 6 administrations over 5 weeks" in msg
    assert "95% CI" in msg


def test_sudden_loss_fires_on_a_jump_not_on_a_drift(tmp_path: Path, store: Store,
                                                    reg: Registry) -> None:
    eps = [episode("JUMP", ended=False), episode("DRIFT", ended=False)]
    days = [0, 7, 14, 21, 28, 35]
    adm = series("JUMP", "PHQ-9", days, [8, 9, 8, 16, 17, 16]) + \
        series("DRIFT", "PHQ-9", days, [8, 9, 10, 11, 12, 13])
    f = run(tmp_path, store, reg, eps, adm)
    assert "sudden_loss" in kinds_for(f, "JUMP")
    assert "sudden_loss" not in kinds_for(f, "DRIFT")
    row = f[(f["episode_id"] == "JUMP") & (f["kind"] == "sudden_loss")].iloc[0]
    assert row["key"] == "3"  # between sessions 3 and 4


def test_not_on_track_against_the_expected_curve(tmp_path: Path, store: Store,
                                                 reg: Registry) -> None:
    finished = [episode(f"F{i}") for i in range(3)]
    adm = series("F0", "PHQ-9", [0, 7, 14], [20, 15, 10]) + \
        series("F1", "PHQ-9", [0, 7, 14], [20, 14, 9]) + \
        series("F2", "PHQ-9", [0, 7, 14], [20, 16, 11])
    # k = 3 curve over (10, 9, 11): median 10, 75th percentile 10.5.
    eps = [*finished, episode("HIGH", ended=False), episode("NEAR", ended=False)]
    adm += series("HIGH", "PHQ-9", [0, 7, 14], [20, 19, 19])
    adm += series("NEAR", "PHQ-9", [0, 7, 14], [20, 15, 10])
    f = run(tmp_path, store, reg, eps, adm, settings=Settings(curve_min_stratum=3))
    assert "not_on_track" in kinds_for(f, "HIGH")
    assert "not_on_track" not in kinds_for(f, "NEAR")
    ev = json.loads(f[(f["episode_id"] == "HIGH") & (f["kind"] == "not_on_track")]
                    .iloc[0]["evidence"])
    assert ev["expected_median"] == pytest.approx(10.0)
    assert ev["expected_upper"] == pytest.approx(10.5)


def test_review_overdue_and_missing_measures_need_an_open_episode(
        tmp_path: Path, store: Store, reg: Registry) -> None:
    recent = (NOW - timedelta(days=10)).date()
    eps = [episode("OLD", ended=False), episode("DONE", ended=True),
           dict(episode("NEW", ended=False), start_date=str(recent))]
    adm = series("OLD", "PHQ-9", [0, 7], [15, 14]) + series("DONE", "PHQ-9", [0, 7], [15, 14])
    adm += [{"episode_id": "NEW", "measure": "PHQ-9",
             "administered_at": f"{recent}T10:00:00", "session_number": 1, "total": 15}]
    f = run(tmp_path, store, reg, eps, adm)
    assert {"review_overdue", "missing_measures"} <= kinds_for(f, "OLD")
    assert not {"review_overdue", "missing_measures"} & kinds_for(f, "DONE")
    assert not {"review_overdue", "missing_measures"} & kinds_for(f, "NEW")
    sev = f[(f["episode_id"] == "OLD") & (f["kind"] == "missing_measures")]["severity"]
    assert sev.tolist() == ["info"]


# ------------------------------------------------------------------ risk


def _items_row(episode_id: str, day: int, item9: int | None, session: int) -> dict:
    row = {"episode_id": episode_id, "measure": "PHQ-9", "session_number": session,
           "administered_at": f"{(DAY0 + timedelta(days=day)).isoformat()}T10:00:00"}
    for i in range(1, 9):
        row[f"item_{i}"] = 2
    row["item_9"] = item9
    return row


def test_risk_item_flagged_at_ingest_and_never_cleared_by_a_missing_item(
        tmp_path: Path, store: Store, reg: Registry) -> None:
    settings = Settings()
    paths = entity_files(tmp_path / "a", [episode("R", ended=False)])
    paths.append(write_csv(tmp_path / "a" / "adm.csv", ITEM_HEADER,
                           [_items_row("R", 0, 0, 1), _items_row("R", 7, 2, 2)]))
    rep = ingest_paths(paths, store, settings, reg, now=NOW).as_dict()
    assert rep["risk_flags_raised"] == 1
    f = flags_of(store)  # no compute has run
    assert f["kind"].tolist() == ["risk_item"]
    assert f["state"].tolist() == ["open"] and f["severity"].tolist() == ["urgent"]
    assert "item 9 answered 2" in f["message"].iloc[0]

    # A later administration with item 9 missing: prorated total, risk unknown; the flag
    # stays open through ingest, compute and an ordinary review.
    later = write_csv(tmp_path / "a" / "later.csv", ITEM_HEADER, [_items_row("R", 14, None, 3)])
    ingest_paths([later], store, settings, reg, now=NOW)
    adm = store.read_table("administrations").sort_values("administered_at")
    assert adm["risk"].tolist() == ["no", "yes", "unknown"]
    compute(store, settings, reg, now=NOW)
    record_review(store, "R", reviewer="ann", decision="continue", now=NOW)
    compute(store, settings, reg, now=NOW + timedelta(hours=1))
    risk = flags_of(store).query("kind == 'risk_item'")
    assert risk["state"].tolist() == ["open"]
    # Only a review that records a risk assessment acknowledges it.
    record_review(store, "R", reviewer="ann", decision="continue", risk_assessed=True,
                  now=NOW + timedelta(hours=2))
    assert flags_of(store).query("kind == 'risk_item'")["state"].tolist() == ["acknowledged"]


# ------------------------------------------------------------------ life cycle


def test_review_acknowledges_and_new_worsening_reopens(tmp_path: Path, store: Store,
                                                      reg: Registry) -> None:
    settings = Settings()
    f = run(tmp_path, store, reg, [episode("D", ended=False)],
            series("D", "PHQ-9", [0, 7], [10, 17]))
    assert "reliable_deterioration" in kinds_for(f, "D")
    # The review happens after the 2nd administration (day 7), before any later one.
    t_review = datetime.combine(DAY0, datetime.min.time()) + timedelta(days=10)
    res = record_review(store, "D", reviewer="ann", decision="step_up", note="more sessions",
                        now=t_review)
    assert res.flags_acknowledged == len(f[(f["episode_id"] == "D") & (f["state"] == "open")])
    f = flags_of(store)
    assert set(f.loc[f["kind"] != "risk_item", "state"]) == {"acknowledged"}

    # Recompute with no new data: stays acknowledged.
    compute(store, settings, reg, now=t_review + timedelta(hours=1))
    det = flags_of(store).query("kind == 'reliable_deterioration'")
    assert det["state"].tolist() == ["acknowledged"]

    # A later administration that still meets the rule reopens it.
    newer = write_csv(tmp_path / "a" / "newer.csv", ADMIN_HEADER,
                      series("D", "PHQ-9", [14], [19], first_session=3))
    ingest_paths([newer], store, settings, reg, now=NOW)
    compute(store, settings, reg, now=t_review + timedelta(hours=2))
    det = flags_of(store).query("kind == 'reliable_deterioration'")
    assert det["state"].tolist() == ["open"]

    # Improvement below the threshold resolves it.
    better = write_csv(tmp_path / "a" / "better.csv", ADMIN_HEADER,
                       series("D", "PHQ-9", [21], [11], first_session=4))
    ingest_paths([better], store, settings, reg, now=NOW)
    compute(store, settings, reg, now=t_review + timedelta(hours=3))
    det = flags_of(store).query("kind == 'reliable_deterioration'")
    assert det["state"].tolist() == ["resolved"]


@pytest.mark.parametrize("chunk", [1, 2])
def test_changed_and_reopened_flags_are_updated_alike_in_chunks(
        chunk: int, tmp_path: Path, reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags whose text changed are updated a chunk at a time: stored flags (states,
    texts, times) must be what one update of them all gives, for the flags that reopen
    (acknowledged, newer evidence) and those that stay open alike."""
    import pipeline.flags as flags_module

    def scenario(name: str) -> pd.DataFrame:
        s = Store(f"sqlite:///{tmp_path}/{name}.db")
        s.init()
        ids = [f"D{i}" for i in range(5)]
        adm = [r for e in ids for r in series(e, "PHQ-9", [0, 7], [10, 17])]
        run(tmp_path, s, reg, [episode(e, ended=False) for e in ids], adm, name=name)
        t_review = datetime.combine(DAY0, datetime.min.time()) + timedelta(days=10)
        for e in ids[:3]:
            record_review(s, e, reviewer="ann", decision="step_up", note="", now=t_review)
        newer = write_csv(tmp_path / name / "newer.csv", ADMIN_HEADER,
                          [r for e in ids for r in series(e, "PHQ-9", [14], [19],
                                                          first_session=3)])
        ingest_paths([newer], s, Settings(), reg, now=NOW)
        compute(s, Settings(), reg, now=t_review + timedelta(hours=2))
        return flags_of(s).sort_values("flag_id").reset_index(drop=True)

    whole = scenario("whole")
    monkeypatch.setattr(flags_module, "_UPDATE_CHUNK", chunk)
    chunked = scenario("chunked")
    pd.testing.assert_frame_equal(chunked, whole)
    det = whole[whole["kind"] == "reliable_deterioration"]
    assert det["state"].tolist() == ["open"] * 5  # three reopened, two still open
    assert all(json.loads(e)["last_score"] == 19 for e in det["evidence"])


def test_last_seen_is_written_only_with_the_flag_and_reported_as_of_the_latest_run(
        tmp_path: Path, store: Store, reg: Registry,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A flag that fires unchanged is not rewritten (its stored last_seen stays at its
    last write), one whose evidence changed is (last_seen = that run's clock), one that
    stops firing is resolved with last_seen = the run before (it fired then). The
    command line reports a live flag as seen at the latest run."""
    from pipeline.cli import main

    t1, t2, t3 = NOW, NOW + timedelta(days=1), NOW + timedelta(days=2)
    run(tmp_path, store, reg, [episode("D", ended=False), episode("E", ended=False)],
        series("D", "PHQ-9", [0, 7], [10, 17]) + series("E", "PHQ-9", [0, 7], [10, 17]),
        now=t1)
    compute(store, Settings(), reg, now=t2, full=True)  # nothing new: nothing changes

    def deterioration() -> pd.DataFrame:
        f = flags_of(store)
        return f[f["kind"] == "reliable_deterioration"].set_index("episode_id")

    f = deterioration()
    assert (pd.to_datetime(f["last_seen"]) == t1).all() and (f["state"] == "open").all()
    later = write_csv(tmp_path / "a" / "later.csv", ADMIN_HEADER,
                      series("D", "PHQ-9", [14], [11], first_session=3)  # recovered
                      + series("E", "PHQ-9", [14], [19], first_session=3))  # worse
    ingest_paths([later], store, Settings(), reg, now=t3)
    compute(store, Settings(), reg, now=t3)
    f = deterioration()
    assert f.loc["D", "state"] == "resolved"
    assert pd.Timestamp(f.loc["D", "last_seen"]) == t2  # the run before: it fired then
    assert pd.Timestamp(f.loc["D", "resolved_at"]) == t3
    assert f.loc["E", "state"] == "open" and pd.Timestamp(f.loc["E", "last_seen"]) == t3
    assert json.loads(f.loc["E", "evidence"])["last_score"] == 19

    compute(store, Settings(), reg, now=t3 + timedelta(hours=5), full=True)
    capsys.readouterr()
    assert main(["--database-url", store.engine.url.render_as_string(hide_password=False),
                 "flags", "--all", "--json"]) == 0
    listed = {(x["episode_id"], x["kind"]): x
              for x in json.loads(capsys.readouterr().out)}
    assert listed[("E", "reliable_deterioration")]["last_seen"] == \
        (t3 + timedelta(hours=5)).isoformat()  # live: as of the latest run
    assert listed[("D", "reliable_deterioration")]["last_seen"] == t2.isoformat()
    assert pd.Timestamp(deterioration().loc["E", "last_seen"]) == t3  # not rewritten


def test_review_revises_goals_as_a_new_plan_version(tmp_path: Path, store: Store,
                                                   reg: Registry) -> None:
    run(tmp_path, store, reg, [episode("P", ended=False)], series("P", "PHQ-9", [0], [15]))
    goals = pd.DataFrame({"goal_id": ["G1"], "measure": ["PHQ-9"], "kind": ["below"],
                          "target": [10.0], "due_session": [8]})
    r1 = record_review(store, "P", reviewer="ann", decision="revise", new_goals=goals, now=NOW)
    r2 = record_review(store, "P", reviewer="ann", decision="revise",
                       new_goals=goals.assign(target=8.0), now=NOW)
    assert (r1.plan_version, r2.plan_version) == (1, 2)
    g = store.read_table("goals").sort_values("plan_version")
    assert g["target"].tolist() == [10.0, 8.0]  # the old version is kept


def test_review_of_unknown_or_invisible_episode_is_refused(tmp_path: Path, store: Store,
                                                          reg: Registry) -> None:
    from pipeline.errors import UsageError

    run(tmp_path, store, reg, [episode("V", ended=False)], series("V", "PHQ-9", [0], [15]))
    with pytest.raises(UsageError, match="not found"):
        record_review(store, "NOPE", reviewer="ann", decision="continue")
    with pytest.raises(UsageError, match="not found"):
        record_review(store, "V", reviewer="ann", decision="continue",
                      visible_episodes={"OTHER"})
    assert store.read_table("reviews").empty


# ------------------------------------------------------------------ goals


def _outcome(last_score: int, slope: float, lo: float, hi: float, n: int = 5) -> pd.DataFrame:
    return pd.DataFrame({
        "episode_id": ["E"], "measure": ["PHQ-9"], "first_score": [20], "last_score": [last_score],
        "last_at": [pd.Timestamp("2026-03-02")], "n": [n], "weeks": [8.0],
        "slope_week": [slope], "slope_ci_low": [lo], "slope_ci_high": [hi],
        "stalled": [False], "not_on_track": [False]})


def _goal(kind: str = "below", target: float = 10, due: str | None = "2026-05-01",
          due_session: int | None = None, sustain: int = 1) -> pd.DataFrame:
    return pd.DataFrame({"episode_id": ["E"], "goal_id": ["G"], "measure": ["PHQ-9"],
                         "kind": [kind], "target": [target],
                         "due_date": [pd.Timestamp(due).date() if due else None],
                         "due_session": [due_session], "sustain": [sustain]})


NO_ADMINS = pd.DataFrame({"episode_id": ["E"], "measure": ["PHQ-9"],
                          "administered_at": [pd.Timestamp("2026-03-02")], "score": [16]})


@pytest.mark.parametrize(("weeks", "n", "due"), [
    (13 / 7, 4, "2026-03-19 08:00:00"),  # 13 days / 3 gaps x 4 sessions = 17 d 8 h
    (34 / 7, 6, "2026-03-15 14:24:00"),  # 34 / 5 x 2 = 13.6 d
    (8.0, 5, "2026-04-13 00:00:00")])  # 56 / 4 x 3 = 42 d
def test_a_session_due_date_is_estimated_to_the_second(weeks: float, n: int,
                                                       due: str) -> None:
    """A goal due at session 8 of an episode with n sessions over ``weeks``: due at the
    last score (2026-03-02) + (8 - n) x the mean days between sessions (hand-computed),
    to the second (float days gave 07:59:59.999999997 for the first case)."""
    out = _outcome(16, -1.0, -1.5, -0.5, n=n).assign(weeks=[weeks])
    g = goal_status(_goal(due=None, due_session=8), NO_ADMINS, out, load_registry(),
                    Settings(), datetime(2026, 3, 3)).iloc[0]
    assert g["due_at"] == pd.Timestamp(due)


def test_goal_projection_from_hand_computed_slope() -> None:
    # Last score 16 on 2026-03-02, slope -1/week (CI -1.5 to -0.5), target below 10:
    # 6 points to go -> 6 weeks (2026-04-13); fastest 4 weeks (2026-03-30); slowest
    # 12 weeks (2026-05-25). Due 2026-05-01 -> on track.
    g = goal_status(_goal(), NO_ADMINS, _outcome(16, -1.0, -1.5, -0.5), load_registry(),
                    Settings(), datetime(2026, 3, 3)).iloc[0]
    assert g["status"] == "on_track"
    assert g["projected_at"] == pd.Timestamp("2026-04-13")
    assert g["projected_earliest"] == pd.Timestamp("2026-03-30")
    assert g["projected_latest"] == pd.Timestamp("2026-05-25")
    # Due earlier than the projection: at risk.
    g = goal_status(_goal(due="2026-04-01"), NO_ADMINS, _outcome(16, -1.0, -1.5, -0.5),
                    load_registry(), Settings(), datetime(2026, 3, 3)).iloc[0]
    assert g["status"] == "at_risk"
    # A flat trend is not projected at all.
    g = goal_status(_goal(), NO_ADMINS, _outcome(16, 0.0, -0.5, 0.5), load_registry(),
                    Settings(), datetime(2026, 3, 3)).iloc[0]
    assert g["status"] == "at_risk" and pd.isna(g["projected_at"])
    assert "not projected" in g["status_reason"]
    # Past due and not met: overdue.
    g = goal_status(_goal(due="2026-02-01"), NO_ADMINS, _outcome(16, -1.0, -1.5, -0.5),
                    load_registry(), Settings(), datetime(2026, 3, 3)).iloc[0]
    assert g["status"] == "overdue"


@pytest.mark.parametrize(("sustain", "met_day"), [(1, 7), (2, 28)])
def test_sustain_needs_consecutive_administrations(sustain: int, met_day: int) -> None:
    days = [0, 7, 14, 21, 28]
    scores = [12, 9, 11, 9, 8]  # below 10 at days 7, 21, 28: consecutive only at 21-28
    admins = pd.DataFrame({"episode_id": "E", "measure": "PHQ-9",
                           "administered_at": [pd.Timestamp(DAY0) + pd.Timedelta(days=d)
                                               for d in days], "score": scores})
    out = _outcome(8, -0.8, -1.5, -0.1).assign(first_score=12)
    g = goal_status(_goal(sustain=sustain), admins, out, load_registry(), Settings(),
                    datetime(2026, 3, 3)).iloc[0]
    assert g["status"] == "met"
    assert g["met_at"] == pd.Timestamp(DAY0) + pd.Timedelta(days=met_day)


def test_goal_kinds_reduction_reliable_improvement_remission() -> None:
    admins = pd.DataFrame({"episode_id": "E", "measure": "PHQ-9",
                           "administered_at": pd.to_datetime(["2026-01-05", "2026-01-12",
                                                              "2026-01-19"]),
                           "score": [20, 14, 10]})
    out = _outcome(10, -5.0, -6.0, -4.0, n=3)
    reg, st, today = load_registry(), Settings(), datetime(2026, 1, 20)
    # 50% reduction from 20 is reached at exactly 10 (inclusive).
    g = goal_status(_goal("reduction_pct", 50), admins, out, reg, st, today).iloc[0]
    assert g["status"] == "met" and g["met_at"] == pd.Timestamp("2026-01-19")
    # Reliable improvement of 6 points: 20 -> 14 is exactly 6 (inclusive).
    g = goal_status(_goal("reliable_improvement", 6), admins, out, reg, st, today).iloc[0]
    assert g["met_at"] == pd.Timestamp("2026-01-12")
    # Remission (PHQ-9 < 5) not reached; below 10 is strict, so 10 does not meet it.
    g = goal_status(_goal("remission", 0), admins, out, reg, st, today).iloc[0]
    assert g["status"] != "met"
    g = goal_status(_goal("below", 10), admins, out, reg, st, today).iloc[0]
    assert g["status"] != "met"


@pytest.mark.parametrize("seed", [11, 12])
def test_goal_status_with_the_computes_group_order_is_the_same(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full compute hands goal_status the administrations' group order instead of
    letting it sort them again: every column must be the same either way, and met_at
    (kind "below") must be what a plain walk through each goal's scores in time order
    gives. Ties in time, goals without administrations and unknown episodes included."""
    rng = np.random.default_rng(seed)
    n = 600
    admins = pd.DataFrame({
        "episode_id": pd.array(rng.choice([f"E{i}" for i in range(12)], n), dtype="str"),
        "measure": pd.array(rng.choice(["PHQ-9", "GAD-7"], n), dtype="str"),
        "administered_at": (pd.Timestamp("2026-01-05") + pd.to_timedelta(
            rng.integers(0, 30, n) * 7, unit="D")).astype("datetime64[us]"),
        "score": rng.integers(0, 22, n)})
    reg, st, today = load_registry(), Settings(), datetime(2026, 9, 1)
    grouped = group_administrations(admins)
    out, _ = episode_outcomes(admins, reg, st, Reference(), grouped=grouped)
    goals = pd.DataFrame({
        "episode_id": [f"E{i}" for i in range(14) for _ in range(2)],
        "goal_id": [f"G{i}" for i in range(28)],
        "measure": ["PHQ-9", "GAD-7"] * 14,
        "kind": rng.choice(["below", "reduction_pct", "remission"], 28),
        "target": rng.integers(5, 15, 28).astype(float),
        "due_date": [pd.Timestamp("2026-06-01").date()] * 28,
        "due_session": [None] * 28, "sustain": rng.integers(1, 4, 28)})
    plain = goal_status(goals, admins, out, reg, st, today)
    fast = goal_status(goals, admins, out, reg, st, today, grouped=grouped)
    pd.testing.assert_frame_equal(fast, plain)
    for block in (1, 5, 7):  # goals a few at a time: the same result
        monkeypatch.setattr(goals_module, "GOAL_BLOCK", block)
        pd.testing.assert_frame_equal(
            goal_status(goals, admins, out, reg, st, today, grouped=grouped), fast)
        pd.testing.assert_frame_equal(goal_status(goals, admins, out, reg, st, today), fast)
    walked = admins.assign(row=np.arange(n)).sort_values(
        ["episode_id", "measure", "administered_at", "row"])
    for goal in goals[goals["kind"] == "below"].itertuples():
        met_at, run = pd.NaT, 0
        rows = walked[(walked["episode_id"] == goal.episode_id) &
                      (walked["measure"] == goal.measure)]
        for score, at in zip(rows["score"], rows["administered_at"], strict=True):
            run = run + 1 if score < goal.target else 0
            if run >= goal.sustain:
                met_at = at
                break
        got = fast.loc[fast["goal_id"] == goal.goal_id, "met_at"].iloc[0]
        assert (pd.isna(got) and pd.isna(met_at)) or got == met_at, goal.goal_id


def test_goal_flags_for_open_episodes(tmp_path: Path, store: Store, reg: Registry) -> None:
    eps = [episode("LATE", ended=False), episode("DONE_GOAL", ended=False),
           episode("CLOSED")]
    adm = []
    for e, scores in (("LATE", [18, 17, 17, 16]), ("DONE_GOAL", [18, 12, 9, 8]),
                      ("CLOSED", [18, 17, 17, 16])):
        adm += series(e, "PHQ-9", [0, 7, 14, 21], scores)
    paths = entity_files(tmp_path / "g", eps)
    paths.append(write_csv(tmp_path / "g" / "adm.csv", ADMIN_HEADER, adm))
    plan = [{"episode_id": e, "goal_id": "G1", "measure": "PHQ-9", "kind": "below",
             "target": 10, "due": "2026-03-01"} for e in ("LATE", "DONE_GOAL", "CLOSED")]
    paths.append(write_csv(tmp_path / "g" / "plans.csv",
                           ["episode_id", "goal_id", "measure", "kind", "target", "due"], plan))
    ingest_paths(paths, store, Settings(), reg, now=NOW)
    compute(store, Settings(), reg, now=NOW)
    f = flags_of(store)
    assert "goal_overdue" in kinds_for(f, "LATE")  # due 2026-03-01, still 16
    assert not {"goal_overdue", "goal_at_risk"} & kinds_for(f, "DONE_GOAL")  # met (9 < 10)
    assert not {"goal_overdue", "goal_at_risk"} & kinds_for(f, "CLOSED")  # not open
    row = f[(f["episode_id"] == "LATE") & (f["kind"] == "goal_overdue")].iloc[0]
    assert row["key"] == "G1" and "past due" in row["message"]


def test_incremental_flags_equal_a_full_evaluation(tmp_path: Path, store: Store,
                                                   reg: Registry) -> None:
    """An incremental run evaluates affected + open episodes only; a full run that keeps
    the reference must find exactly the same flags, goal statuses and summaries."""
    import csv

    sample = Path(__file__).resolve().parent.parent / "data" / "sample" / "input"
    settings = Settings()
    ingest_paths([sample / f for f in ("therapists.csv", "clients.csv", "episodes.csv",
                                       "plans.csv")], store, settings, reg, now=NOW)
    with (sample / "administrations.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    header = list(rows[0])
    # The second file touches a third of the episodes only, so some open episodes are
    # left out of the incremental run's "affected" set.
    def touched(r: dict[str, str]) -> bool:
        eid = r["episode_id"]
        return eid[1:].isdigit() and int(eid[1:]) % 3 == 0 and \
            r["administered_at"] >= "2026-06-01"
    first = [r for r in rows if not touched(r)]
    later = [r for r in rows if touched(r)]
    ingest_paths([write_csv(tmp_path / "a1.csv", header, first)], store, settings, reg,
                 now=NOW)
    compute(store, settings, reg, full=True, now=NOW)
    ingest_paths([write_csv(tmp_path / "a2.csv", header, later)], store, settings, reg,
                 now=NOW)
    # A month later: date-based rules move on for open episodes the new data never touched.
    later_now = NOW + timedelta(days=30)
    rep = compute(store, settings, reg, now=later_now)
    assert rep.mode == "incremental"

    def snapshot() -> dict[str, pd.DataFrame]:
        f = flags_of(store)[["episode_id", "measure", "kind", "key", "severity", "state",
                             "message", "evidence"]]
        out = {"flags": f.sort_values(["episode_id", "measure", "kind", "key"])}
        for t, keys in (("goal_status", ["episode_id", "goal_id"]),
                        ("caseload", ["episode_id"]), ("episode_service", ["episode_id"])):
            out[t] = store.read_table(t).drop(columns="run_id").sort_values(keys)
        return {k: v.reset_index(drop=True) for k, v in out.items()}

    inc = snapshot()
    compute(store, settings, reg, full=True, keep_reference=True, now=later_now)
    full = snapshot()
    for name in inc:
        pd.testing.assert_frame_equal(inc[name], full[name], check_dtype=False, obj=name)
    assert len(inc["flags"]) > 100


def test_review_due_takes_the_latest_reviews_own_next_date() -> None:
    """A later review that sets no next date supersedes an earlier one's: due N weeks
    after it, not on the earlier review's date (hand-computed)."""
    from pipeline.flags import review_due

    eps = pd.DataFrame({"episode_id": ["A", "B", "C"],
                        "start_date": ["2026-01-05", "2026-01-05", "2026-01-05"]})
    rv = pd.DataFrame({"review_id": [2, 1, 3],
                       "episode_id": ["A", "A", "B"],
                       "reviewed_at": pd.to_datetime(["2026-03-02 10:00", "2026-02-02 10:00",
                                                      "2026-02-16 09:00"]),
                       "next_review": [None, "2026-02-20", "2026-04-01"]})
    _, due = review_due(eps, rv, 6)
    assert [str(d) for d in due] == ["2026-04-13 10:00:00",   # 2 Mar + 6 weeks
                                     "2026-04-01 00:00:00",   # the date B's review set
                                     "2026-02-16 00:00:00"]   # C: 5 Jan + 6 weeks


def test_goal_met_dates_for_many_goals_against_a_goal_by_goal_reading() -> None:
    """Many goals at once (several per episode x measure, some without administrations,
    rows shuffled, tied times): each goal's met date equals the one found by reading its
    own administrations in time order, rule by rule (module docstring; ORS mirrored)."""
    rng = np.random.default_rng(8)
    rows, goals_, outs = [], [], []
    day0 = pd.Timestamp("2026-01-05 09:00")
    for e in range(60):
        for measure in ("PHQ-9", "ORS"):
            k = int(rng.integers(0, 9))
            days = np.sort(rng.integers(0, 60, k))  # repeated days: tied times
            scores = rng.integers(0, 28 if measure == "PHQ-9" else 41, k)
            for d, y in zip(days, scores, strict=True):
                rows.append({"episode_id": f"E{e:02d}", "measure": measure,
                             "administered_at": day0 + pd.Timedelta(days=int(d)),
                             "score": int(y)})
            if k:
                outs.append({"episode_id": f"E{e:02d}", "measure": measure,
                             "first_score": int(scores[0]), "last_score": int(scores[-1]),
                             "last_at": day0 + pd.Timedelta(days=int(days[-1])), "n": k,
                             "weeks": float(days[-1] - days[0]) / 7, "slope_week": -0.5,
                             "slope_ci_low": -1.0, "slope_ci_high": 0.1, "stalled": False,
                             "not_on_track": False})
            for j in range(int(rng.integers(1, 4))):
                kind = ["below", "reduction_pct", "reliable_improvement"][j]
                target = {"below": 12 if measure == "PHQ-9" else 25, "reduction_pct": 30,
                          "reliable_improvement": 5}[kind]
                goals_.append({"episode_id": f"E{e:02d}", "goal_id": f"G{e}{measure}{j}",
                               "measure": measure, "kind": kind, "target": target,
                               "due_date": None, "due_session": None,
                               "sustain": int(rng.integers(1, 3))})
    admins = pd.DataFrame(rows).sample(frac=1.0, random_state=2).reset_index(drop=True)
    admins["administered_at"] = admins["administered_at"].astype("datetime64[us]")
    g = goal_status(pd.DataFrame(goals_), admins, pd.DataFrame(outs), load_registry(),
                    Settings(), datetime(2026, 6, 1))
    met = 0
    for goal, got in zip(goals_, g["met_at"], strict=True):
        mine = admins[(admins["episode_id"] == goal["episode_id"]) &
                      (admins["measure"] == goal["measure"])]
        mine = mine.sort_values("administered_at", kind="stable")
        up = goal["measure"] == "ORS"  # higher is better: every comparison mirrored
        ys = mine["score"].tolist()
        expected, run = None, 0
        for at, y in zip(mine["administered_at"], ys, strict=True):
            gain = (y - ys[0]) if up else (ys[0] - y)
            ok = {"below": (y > goal["target"]) if up else (y < goal["target"]),
                  "reduction_pct": gain >= ys[0] * goal["target"] / 100,
                  "reliable_improvement": gain >= goal["target"]}[goal["kind"]]
            run = run + 1 if ok else 0
            if run >= goal["sustain"]:
                expected = at
                break
        if expected is None:
            assert pd.isna(got), goal
        else:
            met += 1
            assert got == expected, goal
    assert 40 < met < len(goals_)


def test_risk_flag_without_session_number_has_null_evidence() -> None:
    """A risk item endorsed at an administration with no session number: the evidence
    says null (JSON), never the text "<NA>", and the message leaves the session out."""
    a = pd.DataFrame({"episode_id": ["E"], "measure": ["PHQ-9"],
                      "administered_at": [pd.Timestamp("2026-01-05 10:00")],
                      "risk": ["yes"], "risk_value": [2], "score": [15],
                      "session_number": pd.array([pd.NA], dtype="Int64")})
    f = risk_flags(a, load_registry()).iloc[0]
    assert json.loads(f["evidence"]) == {"administered_at": "2026-01-05 10:00:00",
                                         "risk_items": [9], "risk_value": 2, "score": 15,
                                         "session_number": None}
    assert f["message"] == ("PHQ-9 item 9 answered 2 on 2026-01-05: check risk and the "
                            "safety plan")


def _strict(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_evidence_is_strict_json_with_missing_values_as_null() -> None:
    """Evidence is JSON a browser can parse: keys sorted, a missing number (NaN, or
    infinity), date (NaT) or value (pd.NA) is null, never ``NaN`` or the text "NaT";
    numpy integers stay numbers; dates read as before ("YYYY-MM-DD HH:MM:SS")."""
    text = encode_evidence({
        "slope_week": np.float64("nan"), "rci": 2.5, "n": np.int64(6), "ok": np.bool_(True),
        "projected_at": pd.NaT, "due_at": pd.Timestamp("2026-12-05"),
        "last_at": np.datetime64("2026-01-05T10:00:00"), "start_date": pd.Timestamp(
            "2026-01-05").date(), "session_number": pd.NA, "ratio": float("inf"),
        "risk_items": [np.int64(9)], "goal_id": "NaT"})
    assert text == ('{"due_at":"2026-12-05 00:00:00","goal_id":"NaT",'
                    '"last_at":"2026-01-05 10:00:00","n":6,"ok":true,"projected_at":null,'
                    '"ratio":null,"rci":2.5,"risk_items":[9],"session_number":null,'
                    '"slope_week":null,"start_date":"2026-01-05"}')
    assert _strict(text)["projected_at"] is None


def test_goal_flag_without_a_projection_has_null_dates(store: Store, reg: Registry,
                                                     tmp_path: Path) -> None:
    """A goal at risk with no projected date (too few scores to project): the stored
    evidence says null for the projection, and every stored evidence is strict JSON."""
    eps = [episode("WORSE", ended=False), episode("LATE", ended=False)]
    adm = series("WORSE", "PHQ-9", [0, 7, 14, 21], [16, 17, 17, 18]) + \
        series("LATE", "PHQ-9", [0, 7, 14, 21], [18, 17, 17, 16])
    paths = entity_files(tmp_path / "g", eps)
    paths.append(write_csv(tmp_path / "g" / "adm.csv", ADMIN_HEADER, adm))
    paths.append(write_csv(tmp_path / "g" / "plans.csv",
                           ["episode_id", "goal_id", "measure", "kind", "target", "due"],
                           [{"episode_id": e, "goal_id": "G1", "measure": "PHQ-9",
                             "kind": "below", "target": 10, "due": "2026-03-01"}
                            for e in ("WORSE", "LATE")]))
    ingest_paths(paths, store, Settings(), reg, now=NOW)
    compute(store, Settings(), reg, now=NOW)
    f = flags_of(store)
    evidence = {(r.episode_id, r.kind): _strict(r.evidence) for r in f.itertuples()}
    worse = evidence[("WORSE", "goal_overdue")]  # getting worse: nothing to project
    assert worse["projected_at"] is None and worse["projected_latest"] is None, worse
    assert worse["last_score"] == 18 and worse["due_at"] == "2026-03-01 00:00:00", worse
    late = evidence[("LATE", "goal_overdue")]  # improving: a projected date
    assert isinstance(late["projected_at"], str), late


def test_stable_until_is_the_first_date_rule_flip_at_or_after_the_clock() -> None:
    """Per open episode, the last instant before a clock comparison flips
    (hand-computed): review due (due < date: the last microsecond of the due date), no
    recent score (threshold < clock: the threshold itself), a goal's due date (its last
    microsecond); instants before the clock do not count; closed episodes get no row;
    nothing ahead gives NaT."""
    from pipeline.flags import RuleInput, stable_until

    eps = pd.DataFrame({"episode_id": ["A", "B", "C", "D", "E"],
                        "start_date": ["2026-01-05"] * 5,
                        "end_date": [None, None, None, "2026-02-01", None]})
    rv = pd.DataFrame({"review_id": [1, 2], "episode_id": ["A", "E"],
                       "reviewed_at": pd.to_datetime(["2026-02-02 10:00", "2026-01-06 10:00"]),
                       "next_review": ["2026-02-20", "2026-01-10"]})
    adm = pd.DataFrame({"episode_id": ["A", "A", "B", "E"],
                        "administered_at": pd.to_datetime([
                            "2026-02-01 09:00", "2026-02-09 14:30", "2026-01-26 08:15",
                            "2026-01-06 11:00"])})
    goals = pd.DataFrame({"episode_id": ["A", "C", "C", "D", "B"],
                          "due_date": ["2026-03-31", "2026-02-10", "2026-02-27",
                                       "2026-02-12", None]})
    inp = RuleInput(outcomes=pd.DataFrame(), administrations=adm, episodes=eps,
                    sudden=pd.DataFrame(), goals=goals, reviews=rv, registry=load_registry(),
                    settings=Settings(review_overdue_weeks=6, missing_measures_weeks=4),
                    today=datetime(2026, 2, 12, 9, 0))
    got = stable_until(inp).set_index("episode_id")["stable_until"]
    assert sorted(got.index) == ["A", "B", "C", "E"]  # D is closed
    # A: review set for 20 Feb (overdue from 21 Feb); last score 9 Feb 14:30 + 4 weeks =
    # 9 Mar 14:30; goal due 31 Mar. Earliest: the end of 20 Feb.
    assert got["A"] == pd.Timestamp("2026-02-20 23:59:59.999999")
    # B: no review, due 5 Jan + 6 weeks = 16 Feb; last score 26 Jan 08:15 + 4 weeks =
    # 23 Feb 08:15; its goal has no date. Earliest: the end of 16 Feb.
    assert got["B"] == pd.Timestamp("2026-02-16 23:59:59.999999")
    # C: no score: start 5 Jan + 4 weeks = 2 Feb (past); review due 16 Feb; goals due
    # 10 Feb (past) and 27 Feb. Earliest ahead: the end of 16 Feb.
    assert got["C"] == pd.Timestamp("2026-02-16 23:59:59.999999")
    # E: review set for 10 Jan (past), score 6 Jan + 4 weeks = 3 Feb (past): for ever.
    assert pd.isna(got["E"])
    # A clock exactly at an instant keeps it (the result changes just after it); a
    # threshold is its own instant: B at 23 Feb 08:15 (past its review) holds until
    # then.
    later = dataclasses.replace(inp, today=datetime(2026, 2, 20, 23, 59, 59, 999999))
    assert stable_until(later).set_index("episode_id")["stable_until"]["A"] == \
        pd.Timestamp("2026-02-20 23:59:59.999999")
    assert stable_until(later).set_index("episode_id")["stable_until"]["B"] == \
        pd.Timestamp("2026-02-23 08:15")


def test_rule_columns_read_as_to_dict_reads_them() -> None:
    """The rules' column reader gives, for every dtype a rule input holds, exactly the
    values and Python types ``DataFrame.to_dict`` gives: NaN, NaT and None where a
    value is missing (never pd.NA, which the evidence JSON would write as "<NA>"),
    Python scalars where an object column holds numpy ones."""
    from pipeline.flags import _lists

    df = pd.DataFrame({
        "i": np.array([1, 2, 3]), "f": [1.5, np.nan, 2.0], "b": [True, False, True],
        "dt": pd.to_datetime(["2026-01-01 10:00", None, "2026-02-01 00:00"])
        .astype("datetime64[us]"),
        "s": pd.Series(["a", None, "c"], dtype="str"),
        "I": pd.array([1, None, 3], dtype="Int64"),
        "B": pd.array([True, None, False], dtype="boolean"),
        "o": pd.Series([None, np.float64(1.5), np.int64(2)], dtype=object)})
    got = _lists(df, [*df.columns, "absent"])
    want = df.to_dict(orient="list")
    for c in df.columns:
        assert [type(x) for x in got[c]] == [type(x) for x in want[c]], c
        assert all(x is y or x == y or (x != x and y != y)
                   for x, y in zip(got[c], want[c], strict=True)), c
    assert got["I"][1] is None and got["B"][1] is None and type(got["o"][1]) is float
    assert got["absent"] == [None, None, None]


def test_refresh_compares_stored_text_part_by_part() -> None:
    """refresh compares each part of the stored flags with what fires as it reads them
    and keeps a boolean instead of the text; that must say "unchanged" exactly where the
    text comparison after the merge does (severity, rule, message and evidence all
    equal: a rule whose text changed, e.g. a new threshold, is shown as it is now)."""
    from pipeline.flags import _TEXT, _Unchanged

    ident = ["episode_id", "measure", "kind", "key"]
    firing = pd.DataFrame({
        "episode_id": ["E1", "E1", "E2", "E3", "E4", "E5"],
        "measure": ["PHQ-9", "", "GAD-7", "", "", "PHQ-9"],
        "kind": ["stalled", "review_overdue", "stalled", "goal_at_risk", "goal_at_risk",
                 "stalled"], "key": ["", "", "", "G1", "G2", ""], "severity": ["review"] * 6,
        "rule": ["r"] * 5 + ["slope > 0.3/week"],
        "message": ["m1", "m2", "m3 new", "m4", None, "m5"], "evidence": ['{"a": 1}'] * 6})
    firing = firing.astype({c: "str" for c in firing.columns})
    stored = pd.DataFrame({
        "flag_id": [10, 11, 12, 13, 14, 15, 16],
        "episode_id": ["E1", "E1", "E2", "E3", "E4", "E9", "E5"],
        "measure": ["PHQ-9", "", "GAD-7", "", "", "", "PHQ-9"],
        "kind": ["stalled", "review_overdue", "stalled", "goal_at_risk", "goal_at_risk",
                 "stalled", "stalled"], "key": ["", "", "", "G1", "G2", "", ""],
        "state": ["open"] * 7, "acknowledged_at": [None] * 7,
        "severity": ["review", "urgent", "review", "review", "review", "review", "review"],
        "rule": ["r"] * 6 + ["slope > 0.5/week"],
        "message": ["m1", "m2", "m3", "m4", "m5", "m9", "m5"],
        "evidence": ['{"a": 1}', '{"a": 1}', '{"a": 1}', '{"a": 2}', '{"a": 1}', "{}",
                     '{"a": 1}']})
    # E1/PHQ-9 same; E1 severity changed; E2 message changed; E3 evidence changed;
    # E4 firing message missing (never equal); E9 not firing; E5 rule changed.
    want = [True, False, False, False, False, False]
    assert set(_TEXT) == {"severity", "rule", "message", "evidence"}

    slim = _Unchanged(firing)
    assert slim.slim
    parts = pd.concat([slim(stored.iloc[:2]), slim(stored.iloc[2:])], ignore_index=True)
    assert not set(_TEXT) & set(parts.columns)
    m = firing.merge(parts[[*ident, "flag_id", *slim.columns]], on=ident, how="left")
    assert slim.unchanged(m[m["flag_id"].notna()]).tolist() == want
    # Placed by the positions found while reading: what the merge gives, row for row.
    joined = slim.joined(firing.set_axis([7, 7, 3, 1, 0, 2]), parts)  # any index
    assert joined.index.tolist() == list(range(6))
    merged = firing.merge(parts[[*ident, "flag_id", "state", "acknowledged_at", "_same"]],
                          on=ident, how="left")
    for c in ("flag_id", "state", "acknowledged_at", "_same", *firing.columns):
        assert joined[c].tolist() == merged[c].tolist(), c

    text = _Unchanged(pd.concat([firing, firing.iloc[:1]], ignore_index=True))
    assert not text.slim  # duplicated identities: compared after the merge, as text
    m = firing.merge(text(stored)[[*ident, "flag_id", *text.columns]], on=ident, how="left",
                     suffixes=("", "_was"))
    assert text.unchanged(m[m["flag_id"].notna()]).tolist() == want


def test_slim_rule_input_gives_the_same_flags_and_instants(tmp_path: Path,
                                                           reg: Registry) -> None:
    """A full compute hands the rules a slim input (only the endorsed risk items of the
    administrations, the latest date per episode taken from all): every flag, its text
    and evidence, and every episode's stable_until must be what the whole input gives."""
    from pipeline.compute import rule_input
    from pipeline.flags import evaluate, stable_until
    from tests.conftest import SAMPLE_INPUT

    store = Store(f"sqlite:///{tmp_path}/s.db")
    store.init()
    settings = Settings()
    ingest_paths([SAMPLE_INPUT], store, settings, reg, now=NOW)
    compute(store, settings, reg, full=True, now=NOW)
    with store.engine.connect() as conn:
        whole = rule_input(conn, reg, settings, NOW)
    slim = whole.slim()
    assert 0 < len(slim.administrations) < len(whole.administrations) / 10
    full_flags, slim_flags = evaluate(whole), evaluate(slim)
    assert set(full_flags["kind"]) >= {"risk_item", "missing_measures"}
    pd.testing.assert_frame_equal(slim_flags, full_flags, check_exact=True)
    pd.testing.assert_frame_equal(stable_until(slim), stable_until(whole), check_exact=True)
    store.engine.dispose()


@pytest.mark.parametrize("value", [
    pd.Timestamp("2025-05-10 08:00:00"), pd.Timestamp("2024-02-29 23:59:59.999999"),
    datetime(999, 1, 2, 3, 4), datetime(2026, 12, 31), pd.NaT, None, float("nan"),
    np.datetime64("2025-01-03T10:00"), np.datetime64("NaT"), "2025-07-08",
    "2025-07-08 10:11:12.000000", pd.Timestamp("2025-03-04").date()])
def test_message_dates_read_as_strftime_gives_them(value: object) -> None:
    """_date formats datetimes from their fields: what strftime("%Y-%m-%d") gives."""
    from pipeline.flags import _date

    want = pd.Timestamp(value).strftime("%Y-%m-%d") if pd.notna(value) else "n/a"
    if isinstance(value, datetime) and value is not pd.NaT and value.year < 1000:
        want = datetime.strftime(value, "%Y-%m-%d")  # outside pandas' Timestamp range
    assert _date(value) == want


def test_a_rules_evidence_writes_repeated_dates_as_each_one_alone() -> None:
    """The encoder of a rule's flags, which writes each distinct date once, gives the
    text encode_evidence gives flag by flag: equal dates of either type (Timestamp,
    datetime) alike, other values never taken for a remembered date."""
    from pipeline.flags import _evidence_encoder

    at = pd.Timestamp("2026-01-05 10:00:00")
    flags = [{"last_at": at, "first_at": datetime(2026, 1, 5, 10), "n": np.int64(1),
              "ok": np.bool_(True)},
             {"last_at": datetime(2026, 1, 5, 10), "first_at": at, "n": 1, "ok": True},
             {"last_at": pd.NaT, "first_at": pd.Timestamp("2026-01-05 10:00:00.000001"),
              "n": np.int64(1), "ok": np.bool_(False)}]
    encode = _evidence_encoder()
    assert [encode(f) for f in flags] == [encode_evidence(f) for f in flags] == [
        '{"first_at":"2026-01-05 10:00:00","last_at":"2026-01-05 10:00:00","n":1,'
        '"ok":true}',
        '{"first_at":"2026-01-05 10:00:00","last_at":"2026-01-05 10:00:00","n":1,'
        '"ok":true}',
        '{"first_at":"2026-01-05 10:00:00.000001","last_at":null,"n":1,"ok":false}']


@pytest.mark.parametrize("values, dtype", [
    ([True, None, False], object), ([np.True_, None, 1.5], object),
    ([1, None, float("nan"), "x"], object), ([np.int64(3), 2], object),
    ([1, None], "Int64"), ([True, None], "boolean"),
    ([pd.Timestamp("2024-01-01"), None], object), ([1.5, np.nan], "float64"),
])
def test_rule_columns_as_lists_are_what_to_dict_gives(values: list, dtype: str) -> None:
    """flags._list's shortcuts give the values and Python types of to_dict."""
    from pipeline.flags import _list

    col = pd.Series(values, dtype=dtype, name="c")
    got, expected = _list(col), col.to_frame().to_dict(orient="list")["c"]
    assert [type(x) for x in got] == [type(x) for x in expected]
    assert all(x is y or x == y or (x != x and y != y)
               for x, y in zip(got, expected, strict=True))


def test_column_texts_equal_the_per_value_formatting() -> None:
    """The rules' messages are built column by column; each column's text must be what
    the per-value helpers give (``_fmt``: fixed decimals by str.format, a minus sign,
    ``n/a``; f-string ``str``; ``_date``), including ties, negative zero, NaN, large
    values, text, missing dates and years outside 1000-9999."""
    from pipeline.flags import _date, _date_col, _fmt, _fmt_col, _str_col

    rng = np.random.default_rng(9)
    floats = np.concatenate([
        [0.05, 0.15, 0.25, 0.35, 2.675, -0.04, -0.05, -0.0, 0.0, 1e17, -1e-9, np.nan,
         0.5, 1.5, 2.5, -2.5, 123456.789],
        rng.normal(0, 30, 2000), np.round(rng.normal(0, 5, 2000), 2)])
    for nd in (0, 1, 2):
        got = _fmt_col(pd.Series(floats), nd).to_pylist()
        assert got == [_fmt(v, nd) for v in floats.tolist()]
    assert _fmt_col(pd.Series([-0.04]), 1).to_pylist() == ["\u22120.0"]
    assert _fmt_col(pd.Series([0.25, 0.35]), 1).to_pylist() == ["0.2", "0.3"]  # binary
    ints = pd.Series([0, -5, 12, 10**12], dtype="int64")
    assert _str_col(ints).to_pylist() == ["0", "-5", "12", "1000000000000"]
    assert _fmt_col(ints, 1).to_pylist() == ["0", "-5", "12", "1000000000000"]
    mixed = pd.Series([1.0, None, "x"], dtype=object)
    assert _fmt_col(mixed).to_pylist() == [_fmt(1.0), "n/a", "x"]
    text = pd.Series(["PHQ-9", "GAD-7"], dtype="str")
    assert _str_col(text).to_pylist() == ["PHQ-9", "GAD-7"]
    assert _str_col(pd.Series([12.0, 3.5])).to_pylist() == ["12.0", "3.5"]  # as f"{v}"
    dates = pd.Series(pd.to_datetime(["2026-01-05 10:00:00", None, "2025-12-31 23:59:59"])
                      ).astype("datetime64[us]")
    assert _date_col(dates).to_pylist() == ["2026-01-05", "n/a", "2025-12-31"]
    old = pd.Series(np.array(["0999-03-04", "2026-01-05"], dtype="datetime64[us]"))
    assert _date_col(old).to_pylist() == [_date(v) for v in old] == ["999-03-04",
                                                                     "2026-01-05"]
