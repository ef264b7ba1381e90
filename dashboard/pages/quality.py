"""Data quality: batches, quarantine with drill-down, completeness, compute runs."""

from __future__ import annotations

from typing import Any

import dash
import dash_ag_grid as dag
from dash import Input, Output, callback, dcc, html

from dashboard import ids
from dashboard.access import may_see_service
from dashboard.data import get_data
from dashboard.pages.common import denied, table
from dashboard.session import current_viewer


def layout(**_: Any) -> Any:
    viewer = current_viewer()
    if viewer is None or not may_see_service(viewer):
        return denied("data quality")
    q = get_data().quality(viewer)
    if q is None:
        return denied("data quality")
    reasons = q["quarantine"]["reason"].tolist()
    drill = viewer.role in ("director", "admin")
    return html.Div([
        html.H2("Data quality"),
        html.H4("Completeness: ended episodes with paired PHQ-9 and GAD-7 scores"),
        table(q["completeness"], {"team": "Team", "ended": "Ended episodes",
                                  "with_paired_scores": "With paired scores",
                                  "completeness": "Completeness"}, {"completeness": ".0%"}),
        html.H4("Ingest batches"),
        table(q["batches"].head(50), {"batch_id": "Batch", "file": "File", "kind": "Kind",
                                      "status": "Status", "started_at": "Time",
                                      "records": "Records", "accepted": "Accepted",
                                      "duplicates": "Duplicates",
                                      "quarantined": "Quarantined", "error": "Error"}),
        html.H4("Quarantine by reason"),
        table(q["quarantine"], {"reason": "Reason", "records": "Records"}),
        html.Div([
            dcc.Dropdown(reasons, id=ids.QUALITY_REASON, placeholder="All reasons",
                         style={"maxWidth": "320px"}),
            dag.AgGrid(id=ids.QUALITY_RECORDS, rowData=[], columnDefs=[
                {"field": c} for c in ("batch_id", "file", "location", "reason", "detail",
                                       "raw")],
                defaultColDef={"resizable": True, "filter": True, "sortable": True},
                style={"height": "320px"}, className="ag-theme-alpine"),
        ]) if drill else html.P("Record-level drill-down is for directors.",
                                className="text-muted"),
        html.H4("Open episodes with no score recently"),
        table(q["missing"], {"episode_id": "Episode", "message": "Last score"})
        if not q["missing"].empty else html.P("None.", className="text-muted"),
        html.H4("Scheduled cycles (ontrack run / schedule)"),
        table(q["cycles"], {"run_id": "Cycle", "trigger": "Trigger", "status": "Status",
                            "started_at": "Started", "finished_at": "Finished",
                            "files": "Files", "records": "Records", "accepted": "Accepted",
                            "duplicates": "Duplicates", "quarantined": "Quarantined",
                            "flags_raised": "Flags raised", "error": "Error"})
        if not q["cycles"].empty else html.P("No cycles have run yet.", className="text-muted"),
        html.H4("Compute runs"),
        table(q["runs"], {"run_id": "Run", "mode": "Mode", "started_at": "Started",
                          "finished_at": "Finished", "episodes": "Episodes",
                          "status": "Status"}),
    ])



dash.register_page(__name__, path="/quality", title="OnTrack: data quality",
                   name="Data quality", layout=layout)

@callback(Output(ids.QUALITY_RECORDS, "rowData"), Input(ids.QUALITY_REASON, "value"))
def drill_down(reason: str | None) -> list[dict[str, Any]]:
    viewer = current_viewer()
    if viewer is None or not (reason is None or isinstance(reason, str)):
        return []
    df = get_data().quarantined(viewer, reason)
    out = df.astype(object).where(df.notna(), None)
    return [{str(k): v for k, v in r.items()} for r in out.to_dict(orient="records")]
