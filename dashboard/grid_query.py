"""AG Grid's sort and filter models as SQL, over a whitelist of columns.

The caseload grid pages on the server (AG Grid's infinite row model): the browser sends
``sortModel`` and ``filterModel`` with each block request, and the database sorts and
filters before one block of rows is read. Only the columns named in the whitelist can be
sorted or filtered, values are bound parameters, and any other shape is a
:class:`~pipeline.errors.UsageError` (the callback then shows nothing).

Semantics follow AG Grid's own text and number filters: text matching ignores case,
``inRange`` excludes both ends (AG Grid's default, ``inRangeInclusive=False``), text
"not equal"/"not contains" keep blank values and number "not equal" does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from pipeline.errors import UsageError

__all__ = ["GridColumn", "grid_order", "grid_where"]

Clause = sa.ColumnElement[bool]

_TEXT_TYPES = {"contains", "notContains", "equals", "notEqual", "startsWith", "endsWith",
               "blank", "notBlank"}
_NUMBER_TYPES = {"equals", "notEqual", "lessThan", "lessThanOrEqual", "greaterThan",
                 "greaterThanOrEqual", "inRange", "blank", "notBlank"}
_MAX_CONDITIONS = 4
_MAX_TEXT = 200
_MAX_NUMBER = 1e6  # no score, change or count on the grid comes near it


@dataclass(frozen=True)
class GridColumn:
    """One sortable, filterable grid column.

    ``expr`` is what it sorts and filters on; ``kind`` is ``"text"`` or ``"number"``.
    ``compare(op, value)`` replaces plain comparisons for a number shown in derived
    units (weeks since a date: the date is compared, so its index can be used).
    ``descending_expr`` inverts the sort direction (weeks ascending = date descending).
    """

    expr: sa.ColumnElement[Any]
    kind: str = "text"
    compare: Callable[[str, float], Clause] | None = None
    descending_expr: bool = False
    #: An aggregate over joined rows (a count): filtered in HAVING, not WHERE.
    aggregate: bool = False
    #: What to sort on when it differs from ``expr`` (in a grouped query, max(expr)).
    sort_expr: sa.ColumnElement[Any] | None = None


def _text(col: GridColumn, cond: Mapping[str, Any]) -> Clause:
    kind = cond.get("type")
    if kind not in _TEXT_TYPES:
        raise UsageError("unknown text filter", type=kind)
    blank = sa.or_(col.expr.is_(None), col.expr == "")
    if kind == "blank":
        return blank
    if kind == "notBlank":
        return sa.not_(blank)
    value = cond.get("filter")
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise UsageError("a text filter needs a short string", filter=value)
    # Both sides lowered by the database's own lower(): SQLite's folds ASCII only, so a
    # value lowered in Python ('öst') would never match the column's ('Öst' stays).
    low = sa.func.lower(col.expr)
    esc = value.replace("/", "//").replace("%", "/%").replace("_", "/_")

    def like(pattern: str) -> Clause:
        return low.like(sa.func.lower(sa.literal(pattern)), escape="/")

    match: dict[str, Clause] = {
        "contains": like(f"%{esc}%"),
        "notContains": sa.or_(col.expr.is_(None), ~like(f"%{esc}%")),
        "equals": low == sa.func.lower(sa.literal(value)),
        "notEqual": sa.or_(col.expr.is_(None), low != sa.func.lower(sa.literal(value))),
        "startsWith": like(f"{esc}%"),
        "endsWith": like(f"%{esc}"),
    }
    return match[kind]


def _plain(expr: sa.ColumnElement[Any]) -> Callable[[str, float], Clause]:
    def compare(op: str, value: float) -> Clause:
        return {"lt": expr < value, "le": expr <= value, "gt": expr > value,
                "ge": expr >= value, "eq": expr == value}[op]
    return compare


def _number(col: GridColumn, cond: Mapping[str, Any]) -> Clause:
    kind = cond.get("type")
    if kind not in _NUMBER_TYPES:
        raise UsageError("unknown number filter", type=kind)
    if kind == "blank":
        return col.expr.is_(None)
    if kind == "notBlank":
        return col.expr.is_not(None)
    raw = [cond.get("filter")] + ([cond.get("filterTo")] if kind == "inRange" else [])
    values: list[float] = []
    for v in raw:
        number = None
        if isinstance(v, int | float) and not isinstance(v, bool):
            try:
                number = float(v)
            except OverflowError:  # a JSON integer beyond any float
                number = None
        if number is None or not math.isfinite(number) or abs(number) > _MAX_NUMBER:
            raise UsageError("a number filter needs a finite number up to 1e6", filter=v)
        values.append(number)
    cmp = col.compare or _plain(col.expr)
    a = values[0]
    if kind == "equals":
        return cmp("eq", a)
    if kind == "notEqual":  # blanks excluded, as AG Grid's number filter does
        return sa.not_(cmp("eq", a))
    if kind == "inRange":
        lo, hi = sorted(values)
        return sa.and_(cmp("gt", lo), cmp("lt", hi))
    op = {"lessThan": "lt", "lessThanOrEqual": "le", "greaterThan": "gt",
          "greaterThanOrEqual": "ge"}[kind]
    return cmp(op, a)


def grid_where(filter_model: Any, columns: Mapping[str, GridColumn],
               aggregate: bool | None = None) -> list[Clause]:
    """SQL conditions for an AG Grid ``filterModel`` (``None`` or ``{}``: none); with
    ``aggregate``, only those on (``True``, for HAVING) or not on (``False``, for
    WHERE) aggregate columns. Every column named is validated either way."""
    if filter_model is None:
        return []
    if not isinstance(filter_model, dict):
        raise UsageError("the filter model must be an object")
    out: list[Clause] = []
    for col_id, model in filter_model.items():
        col = columns.get(col_id)
        if col is None or not isinstance(model, dict):
            raise UsageError("no such filterable column", column=col_id)
        one = _text if col.kind == "text" else _number
        keep = aggregate is None or col.aggregate == aggregate
        conditions = model.get("conditions")
        if conditions is None:
            clause = one(col, model)
            if keep:
                out.append(clause)
            continue
        operator = model.get("operator")
        if (not isinstance(conditions, list) or not 0 < len(conditions) <= _MAX_CONDITIONS
                or operator not in ("AND", "OR")
                or not all(isinstance(c, dict) for c in conditions)):
            raise UsageError("a combined filter needs AND/OR and 1-4 conditions",
                             column=col_id)
        parts = [one(col, c) for c in conditions]
        if keep:
            out.append(sa.and_(*parts) if operator == "AND" else sa.or_(*parts))
    return out


def grid_order(sort_model: Any, columns: Mapping[str, GridColumn]
               ) -> list[sa.ColumnElement[Any]]:
    """ORDER BY terms for an AG Grid ``sortModel``; blanks sort last either way."""
    if sort_model is None:
        return []
    if not isinstance(sort_model, list):
        raise UsageError("the sort model must be a list")
    out: list[sa.ColumnElement[Any]] = []
    for item in sort_model:
        if not isinstance(item, dict):
            raise UsageError("a sort item must be an object")
        col_id, direction = item.get("colId"), item.get("sort")
        col = columns.get(col_id) if isinstance(col_id, str) else None
        if col is None or direction not in ("asc", "desc"):
            raise UsageError("no such sortable column or direction",
                             column=col_id, sort=direction)
        descending = (direction == "desc") != col.descending_expr
        expr = col.sort_expr if col.sort_expr is not None else col.expr
        out.append((expr.desc() if descending else expr.asc()).nulls_last())
    return out
