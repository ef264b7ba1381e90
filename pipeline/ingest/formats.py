"""Input record kinds (SPEC §11): their required and optional columns, and detection."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from pipeline.reasons import Reason

__all__ = ["KINDS", "INGEST_ORDER", "LONE_SURROGATE", "Kind", "QuarantineRecord", "RawChunk",
           "detect_kind", "is_ascii_number"]


#: Lone UTF-16 surrogates: a JSON ``\\ud800`` escape decodes to one, and no UTF-8 database
#: driver can store it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def is_ascii_number(text: str) -> bool:
    """True for a non-empty run of ASCII digits 0-9 (nothing int() could choke on)."""
    return text.isascii() and text.isdigit()


@dataclass(frozen=True)
class Kind:
    """A record kind: its name, required columns and optional columns."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    item_columns: bool = False

    def known(self, column: str, max_items: int) -> bool:
        """Whether a column belongs to this kind (items up to the registry's widest scale)."""
        if column in self.required or column in self.optional:
            return True
        if self.item_columns and column.startswith("item_"):
            suffix = column[5:]
            # ASCII digits only: str.isdigit() is also true for "²", which int() rejects.
            return is_ascii_number(suffix) and 1 <= int(suffix) <= max_items \
                and suffix[0] != "0"
        return False


KINDS: dict[str, Kind] = {
    "plans": Kind("plans", ("episode_id", "goal_id", "measure", "kind", "target", "due"),
                  ("description", "sustain")),
    "administrations": Kind("administrations", ("episode_id", "measure", "administered_at"),
                            ("session_number", "total", "client_id"), item_columns=True),
    "episodes": Kind("episodes", ("episode_id", "client_id", "therapist_id", "start_date"),
                     ("team", "end_date", "end_reason")),
    "therapists": Kind("therapists", ("therapist_id", "name"), ("team",)),
    "clients": Kind("clients", ("client_id",),
                    ("given_name", "family_name", "birth_date", "sex", "ethnicity",
                     "postcode", "record_number")),
}

#: Referenced kinds go in first, so a directory can be ingested in one call.
INGEST_ORDER = ("therapists", "clients", "episodes", "plans", "administrations")

# Columns whose presence, beyond the required ones, rules a kind out (a clients file
# has no episode_id; a therapists file has no client_id).
_EXCLUDES = {
    "therapists": {"episode_id", "client_id"},
    "clients": {"episode_id", "therapist_id"},
    "episodes": {"measure"},
}


def detect_kind(columns: Sequence[str]) -> tuple[Kind | None, Kind | None]:
    """Recognise a record kind from a header.

    Returns
    -------
    (kind, closest)
        ``kind`` when every required column of some kind is present; otherwise None and
        the kind with the most required columns present, ties broken by the smallest
        number missing (for the error message).
    """
    cols = set(columns)
    best: Kind | None = None
    best_hits: tuple[int, float] = (0, 0.0)
    for name in ("plans", "administrations", "episodes", "therapists", "clients"):
        kind = KINDS[name]
        if cols & _EXCLUDES.get(name, set()):
            continue
        hits = len(cols & set(kind.required))
        if hits == len(kind.required):
            return kind, kind
        # Ties on the count go to the kind missing the fewest of its required columns
        # (episode_id + measure is an administrations file lacking one column, not a plans
        # file lacking four).
        score = (hits, hits / len(kind.required))
        if hits and score > best_hits:
            best, best_hits = kind, score
    return None, best


@dataclass
class QuarantineRecord:
    """A record that failed before or during validation."""

    line: int | None
    reason: Reason
    detail: str
    raw: str
    location: str = ""

    @staticmethod
    def raw_json(value: object) -> str:
        """Serialise a raw record for the quarantine table (never raises).

        The result is always storable: lone surrogates are written as ``\\udXXX``
        escapes, and a value nested too deeply to serialise becomes a placeholder string.
        """
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (RecursionError, ValueError, TypeError):
            # Hostile nesting that json.loads still accepted can exceed the encoder's
            # recursion budget here, a few stack frames deeper.
            return json.dumps("<record too deeply nested to keep>")
        if LONE_SURROGATE.search(text):
            text = json.dumps(value, ensure_ascii=True, default=str)
        return text


@dataclass
class RawChunk:
    """A slice of one input file: string columns as given, plus what could not be read.

    ``frame`` has every column of the kind (empty string where absent), the extra
    columns, and ``_line`` (1-based physical line or entry number).
    """

    kind: Kind
    frame: pd.DataFrame
    failed: list[QuarantineRecord] = field(default_factory=list)
    extra_columns: tuple[str, ...] = ()

    @property
    def n_records(self) -> int:
        """Records in this chunk, readable or not."""
        return len(self.frame) + len(self.failed)
