"""Small layout helpers shared by pages."""

from __future__ import annotations

from typing import Any

import dash_bootstrap_components as dbc
import pandas as pd
from dash import html


def denied(what: str = "this page") -> Any:
    return dbc.Alert(f"You do not have access to {what}.", color="secondary")


def table(frame: pd.DataFrame, columns: dict[str, str], fmt: dict[str, str] | None = None,
          **kwargs: Any) -> Any:
    """A plain bootstrap table of selected columns with header labels and formats."""
    fmt = fmt or {}

    def cell(v: Any, col: str) -> str:
        if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and pd.isna(v)):
            return "–"
        if col in fmt:
            return format(v, fmt[col])
        if isinstance(v, pd.Timestamp):
            return v.strftime("%Y-%m-%d")
        return str(v)

    head = html.Thead(html.Tr([html.Th(label) for label in columns.values()]))
    body = html.Tbody([html.Tr([html.Td(cell(r.get(c), c)) for c in columns])
                       for r in frame.to_dict(orient="records")])
    return dbc.Table([head, body], bordered=False, hover=True, size="sm", striped=True,
                     **kwargs)
