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

from mechlrmc.errors import OptionError
from mechlrmc.runs import Run


def phase_evals(run: Run, metric: str | None = None) -> pd.DataFrame:
    """The run's evaluations that have its task's phase metric (`Task.phase_metric`, or `metric`),
    by step (a run imported from the reference implementation records eval_loss only: its rows
    without L_mask are left out)."""
    column = f"eval_{metric or run.config.task.phase_metric}"
    evals = run.evals
    if column not in evals:
        raise OptionError(f"{run.path}: drop detection needs the column {column} in metrics.csv")
    evals = evals[evals[column].notna()].sort_values("step").reset_index(drop=True)
    if len(evals) < 3:
        raise OptionError(f"drop detection needs at least 3 evaluations of {column}, the metrics have {len(evals)}")
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
    """One-row table of the plateau and the drop on the task's phase metric m (`Task.phase_metric`:
    L_mask for LRMC, the outputs' cross-entropy for a token task; finding 1 and P0,
    docs/FINDINGS.md): `plateau_start`, `plateau_end`, `drop_step`, `dropped`, `plateau_{m}`,
    `post_drop_{m}`, the task's analytic plateau levels (`analytic_*`, `Task.plateau`),
    `plateau_over_analytic`, `final_step`, and the task's own columns (`Task.phase_columns`).

    The plateau starts at the first evaluation on the plateau band, or, for a task with a copy
    metric (`Task.copy_metric`: LRMC's L_obs), at the first one that also copies (that metric below
    `tol` times the plateau level)."""
    if window < 1 or tol <= 0 or tol >= 0.5:
        raise OptionError(f"window={window}, tol={tol} are invalid: allowed window >= 1, 0 < tol < 0.5")
    task = run.config.task
    metric = task.phase_metric
    evals = phase_evals(run, metric)
    steps = evals.step.to_numpy()
    log_loss = np.log(evals[f"eval_{metric}"].to_numpy())
    smooth, drop_index, plateau, post, dropped = steepest_drop(steps, log_loss, window, tol)
    in_band = np.abs(np.exp(smooth) / plateau - 1) <= tol
    in_band[0] = False  # the untrained model
    if task.copy_metric is not None:
        starting = ((evals[f"eval_{task.copy_metric}"].to_numpy() < tol * plateau)
                    & (np.abs(np.exp(log_loss) / plateau - 1) <= tol))
    else:
        starting = in_band
    starts = np.flatnonzero(starting[:drop_index])
    band = np.flatnonzero(in_band[:drop_index])
    has_end = len(band) and len(starts) and band[-1] >= starts[0]
    analytic = task.plateau(run.config.data)
    row = {
        "plateau_start": int(steps[starts[0]]) if len(starts) else math.nan,
        "plateau_end": int(steps[band[-1]]) if has_end else math.nan,
        "drop_step": int(steps[drop_index]) if dropped else math.nan,
        "dropped": dropped,
        f"plateau_{metric}": plateau,
        **{f"analytic_{name}": value for name, value in analytic.items()},
        "plateau_over_analytic": plateau / analytic[metric] if analytic.get(metric) else math.nan,
        f"post_drop_{metric}": post,
        **task.phase_columns(evals, drop_index, band, window),
        "final_step": int(steps[-1]),
    }
    return pd.DataFrame([row])


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
