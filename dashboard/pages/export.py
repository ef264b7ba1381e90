"""Research export (researchers and directors): choose a cohort and options, see what
k-anonymity cost, download the anonymised dataset as a zip. Every export is logged.

The dataset is exactly what ``ontrack export`` writes (SPEC §10); the page only passes
options through :class:`dashboard.data.DataAccess`.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, dcc, html

from dashboard import ids
from dashboard.access import may_export
from dashboard.data import get_data
from dashboard.pages.common import denied, table
from dashboard.session import current_viewer
from pipeline.errors import OnTrackError
from pipeline.store import utcnow

_LOG_COLUMNS = {"export_id": "Export", "at": "When (UTC)", "username": "Who",
                "source": "From", "parameters": "Parameters", "episodes": "Episodes",
                "administrations": "Administrations",
                "records_suppressed": "Episodes suppressed", "k_achieved": "k achieved",
                "generalisation": "Generalised"}


def _log_table(viewer: Any) -> Any:
    log = get_data().export_log(viewer)
    if log.empty:
        return html.P("No exports yet.", className="text-muted")
    log = log.assign(at=log["at"].astype(str).str.slice(0, 19),
                     parameters=[_readable(p) for p in log["parameters"]])
    return table(log, _LOG_COLUMNS)


def _readable(parameters: str) -> str:
    p = json.loads(parameters)
    span = f"{p.get('from') or 'first'} to {p.get('to') or 'last'}"
    return (f"started {span}; {', '.join(p.get('measures') or [])}; k={p.get('k')}; "
            f"{p.get('format')}; key {p.get('key')}")


def layout(**_: Any) -> Any:
    viewer = current_viewer()
    if viewer is None or not may_export(viewer):
        return denied("research exports")
    opts = get_data().export_options(viewer)
    if opts is None:
        return denied("research exports")
    defaults = [m for m in opts["default_measures"] if m in opts["measures"]]
    return html.Div([
        html.H2("Research export"),
        html.P(["An anonymised dataset for analysis (SPEC §10): one row per episode with "
                "its outcome flags and per-measure first and last scores, one row per "
                "administration, a codebook and a manifest with SHA-256 checksums. ",
                "Ids are keyed surrogates, ages are bands (90+ never exact), dates are days "
                "since the first score plus the start year, and no name, birth date, "
                "postcode, record number or free text leaves. The quasi-identifiers (age "
                "band, sex, ethnicity, team, start year) are generalised and then "
                "suppressed until every combination has at least k episodes."],
               className="text-muted"),
        dbc.Row([
            dbc.Col([dbc.Label("Episodes that started between"),
                     dcc.DatePickerRange(id=ids.EXPORT_RANGE,
                                         min_date_allowed=opts["first_start"],
                                         max_date_allowed=opts["last_start"],
                                         start_date=opts["first_start"],
                                         end_date=opts["last_start"],
                                         display_format="YYYY-MM-DD")], md=4),
            dbc.Col([dbc.Label("Measures"),
                     dcc.Checklist(opts["measures"], defaults, id=ids.EXPORT_MEASURES,
                                   inline=True, inputClassName="me-1",
                                   labelClassName="me-3")], md=3),
            dbc.Col([dbc.Label("k (smallest group)", html_for=ids.EXPORT_K),
                     dbc.Input(id=ids.EXPORT_K, type="number", min=2, max=100, step=1,
                               value=5)], md=2),
            dbc.Col([dbc.Label("Format"),
                     dcc.RadioItems(["csv", "parquet"], "csv", id=ids.EXPORT_FORMAT,
                                    inline=True, inputClassName="me-1",
                                    labelClassName="me-3")], md=2),
        ], className="g-3 mb-3"),
        dbc.Button("Create export and download zip", id=ids.EXPORT_SUBMIT, color="primary"),
        html.P("Surrogate ids use the server's ONTRACK_EXPORT_KEY when it is set (the same "
               "key links exports); otherwise a random key is used once and never stored.",
               className="text-muted small mt-2"),
        dcc.Loading(html.Div(id=ids.EXPORT_SUMMARY, className="mt-3")),
        dcc.Download(id=ids.EXPORT_DOWNLOAD),
        html.H4("Export log", className="mt-4"),
        html.Div(_log_table(viewer), id=ids.EXPORT_LOG),
    ])


dash.register_page(__name__, path="/export", title="OnTrack: research export",
                   name="Research export", layout=layout)


def _summary(m: dict[str, Any]) -> Any:
    rows = m["rows"]
    cohort = rows["episodes"] + m["records_suppressed"]
    share = m["records_suppressed"] / cohort if cohort else 0.0
    generalised = ", ".join(m["generalisation"]) or "nothing"
    items = [
        f"{rows['episodes']} episodes and {rows['administrations']} administrations "
        f"exported ({', '.join(m['parameters']['measures'])}, {m['parameters']['format']}).",
        f"k = {m['parameters']['k']} required; smallest group exported: "
        f"{m['k_achieved'] if m['k_achieved'] is not None else 'none (empty export)'}.",
        f"Generalised: {generalised}.",
        f"Suppressed: {m['records_suppressed']} of {cohort} episodes in the cohort "
        f"({share:.0%}); 0 cells.",
    ]
    color = "warning" if share > 0.2 or rows["episodes"] == 0 else "success"
    return dbc.Alert([html.Strong("Export ready. "),
                      html.Ul([html.Li(t) for t in items], className="mb-0")],
                     color=color, id="export-ok")


def _day(value: str | None) -> date | None:
    return date.fromisoformat(value[:10]) if value else None


@callback(Output(ids.EXPORT_SUMMARY, "children"), Output(ids.EXPORT_DOWNLOAD, "data"),
          Output(ids.EXPORT_LOG, "children"),
          Input(ids.EXPORT_SUBMIT, "n_clicks"),
          State(ids.EXPORT_RANGE, "start_date"), State(ids.EXPORT_RANGE, "end_date"),
          State(ids.EXPORT_MEASURES, "value"), State(ids.EXPORT_K, "value"),
          State(ids.EXPORT_FORMAT, "value"), prevent_initial_call=True)
def create_export(_clicks: int | None, start: str | None, end: str | None,
                  measures: list[str] | None, k: Any, fmt: str | None) -> tuple[Any, ...]:
    viewer = current_viewer()
    if viewer is None or not may_export(viewer):
        return denied("research exports"), None, dash.no_update
    problem = None
    if not measures:
        problem = "Choose at least one measure."
    elif not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 100:
        problem = "k must be a whole number from 2 to 100."
    elif fmt not in ("csv", "parquet"):
        problem = "Format must be csv or parquet."
    if problem:
        return dbc.Alert(problem, color="danger", id="export-error"), None, dash.no_update
    try:
        out = get_data().export(viewer, date_from=_day(start), date_to=_day(end),
                                measures=list(measures or []), k=int(k), fmt=str(fmt))
    except (OnTrackError, ValueError) as exc:
        # OnTrack's messages name the problem; they never carry identifiers.
        return (dbc.Alert(f"Export failed: {exc}", color="danger", id="export-error"),
                None, dash.no_update)
    if out is None:
        return denied("research exports"), None, dash.no_update
    payload, manifest = out
    name = f"ontrack-export-{utcnow():%Y%m%d-%H%M%S}.zip"
    return _summary(manifest), dcc.send_bytes(payload, name), _log_table(viewer)
