"""FHIR R4 JSON reader: a Bundle, a single resource, or NDJSON of resources.

QuestionnaireResponse (items by LOINC linkId, ``item_N`` or ``N``) and Observation (a
LOINC total-score code with ``valueInteger``/``valueQuantity``, or a panel code with item
``component``s) become administration records with the same string columns as a CSV, so
one validation path serves both. Structure is checked with ``fhir.resources`` (R4B
models); codes, status and required fields are checked here, since the models accept
e.g. an Observation with status "bogus" and an empty code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pydantic
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse

from pipeline.errors import UnreadableFileError
from pipeline.ingest.formats import (
    KINDS,
    LONE_SURROGATE,
    QuarantineRecord,
    RawChunk,
    is_ascii_number,
)
from pipeline.reasons import Reason
from pipeline.scales import Registry

__all__ = ["read_fhir"]

_MODELS: dict[str, Any] = {
    "QuestionnaireResponse": QuestionnaireResponse,
    "Observation": Observation,
}
_QR_DONE = {"completed", "amended"}
_OBS_DONE = {"final", "amended", "corrected"}
_RAW_LIMIT = 20_000


class _Skip(Exception):
    """A resource that becomes a quarantine record."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _ref_id(ref: Any, types: tuple[str, ...]) -> str:
    if not isinstance(ref, dict):
        return ""
    value = ref.get("reference")
    if isinstance(value, str) and "/" in value:
        rtype, _, rid = value.rstrip("/").rpartition("/")
        if rtype.split("/")[-1] in types:
            return rid
    ident = ref.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        return str(ident["value"])
    return ""


def _extension(res: dict[str, Any], suffix: str) -> str:
    for ext in res.get("extension") or []:
        if isinstance(ext, dict) and str(ext.get("url", "")).endswith(suffix):
            for key in ("valueInteger", "valueString", "valuePositiveInt", "valueId"):
                if key in ext:
                    return str(ext[key])
    return ""


def _answer_value(answer: Any) -> str:
    if not isinstance(answer, dict):
        return ""
    for key in ("valueInteger", "valueDecimal"):
        if key in answer:
            return str(answer[key])
    coding = answer.get("valueCoding")
    if isinstance(coding, dict):
        for ext in coding.get("extension") or []:
            url = str(ext.get("url", "")) if isinstance(ext, dict) else ""
            if url.endswith(("ordinalValue", "itemWeight")) and "valueDecimal" in ext:
                return str(ext["valueDecimal"])
        code = coding.get("code")
        if isinstance(code, str) and is_ascii_number(code):
            return code
    if "valueQuantity" in answer and isinstance(answer["valueQuantity"], dict):
        return str(answer["valueQuantity"].get("value", ""))
    return "?"


def _measure_from(text: str, registry: Registry) -> str:
    if not text:
        return ""
    loinc = registry.by_loinc()
    tail = text.rstrip("/").split("/")[-1].split("|")[0]
    if tail in registry:
        return tail
    if tail in loinc:
        return loinc[tail][0].code
    return ""


def _item_number(link: str, measure: str, registry: Registry) -> tuple[str, int | None]:
    """(measure, item number or None for the total) of a linkId or code."""
    loinc = registry.by_loinc()
    if link in loinc:
        scale, item = loinc[link]
        return scale.code, item
    # ASCII digits only: "²".isdigit() is true but int("²") raises.
    if link.startswith("item_") and is_ascii_number(link[5:]):
        return measure, int(link[5:])
    if is_ascii_number(link):
        return measure, int(link)
    if link == "total":
        return measure, None
    raise _Skip(Reason.UNPARSEABLE, f"item linkId {link[:60]!r} is not a LOINC item code, "
                "item_N or N")


def _record(res: dict[str, Any], registry: Registry) -> dict[str, str]:
    rtype = res.get("resourceType")
    # isinstance first: a list or object resourceType is unhashable in the dict lookup.
    if not isinstance(rtype, str) or rtype not in _MODELS:
        raise _Skip(Reason.UNSUPPORTED_RESOURCE,
                    f"resourceType {str(rtype)[:40]!r}: only QuestionnaireResponse and "
                    "Observation carry scores")
    try:
        _MODELS[rtype].model_validate(res)
    except (pydantic.ValidationError, ValueError, TypeError, RecursionError) as exc:
        # RecursionError: a deeply nested (hostile) resource exhausts the model's recursion.
        first = str(exc).splitlines()[:3]
        raise _Skip(Reason.UNPARSEABLE, f"not a valid FHIR R4 {rtype}: {' '.join(first)}") \
            from exc
    rec: dict[str, str] = {
        "episode_id": _ref_id(res.get("encounter"), ("Encounter", "EpisodeOfCare"))
        or _extension(res, "episode-id"),
        "client_id": _ref_id(res.get("subject"), ("Patient",)),
        "session_number": _extension(res, "session-number"),
    }
    if rtype == "QuestionnaireResponse":
        if res.get("status") not in _QR_DONE:
            raise _Skip(Reason.BAD_VALUE, f"QuestionnaireResponse status "
                        f"{str(res.get('status'))[:20]!r}: only completed responses are scored")
        rec["administered_at"] = str(res.get("authored") or "")
        measure = _measure_from(str(res.get("questionnaire") or ""), registry)
        for item in res.get("item") or []:
            if not isinstance(item, dict):
                continue
            m, number = _item_number(str(item.get("linkId", "")), measure, registry)
            measure = measure or m
            answers = item.get("answer") or []
            value = _answer_value(answers[0]) if answers else ""
            rec["total" if number is None else f"item_{number}"] = value
        rec["measure"] = measure
    else:
        if res.get("status") not in _OBS_DONE:
            raise _Skip(Reason.BAD_VALUE, f"Observation status {str(res.get('status'))[:20]!r}:"
                        " only final, amended or corrected results are ingested")
        codes = [c.get("code") for c in (res.get("code") or {}).get("coding") or []
                 if isinstance(c, dict)]
        loinc = registry.by_loinc()
        hits = [loinc[c] for c in codes if c in loinc]
        if not hits:
            raise _Skip(Reason.UNKNOWN_MEASURE, f"Observation code {codes[:3]} is no registry "
                        "scale's LOINC panel or total code")
        scale, item = hits[0]
        if item is not None:
            raise _Skip(Reason.UNSUPPORTED_RESOURCE, "a single-item Observation is not an "
                        "administration; send the panel or the total")
        rec["measure"] = scale.code
        rec["administered_at"] = str(res.get("effectiveDateTime") or
                                     (res.get("effectivePeriod") or {}).get("start") or "")
        if "valueInteger" in res:
            rec["total"] = str(res["valueInteger"])
        elif isinstance(res.get("valueQuantity"), dict):
            rec["total"] = str(res["valueQuantity"].get("value", ""))
        for comp in res.get("component") or []:
            ccodes = [c.get("code") for c in (comp.get("code") or {}).get("coding") or []]
            for c in ccodes:
                if c in loinc and loinc[c][1] is not None:
                    rec[f"item_{loinc[c][1]}"] = _answer_value(comp)
    return rec


def _raw(res: Any) -> str:
    """A resource as JSON for the quarantine table; past ``_RAW_LIMIT`` characters, its
    first ``_RAW_LIMIT`` characters as a JSON string."""
    raw = QuarantineRecord.raw_json(res)
    if len(raw) > _RAW_LIMIT:
        # Cutting the JSON text would leave invalid JSON: keep its head as a JSON string.
        raw = json.dumps(raw[:_RAW_LIMIT] + " ...[truncated]", ensure_ascii=False)
    return raw


def _resources(path: Path, max_bytes: int) -> Iterator[tuple[int, str, Any]]:
    """Yield (position, location, resource-or-error) for each record of the file."""
    data = path.read_bytes()[:max_bytes + 1]
    if len(data) > max_bytes:
        raise UnreadableFileError(f"file is larger than the {max_bytes}-byte limit",
                                  file=str(path), fix="split the file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableFileError(f"file is not UTF-8 ({exc.reason} at byte {exc.start})",
                                  file=str(path), expected="UTF-8 FHIR JSON") from exc
    # ValueError, not only JSONDecodeError (its subclass): an integer literal longer than
    # sys.get_int_max_str_digits() raises a plain ValueError. RecursionError: hostile nesting.
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        doc = None
        # NDJSON separates records by "\n" only; str.splitlines() would also split inside
        # a string holding a raw U+2028 or U+0085, which JSON allows unescaped.
        lines = [ln.removesuffix("\r") for ln in text.split("\n")]
        if len([ln for ln in lines if ln.strip()]) < 2:
            raise UnreadableFileError(f"file is not valid JSON: {str(exc)[:120]}",
                                      file=str(path),
                                      expected="a FHIR Bundle, a resource, or NDJSON") from None
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield i, f"line {i}", json.loads(line)
            except (ValueError, RecursionError) as exc:
                yield i, f"line {i}", _Skip(Reason.UNPARSEABLE, f"line is not JSON: {exc}"[:200])
        return
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        entries = doc.get("entry") or []
        if not isinstance(entries, list):
            raise UnreadableFileError("Bundle.entry is not a list", file=str(path))
        for i, entry in enumerate(entries, start=1):
            res = entry.get("resource") if isinstance(entry, dict) else None
            yield i, f"entry {i}", res if isinstance(res, dict) else _Skip(
                Reason.UNPARSEABLE, "Bundle entry has no resource object")
    elif isinstance(doc, dict) and "resourceType" in doc:
        yield 1, "resource", doc
    else:
        raise UnreadableFileError("JSON is neither a FHIR Bundle nor a resource",
                                  file=str(path), expected="resourceType at the top level")


def read_fhir(path: Path, registry: Registry, max_bytes: int) -> Iterator[RawChunk]:
    """Read a FHIR JSON/NDJSON file into administration record chunks (one chunk)."""
    kind = KINDS["administrations"]
    rows: list[dict[str, str]] = []
    failed: list[QuarantineRecord] = []
    label = "line"
    for pos, location, res in _resources(path, max_bytes):
        label = location.split(" ")[0] if " " in location else location
        raw = _raw(res if not isinstance(res, _Skip) else None)
        if isinstance(res, _Skip):
            failed.append(QuarantineRecord(pos, res.reason, res.detail, raw, location))
            continue
        if not isinstance(res, dict):
            failed.append(QuarantineRecord(pos, Reason.UNPARSEABLE,
                                           "record is not a JSON object", raw, location))
            continue
        try:
            rec = _record(res, registry)
        except _Skip as skip:
            failed.append(QuarantineRecord(pos, skip.reason, skip.detail, raw, location))
            continue
        bad = sorted(k for k, v in rec.items() if "\x00" in v or LONE_SURROGATE.search(v))
        if bad:
            # A "\u0000" or lone "\ud800" escape decodes to a character no text column of
            # the store can hold (PostgreSQL rejects NUL; UTF-8 has no lone surrogates).
            failed.append(QuarantineRecord(pos, Reason.BAD_ENCODING,
                                           f"fields {bad} hold a NUL character or a lone "
                                           "UTF-16 surrogate escape", raw, location))
            continue
        rec["_line"] = str(pos)
        rows.append(rec)
    k = registry.max_items
    columns = list(kind.required + kind.optional) + [f"item_{i}" for i in range(1, k + 1)]
    extra = sorted({c for r in rows for c in r} - set(columns) - {"_line"})
    frame = pd.DataFrame(rows, columns=[*columns, *extra, "_line"], dtype="str").fillna("")
    frame["_line"] = pd.to_numeric(frame["_line"]).astype("int64") if len(frame) else \
        pd.Series([], dtype="int64")
    frame.attrs["location_label"] = label
    yield RawChunk(kind=kind, frame=frame, failed=failed, extra_columns=tuple(extra))
