"""The notebooks run top to bottom on an export of the sample, and their rates equal the
store's up to exactly the suppressed records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from pipeline.export import export_dataset, surrogate
from pipeline.report import episode_flags
from pipeline.scales import load_registry
from tests.dashboard_helpers import computed_sample

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KEY = b"notebook-key"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("nb")
    store, settings = computed_sample(d)
    reg = load_registry()
    res = export_dataset(store, settings, reg, d / "export", key=KEY)
    return {"dir": d, "store": store, "settings": settings, "reg": reg, "res": res}


def run(name: str, env: dict[str, str], cwd: Path) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = dict(os.environ)
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_service_outcomes_notebook_reproduces_the_rates(exported: dict[str, Any]) -> None:
    result = exported["dir"] / "nb-result.json"
    run("01-service-outcomes.ipynb", {"ONTRACK_EXPORT_DIR": str(exported["dir"] / "export"),
                                      "ONTRACK_NOTEBOOK_RESULT": str(result)}, exported["dir"])
    got = json.loads(result.read_text())["counts"]
    flags = episode_flags(exported["store"], exported["settings"], exported["reg"])
    kept = set(__import__("pandas").read_csv(exported["dir"] / "export" / "episodes.csv")
               ["episode_sid"])
    flags["sid"] = [surrogate(KEY, "episode", e) for e in flags["episode_id"]]
    suppressed = flags[~flags["sid"].isin(kept)]
    assert len(suppressed) == exported["res"].manifest["records_suppressed"]
    for col, n in got.items():
        # Equal to the store's counts once the suppressed records are added back.
        assert n + int(suppressed[col].sum()) == int(flags[col].sum()), col


def test_trajectories_notebook_runs(exported: dict[str, Any]) -> None:
    run("02-trajectories.ipynb", {"ONTRACK_EXPORT_DIR": str(exported["dir"] / "export")},
        exported["dir"])
