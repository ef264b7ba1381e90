"""Load and validate the scale definition files (``data/*.toml``).

A malformed file raises :class:`~pipeline.errors.RegistryError` naming the file and the
field. The loaded objects are frozen; nothing else in OnTrack branches on a scale's code.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import RegistryError

__all__ = ["Band", "Norms", "Registry", "Scale", "load_registry", "load_scale"]

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Band:
    """A severity band, inclusive at both ends."""

    label: str
    min: int
    max: int


@dataclass(frozen=True)
class Norms:
    """Mean and SD of a reference population, with the source."""

    mean: float
    sd: float
    source: str


@dataclass(frozen=True)
class Scale:
    """One questionnaire, as the registry file defines it."""

    code: str
    name: str
    version: str
    items: int
    item_min: int
    item_max: int
    total_min: int
    total_max: int
    direction: str
    licence: str
    citation: str
    reverse_keyed: tuple[int, ...] = ()
    optional_items: tuple[int, ...] = ()
    risk_items: tuple[int, ...] = ()
    bands: tuple[Band, ...] = ()
    caseness_cutoff: int | None = None
    caseness_comparison: str | None = None
    caseness_setting: str | None = None
    caseness_source: str | None = None
    reliable_change_points: int | None = None
    reliable_change_interval: float | None = None
    reliable_change_source: str | None = None
    reliability: float | None = None
    reliability_kind: str | None = None
    reliability_source: str | None = None
    norms_functional: Norms | None = None
    norms_clinical: Norms | None = None
    max_missing: int = 0
    proration_source: str = ""
    loinc_panel: str | None = None
    loinc_total: str | None = None
    loinc_items: tuple[str, ...] = ()
    remission_below: int | None = None
    remission_source: str | None = None
    source_file: str = field(default="", compare=False)

    @property
    def higher_is_better(self) -> bool:
        """True for scales where a rising score is improvement (e.g. ORS)."""
        return self.direction == "higher_is_better"

    @property
    def has_risk_item(self) -> bool:
        """True when the scale has at least one risk item."""
        return bool(self.risk_items)

    def band_of(self, score: float) -> str | None:
        """The severity band label of a total score, or None when the scale has no bands."""
        for band in self.bands:
            if band.min <= score <= band.max:
                return band.label
        return None

    def is_case(self, score: float, cutoff: int | None = None) -> bool | None:
        """Whether a score is at caseness (None when the scale has no cut-off)."""
        cut = self.caseness_cutoff if cutoff is None else cutoff
        if cut is None:
            return None
        return score >= cut if self.caseness_comparison == ">=" else score <= cut


_DIRECTIONS = {"lower_is_better", "higher_is_better"}
_COMPARISONS = {">=", "<="}
_RELIABILITY_KINDS = {"alpha", "test_retest"}


class _Reader:
    """Typed access to one parsed file that names the file and field on every error."""

    def __init__(self, path: Path, data: Mapping[str, Any]) -> None:
        self.path = path
        self.data = data

    def fail(self, fieldname: str, expected: str, value: object = None) -> RegistryError:
        return RegistryError(
            f"scale file field {fieldname!r}: expected {expected}",
            file=str(self.path),
            value=value,
        )

    def get(self, section: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
            prefix: str = "", required: bool = True) -> Any:
        name = f"{prefix}{key}"
        if key not in section:
            if required:
                raise self.fail(name, f"a value of type {_kind_name(kind)} (missing)")
            return None
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise self.fail(name, f"a value of type {_kind_name(kind)}", value)
        return value

    def section(self, key: str, prefix: str = "") -> Mapping[str, Any] | None:
        value = self.data.get(key) if not prefix else None
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.fail(prefix + key, "a table", value)
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _int_list(r: _Reader, key: str, lo: int, hi: int) -> tuple[int, ...]:
    value = r.data.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in value
    ):
        raise r.fail(key, f"a list of item numbers between {lo} and {hi}", value)
    return tuple(value)


def _norms(r: _Reader, which: str) -> Norms | None:
    norms = r.data.get("norms", {})
    if not isinstance(norms, Mapping):
        raise r.fail("norms", "a table", norms)
    sec = norms.get(which)
    if sec is None:
        return None
    prefix = f"norms.{which}."
    mean = float(r.get(sec, "mean", (int, float), prefix))
    sd = float(r.get(sec, "sd", (int, float), prefix))
    if sd <= 0:
        raise r.fail(prefix + "sd", "a positive number", sd)
    return Norms(mean=mean, sd=sd, source=r.get(sec, "source", str, prefix))


def load_scale(path: Path) -> Scale:
    """Parse and validate one scale file.

    Raises
    ------
    RegistryError
        Naming the file and the field when anything is missing or inconsistent.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise RegistryError(f"scale file cannot be read: {exc}", file=str(path)) from exc
    r = _Reader(path, data)
    n_items = r.get(data, "items", int)
    item_min = r.get(data, "item_min", int)
    item_max = r.get(data, "item_max", int)
    total_min = r.get(data, "total_min", int)
    total_max = r.get(data, "total_max", int)
    if n_items < 1:
        raise r.fail("items", "a positive item count", n_items)
    if item_max <= item_min:
        raise r.fail("item_max", f"a value above item_min ({item_min})", item_max)
    if (total_min, total_max) != (n_items * item_min, n_items * item_max):
        raise r.fail(
            "total_max",
            f"total range {n_items * item_min}-{n_items * item_max} (items x item range)",
            f"{total_min}-{total_max}",
        )
    direction = r.get(data, "direction", str)
    if direction not in _DIRECTIONS:
        raise r.fail("direction", f"one of {sorted(_DIRECTIONS)}", direction)

    bands_raw = data.get("bands", [])
    if not isinstance(bands_raw, list):
        raise r.fail("bands", "a list of {label, min, max}", bands_raw)
    bands = []
    for i, b in enumerate(bands_raw):
        if not isinstance(b, Mapping):
            raise r.fail(f"bands[{i}]", "a table {label, min, max}", b)
        band = Band(
            label=r.get(b, "label", str, f"bands[{i}]."),
            min=r.get(b, "min", int, f"bands[{i}]."),
            max=r.get(b, "max", int, f"bands[{i}]."),
        )
        bands.append(band)
    if bands:
        expected_lo = total_min
        for i, band in enumerate(bands):
            if band.min != expected_lo or band.max < band.min:
                raise r.fail(f"bands[{i}]", f"contiguous bands starting at {expected_lo}",
                             f"{band.min}-{band.max}")
            expected_lo = band.max + 1
        if expected_lo != total_max + 1:
            raise r.fail("bands", f"bands covering {total_min}-{total_max}",
                         f"ends at {expected_lo - 1}")

    cas = data.get("caseness", {})
    cutoff = comparison = setting = cas_source = None
    if cas:
        cutoff = r.get(cas, "cutoff", int, "caseness.")
        comparison = r.get(cas, "comparison", str, "caseness.")
        if comparison not in _COMPARISONS:
            raise r.fail("caseness.comparison", f"one of {sorted(_COMPARISONS)}", comparison)
        setting = r.get(cas, "setting", str, "caseness.", required=False)
        cas_source = r.get(cas, "source", str, "caseness.")

    rc = data.get("reliable_change", {})
    rc_points = rc_interval = rc_source = None
    if rc:
        rc_points = r.get(rc, "points", int, "reliable_change.")
        rc_interval = float(r.get(rc, "interval", (int, float), "reliable_change."))
        rc_source = r.get(rc, "source", str, "reliable_change.")
        if not 0 < rc_interval < 1:
            raise r.fail("reliable_change.interval", "a probability such as 0.95", rc_interval)

    rel = data.get("reliability", {})
    rel_value = rel_kind = rel_source = None
    if rel:
        rel_value = float(r.get(rel, "value", (int, float), "reliability."))
        rel_kind = r.get(rel, "kind", str, "reliability.")
        rel_source = r.get(rel, "source", str, "reliability.")
        if not 0 < rel_value < 1:
            raise r.fail("reliability.value", "a coefficient between 0 and 1", rel_value)
        if rel_kind not in _RELIABILITY_KINDS:
            raise r.fail("reliability.kind", f"one of {sorted(_RELIABILITY_KINDS)}", rel_kind)

    pro = data.get("proration", {})
    max_missing = r.get(pro, "max_missing", int, "proration.") if pro else 0
    if not 0 <= max_missing < n_items:
        raise r.fail("proration.max_missing", f"0 to {n_items - 1}", max_missing)

    rem = data.get("remission", {})
    rem_below = r.get(rem, "below", int, "remission.") if rem else None
    rem_source = r.get(rem, "source", str, "remission.") if rem else None

    loinc = data.get("loinc", {})
    loinc_items = tuple(loinc.get("items", []))
    if loinc_items and len(loinc_items) != n_items:
        raise r.fail("loinc.items", f"{n_items} codes, one per item", len(loinc_items))

    return Scale(
        code=r.get(data, "code", str),
        name=r.get(data, "name", str),
        version=str(r.get(data, "version", (str, int))),
        items=n_items,
        item_min=item_min,
        item_max=item_max,
        total_min=total_min,
        total_max=total_max,
        direction=direction,
        licence=r.get(data, "licence", str),
        citation=r.get(data, "citation", str),
        reverse_keyed=_int_list(r, "reverse_keyed", 1, n_items),
        optional_items=_int_list(r, "optional_items", 1, n_items),
        risk_items=_int_list(r, "risk_items", 1, n_items),
        bands=tuple(bands),
        caseness_cutoff=cutoff,
        caseness_comparison=comparison,
        caseness_setting=setting,
        caseness_source=cas_source,
        reliable_change_points=rc_points,
        reliable_change_interval=rc_interval,
        reliable_change_source=rc_source,
        reliability=rel_value,
        reliability_kind=rel_kind,
        reliability_source=rel_source,
        norms_functional=_norms(r, "functional"),
        norms_clinical=_norms(r, "clinical"),
        max_missing=max_missing,
        proration_source=(pro.get("source", "") if pro else ""),
        loinc_panel=loinc.get("panel"),
        loinc_total=loinc.get("total"),
        loinc_items=loinc_items,
        remission_below=rem_below,
        remission_source=rem_source,
        source_file=path.name,
    )


@dataclass(frozen=True)
class Registry(Mapping[str, Scale]):
    """All scales by code; iterate for codes, index for :class:`Scale`."""

    scales: Mapping[str, Scale]

    def __getitem__(self, code: str) -> Scale:
        return self.scales[code]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scales)

    def __len__(self) -> int:
        return len(self.scales)

    @property
    def max_items(self) -> int:
        """The largest item count of any scale (the width of item columns)."""
        return max(s.items for s in self.scales.values())

    def by_loinc(self) -> dict[str, tuple[Scale, int | None]]:
        """Map every LOINC code to (scale, item number or None for panel/total)."""
        out: dict[str, tuple[Scale, int | None]] = {}
        for s in self.scales.values():
            for code in (s.loinc_panel, s.loinc_total):
                if code:
                    out[code] = (s, None)
            for i, code in enumerate(s.loinc_items, start=1):
                out[code] = (s, i)
        return out


def load_registry(directory: Path | None = None) -> Registry:
    """Load every ``*.toml`` scale file of ``directory`` (default: the shipped registry)."""
    directory = DATA_DIR if directory is None else directory
    scales: dict[str, Scale] = {}
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise RegistryError("no scale files found", directory=str(directory))
    for path in files:
        scale = load_scale(path)
        if scale.code in scales:
            raise RegistryError(
                f"scale code {scale.code!r} defined twice", file=str(path),
                first=scales[scale.code].source_file,
            )
        scales[scale.code] = scale
    return Registry(scales=dict(sorted(scales.items())))
