"""The caseload grid's server-side paging, sorting and filtering, on both stores.

Every expectation is computed here with plain pandas from the tables themselves (open
episodes, clients, the caseload summary and the open flags), not from the SQL under
test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from dashboard.access import Viewer
from dashboard.data import DataAccess
from dashboard.grid_query import GridColumn, grid_where
from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.errors import UsageError
from pipeline.ingest.batch import ingest_paths
from pipeline.scales import load_registry
from pipeline.store import caseload, clients, episodes, flags
from tests.conftest import fresh_store
from tests.dashboard_helpers import NOW, SAMPLE

DIRECTOR = Viewer("d", "director")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def grid(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[DataAccess, pd.DataFrame]]:
    with fresh_store(request.param, tmp_path_factory.mktemp("grid")) as store:
        settings, reg = Settings(), load_registry()
        ingest_paths([SAMPLE], store, settings, reg, now=NOW)
        compute(store, settings, reg, now=NOW)
        yield DataAccess(store, settings, reg), _reference(store)


def _reference(store: Any) -> pd.DataFrame:
    """Open episodes with what the grid sorts and filters on, computed with pandas."""
    with store.engine.connect() as conn:
        ep = pd.DataFrame(conn.execute(sa.select(
            episodes.c.episode_id, episodes.c.client_id, episodes.c.therapist_id,
            episodes.c.team, episodes.c.start_date).where(episodes.c.end_date.is_(None)))
            .all())
        cl = pd.DataFrame(conn.execute(sa.select(clients)).mappings().all())
        cs = pd.DataFrame(conn.execute(sa.select(caseload)).mappings().all())
        fl = pd.DataFrame(conn.execute(sa.select(flags.c.episode_id, flags.c.severity,
                                                 flags.c.kind)
                                       .where(flags.c.state == "open")).all())
    ref = ep.merge(cl[["client_id", "given_name", "family_name"]], on="client_id") \
        .merge(cs.drop(columns=["run_id"]), on="episode_id", how="left")
    ref["client"] = (ref["given_name"].fillna("") + " " + ref["family_name"].fillna("")) \
        .str.strip()
    ref["weeks"] = [(NOW.date() - d).days // 7 for d in ref["start_date"]]
    for sev in ("urgent", "review", "info"):
        n = fl[fl["severity"] == sev].groupby("episode_id").size()
        ref[f"flags_{sev}"] = ref["episode_id"].map(n).fillna(0).astype(int)
    ref["risk"] = ref["episode_id"].isin(set(fl.loc[fl["kind"] == "risk_item",
                                                    "episode_id"]))
    return ref


def _default_sorted(ref: pd.DataFrame) -> list[str]:
    return ref.sort_values(["risk", "flags_urgent", "flags_review", "start_date",
                            "episode_id"], ascending=[False, False, False, True, True]
                           )["episode_id"].tolist()


def _order(data: DataAccess, sort: Any = None, filt: Any = None,
           viewer: Viewer = DIRECTOR) -> list[str]:
    return data.caseload_order(viewer, sort, filt, today=NOW)


def test_blocks_page_through_the_default_order(grid: tuple[DataAccess, pd.DataFrame]
                                               ) -> None:
    data, ref = grid
    assert len(ref) > 20 and ref["risk"].any()
    seen: list[str] = []
    for start in range(0, len(ref) + 7, 7):
        df, total = data.caseload_page(DIRECTOR, start, start + 7, today=NOW)
        assert total == len(ref)
        seen += df["episode_id"].tolist() if not df.empty else []
    assert seen == _default_sorted(ref)  # no row skipped or repeated between blocks
    # A block's values are the episode's own.
    df, _ = data.caseload_page(DIRECTOR, 0, 10, today=NOW)
    want = ref.set_index("episode_id").loc[df["episode_id"]]
    for col in ("weeks", "flags_urgent", "flags_review", "flags_info", "risk", "client",
                "team"):
        assert df[col].tolist() == want[col].tolist(), col
    # The sample has no plan reviews: the next one is due 6 weeks after the start.
    assert df["next_review"].tolist() == [
        (d + timedelta(weeks=6)).isoformat() for d in want["start_date"]]


def test_sorting_by_a_column_keeps_urgency_as_the_tie_break(
        grid: tuple[DataAccess, pd.DataFrame]) -> None:
    data, ref = grid
    ranked = {e: i for i, e in enumerate(_default_sorted(ref))}
    ref = ref.assign(rank=ref["episode_id"].map(ranked))
    for col, direction in (("dep_latest", "desc"), ("dep_latest", "asc"), ("team", "asc"),
                           ("flags_info", "desc")):
        want = ref.sort_values([col, "rank"], ascending=[direction == "asc", True],
                               na_position="last")["episode_id"].tolist()
        assert _order(data, [{"colId": col, "sort": direction}]) == want, (col, direction)
    # Weeks ascending is start date descending; ties in urgency order.
    want = ref.sort_values(["weeks", "rank"])["episode_id"].tolist()
    got = _order(data, [{"colId": "weeks", "sort": "asc"}])
    assert ref.set_index("episode_id").loc[got, "weeks"].tolist() == \
        ref.set_index("episode_id").loc[want, "weeks"].tolist()


def _number(kind: str, value: float, to: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"filterType": "number", "type": kind, "filter": value}
    if to is not None:
        out["filterTo"] = to
    return out


def _text(kind: str, value: str = "") -> dict[str, Any]:
    return {"filterType": "text", "type": kind, "filter": value}


def test_filters_select_what_ag_grid_would(grid: tuple[DataAccess, pd.DataFrame]) -> None:
    data, ref = grid
    w, chg = ref["weeks"], ref["dep_change"]
    cases: list[tuple[dict[str, Any], pd.Series]] = [
        ({"weeks": _number("greaterThan", 10)}, w > 10),
        ({"weeks": _number("greaterThan", 9.5)}, w > 9.5),
        ({"weeks": _number("greaterThanOrEqual", 9.5)}, w >= 9.5),
        ({"weeks": _number("lessThanOrEqual", 8)}, w <= 8),
        ({"weeks": _number("lessThan", 8.5)}, w < 8.5),
        ({"weeks": _number("equals", 9)}, w == 9),
        ({"weeks": _number("equals", 9.5)}, w == 9.5),
        ({"weeks": _number("notEqual", 9)}, w != 9),
        ({"weeks": _number("inRange", 8, 12)}, (w > 8) & (w < 12)),  # AG Grid: exclusive
        ({"dep_change": _number("inRange", 5, -5)}, (chg > -5) & (chg < 5)),
        ({"dep_change": _number("lessThan", -5)}, chg < -5),
        ({"dep_latest": _number("blank", 0)}, ref["dep_latest"].isna()),
        ({"flags_urgent": _number("greaterThan", 0)}, ref["flags_urgent"] > 0),
        ({"client_link": _text("contains", "AN")},
         ref["client"].str.lower().str.contains("an", regex=False)),
        ({"client_link": _text("notContains", "an")},
         ~ref["client"].str.lower().str.contains("an", regex=False)),
        ({"client_link": _text("startsWith", "e")}, ref["client"].str.lower()
         .str.startswith("e")),
        ({"goal_status": _text("equals", "MET")}, ref["goal_status"] == "met"),
        ({"risk_label": _text("contains", "risk")}, ref["risk"]),
        ({"team": {"filterType": "text", "operator": "OR",
                   "conditions": [_text("equals", "North"), _text("equals", "South")]}},
         ref["team"].isin(["North", "South"])),
        ({"team": _text("equals", "North"), "weeks": _number("greaterThan", 9)},
         (ref["team"] == "North") & (w > 9)),
        ({"client_link": _text("contains", "%")}, ref["client"].str.contains("%")),
        ({"dep_latest": _number("notEqual", 10)},  # blanks excluded, as AG Grid does
         ref["dep_latest"].notna() & (ref["dep_latest"] != 10)),
        ({"dep_trend_label": _text("startsWith", "↓")}, ref["dep_trend"] == "improving"),
        ({"dep_trend_label": _text("equals", "→ FLAT")}, ref["dep_trend"] == "flat"),
        ({"weeks": _number("greaterThan", 200_000)}, w > 200_000),  # before year 1
        ({"weeks": _number("lessThan", 999_999)}, w < 999_999),
        ({"weeks": _number("greaterThan", -999_999)}, w > -999_999),
        ({"client_link": _text("contains", "' OR '1'='1")}, ref["client"] == "?"),
    ]
    for model, mask in cases:
        want = [e for e in _default_sorted(ref) if e in set(ref.loc[mask, "episode_id"])]
        got = _order(data, None, model)
        assert got == want, model
    assert any(len(_order(data, None, m)) for m, _ in cases[:3])


def test_a_filter_cannot_widen_a_therapists_scope(grid: tuple[DataAccess, pd.DataFrame]
                                                  ) -> None:
    data, ref = grid
    counts = ref["therapist_id"].value_counts()
    own, other = counts.index[0], counts.index[1]
    me = Viewer("t", "therapist", own)
    assert _order(data, None, None, me) == [e for e in _default_sorted(ref)
                                            if e in set(ref.loc[ref["therapist_id"] == own,
                                                                "episode_id"])]
    assert _order(data, None, {"therapist_id": _text("equals", other)}, me) == []
    assert _order(data, None, {"therapist_id": _text("notEqual", own)}, me) == []
    df, total = data.caseload_page(Viewer("r", "researcher"), 0, 10)
    assert df.empty and total == 0


@pytest.mark.parametrize("sort, filt", [
    ("dep_latest", None),
    ([{"colId": "no_such", "sort": "asc"}], None),
    ([{"colId": "dep_latest", "sort": "sideways"}], None),
    ([{"colId": ["dep_latest"], "sort": "asc"}], None),
    ([{"colId": "next_review", "sort": "asc"}], None),  # computed per row: not sortable
    (None, ["team"]),
    (None, {"episodes.team": _text("equals", "North")}),
    (None, {"team": _text("regex", ".*")}),
    (None, {"team": _text("contains", 7)}),  # type: ignore[arg-type]
    (None, {"team": _text("contains", "x" * 201)}),
    (None, {"weeks": _number("greaterThan", math.inf)}),
    (None, {"weeks": _number("greaterThan", 10 ** 400)}),
    (None, {"weeks": _number("greaterThan", 2e6)}),
    (None, {"weeks": {"filterType": "number", "type": "greaterThan", "filter": "3"}}),
    (None, {"weeks": {"filterType": "number", "type": "greaterThan", "filter": True}}),
    (None, {"weeks": _number("inRange", 1)}),
    (None, {"team": {"operator": "XOR", "conditions": [_text("equals", "North")]}}),
    (None, {"team": {"operator": "OR", "conditions": [_text("equals", "N")] * 5}}),
])
def test_malformed_models_are_refused(grid: tuple[DataAccess, pd.DataFrame], sort: Any,
                                      filt: Any) -> None:
    data, _ = grid
    with pytest.raises(UsageError):
        data.caseload_page(DIRECTOR, 0, 10, sort, filt, today=NOW)


@pytest.mark.parametrize("start, end", [(-1, 5), (5, 4), (0, 501), ("0", 10), (0, 1.5)])
def test_malformed_blocks_are_refused(grid: tuple[DataAccess, pd.DataFrame], start: Any,
                                      end: Any) -> None:
    with pytest.raises(UsageError):
        grid[0].caseload_page(DIRECTOR, start, end, today=NOW)


def test_text_filters_fold_case_the_same_way_on_both_sides(store: Any) -> None:
    """The database lowers the column and the value alike: names with letters SQLite's
    lower() leaves alone ('Ö', 'É') still match as typed."""
    meta = sa.MetaData()
    t = sa.Table("names_t", meta, sa.Column("name", sa.String(50)))
    meta.create_all(store.engine)
    names = ["Öst", "Émilie Durand", "north", "NORTH", "Ann_Lee", "Ann Lee"]
    with store.engine.begin() as conn:
        conn.execute(t.insert(), [{"name": n} for n in names])
    cols = {"name": GridColumn(t.c.name)}

    def hits(kind: str, value: str) -> set[str]:
        with store.engine.connect() as conn:
            q = sa.select(t.c.name).where(*grid_where({"name": _text(kind, value)}, cols))
            return set(conn.execute(q).scalars())

    assert hits("equals", "Öst") == {"Öst"}
    assert hits("contains", "Émilie") == {"Émilie Durand"}
    assert hits("equals", "North") == {"north", "NORTH"}
    assert hits("startsWith", "ann_") == {"Ann_Lee"}  # "_" is a character, not a wildcard
    assert hits("notEqual", "öst") | hits("equals", "öst") == set(names)
