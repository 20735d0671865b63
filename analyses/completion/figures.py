"""Figures of the completion lens: plotly figures drawn from the tables its estimators return (no computation beyond layout)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.completion.copying import summarize_copy

COLORS = {"model": "#1f77b4", "nuclear_norm": "#d62728", "copy_zero": "#7f7f7f", "truth": "#2ca02c"}


def plot_baselines(frame: pd.DataFrame) -> go.Figure:
    """Masked-entry MSE and mean nuclear norm against p_mask, one line per predictor."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("MSE on masked entries", "mean nuclear norm of output"))
    for name, part in frame.groupby("predictor", sort=False):
        color = COLORS.get(name)
        if name != "truth":
            fig.add_scatter(x=part.p_mask, y=part.mse_mask, name=name, legendgroup=name,
                            line_color=color, mode="lines+markers", row=1, col=1)
        fig.add_scatter(x=part.p_mask, y=part.nuclear_norm, name=name, legendgroup=name, showlegend=name == "truth",
                        line_color=color, mode="lines+markers", row=1, col=2)
    fig.update_yaxes(type="log", title_text="MSE", row=1, col=1)
    fig.update_yaxes(title_text="||X||_*", row=1, col=2)
    fig.update_xaxes(title_text="p_mask")
    fig.update_layout(height=380, margin=dict(t=40, b=40))
    return fig


def plot_ood(frame: pd.DataFrame) -> go.Figure:
    """Masked-entry MSE per OOD variant, relative to that variant's copy-and-zero MSE (= 1)."""
    level = frame[frame.predictor == "copy_zero"].set_index("variant").mse_mask
    fig = go.Figure()
    for name, part in frame[frame.predictor != "truth"].groupby("predictor", sort=False):
        fig.add_bar(x=part.variant, y=part.mse_mask / part.variant.map(level), name=name,
                    marker_color=COLORS.get(name))
    fig.update_layout(barmode="group", height=380, margin=dict(t=30, b=40),
                      yaxis_title="MSE_mask / plateau level (copy-and-zero = 1)")
    return fig


def plot_copy(copies: pd.DataFrame) -> px.line:
    """MSE at masked positions vs the inserted value and vs the truth over training (log scale)."""
    summary = summarize_copy(copies)
    long = summary.melt(id_vars="step", value_vars=["mse_vs_inserted", "mse_vs_truth", "loss_obs"],
                        var_name="measure", value_name="mse")
    fig = px.line(long, x="step", y="mse", color="measure", markers=True, log_y=True,
                  title="Copy check: MASK replaced by a value token (mean over inserted values)")
    fig.update_layout(template="plotly_white", width=900, height=450)
    return fig
