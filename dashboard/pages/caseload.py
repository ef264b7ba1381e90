"""Caseload (start page): open episodes, most urgent first."""

from __future__ import annotations

from typing import Any

import dash
import dash_ag_grid as dag
import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, dcc, html

from dashboard import ids
from dashboard.access import may_see_clients
from dashboard.data import TREND_LABELS, get_data
from dashboard.pages.common import denied
from dashboard.session import current_viewer
from pipeline.errors import UsageError

_BAND_COLOURS = {"severe": "#ffcdd2", "moderately severe": "#ffccbc", "moderate": "#ffe0b2",
                 "mild": "#fff8e1", "minimal": "#e8f5e9"}


def _band_style(band_field: str) -> dict[str, Any]:
    """Colour a score cell by its severity band (held in another field of the row)."""
    return {"styleConditions": [
        {"condition": f"params.data.{band_field} == {label!r}",
         "style": {"backgroundColor": colour}} for label, colour in _BAND_COLOURS.items()]}


_NUMBER = "agNumberColumnFilter"




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
        {"field": "therapist_id", "hide": True},  # the therapist drop-down filters on it
        {"field": "team", "headerName": "Team", "width": 110},
        {"field": "weeks", "headerName": "Weeks", "width": 95, "filter": _NUMBER},
        {"field": "dep_latest", "headerName": dep, "width": 95, "filter": _NUMBER,
         "cellStyle": _band_style("dep_band")},
        {"field": "dep_change", "headerName": f"Δ {dep}", "width": 105, "filter": _NUMBER},
        {"field": "dep_trend_label", "headerName": f"{dep} trend", "width": 130},
        {"field": "anx_latest", "headerName": anx, "width": 95, "filter": _NUMBER,
         "cellStyle": _band_style("anx_band")},
        {"field": "anx_change", "headerName": f"Δ {anx}", "width": 105, "filter": _NUMBER},
        {"field": "goal_status", "headerName": "Goals", "width": 115},
        {"field": "flags_urgent", "headerName": "Urgent", "width": 100, "filter": _NUMBER,
         "cellStyle": {"styleConditions": [{"condition": "params.value > 0",
                                            "style": {"color": "#b71c1c",
                                                      "fontWeight": "bold"}}]}},
        {"field": "flags_review", "headerName": "Review", "width": 100, "filter": _NUMBER},
        {"field": "flags_info", "headerName": "Info", "width": 85, "filter": _NUMBER},
        # Worked out per row from the latest review; not sortable on the server.
        {"field": "next_review", "headerName": "Next review", "width": 130,
         "sortable": False, "filter": False},
    ]


def records(df: Any) -> list[dict[str, Any]]:
    """Grid rows: the client's name links to the client page; blanks are ``None``."""
    if df.empty:
        return []
    df = df.assign(
        risk_label=df["risk"].map({True: "RISK", False: ""}),
        client_link="[" + df["client"].str.replace("[", "", regex=False) + "](/client/" +
        df["episode_id"] + ")",
        dep_trend_label=df["dep_trend"].map(TREND_LABELS),
    )
    out = df.astype(object).where(df.notna(), None)
    return [{str(k): v for k, v in r.items()} for r in out.to_dict(orient="records")]


def _count_label(n: int, filtered: bool) -> str:
    return f"{n:,} open episode{'s' if n != 1 else ''}" + (" match the filters" if filtered
                                                           else "")


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
    return html.Div([
        html.H2("Caseload" if director else "My caseload"),
        html.P("Open episodes, most urgent first: an endorsed risk item, then urgent and "
               "review flags. Colours are severity bands; Δ is the change since the first "
               "score. Sorting and filtering run on the server, over every open episode.",
               className="text-muted"),
        filters,
        html.Div("", id=ids.CASELOAD_COUNT, className="mb-1"),
        dag.AgGrid(id=ids.CASELOAD_GRID, rowModelType="infinite",
                   columnDefs=columns(get_data().settings.depression_measure,
                                      get_data().settings.anxiety_measure),
                   defaultColDef={"sortable": True, "filter": True, "resizable": True,
                                  "filterParams": {"maxNumConditions": 2}},
                   getRowId="params.data.episode_id",
                   dashGridOptions={"pagination": True, "paginationPageSize": 25,
                                    "paginationPageSizeSelector": False,
                                    "cacheBlockSize": 100, "maxBlocksInCache": 20,
                                    "animateRows": False},
                   style={"height": "70vh"}, className="ag-theme-alpine"),
    ])


dash.register_page(__name__, path="/", title="OnTrack: caseload", name="Caseload", layout=layout)


@callback(Output(ids.CASELOAD_GRID, "getRowsResponse"), Output(ids.CASELOAD_COUNT, "children"),
          Input(ids.CASELOAD_GRID, "getRowsRequest"))
def caseload_block(request: Any) -> tuple[dict[str, Any], str]:
    """One block of rows, sorted and filtered in the database; the viewer's scope is
    applied there too, so no filter can widen it."""
    viewer = current_viewer()
    if viewer is None or not may_see_clients(viewer) or not isinstance(request, dict):
        return {"rowData": [], "rowCount": 0}, _count_label(0, False)
    try:
        df, total = get_data().caseload_page(
            viewer, request.get("startRow", 0), request.get("endRow", 0),
            request.get("sortModel"), request.get("filterModel"))
    except UsageError:  # a crafted or unsupported request: show nothing
        return {"rowData": [], "rowCount": 0}, _count_label(0, False)
    return ({"rowData": records(df), "rowCount": total},
            _count_label(total, bool(request.get("filterModel"))))


@callback(Output(ids.CASELOAD_GRID, "filterModel"), Input(ids.CASELOAD_TEAM, "value"),
          Input(ids.CASELOAD_THERAPIST, "value"), State(ids.CASELOAD_GRID, "filterModel"),
          prevent_initial_call=True)
def filter_caseload(team: Any, therapist: Any, model: Any) -> dict[str, Any]:
    """The team and therapist drop-downs set the grid's own filters (kept with any
    column filters), so one server-side path filters the rows."""
    model = dict(model) if isinstance(model, dict) else {}
    for col, value in (("team", team), ("therapist_id", therapist)):
        model.pop(col, None)
        if isinstance(value, str) and value:
            model[col] = {"filterType": "text", "type": "equals", "filter": value}
    return model
