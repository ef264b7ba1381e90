"""Caseload (start page): open episodes, most urgent first."""

from __future__ import annotations

from typing import Any

import dash
import dash_ag_grid as dag
import dash_bootstrap_components as dbc
from dash import Input, Output, callback, dcc, html

from dashboard import ids
from dashboard.access import Viewer, may_see_clients
from dashboard.data import get_data
from dashboard.pages.common import denied
from dashboard.session import current_viewer

_BAND_COLOURS = {"severe": "#ffcdd2", "moderately severe": "#ffccbc", "moderate": "#ffe0b2",
                 "mild": "#fff8e1", "minimal": "#e8f5e9"}


def _band_style(band_field: str) -> dict[str, Any]:
    """Colour a score cell by its severity band (held in another field of the row)."""
    return {"styleConditions": [
        {"condition": f"params.data.{band_field} == {label!r}",
         "style": {"backgroundColor": colour}} for label, colour in _BAND_COLOURS.items()]}


_ARROWS = {"improving": "↓ improving", "worsening": "↑ worsening", "flat": "→ flat",
           "too few": "· too few"}


def columns(dep: str = "PHQ-9", anx: str = "GAD-7") -> list[dict[str, Any]]:
    return [
        {"field": "risk_label", "headerName": "Risk", "width": 90,
         "cellStyle": {"styleConditions": [{"condition": "params.value == 'RISK'",
                                            "style": {"backgroundColor": "#d50000",
                                                      "color": "white",
                                                      "fontWeight": "bold"}}]}},
        {"field": "client_link", "headerName": "Client", "cellRenderer": "markdown",
         "minWidth": 170},
        {"field": "therapist", "headerName": "Therapist"},
        {"field": "team", "headerName": "Team", "width": 110},
        {"field": "weeks", "headerName": "Weeks", "width": 95, "filter": "agNumberColumnFilter"},
        {"field": "dep_latest", "headerName": dep, "width": 95,
         "cellStyle": _band_style("dep_band")},
        {"field": "dep_change", "headerName": f"Δ {dep}", "width": 105},
        {"field": "dep_trend_label", "headerName": f"{dep} trend", "width": 130},
        {"field": "anx_latest", "headerName": anx, "width": 95,
         "cellStyle": _band_style("anx_band")},
        {"field": "anx_change", "headerName": f"Δ {anx}", "width": 105},
        {"field": "goal_status", "headerName": "Goals", "width": 115},
        {"field": "flags_urgent", "headerName": "Urgent", "width": 100,
         "cellStyle": {"styleConditions": [{"condition": "params.value > 0",
                                            "style": {"color": "#b71c1c",
                                                      "fontWeight": "bold"}}]}},
        {"field": "flags_review", "headerName": "Review", "width": 100},
        {"field": "flags_info", "headerName": "Info", "width": 85},
        {"field": "next_review", "headerName": "Next review", "width": 130},
    ]


def rows(viewer: Viewer, team: str | None, therapist: str | None) -> list[dict[str, Any]]:
    df = get_data().caseload(viewer, team=team, therapist=therapist)
    if df.empty:
        return []
    df = df.assign(
        risk_label=df["risk"].map({True: "RISK", False: ""}),
        client_link="[" + df["client"].str.replace("[", "", regex=False) + "](/client/" +
        df["episode_id"] + ")",
        dep_trend_label=df["dep_trend"].map(_ARROWS),
    )
    out = df.astype(object).where(df.notna(), None)
    return [{str(k): v for k, v in r.items()} for r in out.to_dict(orient="records")]


def layout(**_: Any) -> Any:
    viewer = current_viewer()
    if viewer is None or not may_see_clients(viewer):
        return denied("the caseload", viewer)
    opts = get_data().options(viewer)
    director = viewer.role in ("director", "admin")
    filters = dbc.Row([
        dbc.Col(dcc.Dropdown(opts["teams"], id=ids.CASELOAD_TEAM, placeholder="All teams"),
                md=3),
        dbc.Col(dcc.Dropdown(opts["therapists"], id=ids.CASELOAD_THERAPIST,
                             placeholder="All therapists"), md=3),
    ], className="mb-2", style={} if director else {"display": "none"})
    data = rows(viewer, None, None)
    return html.Div([
        html.H2("Caseload" if director else "My caseload"),
        html.P("Open episodes, most urgent first: an endorsed risk item, then urgent and "
               "review flags. Colours are severity bands; Δ is the change since the first "
               "score.", className="text-muted"),
        filters,
        html.Div(f"{len(data)} open episodes", id=ids.CASELOAD_COUNT, className="mb-1"),
        dag.AgGrid(id=ids.CASELOAD_GRID, rowData=data,
                   columnDefs=columns(get_data().settings.depression_measure,
                                      get_data().settings.anxiety_measure),
                   defaultColDef={"sortable": True, "filter": True, "resizable": True},
                   dashGridOptions={"pagination": True, "paginationPageSize": 25,
                                    "paginationPageSizeSelector": [25, 50, 100],
                                    "animateRows": False},
                   style={"height": "70vh"}, className="ag-theme-alpine"),
    ])



dash.register_page(__name__, path="/", title="OnTrack: caseload", name="Caseload", layout=layout)

@callback(Output(ids.CASELOAD_GRID, "rowData"), Output(ids.CASELOAD_COUNT, "children"),
          Input(ids.CASELOAD_TEAM, "value"), Input(ids.CASELOAD_THERAPIST, "value"),
          prevent_initial_call=True)
def filter_caseload(team: str | None, therapist: str | None) -> tuple[list[Any], str]:
    """Filter by team/therapist; a therapist's filter can never widen their scope."""
    viewer = current_viewer()
    if viewer is None or not may_see_clients(viewer):
        return [], "0 open episodes"
    if not all(v is None or isinstance(v, str) for v in (team, therapist)):
        return [], "0 open episodes"  # a crafted payload: the dropdowns send strings
    data = rows(viewer, team, therapist)
    return data, f"{len(data)} open episodes"
