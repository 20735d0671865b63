"""Figures of the llc lens: plotly figures drawn from the tables its estimators return (no computation beyond layout)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

_COLOURS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3")


def plot_sgld_traces(traces: pd.DataFrame) -> go.Figure:
    """SGLD loss traces per chain (one panel per `step` if present), burn-in shaded: calibrated
    settings give traces that rise from L(w*) and are flat after the burn-in."""
    steps = sorted(traces.step.unique()) if "step" in traces else [None]
    fig = make_subplots(rows=1, cols=len(steps), shared_yaxes=False,
                        subplot_titles=[f"checkpoint {s}" for s in steps] if steps[0] is not None else None)
    for col, step in enumerate(steps, start=1):
        part = traces if step is None else traces[traces.step == step]
        for chain, rows in part.groupby("chain"):
            colour = _COLOURS[int(chain) % len(_COLOURS)]
            fig.add_scatter(x=rows.sgld_step, y=rows.loss, mode="lines", name=f"chain {chain}", row=1, col=col,
                            line=dict(width=1, color=colour), legendgroup=str(chain), showlegend=col == 1)
        burnin = part[part.burnin].sgld_step.max()
        if not pd.isna(burnin):
            fig.add_vrect(x0=0, x1=burnin, fillcolor="grey", opacity=0.12, line_width=0, row=1, col=col)
        fig.add_hline(y=float(part.init_loss.iloc[0]), line_dash="dot", line_color="black", row=1, col=col)
    fig.update_xaxes(title_text="SGLD step")
    fig.update_yaxes(type="log").update_yaxes(title_text="minibatch loss (log)", col=1)
    return fig.update_layout(title="SGLD loss traces (burn-in shaded, L(w*) dotted)", template="plotly_white",
                             height=380)


def plot_llc(llc: pd.DataFrame, metrics: pd.DataFrame, drop_step: float | None = None) -> go.Figure:
    """The training loss curves (top) and the LLC with its spread across chains (bottom, mean +- std
    and every chain) on a shared step axis. `llc` from `across_checkpoints(run, local_learning_coefficient)`,
    `metrics` the run's metrics table. A checkpoint whose diagnostics fail (`ok` False, or no `ok`
    column: not checked) is drawn as a hollow marker, labelled in the legend."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.5, 0.5])
    evals = metrics.dropna(subset=["eval_loss"])
    for column, name in (("eval_loss", "L"), ("eval_loss_obs", "L_obs"), ("eval_loss_mask", "L_mask"),
                         ("eval_loss_out", "L on the outputs")):
        if column in evals:
            fig.add_scatter(x=evals.step, y=evals[column], name=name, mode="lines", row=1, col=1)
    summary = llc.groupby("step").llc.agg(["mean", "std", "min", "max"]).reset_index()
    fig.add_scatter(x=summary.step, y=summary["mean"] + summary["std"].fillna(0), mode="lines", line_width=0,
                    showlegend=False, hoverinfo="skip", row=2, col=1)
    fig.add_scatter(x=summary.step, y=summary["mean"] - summary["std"].fillna(0), mode="lines", line_width=0,
                    fill="tonexty", fillcolor="rgba(99,110,250,0.2)", name="LLC +- std", row=2, col=1)
    fig.add_scatter(x=llc.step, y=llc.llc, mode="markers", marker=dict(size=4, color="grey"), name="chains",
                    row=2, col=1)
    ok = (llc.groupby("step").ok.all() if "ok" in llc else pd.Series(False, index=summary.step)).to_numpy()
    fig.add_scatter(x=summary.step, y=summary["mean"], mode="lines", name="LLC (mean)",
                    line=dict(color="rgb(99,110,250)"), row=2, col=1)
    for good, name, symbol in ((True, "diagnostics pass", "circle"),
                               (False, "diagnostics fail (hollow)", "circle-open")):
        part = summary[ok == good]
        if len(part):
            fig.add_scatter(x=part.step, y=part["mean"], mode="markers", name=name, row=2, col=1,
                            marker=dict(size=9, symbol=symbol, color="rgb(99,110,250)", line_width=2))
    if drop_step is not None and not pd.isna(drop_step):
        fig.add_vline(x=float(drop_step), line_dash="dash", line_color="red")
    losses = evals.filter(like="eval_loss").to_numpy().ravel()
    losses = losses[np.isfinite(losses) & (losses > 0)]
    decades = np.log10(losses.max() / losses.min()) if len(losses) else 0.0
    ticks = {"dtick": 1} if decades >= 2 else {}  # one label a decade, not the 2s and 5s between
    fig.update_yaxes(title_text="eval loss", type="log", exponentformat="power", row=1, col=1, **ticks)
    fig.update_yaxes(title_text="LLC estimate", row=2, col=1)
    fig.update_xaxes(title_text="training step", row=2, col=1)
    return fig.update_layout(title="Local learning coefficient under the loss curve (finding 1)",
                             template="plotly_white", height=620)


def plot_component_llc(per_run: pd.DataFrame):
    """The refined LLC of each component (a panel each) at the plateau, drop and end checkpoints,
    one line per run; a moment whose diagnostics fail is a hollow marker."""
    from plotly.subplots import make_subplots

    components = list(dict.fromkeys(per_run.component))
    columns = min(len(components), 5)
    fig = make_subplots(rows=-(-len(components) // columns), cols=columns, subplot_titles=components,
                        horizontal_spacing=0.04, vertical_spacing=0.12)
    order = {"plateau": 0, "drop": 1, "end": 2}
    for i, component in enumerate(components):
        for j, (run, part) in enumerate(per_run[per_run.component == component].groupby("run", sort=False)):
            part = part.sort_values("moment", key=lambda m: m.map(order))
            fig.add_scatter(x=part.moment, y=part.llc, mode="lines+markers", name=str(run), legendgroup=str(run),
                            showlegend=i == 0, line=dict(color=_COLOURS[j % len(_COLOURS)], width=1.5),
                            marker=dict(size=7, symbol=["circle" if ok else "circle-open" for ok in part.ok]),
                            row=i // columns + 1, col=i % columns + 1)
    return fig.update_layout(title="Refined LLC per component at the plateau, drop and end (hollow: diagnostics fail)",
                             template="plotly_white", height=260 * (-(-len(components) // columns)) + 80)


def plot_family_llc(tables: dict[str, pd.DataFrame], drops: dict[str, float]):
    """Every run's LLC against the steps from its drop (mean +- std over chains); a checkpoint whose
    diagnostics fail is a hollow marker."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, table) in enumerate(tables.items()):
        x = table.step - (drops.get(name) or 0)
        fig.add_scatter(x=x, y=table.llc_mean, error_y=dict(type="data", array=table.llc_std.fillna(0), width=2),
                        mode="lines+markers", name=str(name), line=dict(color=_COLOURS[i % len(_COLOURS)]),
                        marker=dict(size=8, symbol=["circle" if ok else "circle-open" for ok in table.ok],
                                    line_width=2))
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    return fig.update_layout(title="LLC of each run, aligned at its drop (hollow: diagnostics fail)",
                             xaxis_title="steps from the drop", yaxis_title="LLC (calibrated)",
                             template="plotly_white", height=420)
