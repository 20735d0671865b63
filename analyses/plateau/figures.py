"""Figures of the plateau lens: plotly figures drawn from the tables its estimators return (no computation beyond layout)."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from analyses.plateau.early_warning import headline_measures, normalised
from analyses.plateau.lm_checkpoints import lm_dynamics_summary
from analyses.plateau.phases import detect_phases, phase_evals
from mechlrmc.runs import Run

LOSSES = {"loss": "L", "loss_obs": "L_obs", "loss_mask": "L_mask"}


def plot_phases(run: Run, phases: pd.DataFrame | None = None) -> go.Figure:
    """L, L_obs and L_mask on a log scale (training: faint, evaluation: bold), the analytic
    plateau r/9 dashed, and the plateau start/end and drop step as vertical lines."""
    phases = detect_phases(run) if phases is None else phases
    p = phases.iloc[0]
    metrics = run.metrics
    train = metrics.dropna(subset=["loss"])
    evals = phase_evals(run)
    colors = {"loss": "#1f77b4", "loss_obs": "#2ca02c", "loss_mask": "#d62728"}
    fig = go.Figure()
    for col, name in LOSSES.items():
        fig.add_scatter(x=train.step, y=train[col], name=f"{name} (train)", mode="lines",
                        line=dict(color=colors[col], width=1), opacity=0.3)
        fig.add_scatter(x=evals.step, y=evals[f"eval_{col}"], name=f"{name} (eval)", mode="lines+markers",
                        line=dict(color=colors[col], width=2.5), marker=dict(size=4))
    fig.add_hline(y=p.analytic_loss_mask, line_dash="dash", line_color=colors["loss_mask"],
                  annotation_text="copy-and-zero E[X²]", annotation_position="bottom right")
    label_at = {"plateau_start": "top right", "plateau_end": "top left", "drop_step": "bottom right"}
    for name, position in label_at.items():
        if not pd.isna(p[name]):
            fig.add_vline(x=p[name], line_dash="dot", line_color="gray",
                          annotation_text=name.replace("_", " "), annotation_position=position)
    drop = f"drop at step {int(p.drop_step)}" if p.dropped else "no drop"
    fig.update_layout(title=f"Losses of {run.path.name}: L_mask plateau {p.plateau_loss_mask:.3g} "
                            f"({p.plateau_over_analytic:.2f} x analytic), {drop}",
                      xaxis_title="step", yaxis_title="MSE", yaxis_type="log", template="plotly_white",
                      width=1000, height=550)
    return fig


def plot_sequence_phases(run: Run, phases: pd.DataFrame) -> go.Figure:
    """Output cross-entropy (log), greedy accuracy, repetition (model and truth), attention on the
    optimal map and collapse from the run's evaluations, with the plateau and the drop marked."""
    p, evals = phases.iloc[0], run.evals
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.45, 0.55])
    fig.add_scatter(x=evals.step, y=evals.eval_loss_out, name="output cross-entropy", row=1, col=1,
                    line=dict(color="#d62728", width=2.5))
    fig.add_scatter(x=evals.step, y=evals.eval_loss, name="cross-entropy, all positions", row=1, col=1,
                    line=dict(color="#1f77b4", width=1.5))
    for column, name, color, dash in (("eval_greedy_acc", "greedy output accuracy", "#2ca02c", "solid"),
                                      ("eval_rep", "repetition of greedy outputs", "#ff7f0e", "solid"),
                                      ("eval_rep_true", "repetition of the truth", "#ff7f0e", "dot"),
                                      ("eval_attn_on_map", "attention on the optimal map", "#9467bd", "solid"),
                                      ("eval_collapse", "collapse (mean cosine)", "#8c564b", "solid")):
        if column in evals:
            fig.add_scatter(x=evals.step, y=evals[column], name=name, row=2, col=1, line=dict(color=color, dash=dash))
    for column, text, where in (("analytic_loss_out", "no information", "top right"),
                                ("analytic_loss_out_first_solved", "output 1 solved, the rest marginal", "bottom right")):
        if column in p and not pd.isna(p[column]):
            fig.add_hline(y=p[column], line_dash="dash", line_color="gray", line_width=1, row=1, col=1,
                          annotation_text=f"{text} {p[column]:.3f}", annotation_position=where)
    for name in ("plateau_start", "plateau_end", "drop_step"):
        if not pd.isna(p[name]):
            fig.add_vline(x=p[name], line_dash="dot", line_color="gray", annotation_text=name.replace("_", " "))
    fig.update_yaxes(type="log", title_text="cross-entropy", row=1, col=1)
    fig.update_yaxes(title_text="share / accuracy", range=[-0.02, 1.02], row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    drop = f"drop at step {int(p.drop_step)}" if p.dropped else "no drop"
    return fig.update_layout(template="plotly_white", height=650, title=f"{run.path.name}: {drop}; plateau greedy "
                             f"accuracy {p.plateau_greedy_acc:.2f}, repetition up to {p.plateau_max_rep:.2f} "
                             f"(truth {p.rep_true:.2f})")


def plot_native_dynamics(tables: dict[str, pd.DataFrame], drop_step: float | None = None) -> go.Figure:
    """Four panels across checkpoints: repetition (model and truth), collapse per layer, attention
    on the optimal map per head, and the accuracy of each output position (greedy)."""
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.14, horizontal_spacing=0.08,
                        subplot_titles=("repetition of greedy outputs (P1)", "collapse: mean cosine of hidden states (P2)",
                                        "attention on the optimal map (P3)", "greedy accuracy per output position (P4)"))
    rep = tables["repetition"]
    fig.add_scatter(x=rep.step, y=rep.rep, name="model", row=1, col=1, line=dict(color="#ff7f0e"))
    fig.add_scatter(x=rep.step, y=rep.rep_true, name="truth", row=1, col=1, line=dict(color="#ff7f0e", dash="dot"))
    for layer, part in tables["collapse"].groupby("layer", sort=False):
        fig.add_scatter(x=part.step, y=part.cos_scored, name=f"layer {layer}", row=1, col=2)
    for (layer, head), part in tables["attention_progress"].groupby(["layer", "head"]):
        fig.add_scatter(x=part.step, y=part.share_on_map, name=f"L{layer}H{head}", row=2, col=1)
    grid = tables["partial_solution"].pivot(index="position", columns="step", values="greedy_acc")
    fig.add_heatmap(z=grid.to_numpy(), x=[str(s) for s in grid.columns], y=grid.index, colorscale="Viridis",
                    zmin=0, zmax=1, colorbar=dict(title="accuracy", x=1.02, y=0.22, len=0.45), row=2, col=2)
    if drop_step is not None and not pd.isna(drop_step):
        for row, col in ((1, 1), (1, 2), (2, 1)):
            fig.add_vline(x=drop_step, line_dash="dot", line_color="red", row=row, col=col)
    fig.update_yaxes(title_text="output position", row=2, col=2)
    return fig.update_layout(template="plotly_white", height=750, title="The plateau paper's measurements across "
                             "checkpoints (dotted red: the drop)")


def plot_dynamics(frames: dict[str, pd.DataFrame], metrics: pd.DataFrame | None = None) -> go.Figure:
    """Three panels against training step: repetition (with the masked-entry correlation when
    `metrics` is given), collapse of masked positions per layer (all positions dotted), and the
    attention share on the optimal map of the best head of every block."""
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.06, subplot_titles=(
        "repetition: masked spread / true spread", "collapse: mean pairwise cosine",
        "attention share on the optimal map"))
    rep = frames["repetition"]
    fig.add_scatter(x=rep.step, y=rep.spread_ratio, name="spread ratio", legendgroup="rep",
                    legendgrouptitle_text="repetition", mode="lines+markers", line_color="#1f77b4", row=1, col=1)
    if metrics is not None:
        ev = metrics.dropna(subset=["eval_corr_mask"])
        ev = ev[ev.step <= rep.step.max()]
        fig.add_scatter(x=ev.step, y=ev.eval_corr_mask, name="corr (masked)", legendgroup="rep",
                        mode="lines", line_dash="dot", line_color="black", row=1, col=1)
    col = frames["collapse"]
    depth = sample_colorscale("Viridis", [i / max(col.layer.max(), 1) * 0.85 for i in range(col.layer.max() + 1)])
    for layer, part in col.groupby("layer"):
        name = "embeddings" if layer == 0 else f"after block {layer - 1}"
        fig.add_scatter(x=part.step, y=part.cos_masked, name=name, legendgroup="collapse",
                        legendgrouptitle_text="collapse (masked; dotted: all)", mode="lines+markers",
                        line_color=depth[layer], row=1, col=2)
        fig.add_scatter(x=part.step, y=part.cos_all, name=name, legendgroup="collapse", showlegend=False,
                        mode="lines", line=dict(color=depth[layer], dash="dot"), row=1, col=2)
    att = frames["attention_progress"]
    best = att.groupby(["step", "layer"]).share_on_map.max().reset_index()
    for layer, part in best.groupby("layer"):
        fig.add_scatter(x=part.step, y=part.share_on_map, name=f"block {layer}", legendgroup="attn",
                        legendgrouptitle_text="best head of", mode="lines+markers",
                        line_color=qualitative.Set2[layer % len(qualitative.Set2)], row=1, col=3)
    chance = att.groupby("step").uniform_share.first()
    fig.add_scatter(x=chance.index, y=chance.values, name="uniform attention", legendgroup="attn",
                    mode="lines", line_dash="dash", line_color="gray", row=1, col=3)
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=420, margin=dict(t=40, b=40), legend=dict(groupclick="toggleitem"))
    return fig


def plot_interventions(frame: pd.DataFrame) -> go.Figure:
    """Evaluation L_mask of every intervention run (log scale), drop steps marked."""
    fig = go.Figure()
    for row in frame.itertuples():
        ev = Run(row.run).evals
        label = f"c = {row.scale:g}" + (f" (drop at {row.drop_step:g})" if row.dropped else " (no drop)")
        fig.add_scatter(x=ev.step, y=ev.eval_loss_mask, name=label, mode="lines+markers")
    fig.update_layout(height=380, margin=dict(t=30, b=40), xaxis_title="step",
                      yaxis_title="eval L_mask", yaxis_type="log")
    return fig


def plot_drop_aligned(frames: dict[str, pd.DataFrame], marks: dict[str, pd.DataFrame], drops: dict[str, float],
                      measures: list[str] | None = None, cols: int = 3) -> go.Figure:
    """Each measure's progress (0 at its plateau level, 1 at the end) against steps from each
    run's drop, one line per run: what moves before 0 is an early warning."""
    chosen = measures or list(dict.fromkeys(m for frame in frames.values() for m in frame.measure))
    rows = math.ceil(len(chosen) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=chosen, shared_xaxes=True,
                        vertical_spacing=min(0.08, 0.5 / max(rows, 1)), horizontal_spacing=0.06)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for r, (run, frame) in enumerate(frames.items()):
        drop = drops.get(run, math.nan)
        if math.isnan(drop):
            continue
        prog = normalised(frame, marks[run])
        for i, measure in enumerate(chosen):
            part = prog[prog.measure == measure].sort_values("step")
            fig.add_scatter(x=part.step - drop, y=part.progress, mode="lines", name=run, legendgroup=run,
                            showlegend=i == 0, line=dict(color=palette[r % len(palette)], width=1.5),
                            row=i // cols + 1, col=i % cols + 1)
    for i in range(len(chosen)):
        fig.add_vline(x=0, line_dash="dot", line_color="gray", row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(range=[-0.5, 1.5])
    return fig.update_layout(template="plotly_white", height=220 * rows + 120,
                             title="Measures aligned at each run's drop (0: the plateau's level, 1: the end; x: steps from the drop)")


def drop_aligned_figure(tables: dict[str, pd.DataFrame]) -> go.Figure:
    """`plot_drop_aligned` of `family_early_warning`'s tables (or one run's)."""
    long, per_run = tables["trajectories"], tables["milestones"]
    frames = {name: part.drop(columns="run") for name, part in long.groupby("run", sort=False)}
    marks = {name: part for name, part in per_run.groupby("run", sort=False)}
    drops = per_run.groupby("run").drop_step.first().to_dict()
    shown = [m for m in headline_measures(per_run) if m in set(long.measure)]
    return plot_drop_aligned(frames, marks, drops, measures=shown)


def plot_lm_dynamics(frame: pd.DataFrame) -> go.Figure:
    """Two panels against step: mean repetition of the greedy tokens (reference dashed where
    given) and mean collapse per layer (the last layer thick). The step axis is logarithmic when
    all steps are positive and span two decades (as Pythia's early checkpoints do)."""
    summary = lm_dynamics_summary(frame)
    last = summary[summary.layer == summary.n_layers]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08, subplot_titles=(
        "repetition: consecutive equal greedy tokens", "collapse: mean pairwise cosine"))
    fig.add_scatter(x=last.step, y=last.repetition, name="generated", legendgroup="rep",
                    legendgrouptitle_text="repetition", mode="lines+markers", line_color="#1f77b4", row=1, col=1)
    if last.reference_repetition.notna().any():
        fig.add_scatter(x=last.step, y=last.reference_repetition, name="reference", legendgroup="rep",
                        mode="lines", line=dict(color="black", dash="dash"), row=1, col=1)
    top = int(summary.layer.max())
    colors = sample_colorscale("Viridis", [layer / max(top, 1) * 0.85 for layer in range(top + 1)])
    for layer, part in summary.groupby("layer"):
        final = bool((part.layer == part.n_layers).all())
        fig.add_scatter(x=part.step, y=part.collapse, name="embeddings" if layer == 0 else f"layer {layer}",
                        legendgroup="collapse", legendgrouptitle_text="collapse", mode="lines+markers",
                        line=dict(color=colors[layer], width=3 if final else 1.5), row=1, col=2)
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=1)
    steps = summary.step
    log_steps = bool((steps > 0).all() and steps.max() / steps.min() >= 100)
    fig.update_xaxes(title_text="step", type="log" if log_steps else "linear")
    fig.update_layout(height=420, margin=dict(t=40, b=40), legend=dict(groupclick="toggleitem"))
    return fig


def plot_learning_times(times: pd.DataFrame, scores: pd.DataFrame | None = None, drop_step: float | None = None
                        ) -> go.Figure:
    """Each output position's onset (marker) and its 10 %-90 % rise (bar) where the checkpoints
    resolve them (a rise shorter than the checkpoint spacing: no bar, its width is not measured); a
    position learned between two checkpoints as its bracket (open marker at the midpoint, bar to
    the two checkpoints); unfit ones listed in the title; with `scores`, each position's score
    against the step beneath."""
    ok = times[times.fit == "ok"]
    between = times[times.fit == "between checkpoints"]
    unfit = times[~times.fit.isin(["ok", "between checkpoints"])]
    rows = 2 if scores is not None else 1
    fig = make_subplots(rows=rows, cols=1, vertical_spacing=0.12,
                        subplot_titles=["onset and 10-90 % rise of each position (open: bracket between checkpoints)"]
                        + (["score of each position against the step"] if scores is not None else []))
    half = (ok.width * math.log(9)).where(~ok.width_below_spacing.astype(bool), 0.0)  # half of the 10 %-90 % rise
    fig.add_scatter(x=ok.onset, y=ok.position, mode="markers", name="onset", marker=dict(size=8, color="#1f77b4"),
                    error_x=dict(type="data", array=half, color="#1f77b4", thickness=1.5),
                    hovertext=[f"position {r.position}: onset {r.onset:.0f}, R² {r.r2:.3f}, "
                               + (f"rise shorter than the checkpoint spacing ({r.spacing:.0f} steps): width not resolved"
                                  if r.width_below_spacing else f"width {r.width:.1f}") for r in ok.itertuples()],
                    row=1, col=1)
    if len(between):
        fig.add_scatter(x=between.learned_at, y=between.position, mode="markers", name="between checkpoints",
                        marker=dict(size=8, color="#ff7f0e", symbol="circle-open"),
                        error_x=dict(type="data", array=between.spacing / 2, color="#ff7f0e", thickness=1.5),
                        hovertext=[f"position {r.position}: learned between steps {r.bracket_low:.0f} and "
                                   f"{r.bracket_high:.0f} (no checkpoint inside the rise)" for r in between.itertuples()],
                        row=1, col=1)
    if drop_step is not None and not pd.isna(drop_step):
        fig.add_vline(x=drop_step, line=dict(color="gray", dash="dot"), annotation_text="drop", row=1, col=1)
    fig.update_yaxes(title_text="output position", autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="step", row=1, col=1)
    if scores is not None:
        positions = sorted(scores.position.unique())
        colours = sample_colorscale("Viridis", [i / max(1, len(positions) - 1) for i in range(len(positions))])
        for position, colour in zip(positions, colours):
            part = scores[scores.position == position].sort_values("step")
            fig.add_scatter(x=part.step, y=part.score, mode="lines", name=f"position {position}",
                            line=dict(color=colour, width=1.5), showlegend=False, row=2, col=1)
        fig.update_yaxes(title_text="score", row=2, col=1)
        fig.update_xaxes(title_text="step", row=2, col=1)
    note = f"; {len(between)} between checkpoints" if len(between) else ""
    note += f"; unfit: {', '.join(f'{p} ({f})' for p, f in zip(unfit.position, unfit.fit))}" if len(unfit) else ""
    return fig.update_layout(template="plotly_white", height=380 * rows, showlegend=False,
                             title=f"Learning times: {len(ok)} of {len(times)} positions fitted{note}")
