"""The plateau and the drop, measured from a run's metrics (finding 1, docs/FINDINGS.md).

The evaluation columns (a fixed batch every `eval_every` steps) are used, not the noisy training
losses. On log L_mask smoothed by a centred running median of `window` evaluations:

- drop step: the steepest descent, i.e. the evaluation step ending the most negative slope of the
  smoothed log L_mask per step;
- plateau level: the median L_mask of the evaluations between the first one (the untrained model)
  and the drop step; it is compared with the copy-and-zero value E[X^2] (r/9 for uniform factors);
- plateau start: the first evaluation at which the model copies (L_obs below `tol` times the
  plateau level) while L_mask is within `tol` (relative) of the plateau level; plateau end: the
  last evaluation before the drop whose smoothed L_mask is still within that band (the run leaves
  the plateau after it);
- post-drop level: the median L_mask of the last `window` evaluations.

A run "dropped" when its post-drop level is below `(1 - 2 * tol)` times the plateau level;
otherwise the drop step is missing (NaN) and the plateau lasts to the last evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mechlrmc.errors import OptionError
from mechlrmc.runs import Run

LOSSES = {"loss": "L", "loss_obs": "L_obs", "loss_mask": "L_mask"}


def _evals(run: Run) -> pd.DataFrame:
    """The run's evaluations of L_mask by step (those of a run imported from the reference
    implementation record eval_loss only, and are left out)."""
    evals = run.evals
    evals = evals[evals.eval_loss_mask.notna()].sort_values("step").reset_index(drop=True)
    if len(evals) < 3:
        raise OptionError(f"drop detection needs at least 3 evaluations, the metrics have {len(evals)}")
    return evals


def steepest_drop(steps: np.ndarray, log_loss: np.ndarray, window: int, tol: float
                  ) -> tuple[np.ndarray, int, float, float, bool]:
    """The drop of a logged loss curve: (the running-median smoothed log loss, the index of the
    evaluation ending its steepest descent (after the first, untrained one; `len(steps)` when there
    is no drop), the plateau level (median before the drop), the post-drop level (median of the
    last `window`), whether it dropped (post < (1 - 2 tol) x plateau))."""
    smooth = pd.Series(log_loss).rolling(window, center=True, min_periods=1).median().to_numpy()
    slope = np.diff(smooth) / np.diff(steps)  # [n_evals - 1]
    drop_index = int(np.argmin(slope[1:])) + 2  # skip the untrained model's first step
    plateau = float(np.exp(np.median(log_loss[1:drop_index])))
    post = float(np.exp(np.median(log_loss[-window:])))
    dropped = post < (1 - 2 * tol) * plateau
    if not dropped:
        drop_index = len(steps)
        plateau = float(np.exp(np.median(log_loss[1:])))
    return smooth, drop_index, plateau, post, dropped


def detect_phases(run: Run, window: int = 3, tol: float = 0.1) -> pd.DataFrame:
    """One-row table: plateau start/end/level, drop step, post-drop level and the analytic
    copy-and-zero plateau (finding 1, docs/FINDINGS.md), for L_mask and L. A run of a token task
    gets `analyses.sequences.sequence_phases` instead (its plateau and drop on the outputs)."""
    if window < 1 or tol <= 0 or tol >= 0.5:
        raise OptionError(f"window={window}, tol={tol} are invalid: allowed window >= 1, 0 < tol < 0.5")
    if "eval_loss_mask" not in run.metrics:  # a token task: its phases are on the outputs' cross-entropy
        from analyses.sequences import sequence_phases

        return sequence_phases(run, window, tol)
    evals = _evals(run)
    steps = evals.step.to_numpy()
    log_mask = np.log(evals.eval_loss_mask.to_numpy())
    smooth, drop_index, plateau, post, dropped = steepest_drop(steps, log_mask, window, tol)
    in_band = np.abs(np.exp(smooth) / plateau - 1) <= tol
    copying = (evals.eval_loss_obs.to_numpy() < tol * plateau) & (np.abs(np.exp(log_mask) / plateau - 1) <= tol)
    starts = np.flatnonzero(copying[:drop_index])
    start = int(steps[starts[0]]) if len(starts) else math.nan
    band = np.flatnonzero(in_band[:drop_index])
    end = int(steps[band[-1]]) if len(band) and len(starts) and band[-1] >= starts[0] else math.nan
    data = run.config.data
    analytic = data.plateau_mask_loss
    before = evals.iloc[1:drop_index]
    return pd.DataFrame([{
        "plateau_start": start,
        "plateau_end": end,
        "drop_step": int(steps[drop_index]) if dropped else math.nan,
        "dropped": dropped,
        "plateau_loss_mask": plateau,
        "analytic_loss_mask": analytic,
        "plateau_over_analytic": plateau / analytic,
        "plateau_loss": float(before.eval_loss.median()),
        "analytic_loss": data.p_mask * analytic,
        "post_drop_loss_mask": post,
        "post_drop_loss": float(evals.eval_loss.iloc[-window:].median()),
        "final_step": int(steps[-1]),
    }])


def steps_around_drop(run: Run, n: int = 7) -> list[int]:
    """`n` checkpoints spread over the plateau, the drop and the completion phase.

    About half lie evenly between the plateau start and the drop, one at the drop, the rest evenly
    after it; each target maps to its nearest checkpoint. Without a drop: evenly over the run."""
    if n < 1:
        raise OptionError(f"n={n} is invalid: allowed an integer >= 1")
    available = run.steps
    if len(available) <= n:
        return available
    phases = detect_phases(run).iloc[0]
    if phases.dropped:
        start, drop, last = phases.plateau_start, phases.drop_step, available[-1]
        n_before = (n - 1) // 2
        targets = [*np.linspace(start, drop, n_before + 1), *np.linspace(drop, last, n - n_before)[1:]]
    else:
        targets = np.linspace(available[0], available[-1], n)
        drop = available[-1]
    chosen = {run.nearest_step(int(t)) for t in targets}
    for s in sorted(available, key=lambda s: (abs(s - drop), s)):  # fill collisions near the drop
        if len(chosen) >= n:
            break
        chosen.add(s)
    return sorted(chosen)


def key_checkpoints(run: Run, phases: pd.Series | None = None) -> dict[str, int]:
    """The checkpoints every analysis compares, defined once: `plateau` (midway between the
    plateau start and its end, i.e. the drop or the last evaluation for a run that never dropped),
    `drop` (nearest the drop step; only for a run that dropped) and `end` (the last checkpoint). A
    run that never dropped has `start` (its first checkpoint) instead of `drop`."""
    p = detect_phases(run).iloc[0] if phases is None else phases
    steps = run.steps
    start = steps[0] if math.isnan(p.plateau_start) else p.plateau_start
    end = steps[-1] if math.isnan(p.plateau_end) else p.plateau_end
    plateau = run.nearest_step((start + end) / 2)
    if p.dropped:
        return {"plateau": plateau, "drop": run.nearest_step(p.drop_step), "end": steps[-1]}
    return {"start": steps[0], "plateau": plateau, "end": steps[-1]}


def plot_phases(run: Run, phases: pd.DataFrame | None = None) -> go.Figure:
    """L, L_obs and L_mask on a log scale (training: faint, evaluation: bold), the analytic
    plateau r/9 dashed, and the plateau start/end and drop step as vertical lines."""
    phases = detect_phases(run) if phases is None else phases
    p = phases.iloc[0]
    metrics = run.metrics
    train = metrics.dropna(subset=["loss"])
    evals = _evals(run)
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


# ----- registry entry (analyses.registry) -------------------------------------------------------

def phases_tables(ctx) -> dict[str, pd.DataFrame]:
    return {"phases": ctx.phases.to_frame().T.reset_index(drop=True)}


def phases_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    if "analytic_loss_mask" not in tables["phases"]:
        from analyses.sequences import plot_sequence_phases

        return {"phases": plot_sequence_phases(ctx.run, tables["phases"])}
    return {"phases": plot_phases(ctx.run, tables["phases"]).update_layout(width=None)}
