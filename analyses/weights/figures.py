"""Figures of the weights lens: plotly figures drawn from the tables its estimators return (no computation beyond layout)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go


def plot_swaps(frame: pd.DataFrame, metric: str = "loss_mask"):
    """Bars of `metric` per swapped component set, one group per direction (log scale)."""
    fig = px.bar(frame, x="components", y=metric, color="direction", barmode="group", log_y=True,
                 hover_data=[c for c in frame.columns if c.startswith(("loss", "acc", "corr"))],
                 title=f"Component swaps: {metric} (finding 9)")
    return fig.update_layout(template="plotly_white")


def plot_freeze(frame: pd.DataFrame, plateau: float | None = None, metric: str = "eval_loss_mask"):
    """One curve per trained component set (log y) with its `half_plateau_step` marked by a dotted line."""
    fig = go.Figure()
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (comps, part) in enumerate(frame.groupby("components", sort=False)):
        color = colors[i % len(colors)]
        fig.add_scatter(x=part.step, y=part[metric], mode="lines", name=comps, line=dict(color=color))
        drop = part.half_plateau_step.iloc[0]
        if pd.notna(drop):
            fig.add_vline(x=drop, line=dict(color=color, dash="dot"))
    if plateau is not None:
        fig.add_scatter(x=[frame.step.min(), frame.step.max()], y=[plateau, plateau], mode="lines",
                        name="plateau r/9", line=dict(color="gray", dash="dash"))
    fig.update_yaxes(type="log", title=metric)
    fig.update_xaxes(title="step")
    return fig.update_layout(template="plotly_white", legend_title="trained",
                             title="Component-wise training, the rest frozen (finding 10)")
