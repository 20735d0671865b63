"""Figures of the causal lens: plotly figures drawn from the tables its estimators return (no computation beyond layout)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.causal.sequence_patching import SITES


def plot_patching(frame: pd.DataFrame, site: str = "z", granularity: str = "layer_head",
                  metric: str = "recovery_mask", step: int | None = None):
    """A layer x head (or layer x position) heatmap of `metric` at one step (default: the last)."""
    part = frame[(frame.site == site) & (frame.granularity == granularity)]
    if "step" in part:
        part = part[part.step == (part.step.max() if step is None else step)]
    column = "head" if granularity == "layer_head" else "pos"
    grid = part.groupby(["layer", column])[metric].mean().unstack(column)
    fig = px.imshow(grid, color_continuous_scale="RdBu", color_continuous_midpoint=0.0, text_auto=".2f",
                    labels={"color": metric}, title=f"Patching {site} per {granularity}: {metric} (finding 6)")
    return fig.update_layout(template="plotly_white")


def plot_patching_steps(frame: pd.DataFrame, site: str = "attn_out", metric: str = "recovery_mask"):
    """Per-layer recovery (whole layer patched) against step."""
    part = frame[(frame.site == site) & (frame.granularity == "layer")]
    fig = px.line(part, x="step", y=metric, color=part.layer.astype(str), markers=True,
                  labels={"color": "layer"}, title=f"Patching whole {site} per layer: {metric}")
    return fig.update_layout(template="plotly_white")


def plot_attribution_vs_patching(frame: pd.DataFrame, metric: str = "recovery_mask", step: int | None = None,
                                 estimator: str = "attribution"):
    """Scatter of an estimate (a column of ESTIMATORS) against exact recovery, one panel per site /
    granularity, the diagonal marking perfect agreement; with a `step` column, one colour per step
    (or only `step`)."""
    part = frame[frame.metric == metric].copy()
    if step is not None:
        part = part[part.step == step]
    part["panel"] = part.site + " / " + part.granularity
    color = "step" if "step" in part and part.step.nunique() > 1 else None
    if color:
        part["step"] = part.step.astype(str)
    fig = px.scatter(part, x="exact", y=estimator, color=color, facet_col="panel", facet_col_wrap=4,
                     hover_data=["layer", "pos", "head"], opacity=0.6,
                     title=f"{estimator.replace('_', ' ').capitalize()} against exact patching: {metric} (finding 6)")
    for trace_x, trace_y in {(t.xaxis, t.yaxis) for t in fig.data}:  # the diagonal in each panel's own range
        points = [v for t in fig.data if (t.xaxis, t.yaxis) == (trace_x, trace_y) for v in (*t.x, *t.y)]
        lo, hi = float(min(points)), float(max(points))
        fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line=dict(color="grey", dash="dot"),
                      xref=trace_x, yref=trace_y)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    return fig.update_xaxes(matches=None).update_yaxes(matches=None).update_layout(template="plotly_white")


def plot_sequence_patching(frame: pd.DataFrame, names: list[str], title: str = "") -> go.Figure:
    """Exact recovery per (site, position) for each layer at one step, with attribution beside it."""
    sites = [s for s in SITES if s in set(frame.site)]
    per_pos = (frame[frame.site != "z"].groupby(["method", "site", "layer", "pos"]).recovery.mean().reset_index())
    z = frame[frame.site == "z"].groupby(["method", "layer", "pos"]).recovery.sum().reset_index()  # heads summed
    per_pos = pd.concat([per_pos, z.assign(site="z")], ignore_index=True)
    layers = sorted(per_pos.layer.unique())
    fig = make_subplots(rows=len(layers), cols=2, shared_xaxes=True, vertical_spacing=0.12, horizontal_spacing=0.1,
                        subplot_titles=[f"layer {l}: {m}" for l in layers for m in ("exact patching", "attribution")])
    for i, layer in enumerate(layers):
        for j, method in enumerate(("exact", "attribution")):
            part = per_pos[(per_pos.layer == layer) & (per_pos.method == method)]
            grid = part.pivot(index="site", columns="pos", values="recovery").reindex(sites)
            fig.add_heatmap(z=grid.to_numpy(), x=[names[p] for p in grid.columns], y=sites, coloraxis="coloraxis",
                            row=i + 1, col=j + 1, hovertemplate="%{y} at %{x}: %{z:.3f}<extra></extra>")
    return fig.update_layout(template="plotly_white", height=260 * len(layers) + 120, title=title,
                             coloraxis=dict(colorscale="RdBu", cmid=0.0, colorbar=dict(title="recovery")))


def plot_component_ablation(frame: pd.DataFrame, measure: str = "delta_loss_mask") -> go.Figure:
    """Bars of one delta per component (`attn.L`, `mlp.L`), one group per ablation kind (the last step)."""
    last = frame[frame.step == frame.step.max()] if "step" in frame else frame
    at = f" at step {int(last.step.iloc[0])}" if "step" in last else ""
    fig = px.bar(last, x="component", y=measure, color="kind", barmode="group",
                 title=f"Each layer's attention and MLP output ablated alone{at}: {measure}")
    return fig.update_layout(template="plotly_white")


def plot_ablation(sweep: pd.DataFrame, kind: str = "zero", measure: str = "delta_loss_mask") -> px.imshow:
    """Heatmap of one delta per (layer, head), one panel per step when a `step` column is present."""
    frame = sweep[sweep.kind == kind]
    facet = "step" if "step" in frame else None
    index = ["step", "layer"] if facet else ["layer"]
    cube = frame.pivot_table(index=index, columns="head", values=measure)
    if facet:
        steps = sorted(frame.step.unique())
        data = np.stack([cube.loc[s].to_numpy() for s in steps])  # [step, layer, head]
        fig = px.imshow(data, facet_col=0, facet_col_wrap=min(6, len(steps)), color_continuous_scale="Reds",
                        labels=dict(x="head", y="layer", color=measure), aspect="auto")
        for ann, s in zip(fig.layout.annotations, steps):
            ann.text = f"step {s}"
    else:
        fig = px.imshow(cube.to_numpy(), color_continuous_scale="Reds", labels=dict(x="head", y="layer", color=measure))
    fig.update_layout(title=f"{kind} ablation of each head alone: {measure}", template="plotly_white")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(dtick=1)
    return fig
