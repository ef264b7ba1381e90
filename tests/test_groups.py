"""Ordering administrations into episode x measure groups: the same order, boundaries
and administration numbers as a plain stable sort of the text keys, by any input order."""

from __future__ import annotations

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


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_outcomes_in_parts_equal_one_call(parts: int) -> None:
    """Outcomes computed over runs of groups (in threads) are row for row those of one
    call, and so are the sudden changes, in the same order."""
    from pipeline.compute import build_reference
    from pipeline.config import Settings
    from pipeline.scales import load_registry
    from pipeline.stats.outcomes import episode_outcomes, episode_outcomes_in_parts
    from pipeline.synth import SynthConfig, generate

    data = generate(SynthConfig(episodes=400, therapists=5, seed=3))
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
    settings, registry = Settings(), load_registry()
    g = group_administrations(a)
    split = g.split(parts)
    assert [p.n_groups for p in split] != [g.n_groups] and \
        sum(p.n_groups for p in split) == g.n_groups
    reference, _ = build_reference(a, ended, registry, settings, grouped=g)
    one, sudden = episode_outcomes(a, registry, settings, reference, grouped=g)
    many, sudden_many = episode_outcomes_in_parts(a, registry, settings, reference, g,
                                                  threads=parts, min_groups=0)
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
