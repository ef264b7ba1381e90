"""Reason codes: why a record was quarantined, and warnings on accepted records.

One enum each, shared by every reader and by the store, so the counts of a batch, the
quarantine table and the dashboard speak the same words.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Reason", "Warn"]


class Reason(StrEnum):
    """Why an input record was not accepted."""

    MISSING_FIELD = "missing_field"  #: a required field is empty (or neither items nor total)
    BAD_DATE = "bad_date"  #: a date/time is not ISO 8601
    FUTURE_DATE = "future_date"  #: administered after now (+ tolerance)
    BAD_VALUE = "bad_value"  #: a number field holds something that is not an integer
    UNKNOWN_MEASURE = "unknown_measure"  #: measure code not in the scale registry
    UNKNOWN_EPISODE = "unknown_episode"  #: episode_id not in the store nor earlier in this ingest
    UNKNOWN_CLIENT = "unknown_client"  #: an episode names a client that is not known
    UNKNOWN_THERAPIST = "unknown_therapist"  #: an episode names a therapist that is not known
    CLIENT_MISMATCH = "client_mismatch"  #: a FHIR subject is not the episode's client
    ITEM_OUT_OF_RANGE = "item_out_of_range"  #: an item outside the scale's item range
    TOO_MANY_MISSING_ITEMS = "too_many_missing_items"  #: more missing items than proration allows
    TOTAL_OUT_OF_RANGE = "total_out_of_range"  #: a supplied total outside the scale's range
    CONFLICT = "conflict"  #: same identity as an accepted record, different content
    BAD_ENCODING = "bad_encoding"  #: bytes that are not UTF-8, a NUL or lone-surrogate character
    UNPARSEABLE = "unparseable"  #: wrong field count, broken JSON, a resource we cannot read
    UNSUPPORTED_RESOURCE = "unsupported_resource"  #: a FHIR resource type OnTrack does not ingest
    FIELD_TOO_LARGE = "field_too_large"  #: a field longer than max_field_chars or its column
    FILE_TOO_LARGE = "file_too_large"  #: the file is over max_file_bytes (not parsed at all)
    UNREADABLE_FILE = "unreadable_file"  #: the whole file could not be read (see its error)


class Warn(StrEnum):
    """Accepted, but worth a look."""

    TOTAL_ITEMS_MISMATCH = "total_items_mismatch"  #: supplied total != items' score (items win)
    PRORATED = "prorated"  #: total prorated from answered items
    RISK_ITEM_MISSING = "risk_item_missing"  #: risk item not answered: risk status unknown
    BEFORE_EPISODE_START = "before_episode_start"  #: administered before the episode started
    UPDATED = "updated"  #: an entity record changed mutable fields (e.g. an episode's end date)
