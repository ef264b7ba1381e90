"""Client page: trajectories with their reference lines, goals, flags, reviews, and the
plan review form."""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import dash
import dash_bootstrap_components as dbc
import pandas as pd
from dash import Input, Output, State, callback, dcc, html

from dashboard import ids
from dashboard.data import get_data
from dashboard.figures import trajectory_figure
from dashboard.pages.common import table
from dashboard.session import current_viewer
from pipeline.errors import UsageError
from pipeline.reviews import DECISIONS

_SEVERITY_COLOUR = {"urgent": "danger", "review": "warning", "info": "secondary"}


def _not_found() -> Any:
    return dbc.Alert("Episode not found.", color="secondary", id="client-not-found")


def _flags(fl: pd.DataFrame) -> Any:
    live = fl[fl["state"] != "resolved"] if not fl.empty else fl
    if live.empty:
        return html.P("No open flags.", className="text-muted")
    items = []
    for r in live.to_dict(orient="records"):
        ev = json.loads(r["evidence"])
        items.append(dbc.ListGroupItem([
            html.Div([dbc.Badge(r["severity"], color=_SEVERITY_COLOUR[r["severity"]],
                                className="me-2"),
                      html.Strong(r["kind"].replace("_", " ")),
                      html.Span(f"  ({r['state']})", className="text-muted")]),
            html.Div(r["message"]),
            html.Small(f"Rule: {r['rule']}. First raised {r['first_raised']:%Y-%m-%d}.",
                       className="text-muted"),
            html.Details([html.Summary("evidence"),
                          html.Pre(json.dumps(ev, indent=1, default=str),
                                   style={"fontSize": "0.75rem"})]),
        ]))
    return dbc.ListGroup(items)


def _reviews(reviews: pd.DataFrame) -> Any:
    if reviews.empty:
        return html.P("No reviews yet.", className="text-muted")
    return table(reviews, {"reviewed_at": "When", "reviewer": "Who", "decision": "Decision",
                           "note": "Note", "next_review": "Next review",
                           "flags_acknowledged": "Flags acknowledged"})


def _review_form(episode_id: str) -> Any:
    return dbc.Card(dbc.CardBody([
        html.H5("Record a plan review"),
        dcc.Store(id=ids.CLIENT_EPISODE, data=episode_id),
        dbc.Label("Decision"),
        dcc.Dropdown(list(DECISIONS), "continue", id=ids.CLIENT_REVIEW_DECISION,
                     clearable=False),
        dbc.Label("Note", className="mt-2"),
        dbc.Textarea(id=ids.CLIENT_REVIEW_NOTE, placeholder="What was decided and why"),
        dbc.Label("Next review", className="mt-2"),
        dcc.DatePickerSingle(id=ids.CLIENT_REVIEW_NEXT, display_format="YYYY-MM-DD"),
        dbc.Checklist(options=[{"label": "Risk assessed (also acknowledges risk flags)",
                                "value": "risk"}], value=[], id=ids.CLIENT_REVIEW_RISK,
                      className="mt-2"),
        dbc.Button("Record review", id=ids.CLIENT_REVIEW_SUBMIT, color="primary",
                   className="mt-2"),
        html.Div(id=ids.CLIENT_REVIEW_RESULT, className="mt-2"),
    ]))


def layout(episode_id: str | None = None, **_: Any) -> Any:
    viewer = current_viewer()
    if viewer is None or not episode_id:
        return _not_found()
    data = get_data()
    d = data.episode(viewer, episode_id)
    if d is None:
        return _not_found()
    data.audit(viewer, "view_client", episode_id)
    e = d["episode"]
    adm, oc, curves = d["administrations"], d["outcomes"], d["curves"]
    reg = data.registry
    graphs = []
    for measure in [m for m in reg if m in set(adm["measure"])]:
        scale = reg[measure]
        o = oc[oc["measure"] == measure]
        orow = o.iloc[0].to_dict() if len(o) else None
        band = orow["band"] if orow else None
        cv = curves[(curves["measure"] == measure) & (curves["band"] == band)] \
            if band is not None else curves.iloc[0:0]
        caseness = data.settings.caseness(scale.caseness_setting, scale.caseness_cutoff)
        fig = trajectory_figure(scale, adm[adm["measure"] == measure], orow, cv,
                                d["goals"][d["goals"]["measure"] == measure],
                                d["sudden"][d["sudden"]["measure"] == measure]
                                if not d["sudden"].empty else d["sudden"], caseness)
        graphs.append(dcc.Graph(figure=fig, id=f"client-graph-{measure}",
                                config={"displaylogo": False}))
    risk_open = not d["flags"].empty and bool(
        ((d["flags"]["kind"] == "risk_item") & (d["flags"]["state"] == "open")).any())
    safety = dbc.Alert([html.Strong("Risk item endorsed. "),
                        "No safety plan is on record for this episode: complete one with the "
                        "client (warning signs, coping, people and places, professionals and "
                        "crisis lines, making the environment safe)."], color="danger") \
        if risk_open else None
    goals = d["goals"]
    goal_table = table(goals, {"goal_id": "Goal", "measure": "Measure", "kind": "Kind",
                               "target": "Target", "status": "Status",
                               "projected_at": "Projected", "projected_earliest": "Earliest",
                               "projected_latest": "Latest", "due_at": "Due",
                               "status_reason": "Why"},
                       {"target": "g"}) if not goals.empty else html.P("No goals on record.")
    review_table = _reviews(d["reviews"])
    name = f"{e.get('given_name') or ''} {e.get('family_name') or ''}".strip()
    return html.Div([
        html.H2(f"{name or e['client_id']}", id="client-title"),
        html.P(f"Episode {e['episode_id']} · therapist {e['therapist']} · team {e['team']} · "
               f"started {e['start_date']}" + (f" · ended {e['end_date']} ({e['end_reason']})"
                                               if e.get("end_date") else " · open"),
               className="text-muted"),
        safety,
        dbc.Row([
            dbc.Col(graphs, lg=8),
            dbc.Col([html.H4("Flags (open and acknowledged)"), html.Div(_flags(d["flags"]), id=ids.CLIENT_FLAGS),
                     html.Hr(), _review_form(e["episode_id"])], lg=4),
        ]),
        html.H4("Goals", className="mt-3"), goal_table,
        html.H4("Plan reviews", className="mt-3"), html.Div(review_table, id=ids.CLIENT_REVIEWS),
    ])



dash.register_page(__name__, path_template="/client/<episode_id>", title="OnTrack: client",
                   name="Client", layout=layout)

@callback(Output(ids.CLIENT_REVIEW_RESULT, "children"), Output(ids.CLIENT_FLAGS, "children"),
          Output(ids.CLIENT_REVIEWS, "children"),
          Input(ids.CLIENT_REVIEW_SUBMIT, "n_clicks"), State(ids.CLIENT_EPISODE, "data"),
          State(ids.CLIENT_REVIEW_DECISION, "value"), State(ids.CLIENT_REVIEW_NOTE, "value"),
          State(ids.CLIENT_REVIEW_NEXT, "date"), State(ids.CLIENT_REVIEW_RISK, "value"),
          prevent_initial_call=True)
def submit_review(n_clicks: int | None, episode_id: str, decision: str, note: str | None,
                  next_review: str | None, risk: list[str] | None) -> tuple[Any, Any, Any]:
    """Record the review; the access check happens again here (never trust the page)."""
    viewer = current_viewer()
    if viewer is None or not n_clicks:
        return dbc.Alert("Not signed in.", color="danger"), dash.no_update, dash.no_update
    data = get_data()
    try:
        res = data.record_review(
            viewer, str(episode_id), decision=decision, note=note,
            next_review=date.fromisoformat(next_review[:10]) if next_review else None,
            risk_assessed="risk" in (risk or []))
    except UsageError as exc:
        msg = "Episode not found." if "not found" in str(exc) else str(exc).split(" (")[0]
        return dbc.Alert(msg, color="danger"), dash.no_update, dash.no_update
    d = data.episode(viewer, str(episode_id))
    flags = _flags(d["flags"]) if d else dash.no_update
    reviews = _reviews(d["reviews"]) if d else dash.no_update
    return dbc.Alert(f"Review recorded: {res.flags_acknowledged} flags acknowledged.",
                     color="success", id="review-ok"), flags, reviews
