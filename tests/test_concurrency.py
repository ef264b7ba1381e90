"""Concurrency on SQLite and PostgreSQL: dashboard readers in several threads while a cycle
writes see one compute run at a time for an episode (never a mix) and never error; two
writers at once (a cycle and plan reviews) lose neither's writes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dashboard.access import Viewer
from dashboard.data import DataAccess
from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.ingest.batch import ingest_paths
from pipeline.reviews import record_review
from pipeline.scales import Registry
from pipeline.store import Store
from tests.conftest import NOW, SAMPLE_INPUT

DIRECTOR = Viewer(username="director", role="director")
CYCLES = 6
READERS = 3


@pytest.fixture
def computed(store: Store, settings: Settings, registry: Registry) -> Store:
    ingest_paths([SAMPLE_INPUT], store, settings, registry, now=NOW)
    compute(store, settings, registry, full=True, now=NOW)
    return store


def _open_episode(store: Store, skip: int = 0) -> str:
    oc = store.read_table("outcomes")
    gs = store.read_table("goal_status")
    ep = store.read_table("episodes")
    ids = sorted(set(ep.loc[ep["end_date"].isna(), "episode_id"])
                 & set(oc.loc[oc["measure"] == "PHQ-9", "episode_id"])
                 & set(gs["episode_id"]))
    return str(ids[skip])


def _cycle(store: Store, settings: Settings, registry: Registry, tmp: Path,
           episode: str, i: int) -> None:
    """One cycle: a new PHQ-9 score for the episode (a file), ingest, compute."""
    when = datetime(2026, 11, 1, 9) + timedelta(hours=i)
    path = tmp / f"cycle{i}.csv"
    path.write_text("episode_id,measure,administered_at,session_number,total\n"
                    f"{episode},PHQ-9,{when:%Y-%m-%dT%H:%M:%S},,{10 + i % 5}\n",
                    encoding="utf-8")
    ingest_paths([path], store, settings, registry, now=NOW)
    compute(store, settings, registry, now=NOW)


def _threads(target: Callable[[], None], n: int) -> list[threading.Thread]:
    return [threading.Thread(target=target, daemon=True) for _ in range(n)]


def test_readers_during_cycles_see_one_run_never_a_mix(
        computed: Store, settings: Settings, registry: Registry, tmp_path: Path) -> None:
    data = DataAccess(computed, settings, registry)
    episode = _open_episode(computed)
    stop = threading.Event()
    errors: list[BaseException] = []
    mixes: list[Any] = []
    seen: set[int] = set()
    reads = [0]
    lock = threading.Lock()

    def read() -> None:
        while not stop.is_set():
            try:
                e = data.episode(DIRECTOR, episode)
                assert e is not None
                # Every row the client page shows for the episode was written by the same
                # compute run: outcomes of every measure and the goal status.
                runs = set(e["outcomes"]["run_id"]) | set(e["goals"]["run_id"])
                n_phq = int(e["outcomes"].set_index("measure").loc["PHQ-9", "n"])
                shown = int((e["administrations"]["measure"] == "PHQ-9").sum())
                with lock:
                    reads[0] += 1
                    seen.update(int(r) for r in runs)
                    # Outcomes may lag a just-ingested score (compute not yet run), never
                    # lead it.
                    if len(runs) != 1 or n_phq > shown:
                        mixes.append((runs, n_phq, shown))
                case = data.caseload(DIRECTOR)
                assert episode in set(case["episode_id"])
            except BaseException as exc:  # collected and re-raised below
                errors.append(exc)
                return

    readers = _threads(read, READERS)
    for t in readers:
        t.start()
    try:
        for i in range(CYCLES):
            _cycle(computed, settings, registry, tmp_path, episode, i)
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=60)
    assert not errors, errors[0]
    assert mixes == []
    assert reads[0] >= READERS
    assert len(seen) >= 2  # the readers really overlapped the writes
    final = data.episode(DIRECTOR, episode)
    assert final is not None
    assert int(final["outcomes"].set_index("measure").loc["PHQ-9", "n"]) == \
        int((final["administrations"]["measure"] == "PHQ-9").sum())


def test_a_cycle_and_plan_reviews_at_once_lose_no_write(
        computed: Store, settings: Settings, registry: Registry, tmp_path: Path) -> None:
    cycled = _open_episode(computed, 0)
    reviewed = [_open_episode(computed, k) for k in range(1, 4)]
    adm_before = len(computed.read_table("administrations"))
    errors: list[BaseException] = []
    review_ids: list[int] = []

    def cycles() -> None:
        try:
            for i in range(CYCLES):
                _cycle(computed, settings, registry, tmp_path, cycled, i)
        except BaseException as exc:
            errors.append(exc)

    def reviews() -> None:
        try:
            for i in range(CYCLES * 2):
                e = reviewed[i % len(reviewed)]
                res = record_review(computed, e, reviewer="concurrency", decision="continue",
                                    note=f"review {i}", now=NOW)
                review_ids.append(res.review_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=cycles), threading.Thread(target=reviews)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
    rv = computed.read_table("reviews")
    assert sorted(rv["review_id"]) == sorted(review_ids) and len(rv) == CYCLES * 2
    assert sorted(rv["note"]) == sorted(f"review {i}" for i in range(CYCLES * 2))
    assert len(computed.read_table("administrations")) == adm_before + CYCLES
    runs = computed.read_table("compute_runs")
    assert (runs["status"] == "done").all() and len(runs) == CYCLES + 1
    # A flag acknowledged by a review stays acknowledged through later computes unless
    # its rule stopped firing (resolved): never silently reopened.
    fl = computed.read_table("flags")
    acked = fl[fl["review_id"].notna()]
    assert set(acked["state"]) <= {"acknowledged", "resolved"}
