"""Validation looks ids up per chunk (few ids) or loads them all (many): same result.

A cycle's small file into a large store asks the store for the few episodes, clients
and therapists its chunk names; a large chunk loads every id once per file. Both ways
must quarantine, accept and flag exactly the same records, including ids written by an
earlier chunk of the same file and identities already stored (duplicates, conflicts).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.ingest import batch
from pipeline.scales import Registry
from pipeline.store import Store
from pipeline.synth import Dataset, SynthConfig, next_week, write_sample
from tests.conftest import fresh_store, ingest

TABLES = {"quarantine": ["quarantine_id", "batch_id", "file"],
          "administrations": ["admin_id", "batch_id"], "episodes": ["batch_id"],
          "clients": ["batch_id"], "therapists": ["batch_id"], "goals": [],
          "flags": ["flag_id", "first_raised", "last_seen"]}


def _tables(store: Store) -> dict[str, pd.DataFrame]:
    out = {}
    for table, drop in TABLES.items():
        df = store.read_table(table).drop(columns=drop, errors="ignore").astype(str)
        out[table] = df.sort_values(list(df.columns)).reset_index(drop=True)
    return out


def _other_score(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with another total: the same identity, different answers."""
    rows = rows.copy()
    rows["total"] = ["3" if t != "3" else "4" for t in rows["total"]]
    return rows


def _two_files(tmp_path: Path, faulty_rows: int, repeats: bool = False
               ) -> tuple[Dataset, Path, Path]:
    """A sample's input, and a second administrations file: a further week for 30
    episodes, 10 rows already stored (duplicates) and one stored identity with another
    score (a conflict); with ``repeats``, also the first new record again as is and the
    second again with another score."""
    data = write_sample(tmp_path / "s", SynthConfig(episodes=40, therapists=3, seed=5,
                                                    faulty_rows=faulty_rows))
    inp = tmp_path / "s" / "input"
    again = tmp_path / "again"
    again.mkdir()
    new = next_week(inp / "administrations.csv", 30)
    old = pd.read_csv(inp / "administrations.csv", dtype="str", keep_default_na=False)
    parts = [new, old.iloc[:10], _other_score(old.iloc[[5]])]
    if repeats:
        parts += [new.iloc[[0]], _other_score(new.iloc[[1]])]
    pd.concat(parts).to_csv(again / "administrations.csv", index=False)
    return data, inp, again


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_per_chunk_lookups_equal_loading_every_id(tmp_path: Path, registry: Registry,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  kind: str) -> None:
    data, inp, again = _two_files(tmp_path, faulty_rows=22)
    settings = Settings(chunk_rows=25)  # several chunks per file
    results = []
    for limit in (0, batch.LOOKUP_LIMIT):  # 0: every chunk loads every id
        monkeypatch.setattr(batch, "LOOKUP_LIMIT", limit)
        with fresh_store(kind, tmp_path / f"l{limit}") as store:
            reports = [ingest([inp], store, settings, registry),
                       ingest([again], store, settings, registry)]
            counts = [(f.kind, f.records, f.accepted, f.duplicates, f.quarantined,
                       dict(f.by_reason), dict(f.warnings)) for r in reports for f in r.files]
            results.append((counts, _tables(store)))
    (counts_all, tables_all), (counts_few, tables_few) = results
    assert counts_few == counts_all
    assert any(c[4] for c in counts_all) and any(c[3] for c in counts_all)
    for table in TABLES:
        pd.testing.assert_frame_equal(tables_few[table], tables_all[table], obj=table)
    assert len(data.administrations) > 25


def test_context_lookups_follow_additions(registry: Registry) -> None:
    """The context's cached id indexes answer as the dicts and sets they stand for, and
    an id added after a lookup is known to the next one (the index is rebuilt)."""
    from datetime import datetime

    from pipeline.validate import Context

    ctx = Context(registry=registry, now=datetime(2026, 1, 1), clients={"c1", "c2"},
                  episode_client={"e1": "c1", "e2": "c2"},
                  episode_start={"e1": "2025-01-01", "e2": "2025-02-01"})
    ids = pd.Series(["e2", "e3", "", None, "e1", "E1"], dtype="str", index=[9, 8, 7, 6, 5, 4])
    assert ctx.known("episode_client", ids).tolist() == [True, False, False, False, True,
                                                         False]
    owner = ctx.mapped("episode_client", ids)
    assert owner.index.tolist() == [9, 8, 7, 6, 5, 4]
    assert owner.tolist()[0] == "c2" and owner.tolist()[4] == "c1"
    assert owner.isna().tolist() == [False, True, True, True, False, True]
    ctx.add("episode_client", pd.Series(["e3", "e1"]), pd.Series(["c3", "changed"]))
    assert ctx.known("episode_client", ids).tolist() == [True, True, False, False, True,
                                                         False]
    # An id already present keeps its value (the store keeps its row).
    assert ctx.mapped("episode_client", ids).tolist()[:2] == ["c2", "c3"]
    assert ctx.mapped("episode_client", ids).tolist()[4] == "c1"
    assert ctx.known("clients", pd.Series(["c2", "c3"], dtype="str")).tolist() == [True,
                                                                                  False]
    ctx.add("clients", pd.Series(["c3"]))
    assert ctx.known("clients", pd.Series(["c2", "c3"], dtype="str")).tolist() == [True,
                                                                                  True]
    with pytest.raises(TypeError):
        ctx.mapped("clients", ids)
    # The start dates share the episode index (same keys, same order), and positions
    # found once serve a mapping of the same ids.
    ctx.add("episode_start", pd.Series(["e3"]), pd.Series(["2025-03-01"]))
    starts = ctx.mapped("episode_start", ids)
    assert starts.tolist()[0] == "2025-02-01" and starts.tolist()[1] == "2025-03-01"
    assert starts.tolist()[4] == "2025-01-01" and starts.isna().tolist()[2:4] == [True, True]
    assert ctx._indexes["episode_start"][1] is ctx._indexes["episode_client"][1]
    pos, _ = ctx.positions("episode_client", ids)
    assert ctx.mapped("episode_client", ids, pos).tolist()[:2] == ["c2", "c3"]


def test_skipping_stored_identities_equals_looking_them_up_first(
        tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite a chunk's first records are inserted at once, the stored identities
    skipped, and the store is asked which were stored only when some were skipped.
    That must accept, count, quarantine and flag exactly what looking every identity
    up first does (PostgreSQL's way): with duplicates of stored records, a conflict
    with one, and a record repeated within the file, same and different."""
    # No faulty rows: every record of the first file is accepted, so the second file's
    # counts are known exactly.
    _, inp, again = _two_files(tmp_path, faulty_rows=0, repeats=True)
    settings = Settings(chunk_rows=25)  # several chunks per file
    results = []
    for skips in (True, False):
        monkeypatch.setattr(Store, "skips_stored", staticmethod(lambda conn, s=skips: s))
        with fresh_store("sqlite", tmp_path / f"skip{skips}") as store:
            reports = [ingest([inp], store, settings, registry),
                       ingest([again], store, settings, registry)]
            counts = [(f.records, f.accepted, f.duplicates, f.quarantined,
                       dict(f.by_reason), dict(f.warnings)) for r in reports for f in r.files
                      if f.kind == "administrations"]
            tables = _tables(store)
            ids = store.read_table("administrations")["admin_id"].sort_values().tolist()
            results.append((counts, tables, ids))
    (counts_skip, tables_skip, ids_skip), (counts_look, tables_look, ids_look) = results
    assert counts_skip == counts_look
    records, accepted, duplicates, quarantined, by_reason, _ = counts_skip[1]
    # The second file: 30 new records (a week on), 10 sent again, 1 conflicting with a
    # stored one, one new record repeated as is and one repeated with another total.
    assert records == 30 + 10 + 1 + 2
    assert (accepted, duplicates, quarantined) == (30, 11, 2)
    assert by_reason == {"conflict": 2}
    assert ids_skip == ids_look
    for table in TABLES:
        pd.testing.assert_frame_equal(tables_skip[table], tables_look[table], obj=table)
