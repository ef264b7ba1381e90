"""The scale registry: the shipped files load, and malformed files fail loudly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.errors import RegistryError
from pipeline.scales import Registry, load_registry, load_scale
from pipeline.scales.registry import DATA_DIR

CODES = {"PHQ-9", "GAD-7", "PHQ-8", "CORE-10", "WSAS", "PCL-5", "ORS"}


def test_all_seven_scales_load(registry: Registry) -> None:
    assert set(registry) == CODES
    assert len(registry) == 7
    assert registry.max_items == 20  # PCL-5


@pytest.mark.parametrize(("code", "items", "lo", "hi", "tmax"), [
    ("PHQ-9", 9, 0, 3, 27), ("GAD-7", 7, 0, 3, 21), ("PHQ-8", 8, 0, 3, 24),
    ("CORE-10", 10, 0, 4, 40), ("WSAS", 5, 0, 8, 40), ("PCL-5", 20, 0, 4, 80),
    ("ORS", 4, 0, 10, 40),
])
def test_item_and_total_ranges_as_spec(registry: Registry, code: str, items: int, lo: int,
                                       hi: int, tmax: int) -> None:
    s = registry[code]
    assert (s.items, s.item_min, s.item_max, s.total_min, s.total_max) == (items, lo, hi, 0, tmax)


def test_scale_specific_fields(registry: Registry) -> None:
    phq9, gad7, core10 = registry["PHQ-9"], registry["GAD-7"], registry["CORE-10"]
    assert phq9.risk_items == (9,)
    assert phq9.max_missing == 2 and gad7.max_missing == 2 and core10.max_missing == 1
    assert registry["PHQ-8"].max_missing == 0
    assert core10.reverse_keyed == (2, 3)
    assert registry["WSAS"].optional_items == (1,)
    assert registry["ORS"].higher_is_better
    assert {c for c in registry if registry[c].higher_is_better} == {"ORS"}
    assert not registry["GAD-7"].has_risk_item
    assert phq9.loinc_panel == "44249-1" and phq9.loinc_total == "44261-6"
    assert phq9.loinc_items[8] == "44260-8"
    assert gad7.loinc_panel == "69737-5" and gad7.loinc_total == "70274-6"
    assert len(gad7.loinc_items) == 7


@pytest.mark.parametrize(("score", "band"), [
    (0, "minimal"), (4, "minimal"), (5, "mild"), (9, "mild"), (10, "moderate"),
    (14, "moderate"), (15, "moderately severe"), (19, "moderately severe"), (20, "severe"),
    (27, "severe"),
])
def test_phq9_bands_as_spec(registry: Registry, score: int, band: str) -> None:
    assert registry["PHQ-9"].band_of(score) == band


def test_caseness_direction(registry: Registry) -> None:
    assert registry["PHQ-9"].is_case(10) is True
    assert registry["PHQ-9"].is_case(9) is False
    # ORS: higher is better, caseness is at or below 25.
    assert registry["ORS"].is_case(25) is True
    assert registry["ORS"].is_case(26) is False
    assert registry["WSAS"].is_case(30) is None


# ------------------------------------------------------------------ malformed files

GOOD = (DATA_DIR / "phq9.toml").read_text(encoding="utf-8")


def _write(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    d = tmp_path / "reg"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(text, encoding="utf-8")
    return p


def _sub(pattern: str, repl: str) -> str:
    out, n = re.subn(pattern, repl, GOOD, count=1, flags=re.MULTILINE)
    assert n == 1, f"pattern {pattern!r} not found in phq9.toml"
    return out


def test_good_copy_loads(tmp_path: Path) -> None:
    """The mutations below start from a file that is itself valid."""
    p = _write(tmp_path, GOOD)
    assert load_scale(p).code == "PHQ-9"


@pytest.mark.parametrize(("text", "field"), [
    pytest.param(_sub(r"^items = 9\n", ""), "items", id="missing-items"),
    pytest.param(_sub(r"^items = 9$", 'items = "nine"'), "items", id="items-not-int"),
    pytest.param(_sub(r'label = "mild", min = 5', 'label = "mild", min = 6'), "bands[1]",
                 id="bands-gap"),
    pytest.param(_sub(r'label = "severe", min = 20, max = 27', 'label = "severe", min = 20, '
                      'max = 26'), "bands", id="bands-short"),
    pytest.param(_sub(r'^direction = "lower_is_better"', 'direction = "sideways"'),
                 "direction", id="direction-bogus"),
    pytest.param(_sub(r"^total_max = 27", "total_max = 30"), "total_max", id="total-range"),
    pytest.param(_sub(r"^item_max = 3", "item_max = 0"), "item_max", id="item-range"),
    pytest.param(_sub(r"^risk_items = \[9\]", "risk_items = [10]"), "risk_items",
                 id="risk-item-beyond"),
    pytest.param(_sub(r'^comparison = ">="', 'comparison = "=="'), "caseness.comparison",
                 id="comparison"),
    pytest.param(_sub(r"^interval = 0.95", "interval = 95"), "reliable_change.interval",
                 id="interval-not-probability"),
    pytest.param(_sub(r"^max_missing = 2", "max_missing = 9"), "proration.max_missing",
                 id="max-missing"),
    pytest.param(_sub(r'^items = \["44250-9", ', "items = ["), "loinc.items",
                 id="loinc-items-count"),
    pytest.param(_sub(r"^sd = 3.5", "sd = -1"), "norms.functional.sd", id="norms-sd"),
])
def test_malformed_file_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(RegistryError) as exc:
        load_registry(p.parent)
    msg = str(exc.value)
    assert str(p) in msg
    assert f"'{field}'" in msg


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD + "\nthis is = = not toml\n")
    with pytest.raises(RegistryError) as exc:
        load_registry(p.parent)
    assert str(p) in str(exc.value)


def test_duplicate_code_names_both_files(tmp_path: Path) -> None:
    _write(tmp_path, GOOD, "a.toml")
    p = _write(tmp_path, GOOD, "b.toml")
    with pytest.raises(RegistryError) as exc:
        load_registry(p.parent)
    msg = str(exc.value)
    assert "PHQ-9" in msg and str(p) in msg and "a.toml" in msg


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no scale files"):
        load_registry(tmp_path)
