"""The Dask engine gives exactly the pandas engine's results (issue #8): the same
per-partition functions over a Parquet dataset partitioned by episode, the reference as a
reduction of mergeable aggregates, on a 2-worker ``LocalCluster``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.distributed import compute_parquet, read_results
from pipeline.ingest.batch import ingest_paths
from pipeline.parquet import partition_of, read_partition, write_parquet_dataset
from pipeline.stats.reference import curves_from_histogram, sd_from_partials
from pipeline.synth import SynthConfig, write_sample
from tests.conftest import NOW, fresh_store

KEYS = ["episode_id", "measure"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pipeline.scales import load_registry

    d = tmp_path_factory.mktemp("dask")
    write_sample(d / "synth", SynthConfig(episodes=1500, therapists=20))
    settings, registry = Settings(), load_registry()
    with fresh_store("sqlite", d) as store:
        ingest_paths([d / "synth" / "input"], store, settings, registry, now=NOW)
        compute(store, settings, registry, full=True, now=NOW)
        meta = write_parquet_dataset(store, d / "parquet", partitions=5,
                                     chunk_episodes=400)
        yield {"dir": d, "store": store, "meta": meta, "settings": settings,
               "registry": registry,
               "outcomes": store.read_table("outcomes"),
               "sudden": store.read_table("sudden_changes"),
               "norms": store.read_table("reference_norms"),
               "curves": store.read_table("expected_curves")}


def _sorted(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sorted rows, every value as a plain Python object (missing = None), so that the
    comparison is exact and ignores only how each side represents missing values."""
    df = df.drop(columns=["run_id"], errors="ignore")
    df = df.sort_values(keys, kind="stable").reset_index(drop=True)
    out = df.astype(object).where(df.notna(), None)
    return out.map(lambda v: v.item() if hasattr(v, "item") else v)


def test_parquet_dataset_keeps_every_episode_in_one_partition(dataset: Any) -> None:
    files = sorted((dataset["dir"] / "parquet").glob("part-*.parquet"))
    assert len(files) == 5
    frames = [read_partition(f) for f in files]
    assert sum(len(f) for f in frames) == dataset["meta"]["rows"] == \
        len(dataset["store"].read_table("administrations"))
    seen: set[str] = set()
    for i, f in enumerate(frames):
        ids = set(f["episode_id"])
        assert not ids & seen  # no episode split across files
        seen |= ids
        assert (partition_of(f["episode_id"], 5) == i).all()
    assert len(seen) == dataset["meta"]["episodes"]


@pytest.mark.parametrize("engine", ["pandas", "dask"])
def test_engine_results_are_identical_to_the_store_compute(dataset: Any,
                                                           engine: str) -> None:
    out = dataset["dir"] / f"out-{engine}"
    res = compute_parquet(dataset["dir"] / "parquet", out, dataset["settings"],
                          dataset["registry"], engine=engine, workers=2)
    assert res["partitions"] == 5
    got = _sorted(read_results(out, "outcomes"), KEYS)
    want = _sorted(dataset["outcomes"], KEYS)
    assert len(got) == len(want) == res["outcome_rows"] > 2000
    # Exactly equal, float for float (the reference is reduced from exact integers).
    pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False,
                                  check_exact=True)
    sk = ["episode_id", "measure", "kind", "pregain_session"]
    pd.testing.assert_frame_equal(_sorted(read_results(out, "sudden_changes"), sk)
                                  [dataset["sudden"].drop(columns="run_id").columns],
                                  _sorted(dataset["sudden"], sk), check_dtype=False,
                                  check_exact=True)
    norms = pd.read_csv(out / "reference_norms.csv")
    pd.testing.assert_frame_equal(
        _sorted(norms, ["measure"])[["measure", "sd", "n"]],
        _sorted(dataset["norms"], ["measure"])[["measure", "sd", "n"]],
        check_dtype=False, check_exact=True)
    ck = ["measure", "band", "k"]
    curves = pd.read_csv(out / "expected_curves.csv", dtype={"band": "str"})
    pd.testing.assert_frame_equal(
        _sorted(curves, ck)[["measure", "band", "k", "n", "median", "upper", "lower"]],
        _sorted(dataset["curves"], ck)[["measure", "band", "k", "n", "median", "upper",
                                        "lower"]],
        check_dtype=False, check_exact=True)
    assert json.loads((out / "_compute.json").read_text())["engine"] == engine


def test_sd_from_integer_sums_matches_the_textbook_formula() -> None:
    x = np.array([3, 7, 7, 19, 24, 11])
    # By hand: sum 71, sum of squares 9+49+49+361+576+121 = 1165; squared deviations
    # 1165 - 71**2/6 = 324.8333; variance / 5 = 64.96667; SD 8.060190.
    n, s1, s2 = len(x), int(x.sum()), int((x * x).sum())
    assert (n, s1, s2) == (6, 71, 1165)
    assert sd_from_partials(n, s1, s2) == pytest.approx(8.060190, abs=5e-7)
    assert sd_from_partials(n, s1, s2) == pytest.approx(float(np.std(x, ddof=1)), rel=1e-15)


def test_quantiles_from_histograms_follow_type_7() -> None:
    # Stratum scores 1, 2, 2, 4, 9 (n=5): type 7 median = 2, 0.75 -> 4, 0.25 -> 2.
    # Stratum 0, 10 (n=2): median 5, 0.75 -> 7.5, 0.25 -> 2.5.
    hist = pd.DataFrame({"measure": ["M"] * 6, "band": ["a", "a", "a", "a", "b", "b"],
                         "k": [1] * 6, "score": [1, 2, 4, 9, 0, 10],
                         "count": [1, 2, 1, 1, 1, 1]})
    c = curves_from_histogram(hist, percentile=0.75, min_stratum=1)
    fine = c[c["source"] == "service"].set_index("band")
    assert fine.loc["a", ["median", "upper", "lower"]].tolist() == [2.0, 4.0, 2.0]
    assert fine.loc["b", ["median", "upper", "lower"]].tolist() == [5.0, 7.5, 2.5]
    assert fine.loc["a", "n"] == 5 and fine.loc["b", "n"] == 2
    # The same numbers numpy gives on the raw values (an independent implementation).
    assert np.quantile([1, 2, 2, 4, 9], [0.5, 0.75, 0.25]).tolist() == [2.0, 4.0, 2.0]


def test_cli_export_parquet_and_compute_with_the_dask_engine(dataset: Any) -> None:
    import os
    import subprocess
    import sys

    d = dataset["dir"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONTRACK_")}
    env.update(ONTRACK_DATABASE_URL=dataset["store"].url, ONTRACK_DATA_DIR=str(d / "cli"))
    cli = [sys.executable, "-m", "pipeline.cli"]
    r = subprocess.run([*cli, "export-parquet", "--out", str(d / "cli-parquet"),
                        "--partitions", "3"], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert f"wrote {dataset['meta']['rows']} administrations" in r.stdout
    r = subprocess.run([*cli, "compute", "--engine", "dask", "--parquet",
                        str(d / "cli-parquet"), "--out", str(d / "cli-out"), "--json"],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["engine"] == "dask" and res["partitions"] == 3
    assert res["outcome_rows"] == len(dataset["outcomes"])


def test_a_rerun_with_fewer_partitions_leaves_no_stale_results(dataset: Any) -> None:
    d = dataset["dir"]
    out = d / "rerun-out"
    compute_parquet(d / "parquet", out, dataset["settings"], dataset["registry"])
    few = d / "parquet-2"
    write_parquet_dataset(dataset["store"], few, partitions=2)
    compute_parquet(few, out, dataset["settings"], dataset["registry"])
    assert len(list((out / "outcomes").glob("part-*.parquet"))) == 2
    assert len(read_results(out, "outcomes")) == len(dataset["outcomes"])


def test_parquet_files_are_in_group_order(dataset: Any) -> None:
    """Each file's rows are in (episode_id, measure, administered_at) order, so the
    statistics group them without a sort."""
    from pipeline.stats.groups import group_administrations, in_group_order

    for f in sorted((dataset["dir"] / "parquet").glob("part-*.parquet")):
        frame = read_partition(f)
        assert in_group_order(frame)
        assert group_administrations(frame).offset == 0
        expected = frame.sort_values(["episode_id", "measure", "administered_at"],
                                     kind="stable", ignore_index=True)
        pd.testing.assert_frame_equal(frame, expected)


def test_parquet_export_orders_rows_the_database_returns_in_another_order(
        dataset: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that come back in another order (e.g. PostgreSQL's locale collation, where
    "E1 " sorts differently) are put in key order before they are written."""
    import pipeline.parquet as parquet
    from pipeline.stats.groups import in_group_order

    real = parquet.read_frame

    def shuffled(*args: Any, **kwargs: Any) -> pd.DataFrame:
        frame = real(*args, **kwargs)
        if "score" in frame.columns:
            frame = frame.sample(frac=1, random_state=1).reset_index(drop=True)
        return frame

    monkeypatch.setattr(parquet, "read_frame", shuffled)
    write_parquet_dataset(dataset["store"], tmp_path / "p", partitions=3,
                          chunk_episodes=10_000)
    files = sorted((tmp_path / "p").glob("part-*.parquet"))
    frames = [read_partition(f) for f in files]
    assert all(in_group_order(f) for f in frames)
    assert sum(len(f) for f in frames) == dataset["meta"]["rows"]
