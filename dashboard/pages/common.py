"""Small layout helpers shared by pages."""

from __future__ import annotations

from typing import Any

import dash_bootstrap_components as dbc
import pandas as pd
from dash import dcc, html

from dashboard.access import Viewer, may_export, may_see_clients, may_see_service


def denied(what: str = "this page", viewer: Viewer | None = None) -> Any:
    """The no-access notice; with the viewer, links to the pages their role may open
    (a researcher signing in lands on the caseload, which is not theirs)."""
    pages = [] if viewer is None else [
        (href, label) for href, label, allowed in (
            ("/", "Caseload", may_see_clients(viewer)),
            ("/service", "Service outcomes", may_see_service(viewer)),
            ("/quality", "Data quality", may_see_service(viewer)),
            ("/export", "Research export", may_export(viewer)))
        if allowed]
    links: list[Any] = [html.Span(" Your pages: ")] + [
        item for i, (href, label) in enumerate(pages)
        for item in ([html.Span(", ")] if i else []) + [dcc.Link(label, href=href)]] \
        if pages else []
    return dbc.Alert([f"You do not have access to {what}.", *links], color="secondary")


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
