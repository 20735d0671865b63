"""Figures of the representations lens: plotly figures drawn from the tables its estimators return (no computation beyond layout)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
from plotly.subplots import make_subplots



def plot_probes(frame: pd.DataFrame, metric: str = "r2", positions: str = "masked"):
    """`metric` against step, one panel per target, one line per layer."""
    part = frame[frame.positions == positions].sort_values(["layer", "step"])
    fig = px.line(part, x="step", y=metric, color=part.layer.astype(str), facet_col="target",
                  facet_col_wrap=3, markers=True, labels={"color": "layer"},
                  title=f"Linear probes ({positions} positions): test {metric} (finding 7)")
    return fig.update_layout(template="plotly_white")


def plot_embedding_geometry(frame: pd.DataFrame):
    """The geometry scores against step (top) and the losses with permuted positions (bottom)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("embedding geometry", "L_mask: original vs permuted positions"))
    for col in ("norm_symmetry", "norm_abs_corr", "pc_sign_accuracy", "pc_magnitude_r2",
                "pos_silhouette_col", "pos_silhouette_row"):
        fig.add_scatter(x=frame.step, y=frame[col], name=col, mode="lines+markers", row=1, col=1)
    for col in ("loss_mask", "loss_mask_permuted_pos"):
        fig.add_scatter(x=frame.step, y=frame[col], name=col, mode="lines+markers", row=2, col=1)
    fig.update_yaxes(type="log", row=2, col=1)
    return fig.update_layout(template="plotly_white", height=700, title="Embeddings (finding 8)")


def plot_token_embeddings(frame: pd.DataFrame):
    """Token embeddings in their top-2 PCs coloured by value (left), embedding norm vs value (right):
    a `token_embedding_plane` frame."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("top-2 PCs of token embeddings", "||E(x)|| vs x"))
    fig.add_scatter(x=frame.pc1, y=frame.pc2, mode="markers", text=[f"{v:.2f}" for v in frame.value],
                    marker=dict(color=frame.value, colorscale="RdBu", showscale=True, size=5), row=1, col=1)
    fig.add_scatter(x=frame.value, y=frame.norm, mode="lines", row=1, col=2)
    return fig.update_layout(template="plotly_white", showlegend=False)


def plot_position_tsne(frame: pd.DataFrame):
    """t-SNE of the position embeddings, labelled (row, col) and coloured by column: a
    `position_tsne` frame."""
    frame = frame.assign(column=frame.column.astype(str))
    fig = px.scatter(frame, x="x", y="y", color="column", text="label", title="t-SNE of position embeddings")
    return fig.update_traces(textposition="top center").update_layout(template="plotly_white")
