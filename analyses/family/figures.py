"""Figures of the family lens: plotly figures drawn from the tables its estimators return (no computation beyond layout)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, qualitative
from plotly.subplots import make_subplots

from analyses.family.commitment import commitment_bracket
from analyses.family.summary import RunsLike, family_runs, family_summary, setting_label, varied_keys
from analyses.family.survival import run_durations, k_of_n


def plot_family_curves(source: RunsLike, summary: pd.DataFrame | None = None) -> go.Figure:
    """Every run's phase metric (LRMC: eval L_mask; log scale): against the step (left) and aligned at its own drop
    step (right, from the first trained step; runs that never dropped are left out there). One
    colour per setting, or per run when all runs share one setting."""
    runs = family_runs(source)
    summary = family_summary(runs) if summary is None else summary
    keys = varied_keys(runs)
    settings = list(dict.fromkeys(setting_label(r, keys) for _, r in summary.iterrows()))
    task = runs[0].config.task
    column, name = f"eval_{task.phase_metric}", task.phase_label
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=(f"{name} against step", "aligned at each run's drop"))
    for i, (run, (_, row)) in enumerate(zip(runs, summary.iterrows())):
        setting = setting_label(row, keys)
        color = qualitative.D3[(settings.index(setting) if len(settings) > 1 else i) % len(qualitative.D3)]
        evals = run.evals
        label = f"{row.run}" + ("" if pd.notna(row.get("drop_step")) else " (no drop)")
        fig.add_scatter(x=evals.step, y=evals[column], mode="lines", name=label, legendgroup=row.run,
                        line=dict(color=color, width=1.5, dash="solid" if pd.notna(row.get("drop_step")) else "dot"),
                        row=1, col=1)
        if pd.notna(row.get("drop_step")):
            trained = evals[evals.step > 0]  # the untrained model's loss would clutter the aligned axis
            fig.add_scatter(x=trained.step - row.drop_step, y=trained[column], mode="lines", name=label,
                            legendgroup=row.run, showlegend=False, line=dict(color=color, width=1.5), row=1, col=2)
    level = task.plateau(runs[0].config.data).get(task.phase_metric)
    if level:
        for col in (1, 2):
            fig.add_hline(y=level, line=dict(color="gray", dash="dash"), row=1, col=col)
    fig.add_vline(x=0, line=dict(color="gray", dash="dot"), row=1, col=2)
    fig.update_yaxes(type="log", title_text=name, row=1, col=1)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="steps from the drop", row=1, col=2)
    return fig.update_layout(template="plotly_white", height=450, margin=dict(t=90, b=40),
                             title=f"{len(runs)} runs; " + ("dashed: the analytic plateau, " if level else "")
                             + "dotted lines: no drop")


def plot_drop_steps(summary: pd.DataFrame) -> go.Figure:
    """Drop step of every run, one column per setting (seed aside); a run that never dropped is an
    open marker at its last evaluated step."""
    keys = [c for c in summary.columns if "." in c]
    fig = go.Figure()
    labels = summary.apply(lambda r: setting_label(r, keys), axis=1)
    for setting in dict.fromkeys(labels):
        part = summary[labels == setting]
        dropped = part[part.drop_step.notna()]
        never = part[part.drop_step.isna()]
        fig.add_box(x=[setting] * len(dropped), y=dropped.drop_step, name=setting, boxpoints="all", jitter=0.3,
                    pointpos=0, marker=dict(size=9), text=[f"seed {s}" for s in dropped.seed], showlegend=False,
                    line_color=qualitative.D3[0])
        if len(never):
            fig.add_scatter(x=[setting] * len(never), y=never.final_step, mode="markers", showlegend=False,
                            marker=dict(symbol="circle-open", size=11, color="#d62728"),
                            text=[f"seed {s}: no drop by {int(v)}" for s, v in zip(never.seed, never.final_step)],
                            hoverinfo="text")
    n_drop = int(summary.drop_step.notna().sum())
    return fig.update_layout(
        template="plotly_white", height=380, yaxis_title="drop step", margin=dict(t=40, b=40),
        title=f"Drop step per setting: {n_drop} of {len(summary)} runs dropped (open red: no drop by that step)")


def plot_run_in_family(family: pd.DataFrame, run_row: dict) -> go.Figure:
    """Drop step and final L_mask of every run of a family (dots; open marker: no drop) with one
    run marked by a star: where that run sits in the family's distribution."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("drop step", "final eval L_mask"))
    for col, key in ((1, "drop_step"), (2, "final_loss_mask")):
        dropped = family[family.drop_step.notna()]
        fig.add_scatter(x=dropped[key], y=[0] * len(dropped), mode="markers", name="family seeds",
                        marker=dict(size=11, color="#1f77b4", opacity=0.7), showlegend=col == 1,
                        text=[f"seed {s}" for s in dropped.seed], hoverinfo="text+x", row=1, col=col)
        never = family[family.drop_step.isna()]
        if len(never):
            x = never.final_step if key == "drop_step" else never[key]
            fig.add_scatter(x=x, y=[0] * len(never), mode="markers", name="no drop (at last step)",
                            marker=dict(size=11, symbol="circle-open", color="#d62728"), showlegend=col == 1,
                            text=[f"seed {s}" for s in never.seed], hoverinfo="text+x", row=1, col=col)
        value = run_row.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            fig.add_scatter(x=[value], y=[0], mode="markers", name="this run", showlegend=col == 1,
                            marker=dict(size=20, symbol="star", color="#ff7f0e", line=dict(width=1, color="black")),
                            row=1, col=col)
    fig.update_yaxes(visible=False, range=[-1, 1])
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="L_mask", type="log", row=1, col=2)
    return fig.update_layout(template="plotly_white", height=260, margin=dict(t=40, b=50))


def plot_survival(table: pd.DataFrame) -> go.Figure:
    """The `drop_survival` table as Kaplan-Meier step curves, one colour (legend group) per
    setting: the fraction of runs still on the plateau against the step, its 95 % band shaded,
    and a tick where a run was censored (its last step, no drop yet)."""
    fig = go.Figure()
    for i, (setting, curve) in enumerate(table.groupby("setting", sort=False)):
        color = qualitative.D3[i % len(qualitative.D3)]
        common = dict(legendgroup=setting, line_shape="hv", hoverinfo="skip", showlegend=False)
        fig.add_scatter(x=curve.step, y=curve.ci_high, mode="lines", line=dict(width=0), **common)
        fig.add_scatter(x=curve.step, y=curve.ci_low, mode="lines", line=dict(width=0), fill="tonexty",
                        fillcolor=rgba(color, 0.18), **common)
        n = int(curve.at_risk.iloc[0])
        fig.add_scatter(x=curve.step, y=curve.survival, mode="lines", name=f"{setting} (n={n})",
                        legendgroup=setting, line=dict(color=color, width=2.5, shape="hv"),
                        customdata=curve[["at_risk", "dropped", "censored"]],
                        hovertemplate="step %{x}<br>on the plateau %{y:.2f}<br>at risk %{customdata[0]}, "
                                      "dropped %{customdata[1]}, censored %{customdata[2]}<extra></extra>")
        censored = curve[curve.censored > 0]
        if len(censored):
            fig.add_scatter(x=censored.step, y=censored.survival, mode="markers", legendgroup=setting,
                            showlegend=False, hoverinfo="skip",
                            marker=dict(symbol="line-ns-open", size=12, color=color, line=dict(width=2, color=color)))
    fig.update_layout(title="Time to the drop (Kaplan-Meier, 95% band; ticks: runs censored at their last step)",
                      xaxis_title="step", yaxis_title="fraction still on the plateau",
                      yaxis_range=[0, 1.04], template="plotly_white", hovermode="closest")
    return fig


def plot_scaling(summary: pd.DataFrame, variables: str | list[str], fit: pd.DataFrame | pd.Series) -> go.Figure:
    """Drop step against the first of `variables` on log-log axes: a filled marker per run that
    dropped, an open one at the censoring step (its last step) per run that did not, and the fitted
    median power law of `scaling_exponents` (`fit`: one model's rows, one per variable) with its
    exponents and 95 % CIs. With several variables, one colour per setting of the others, each with
    the joint power law at that setting."""
    variables = [variables] if isinstance(variables, str) else list(variables)
    fit = (fit.to_frame().T if isinstance(fit, pd.Series) else fit).set_index("variable").loc[variables]
    runs = run_durations(summary)
    x, others = variables[0], variables[1:]
    exponent, prefactor = fit.exponent.astype(float), float(fit.prefactor.iloc[0])
    grid = np.geomspace(runs[x].min(), runs[x].max(), 50)
    fig = go.Figure()
    for i, (values, part) in enumerate(runs.groupby(others, sort=True) if others else [((), runs)]):
        setting = ", ".join(f"{k}={v:g}" for k, v in zip(others, values))
        prefix = f"{setting}: " if others else ""
        colors = (qualitative.D3[i % 10],) * 3 if others else (qualitative.D3[0], qualitative.D3[3], qualitative.D3[1])
        for dropped, name, symbol, color in ((True, "dropped (at its drop step)", "circle", colors[0]),
                                             (False, "censored (no drop by its last step)", "circle-open", colors[1])):
            rows = part[part.dropped == dropped]
            if len(rows):
                fig.add_scatter(x=rows[x], y=rows.duration, mode="markers", name=f"{prefix}{name}: {len(rows)} runs",
                                legendgroup=setting, marker=dict(symbol=symbol, size=8 if dropped else 11,
                                                                 opacity=0.7 if dropped else 1, color=color,
                                                                 line=dict(width=2, color=color)))
        at = prefactor * math.prod(v ** exponent[k] for k, v in zip(others, values))
        label = (f"{prefix}{fit.model.iloc[0]} AFT median: {at:.3g} · {x}^{exponent[x]:.2f} "
                 f"(95% CI {fit.ci_low[x]:.2f} to {fit.ci_high[x]:.2f})")
        fig.add_scatter(x=grid, y=at * grid ** exponent[x], mode="lines", name=label, legendgroup=setting,
                        line=dict(color=colors[2], width=2.5))
    law = " · ".join(f"{v}^{exponent[v]:.2f} [{fit.ci_low[v]:.2f}, {fit.ci_high[v]:.2f}]" for v in variables)
    fig.update_layout(title=f"Plateau length ~ {law}<br><sup>{k_of_n(summary)}</sup>",
                      xaxis=dict(title=x, type="log", tickvals=log_ticks(runs[x])),
                      yaxis=dict(title="drop step", type="log", tickvals=log_ticks(runs.duration)),
                      template="plotly_white", legend=dict(orientation="h", x=0, y=-0.18, yanchor="top"))
    return fig


def plot_commitment(branches: pd.DataFrame, table: pd.DataFrame) -> go.Figure:
    """Where a run's fate is sealed (`analyses.family.commitment`): every branch's drop step against
    the step it branched from (filled: dropped; open: censored at its last step), the median per
    branching step with the spread (sd) as error bars, the parent run's own drop (dotted) and where
    the branches start (the diagonal); one colour per parent run. Each run's verdict
    (`commitment_bracket`, the text of commitment.csv's `verdict`) is drawn as its bracket: a band
    between the last unsealed and the first sealed branching step, or a line at the step an upper
    bound or a "not sealed" names; the title repeats it with the criterion."""
    fig = go.Figure()
    parents = table.run.unique() if "run" in table else [None]
    verdicts = []
    for i, parent in enumerate(parents):
        color = qualitative.D3[i % len(qualitative.D3)]
        rows = branches if parent is None else branches[branches.parent == parent]
        steps = table if parent is None else table[table.run == parent]
        name = parent or "branches"
        dropped = rows.drop_step.notna()
        # each branch of a step a little apart, by its data seed's rank there (seeds need not be 1..K)
        order = rows.groupby("train.branch_step")["train.data_seed"]
        jitter = (order.rank() - (order.transform("size") + 1) / 2) * 0.6
        for ok, symbol, label in ((True, "circle", "dropped"), (False, "circle-open", "censored")):
            part = rows[dropped == ok]
            if len(part):
                y = part.drop_step if ok else part.final_step
                fig.add_scatter(x=part["train.branch_step"] + jitter[dropped == ok], y=y, mode="markers",
                                name=f"{name}: branches {label}", legendgroup=name,
                                marker=dict(symbol=symbol, size=8, color=color, line=dict(width=1.5, color=color)),
                                customdata=part[["train.data_seed"]],
                                hovertemplate="from step %{x:.0f}, data seed %{customdata[0]}: %{y}<extra></extra>")
        fig.add_scatter(x=steps.branch_step, y=steps.median_drop, mode="lines+markers", legendgroup=name,
                        name=f"{name}: median (spread = sd)", line=dict(color=color, width=2),
                        marker=dict(symbol="line-ew", size=14, line=dict(width=2, color=color)),
                        error_y=dict(type="data", array=steps.spread, visible=True, color=rgba(color, 0.6)),
                        customdata=steps[["ratio", "ratio_low", "ratio_high"]],
                        hovertemplate="from step %{x:.0f}: median %{y}, sd / between-seed sd %{customdata[0]:.2f} "
                                      "[%{customdata[1]:.2f}, %{customdata[2]:.2f}]<extra></extra>")
        drop = steps.run_drop_step.iloc[0]
        if np.isfinite(drop):
            fig.add_hline(y=drop, line=dict(color=color, dash="dot", width=1.5),
                          annotation_text=f"{name}'s own drop", annotation_position="top left")
        bracket = commitment_bracket(steps)
        verdict = steps.verdict.iloc[0]
        verdicts.append(f"{name}: {verdict}")
        label = dict(text=f"{name}: {verdict}", yshift=18 * i, font=dict(color=color))
        if bracket["kind"] == "between":
            fig.add_vrect(x0=bracket["low"], x1=bracket["high"], fillcolor=rgba(color, 0.12), line_width=0,
                          annotation=label, annotation_position="bottom left")
        else:
            fig.add_vline(x=bracket["high"] if bracket["kind"] == "upper bound" else bracket["low"],
                          line=dict(color=color, dash="dash", width=1), annotation=label,
                          annotation_position="bottom right")
    low, high = branches["train.branch_step"].min(), branches["train.branch_step"].max()
    fig.add_scatter(x=[low, high], y=[low, high], mode="lines", name="branch start (y = x)",
                    line=dict(color="#999", dash="dash", width=1))
    fig.update_layout(title=dict(text="When the fate is sealed: drop steps of branches that differ only in their data"
                                      f"<br><sup>{'; '.join(verdicts)}<br>criterion: {table.criterion.iloc[0]}</sup>"),
                      xaxis_title="branching step (same weights and Adam state)", yaxis_title="drop step",
                      template="plotly_white", margin=dict(t=110),
                      legend=dict(orientation="h", x=0, y=-0.2, yanchor="top"))
    return fig


def rgba(color: str, alpha: float) -> str:
    r, g, b = hex_to_rgb(color)
    return f"rgba({r},{g},{b},{alpha})"


def log_ticks(values: pd.Series) -> list[float]:
    """Tick values for a log axis: the distinct values when there are a few (a grid column),
    else 1-2-5 times powers of ten across their range."""
    distinct = np.unique(values.to_numpy(float))
    if len(distinct) <= 8:
        return distinct.tolist()
    decades = range(math.floor(math.log10(distinct[0])), math.ceil(math.log10(distinct[-1])) + 1)
    ticks = [m * 10.0 ** d for d in decades for m in (1, 2, 5)]
    return [t for t in ticks if distinct[0] / 2 <= t <= distinct[-1] * 2]


def plot_drop_variance(summary: pd.DataFrame, factors: list[str], table: pd.DataFrame) -> go.Figure:
    """A crossed family's drop steps in its grid (left: rows the first factor's levels, columns the
    second's) and each factor's share of the variance of log drop step with its interval (right)."""
    from analyses.family.variance import drop_grid

    grid = drop_grid(summary, factors)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.58, 0.42], horizontal_spacing=0.14,
                        subplot_titles=("drop step", "share of the variance of log drop step"))
    fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=[str(i) for i in grid.index],
                             colorscale="Viridis", text=grid.to_numpy(), texttemplate="%{text:.0f}",
                             colorbar=dict(title="step", x=0.5), hovertemplate=f"{factors[0]}=%{{y}}<br>"
                             f"{factors[1]}=%{{x}}<br>drop at %{{z:.0f}}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=table.factor, y=table.share, marker_color=qualitative.Plotly[:len(table)],
                         error_y=dict(type="data", symmetric=False, array=table.ci_high - table.share,
                                      arrayminus=table.share - table.ci_low),
                         hovertemplate="%{x}: %{y:.0%}<extra></extra>", showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text=factors[1], type="category", row=1, col=1)
    fig.update_yaxes(title_text=factors[0], type="category", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%", row=1, col=2)
    fig.update_layout(title=f"Init or data: {len(summary)} runs, {table.model.iloc[0]}", height=460, width=1000,
                      template="plotly_white")
    return fig
