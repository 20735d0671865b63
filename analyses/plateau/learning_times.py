"""When each output is learned: per-position learning times across a run's checkpoints (P4, docs/FINDINGS.md).

Does the model learn all its outputs at once, or in order? For every output position the score
across checkpoints is fitted with a logistic curve

    score(t) = low + (high - low) / (1 + exp(-(t - onset) / width))

(`scipy.optimize.curve_fit`): `onset` is the step at which the position has covered half its
change, `width` the steps of its rise (10 % -> 90 % takes 4.39 widths). A position is fitted where
its score changes by at least `MIN_CHANGE` and the curve explains at least `MIN_R2` of its
variance; otherwise it is reported unfit (`fit` "flat" or "poor"), never given an onset.

The score is the task's (`Task.position_scores`): a token task's greedy accuracy of each output
position; LRMC's 1 - masked MSE / copy-and-zero MSE at each matrix position (0 on the plateau, 1
when solved).

On MWS the plateau paper's partial solution is output 1 (a copy of x_1): learned long before the
rest, so its onset precedes the median onset (`first_precedes_median`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch

from analyses.base.walk import Steps, across_checkpoints, analysis_batch
from mechlrmc.runs import Run
from mechlrmc.tasks import get_task

LEARNING_BATCH = 128  # examples per checkpoint behind each position's score (report and family findings)
MIN_CHANGE = 0.2  # a position whose score moves less than this across the run is "flat"
MIN_R2 = 0.8  # a fit that explains less of the score's variance is "poor"
WIDTH_10_90 = 2 * math.log(9)  # a logistic rises from 10 % to 90 % of its change in this many widths


def logistic(t: np.ndarray, low: float, high: float, onset: float, width: float) -> np.ndarray:
    return low + (high - low) / (1 + np.exp(np.clip(-(t - onset) / width, -500, 500)))


def fit_logistic(steps: np.ndarray, score: np.ndarray) -> dict:
    """One position's logistic fit: `onset`, `width`, `low`, `high`, `r2` and `fit` ("ok", "flat"
    or "poor"; onset and width NaN unless "ok")."""
    steps, score = np.asarray(steps, float), np.asarray(score, float)
    change = float(np.nanmax(score) - np.nanmin(score))
    row = {"onset": math.nan, "width": math.nan, "low": float(score[0]), "high": float(score[-1]), "r2": math.nan}
    if change < MIN_CHANGE:
        return {**row, "fit": "flat"}
    from scipy.optimize import OptimizeWarning, curve_fit

    half = float(np.nanmin(score) + change / 2)
    crossing = steps[np.argmax(score >= half)] if score[-1] >= score[0] else steps[np.argmax(score <= half)]
    span = float(steps[-1] - steps[0]) or 1.0
    guess = (float(score[0]), float(score[-1]), float(crossing), span / 20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # the parameters' covariance is not used
            params, _ = curve_fit(logistic, steps, score, p0=guess, maxfev=20000,
                                  bounds=([-np.inf, -np.inf, steps[0] - span, span / 1e4],
                                          [np.inf, np.inf, steps[-1] + span, span]))
    except RuntimeError:
        return {**row, "fit": "poor"}
    residual = score - logistic(steps, *params)
    r2 = 1 - float(np.sum(residual ** 2) / np.sum((score - score.mean()) ** 2))
    low, high, onset, width = map(float, params)
    if r2 < MIN_R2:
        return {**row, "r2": r2, "fit": "poor"}
    return {"onset": onset, "width": width, "low": low, "high": high, "r2": r2, "fit": "ok"}


@torch.no_grad()
def position_scores(model, batch) -> pd.DataFrame:
    """Per output position (1-based), the score whose rise is its learning (`Task.position_scores`:
    a token task's greedy accuracy of each output; LRMC's 1 - masked MSE / copy-and-zero MSE per
    matrix entry)."""
    score = get_task(batch.task).position_scores(model, batch)
    return pd.DataFrame({"position": np.arange(1, len(score) + 1), "score": score.cpu().numpy()})


def fit_learning_times(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per position of a (step, position, score) table: its logistic fit (`fit_logistic`)."""
    rows = []
    for position, part in scores.sort_values("step").groupby("position"):
        rows.append({"position": int(position), **fit_logistic(part.step.to_numpy(), part.score.to_numpy())})
    return pd.DataFrame(rows)


def learning_times(run: Run, steps: Steps = "all", batch=None, batch_size: int = 128, progress: bool = True
                   ) -> pd.DataFrame:
    """Per output position of `run`: the logistic fit of its score across the checkpoints (`onset`,
    `width`, `low`, `high`, `r2`, `fit`)."""
    batch = analysis_batch(run, batch_size) if batch is None else batch
    scores = across_checkpoints(run, position_scores, steps=steps, batch=batch, progress=progress)
    return fit_learning_times(scores)


def learning_order(times: pd.DataFrame) -> dict:
    """What the fits say about the order: the fitted positions, the spread of their onsets (min,
    median, max, interquartile range), and whether the first position's onset precedes the median
    of the others (the plateau paper's partial solution on MWS, P4)."""
    ok = times[times.fit == "ok"]
    onsets = ok.onset.to_numpy()
    first = ok[ok.position == 1].onset
    median = float(np.median(onsets)) if len(onsets) else math.nan
    return {"positions": len(times), "fitted": len(ok),
            "onset_min": float(onsets.min()) if len(onsets) else math.nan, "onset_median": median,
            "onset_max": float(onsets.max()) if len(onsets) else math.nan,
            "onset_iqr": float(np.subtract(*np.percentile(onsets, [75, 25]))) if len(onsets) else math.nan,
            "first_onset": float(first.iloc[0]) if len(first) else math.nan,
            "first_precedes_median": bool(len(first) and first.iloc[0] < median)}
