"""Plotly figures of the dashboard, from the frames of :mod:`dashboard.data` (no Streamlit here).

Trace names are stable (the tests and the browser look for them): ``Pareto``, ``feasible``,
``infeasible (screened)``, ``full fidelity``, ``front in these axes``.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.data import AXES, front_2d

COLOURS = {"pareto": "#d62728", "feasible": "#1f77b4", "infeasible": "#9e9e9e", "unrecorded": "#bcbd22"}
BASELINE_PREFIXES = ("dense", "uniform")
"""Warm starts labelled on the charts: the dense model and the published uniform plans."""


def _label(name: str) -> str:
    return AXES.get(name, (name,))[0]


def _hover(x: str, y: str, z: str | None = None, colour: str | None = None, note: bool = False) -> str:
    """Hover text from each point's own data (no per-point strings, so 2,000 points stay light to draw):
    the trial number (``customdata``), each axis, the colour's quantity, and the point's ``text`` (``note``)."""
    parts = [f"{_label(x)}: %{{x:.4g}}", f"{_label(y)}: %{{y:.4g}}"]
    parts += [f"{_label(z)}: %{{z:.4g}}"] if z else []
    parts += [f"{_label(colour)}: %{{marker.color:.4g}}"] if colour else []
    parts += ["violates %{text}"] if note else []
    return "trial %{customdata}<br>" + "<br>".join(parts) + "<extra>%{fullData.name}</extra>"


def pareto_scatter(frame: pd.DataFrame, x: str, y: str, title: str = "Pareto front") -> go.Figure:
    """Feasible and Pareto trials, infeasible ones apart (grey crosses), full-fidelity results ringed,
    the dense and uniform baselines labelled, and the front in the chosen axes drawn as a line."""
    fig = go.Figure()
    plotted = frame.dropna(subset=[x, y])
    for status, name, symbol in (("infeasible", "infeasible (screened)", "x"), ("unrecorded", "unrecorded", "square"),
                                 ("feasible", "feasible", "circle"), ("pareto", "Pareto", "circle")):
        part = plotted[plotted["status"] == status]
        if part.empty:
            continue
        fig.add_trace(go.Scatter(
            x=part[x], y=part[y], mode="markers", name=name, customdata=part["trial"],
            marker={"color": COLOURS[status], "symbol": symbol, "size": 9 if status == "pareto" else 6,
                    "opacity": 0.55 if status == "infeasible" else 0.9},
            text=part["violated"] if status == "infeasible" else None,
            hovertemplate=_hover(x, y, note=status == "infeasible")))
    line = front_2d(frame, x, y)
    if len(line):
        fig.add_trace(go.Scatter(x=line[x], y=line[y], mode="lines", name="front in these axes",
                                 line={"color": COLOURS["pareto"], "dash": "dot", "shape": "hv"}, hoverinfo="skip"))
    promoted = plotted[plotted["promoted"]]
    if len(promoted):
        fig.add_trace(go.Scatter(x=promoted[x], y=promoted[y], mode="markers", name="full fidelity",
                                 customdata=promoted["trial"], hovertemplate=_hover(x, y),
                                 marker={"symbol": "circle-open", "size": 16, "color": "#2ca02c",
                                         "line": {"width": 2}}))
    for _, row in plotted[plotted["warm_start"].fillna("").str.startswith(BASELINE_PREFIXES)].iterrows():
        fig.add_annotation(x=row[x], y=row[y], text=row["warm_start"], showarrow=True, arrowhead=1, ax=30, ay=-30,
                           font={"size": 11})
    fig.update_layout(title=title, xaxis_title=_label(x), yaxis_title=_label(y), legend={"orientation": "h"},
                      margin={"t": 50, "b": 40}, height=480)
    return fig


def pareto_3d(frame: pd.DataFrame, axes: list[str], rotate: bool = False) -> go.Figure:
    """Three quantities at once for the evaluated trials: the third as colour on a 2D scatter (SVG, drawn at
    once), or with ``rotate`` a rotatable 3D scatter (WebGL). The study's Pareto trials are ringed in red."""
    x, y, z = axes
    plotted = frame.dropna(subset=axes)
    fig = go.Figure()
    for status, name in (("feasible", "feasible"), ("pareto", "Pareto")):
        part = plotted[plotted["status"] == status]
        if part.empty:
            continue
        marker = {"color": part[z], "coloraxis": "coloraxis", "size": 10 if status == "pareto" else 7}
        if status == "pareto":
            marker["line"] = {"color": COLOURS["pareto"], "width": 2}
        common = {"mode": "markers", "name": name, "customdata": part["trial"]}
        if rotate:
            fig.add_trace(go.Scatter3d(x=part[x], y=part[y], z=part[z], marker={**marker, "size": marker["size"] // 2},
                                       hovertemplate=_hover(x, y, z), **common))
        else:
            fig.add_trace(go.Scatter(x=part[x], y=part[y], marker=marker, hovertemplate=_hover(x, y, colour=z),
                                     **common))
    fig.update_layout(title="Three objectives", height=480, legend={"orientation": "h"},
                      coloraxis={"colorscale": "Viridis", "colorbar": {"title": _label(z)}})
    if rotate:
        fig.update_layout(scene={"xaxis_title": _label(x), "yaxis_title": _label(y), "zaxis_title": _label(z)},
                          margin={"t": 40, "l": 0, "r": 0, "b": 0})
    else:
        fig.update_layout(xaxis_title=_label(x), yaxis_title=_label(y), margin={"t": 40, "b": 40})
    return fig


def hypervolume_chart(hv: pd.DataFrame) -> go.Figure:
    fig = go.Figure(go.Scatter(x=hv["trial"], y=hv["hypervolume"], name="hypervolume", line={"shape": "hv"},
                               mode="lines+markers" if len(hv) <= 200 else "lines"))
    fig.update_layout(title="Hypervolume", xaxis_title="trial", yaxis_title="hypervolume (normalised objectives)",
                      height=300, margin={"t": 50, "b": 40})
    return fig


def plan_map(labels: pd.DataFrame, bits: pd.DataFrame, title: str = "Plan map") -> go.Figure:
    """Blocks as rows, layer types as columns; colour = stored bits per dense weight (cost-model count),
    label = the layer's format (N:M, bits/group, ternary, fp16); the mixer column names MLGRU blocks."""
    text = labels.to_numpy()
    fig = go.Figure(go.Heatmap(
        z=bits.to_numpy(), x=list(labels.columns), y=[f"block {r}" if r.isdigit() else r for r in labels.index],
        text=text, texttemplate="%{text}", textfont={"size": 9}, colorscale="Viridis", zmin=0, zmax=16,
        colorbar={"title": "bits/weight"}, hovertemplate="%{y} %{x}: %{text}<br>%{z:.3g} bits/weight<extra></extra>",
        xgap=1, ygap=1))
    mlgru = [i for i, v in enumerate(labels.get("mixer", pd.Series(dtype=str))) if v == "MLGRU"]
    for i in mlgru:  # the mixer column has no bits: mark MLGRU blocks with a band
        fig.add_shape(type="rect", xref="x", yref="y", x0=len(labels.columns) - 1.5, x1=len(labels.columns) - 0.5,
                      y0=i - 0.5, y1=i + 0.5, fillcolor="#ff7f0e", opacity=0.6, line={"width": 0})
    fig.update_layout(title=title, height=max(320, 18 * len(labels) + 120), margin={"t": 50, "b": 20},
                      yaxis={"autorange": "reversed"}, xaxis={"side": "top"})
    return fig


def layer_chart(layers: pd.DataFrame) -> go.Figure:
    """Cycles of each report row per decode step, coloured by what bounds it (memory or compute)."""
    fig = go.Figure()
    for bound, colour in (("memory", "#1f77b4"), ("compute", "#d62728")):
        part = layers[layers["bound"] == bound]
        if len(part):
            fig.add_trace(go.Bar(x=part["name"], y=part["cycles"], name=f"{bound}-bound", marker_color=colour,
                                 hovertext=part["kernel"]))
    fig.update_layout(title="Cycles per decode step by layer", yaxis_title="cycles", height=360,
                      xaxis={"showticklabels": False, "categoryorder": "array", "categoryarray": list(layers["name"])},
                      margin={"t": 50, "b": 20}, barmode="overlay")
    return fig


def resource_chart(resources: pd.DataFrame, device: str) -> go.Figure:
    """Utilisation of each resource against the device (1.0) and the datapath's cap."""
    fig = go.Figure(go.Bar(x=resources["utilisation"], y=resources["resource"], orientation="h", name="used",
                           text=[f"{u:.1%}" for u in resources["utilisation"].fillna(0)], textposition="outside"))
    caps = resources.dropna(subset=["cap"])
    fig.add_trace(go.Scatter(x=caps["cap"], y=caps["resource"], mode="markers", name="cap",
                             marker={"symbol": "line-ns-open", "size": 24, "color": "#d62728", "line": {"width": 3}}))
    fig.add_vline(x=1.0, line_dash="dash", line_color="#555")
    fig.update_layout(title=f"Resources on {device} (share of what the shell leaves)", xaxis_title="share",
                      xaxis={"range": [0, max(1.15, float(resources["utilisation"].max() or 0) * 1.1)]},
                      height=260, margin={"t": 50, "b": 40})
    return fig
