"""Pure DataFrame -> plotly Figure functions (tested without a browser)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go

from pipeline.scales import Scale

__all__ = ["BAND_COLOURS", "funnel_figure", "trajectory_figure", "trend_figure"]

#: Severity colours, mild to severe (colour-blind safe sequence).
BAND_COLOURS = ["#e8f5e9", "#fff8e1", "#ffe0b2", "#ffccbc", "#ffcdd2"]


def trajectory_figure(scale: Scale, admins: pd.DataFrame, outcome: dict[str, Any] | None,
                      curve: pd.DataFrame, goals: pd.DataFrame, sudden: pd.DataFrame,
                      caseness: int | None) -> go.Figure:
    """One measure of one episode: scores over time with everything needed to read them.

    Parameters
    ----------
    admins
        The measure's administrations (``administered_at``, ``score``, ``session_number``,
        ``risk``, ``risk_value``, ``item_1`` ...), in time order.
    outcome
        The episode x measure outcome row (first score, reliable-change points ...).
    curve
        Expected recovery curve points for this measure and baseline band (``k``,
        ``median``, ``upper``).
    goals
        Goal status rows of this measure (``boundary``, ``due_at``, ``goal_id``).
    sudden
        Sudden gains/losses of this measure (``kind``, ``pregain_session``).
    """
    fig = go.Figure()
    a = admins.reset_index(drop=True)
    x = pd.to_datetime(a["administered_at"])
    x0 = x.min() - pd.Timedelta(days=3) if len(a) else pd.Timestamp.now()
    x1 = x.max() + pd.Timedelta(days=10) if len(a) else pd.Timestamp.now()
    if not goals.empty and "due_at" in goals.columns:
        due = pd.to_datetime(goals["due_at"]).dropna()
        due = due[due <= x1 + pd.Timedelta(weeks=26)]  # show due dates up to 6 months ahead
        if len(due):
            x1 = max(x1, due.max() + pd.Timedelta(days=7))
    for i, band in enumerate(scale.bands):
        colour = BAND_COLOURS[min(i * len(BAND_COLOURS) // max(len(scale.bands), 1),
                                  len(BAND_COLOURS) - 1)]
        fig.add_hrect(y0=band.min - 0.5, y1=band.max + 0.5, fillcolor=colour, opacity=0.6,
                      line_width=0, layer="below", annotation_text=band.label,
                      annotation_position="top left", annotation_font_size=10)
    if caseness is not None:
        fig.add_hline(y=caseness - 0.5, line_dash="dash", line_color="#b71c1c",
                      annotation_text=f"caseness {scale.caseness_comparison}{caseness}",
                      annotation_position="bottom right")
    if outcome is not None and pd.notna(outcome.get("rc_points")):
        base, pts = float(outcome["first_score"]), float(outcome["rc_points"])
        fig.add_hrect(y0=base - pts, y1=base + pts, line_width=1, line_dash="dot",
                      line_color="#455a64", fillcolor="rgba(0,0,0,0)",
                      annotation_text=f"reliable-change band (±{pts:g})",
                      annotation_position="top right", annotation_font_size=10)
    if not curve.empty and len(a):
        # Curve points sit on the k-th administration's date (k = 1, 2, ...).
        c = curve.sort_values("k")
        dates = [x.iloc[k - 1] if k <= len(x) else x.iloc[-1] + pd.Timedelta(weeks=k - len(x))
                 for k in c["k"].astype(int)]
        fig.add_trace(go.Scatter(x=dates, y=c["upper"], mode="lines", name="expected (upper)",
                                 line={"color": "#7e57c2", "dash": "dash", "width": 1}))
        fig.add_trace(go.Scatter(x=dates, y=c["median"], mode="lines", name="expected median",
                                 line={"color": "#7e57c2", "width": 1}))
    for g in goals.to_dict(orient="records"):
        if pd.notna(g.get("boundary")):
            fig.add_hline(y=float(g["boundary"]), line_color="#1b5e20", line_width=1,
                          annotation_text=f"goal {g['goal_id']}: {g['status']}",
                          annotation_position="top left", annotation_font_size=10)
        if pd.notna(g.get("due_at")):
            fig.add_vline(x=pd.Timestamp(g["due_at"]).timestamp() * 1000, line_dash="dot",
                          line_color="#1b5e20")
    items = [c for c in a.columns if c.startswith("item_") and a[c].notna().any()]
    hover = [
        f"score {int(r['score'])}" + (f", session {int(r['session_number'])}"
                                      if pd.notna(r.get("session_number")) else "") +
        ("<br>items: " + " ".join("-" if pd.isna(r[c]) else str(int(r[c])) for c in items)
         if items and bool(r.get("has_items")) else "<br>total only") +
        (" (prorated)" if bool(r.get("prorated")) else "")
        for r in a.to_dict(orient="records")]
    fig.add_trace(go.Scatter(x=x, y=a["score"], mode="lines+markers", name=scale.code,
                             line={"color": "#0d47a1", "width": 2},
                             marker={"size": 8}, hovertext=hover, hoverinfo="text+x"))
    if "risk" in a.columns:
        r = a[a["risk"] == "yes"]
        if len(r):
            fig.add_trace(go.Scatter(
                x=pd.to_datetime(r["administered_at"]), y=r["score"], mode="markers",
                name="risk item > 0", marker={"symbol": "x", "size": 14, "color": "#d50000",
                                              "line": {"width": 2}}))
    for kind, symbol, colour in (("gain", "triangle-down", "#2e7d32"),
                                 ("loss", "triangle-up", "#c62828")):
        s = sudden[sudden["kind"] == kind] if not sudden.empty else sudden
        if len(s) and len(a):
            idx = [min(int(k), len(a) - 1) for k in s["pregain_session"]]
            fig.add_trace(go.Scatter(
                x=x.iloc[idx], y=a["score"].iloc[idx], mode="markers",
                name=f"sudden {kind}", marker={"symbol": symbol, "size": 14, "color": colour}))
    top = scale.total_max
    fig.update_layout(
        title=f"{scale.code} ({'higher' if scale.higher_is_better else 'lower'} is better)",
        yaxis={"range": [scale.total_min - 0.5, top + 0.5], "title": "score"},
        xaxis={"range": [x0, x1]}, height=380, margin={"l": 50, "r": 20, "t": 50, "b": 40},
        legend={"orientation": "h", "y": -0.2}, template="plotly_white")
    return fig


def funnel_figure(groups: pd.DataFrame, limits: pd.DataFrame, p0: float, metric: str,
                  label: str = "therapist_id") -> go.Figure:
    """Rate against its denominator with 95% and 99.8% limits (Spiegelhalter 2005)."""
    fig = go.Figure()
    for tag, dash_style in (("95", "dash"), ("99_8", "dot")):
        for side in ("lo", "hi"):
            fig.add_trace(go.Scatter(
                x=limits["n"], y=limits[f"{side}_{tag}"], mode="lines",
                line={"color": "#757575", "dash": dash_style, "width": 1},
                name=f"{tag.replace('_', '.')}% limits", showlegend=side == "lo"))
    fig.add_hline(y=p0, line_color="#424242", annotation_text=f"service {p0:.0%}")
    fig.add_trace(go.Scatter(
        x=groups["n"], y=groups["rate"], mode="markers+text", text=groups[label],
        textposition="top center", marker={"size": 10, "color": "#1565c0"}, name=label))
    fig.update_layout(title=f"{metric.replace('_', ' ')}: funnel plot",
                      xaxis_title="episodes (denominator)", yaxis_title="rate",
                      yaxis={"tickformat": ".0%", "range": [0, 1]}, template="plotly_white",
                      height=420)
    return fig


def trend_figure(monthly: pd.DataFrame, metrics: list[str]) -> go.Figure:
    """Monthly rates with Wilson intervals as error bars."""
    fig = go.Figure()
    for m in metrics:
        rate = monthly[f"{m}_rate"]
        fig.add_trace(go.Scatter(
            x=monthly["month"], y=rate, mode="lines+markers", name=m.replace("_", " "),
            error_y={"type": "data", "symmetric": False,
                     "array": monthly[f"{m}_ci_high"] - rate,
                     "arrayminus": rate - monthly[f"{m}_ci_low"], "thickness": 1}))
    fig.update_layout(title="monthly rates (by end date) with Wilson 95% intervals",
                      yaxis={"tickformat": ".0%", "range": [0, 1]}, template="plotly_white",
                      height=380)
    return fig
