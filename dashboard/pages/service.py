"""Service outcomes (directors): SPEC §5 rates with Wilson intervals, funnel plots,
monthly trends, flag counts and time to review."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, dcc, html

from dashboard import ids
from dashboard.access import may_see_service
from dashboard.data import get_data
from dashboard.figures import funnel_figure, trend_figure
from dashboard.pages.common import denied, table
from dashboard.session import current_viewer
from pipeline.stats.service import METRICS, funnel_limits

_LABELS = {"recovered": "Recovery", "reliably_improved": "Reliable improvement",
           "reliably_deteriorated": "Reliable deterioration",
           "reliably_recovered": "Reliable recovery"}


def _rate_columns(key: str, label: str) -> dict[str, str]:
    cols = {key: label, "finished_episodes": "Finished", "at_caseness": "At caseness"}
    for m, name in _LABELS.items():
        cols[f"{m}_rate"] = f"{name} %"
        cols[f"{m}_ci"] = "95% CI"
    return cols


def _with_ci(df: Any) -> Any:
    df = df.copy()
    for m in METRICS:
        df[f"{m}_ci"] = [f"{lo:.0%}–{hi:.0%}" if lo == lo else "–"
                         for lo, hi in zip(df[f"{m}_ci_low"], df[f"{m}_ci_high"], strict=True)]
    return df


def funnel(metric: str) -> Any:
    viewer = current_viewer()
    s = get_data().service(viewer) if viewer else None
    if s is None or s["therapist_id"].empty:
        return {}
    overall = s["overall"].iloc[0]
    den = METRICS[metric][1]
    n_col = "finished_episodes" if den == "finished" else "at_caseness"
    p0 = float(overall[f"{metric}_rate"])
    g = s["therapist_id"].assign(n=lambda d: d[n_col], rate=lambda d: d[f"{metric}_rate"])
    g = g[g["n"] > 0]
    n_max = int(g["n"].max()) if len(g) else 10
    limits = funnel_limits(p0, list(range(1, max(n_max, 10) + 1)))
    return funnel_figure(g, limits, p0, metric)


def layout(**_: Any) -> Any:
    viewer = current_viewer()
    if viewer is None or not may_see_service(viewer):
        return denied("service outcomes")
    s = get_data().service(viewer)
    if s is None:
        return denied("service outcomes")
    overall = _with_ci(s["overall"].assign(scope="whole service"))
    fmt = {f"{m}_rate": ".0%" for m in METRICS}
    month = s["month"]
    return html.Div([
        html.H2("Service outcomes"),
        html.P("NHS Talking Therapies definitions (SPEC §5): finished episodes have an end "
               "date and at least two PHQ-9 and two GAD-7 scores; recovery and reliable "
               "recovery are over episodes at caseness. Intervals are Wilson 95%.",
               className="text-muted"),
        table(overall, _rate_columns("scope", "Scope"), fmt),
        html.H4("By team"), table(_with_ci(s["team"]), _rate_columns("team", "Team"), fmt),
        html.H4("By therapist"),
        table(_with_ci(s["therapist_id"]), _rate_columns("therapist_id", "Therapist"), fmt),
        html.H4("Funnel plot: therapists compared fairly"),
        dcc.Dropdown([{"label": v, "value": k} for k, v in _LABELS.items()], "recovered",
                     id=ids.SERVICE_RATE, clearable=False, style={"maxWidth": "320px"}),
        dcc.Graph(id=ids.SERVICE_FUNNEL, figure=funnel("recovered")),
        html.H4("Monthly trend"),
        dcc.Graph(figure=trend_figure(month, ["recovered", "reliably_improved",
                                              "reliably_deteriorated"])
                  if not month.empty else {}, id="service-trend"),
        html.H4("Flags"),
        table(s["flags"], {"kind": "Kind", "open": "Open", "acknowledged": "Acknowledged",
                           "resolved": "Resolved",
                           "median_hours_to_review": "Median hours to review"},
              {"median_hours_to_review": ".1f"}),
    ])



dash.register_page(__name__, path="/service", title="OnTrack: service outcomes",
                   name="Service outcomes", layout=layout)

@callback(Output(ids.SERVICE_FUNNEL, "figure"), Input(ids.SERVICE_RATE, "value"),
          prevent_initial_call=True)
def update_funnel(metric: str) -> Any:
    if not isinstance(metric, str) or metric not in METRICS:  # crafted payloads too
        return {}
    return funnel(metric)
