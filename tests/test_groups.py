"""Ordering administrations into episode x measure groups: the same order, boundaries
and administration numbers as a plain stable sort of the text keys, by any input order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.stats.groups import group_administrations, stable_order


def frame(seed: int, n: int = 2000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    episodes = np.array(["E10", "E9", "e1", "E1", "É2", "E1 ", "Z", "A-1"])
    at = pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 50, n), unit="D")
    return pd.DataFrame({
        "episode_id": pd.array(rng.choice(episodes, n), dtype="str"),
        "measure": pd.array(rng.choice(["PHQ-9", "GAD-7", "CORE-10"], n), dtype="str"),
        "administered_at": at.astype("datetime64[us]"),  # many ties: input order kept
        "score": rng.integers(0, 28, n),
        "row": np.arange(n),
    })


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_group_order_equals_a_stable_sort(seed: int) -> None:
    a = frame(seed)
    g = group_administrations(a)
    expected = a.sort_values(["episode_id", "measure", "administered_at"], kind="stable")
    assert g.frame["row"].tolist() == expected["row"].tolist()
    keys = list(zip(expected["episode_id"], expected["measure"], strict=True))
    # Boundaries and numbering, computed the slow, readable way.
    starts = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]]
    assert g.starts.tolist() == starts
    assert g.ends.tolist() == [s - 1 for s in starts[1:]] + [len(keys) - 1]
    k, gid = [], []
    for i in range(len(keys)):
        k.append(1 if i in set(starts) else k[-1] + 1)
        gid.append(len([s for s in starts if s <= i]) - 1)
    assert g.k.tolist() == k
    assert g.gid.tolist() == gid
    assert g.n_groups == len(set(keys))
    # Each group's measure, as a code into the sorted distinct measures.
    assert [g.measures[c] for c in g.mcode] == [keys[s][1] for s in starts]
    assert list(g.measures) == sorted(set(a["measure"]))
    assert g.per_measure({"PHQ-9": 9}, 0).tolist() == \
        [9 if keys[s][1] == "PHQ-9" else 0 for s in starts]


def test_empty() -> None:
    g = group_administrations(frame(1).iloc[:0])
    assert g.n_groups == 0 and g.frame.empty


@pytest.mark.parametrize("seed", [4, 5])
def test_rows_already_in_time_order_keep_the_stable_order(seed: int) -> None:
    """Rows in time order (as ingest stores them) are ordered by the group key alone;
    the result must still be the stable sort's, ties included, and the column readers
    must return the ordered values."""
    a = frame(seed).sort_values("administered_at", kind="stable").reset_index(drop=True)
    a["row"] = np.arange(len(a))
    g = group_administrations(a)
    expected = a.sort_values(["episode_id", "measure", "administered_at"], kind="stable")
    assert g.frame["row"].tolist() == expected["row"].tolist()
    assert g.values("score").tolist() == expected["score"].tolist()
    heads = expected.drop_duplicates(["episode_id", "measure"])
    pd.testing.assert_frame_equal(g.first(["episode_id", "measure"]),
                                  heads[["episode_id", "measure"]].reset_index(drop=True))


@pytest.mark.parametrize("top", [1, 40_000, 1 << 16, 2_000_000, 1 << 40])
def test_stable_order_is_numpys_stable_argsort(top: int) -> None:
    """The radix order equals numpy's stable argsort, ties in input order, for keys of
    one, two and three 16-bit digits (and a key exactly at a digit boundary)."""
    rng = np.random.default_rng(top % 97)
    key = rng.integers(0, top + 1, 50_000).astype(np.int64)
    key[:3] = [top, 0, top]
    assert stable_order(key).tolist() == np.argsort(key, kind="stable").tolist()
    assert stable_order(np.array([], dtype=np.int64)).size == 0


def synth_scores(episodes: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    """A generated service's scored administrations (in the generator's time order) as
    the statistics take them, and the ids of its finished episodes."""
    from pipeline.synth import SynthConfig, generate

    data = generate(SynthConfig(episodes=episodes, therapists=5, seed=seed))
    adm = data.administrations
    items = adm[[f"item_{i}" for i in range(1, 10)]].astype("Float64")
    total = pd.to_numeric(adm["total"], errors="coerce")
    a = pd.DataFrame({
        "episode_id": adm["episode_id"].astype("str"), "measure": adm["measure"].astype("str"),
        "administered_at": pd.to_datetime(adm["administered_at"]).astype("datetime64[us]"),
        "session_number": adm["session_number"].astype("Int64"),
        "score": np.where(total.notna(), total, items.sum(axis=1, skipna=True).round())
        .astype(np.int64)})
    ended = data.episodes.loc[data.episodes["end_date"] != "", "episode_id"].astype("str")
    return a, ended


@pytest.mark.parametrize(("parts", "threads", "part_groups"),
                         [(2, 2, 10**6), (3, 3, 10**6), (7, 7, 10**6), (6, 1, 150),
                          (6, 2, 150)])
def test_outcomes_in_parts_equal_one_call(parts: int, threads: int, part_groups: int) -> None:
    """Outcomes computed over runs of groups (in threads, or runs of at most
    ``part_groups`` groups one after another) are row for row those of one call, and so
    are the sudden changes, in the same order."""
    from pipeline.compute import build_reference
    from pipeline.config import Settings
    from pipeline.scales import load_registry
    from pipeline.stats.outcomes import episode_outcomes, episode_outcomes_in_parts

    a, ended = synth_scores(episodes=400, seed=3)
    settings, registry = Settings(), load_registry()
    g = group_administrations(a)
    split = g.split(parts)
    assert [p.n_groups for p in split] != [g.n_groups] and \
        sum(p.n_groups for p in split) == g.n_groups
    reference, _ = build_reference(a, ended, registry, settings, grouped=g)
    one, sudden = episode_outcomes(a, registry, settings, reference, grouped=g)
    assert -(-g.n_groups // 150) == 6  # 6 runs of at most 150 groups
    many, sudden_many = episode_outcomes_in_parts(a, registry, settings, reference, g,
                                                  threads=threads, min_groups=0,
                                                  part_groups=part_groups)
    assert len(sudden) > 10  # the data has sudden gains and losses to order
    pd.testing.assert_frame_equal(many, one)
    pd.testing.assert_frame_equal(sudden_many, sudden)


def test_parts_with_only_unrated_measures_keep_one_calls_dtypes() -> None:
    """A part whose groups are all of a scale without reliable change (WSAS) has only
    None in the text columns of reliable change; joined with a part that has text, the
    columns must come out as one call gives them (dtype and missing values)."""
    from pipeline.config import Settings
    from pipeline.scales import load_registry
    from pipeline.stats.outcomes import Reference, episode_outcomes, episode_outcomes_in_parts

    at = pd.date_range("2026-01-05", periods=5, freq="7D").astype("datetime64[us]")
    a = pd.DataFrame({
        "episode_id": pd.array(["E1"] * 5 + ["E2"] * 5, dtype="str"),
        "measure": pd.array(["PHQ-9"] * 5 + ["WSAS"] * 5, dtype="str"),
        "administered_at": np.concatenate([at, at]),
        "score": [20, 16, 12, 9, 7, 30, 28, 25, 20, 18]})
    settings, registry = Settings(), load_registry()
    g = group_administrations(a)
    one, sudden = episode_outcomes(a, registry, settings, Reference(), grouped=g)
    many, sudden_many = episode_outcomes_in_parts(a, registry, settings, Reference(), g,
                                                  threads=2, min_groups=0)
    assert one.loc[0, "fixed_change"] == "improved" and pd.isna(one.loc[1, "fixed_change"])
    pd.testing.assert_frame_equal(many, one)
    pd.testing.assert_frame_equal(sudden_many, sudden)


def test_missing_keys_are_refused() -> None:
    from pipeline.errors import UsageError

    a = frame(1).head(20)
    a.loc[3, "measure"] = None
    with pytest.raises(UsageError, match="without an episode_id or a measure"):
        group_administrations(a)


def _slow(monkeypatch: pytest.MonkeyPatch, a: pd.DataFrame) -> Any:
    """The sorting path on the same rows (the ordered-input check turned off)."""
    import pipeline.stats.groups as groups

    with monkeypatch.context() as m:
        m.setattr(groups, "_boundaries_if_ordered", lambda *_: None)
        return group_administrations(a)


@pytest.mark.parametrize("seed", [6, 7])
def test_rows_already_in_group_order_give_the_sorted_paths_groups(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows in key order (as the Parquet export writes them) are grouped without a sort:
    every array equals the sorting path's, the order is the identity, and the column
    readers give the same values as read-only slices (per part too)."""
    a = frame(seed).sort_values(["episode_id", "measure", "administered_at"],
                                kind="stable", ignore_index=True)
    a["row"] = np.arange(len(a))
    fast, slow = group_administrations(a), _slow(monkeypatch, a)
    assert fast.offset == 0 and slow.offset is None
    assert fast.order.tolist() == list(range(len(a))) == slow.order.tolist()
    for name in ("gid", "starts", "ends", "k", "mcode"):
        assert getattr(fast, name).tolist() == getattr(slow, name).tolist(), name
    assert list(fast.measures) == list(slow.measures) == sorted(set(a["measure"]))
    pd.testing.assert_frame_equal(fast.heads, slow.heads)
    score = fast.values("score")
    assert score.tolist() == slow.values("score").tolist()
    with pytest.raises(ValueError, match="read-only"):
        score[0] = 99
    assert a["score"].tolist() == slow.values("score").tolist()  # the source unchanged
    for p_fast, p_slow in zip(fast.split(3), slow.split(3), strict=True):
        assert p_fast.values("row").tolist() == p_slow.values("row").tolist()
        assert p_fast.first(["episode_id"]).equals(p_slow.first(["episode_id"]))


@pytest.mark.parametrize("swap", ["episode", "measure", "time"])
def test_one_row_out_of_order_takes_the_sorting_path(swap: str) -> None:
    """One pair of rows out of order, by any of the three keys, is noticed: the result
    is the stable sort's, not the input order."""
    a = pd.DataFrame({
        "episode_id": pd.array(["E1", "E1", "E1", "E2", "E2", "E3"], dtype="str"),
        "measure": pd.array(["GAD-7", "PHQ-9", "PHQ-9", "GAD-7", "GAD-7", "PHQ-9"],
                            dtype="str"),
        "administered_at": pd.to_datetime(["2026-01-01", "2026-01-01", "2026-01-08",
                                           "2026-01-01", "2026-01-08", "2026-01-01"])
        .astype("datetime64[us]"),
        "row": np.arange(6)})
    assert group_administrations(a).offset == 0
    i = {"episode": 2, "measure": 0, "time": 3}[swap]  # swap rows i and i + 1
    a.iloc[[i, i + 1]] = a.iloc[[i + 1, i]].to_numpy()
    a["row"] = a["row"].astype(np.int64)
    g = group_administrations(a)
    expected = a.sort_values(["episode_id", "measure", "administered_at"], kind="stable")
    assert g.offset is None
    assert g.frame["row"].tolist() == expected["row"].tolist()


def test_text_not_in_arrow_storage_takes_the_sorting_path() -> None:
    a = frame(8).sort_values(["episode_id", "measure", "administered_at"], kind="stable",
                             ignore_index=True)
    a["episode_id"] = a["episode_id"].astype(object)
    g = group_administrations(a)
    assert g.offset is None and g.order.tolist() == list(range(len(a)))


def test_outcomes_of_rows_in_group_order_equal_those_of_rows_in_any_order() -> None:
    """The statistics on rows already in key order (no sort, columns read as slices) are
    those of the same rows in ingest order, reference and sudden changes included."""
    from pipeline.compute import build_reference
    from pipeline.config import Settings
    from pipeline.scales import load_registry
    from pipeline.stats.outcomes import episode_outcomes_in_parts

    a, ended = synth_scores(episodes=300, seed=5)
    ordered = a.sort_values(["episode_id", "measure", "administered_at"], kind="stable",
                            ignore_index=True)
    settings, registry = Settings(), load_registry()
    results = []
    for rows in (a, ordered):
        g = group_administrations(rows)
        reference, _ = build_reference(rows, ended, registry, settings, grouped=g)
        results.append((g.offset, reference, *episode_outcomes_in_parts(
            rows, registry, settings, reference, g, threads=2, min_groups=0)))
    (off_a, ref_a, out_a, sud_a), (off_o, ref_o, out_o, sud_o) = results
    assert off_a is None and off_o == 0
    assert len(out_a) > 500 and len(sud_a) > 10
    assert ref_o.sd == ref_a.sd and ref_o.sd_source == ref_a.sd_source
    pd.testing.assert_frame_equal(ref_o.curves, ref_a.curves)
    pd.testing.assert_frame_equal(out_o, out_a)
    pd.testing.assert_frame_equal(sud_o, sud_a)


def test_text_in_several_arrow_chunks_is_checked_across_the_chunks() -> None:
    """A column made of several Arrow chunks (frames concatenated from files) in key
    order takes the fast path; rows out of order only across a chunk boundary, beyond
    the first rows the check probes, are still noticed."""
    import pyarrow as pa

    n = 10_000
    ids = [f"E{i // 4:05d}" for i in range(n)]
    # Times rise with the row, so only the episode order can be broken.
    at = pd.Timestamp("2026-01-01") + pd.to_timedelta(np.arange(n), unit="h")

    def frame_of(values: list[str]) -> pd.DataFrame:
        chunks = pa.chunked_array([pa.array(values[:6001], pa.large_string()),
                                   pa.array(values[6001:], pa.large_string())])
        return pd.DataFrame({"episode_id": pd.Series(pd.array(chunks, dtype="str")),
                             "measure": pd.array(["PHQ-9"] * n, dtype="str"),
                             "administered_at": at.astype("datetime64[us]"),
                             "row": np.arange(n)})

    ordered = frame_of(ids)
    assert isinstance(pa.array(ordered["episode_id"].array), pa.ChunkedArray)
    assert group_administrations(ordered).offset == 0
    swapped = ids.copy()  # E01501 last in the first chunk, E01500 first in the second
    swapped[6000], swapped[6004] = ids[6004], ids[6000]
    assert (swapped[6000], swapped[6001]) == ("E01501", "E01500")
    a = frame_of(swapped)
    g = group_administrations(a)
    expected = a.sort_values(["episode_id", "measure", "administered_at"], kind="stable")
    assert g.offset is None and g.frame["row"].tolist() == expected["row"].tolist()
