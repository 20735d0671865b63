"""When each output is learned: per-position learning times across a run's checkpoints (P4, docs/FINDINGS.md).

Does the model learn all its outputs at once, or in order? For every output position the score
across checkpoints is fitted with a logistic curve

    score(t) = low + (high - low) / (1 + exp(-(t - onset) / width))

(`scipy.optimize.curve_fit`): `onset` is the step at which the position has covered half its
change, `width` the steps of its rise (10 % -> 90 % takes 4.39 widths). A position is fitted where
its score changes by at least `MIN_CHANGE` and the curve explains at least `MIN_R2` of its
variance; otherwise it is reported unfit (`fit` "flat" or "poor"), never given an onset.

The checkpoints bound what can be said. Each position's change is bracketed by two checkpoints:
`bracket_low`, the last at which the score has covered less than half its change (from its lowest
to its highest level, in the direction it moves), and `bracket_high`, the next one, from which it
stays at least half the way. The fitted onset is given only where a checkpoint lies strictly
inside the rise (between 10 % and 90 % of the change); a score that jumps between two checkpoints
is fitted "between checkpoints", with no onset and no width: the bracket is the answer (its fit is
the step between the two levels). A fitted 10-90 % rise shorter than the checkpoint spacing
around the onset (`spacing`) is flagged `width_below_spacing`: the width is then an upper bound,
not a measurement. `learned_at` is what orders the positions: the onset where the checkpoints
resolve it, the bracket's midpoint where they do not (`fit` says which).

The score is the task's (`Task.position_scores`): a token task's greedy accuracy of each output
position; LRMC's 1 - masked MSE / copy-and-zero MSE at each matrix position (0 on the plateau, 1
when solved).

On MWS the plateau paper's partial solution is output 1 (a copy of x_1): learned long before the
rest, so it precedes the median of the other outputs (`learning_order`'s `first_precedes_median`).
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
RISE = (0.1, 0.9)  # the rise: from 10 % to 90 % of the change; a checkpoint strictly inside resolves the onset
WIDTH_10_90 = 2 * math.log(9)  # a logistic rises from 10 % to 90 % of its change in this many widths
BETWEEN = "between checkpoints"  # `fit` of a position whose whole rise lies between two checkpoints
ORDERED = ("ok", BETWEEN)  # the fits that place a position in time (`learned_at`)


def logistic(t: np.ndarray, low: float, high: float, onset: float, width: float) -> np.ndarray:
    return low + (high - low) / (1 + np.exp(np.clip(-(t - onset) / width, -500, 500)))


def _progress(score: np.ndarray) -> np.ndarray:
    """The share of its change the score has covered at each checkpoint: 0 at its lowest level, 1
    at its highest (a falling score the other way round)."""
    low, high = np.nanmin(score), np.nanmax(score)
    progress = (score - low) / (high - low)
    return progress if score[-1] >= score[0] else 1 - progress


def _r2(score: np.ndarray, predicted: np.ndarray) -> float:
    return 1 - float(np.sum((score - predicted) ** 2) / np.sum((score - score.mean()) ** 2))


def fit_logistic(steps: np.ndarray, score: np.ndarray) -> dict:
    """One position's learning time: its bracket (`bracket_low`, `bracket_high`: the last checkpoint
    below half its change and the next, from which it stays at least half the way), the logistic
    fit where checkpoints lie inside the rise (`onset`, `width`, `low`, `high`, `r2`; `checkpoints_in_rise`
    counts those strictly between 10 % and 90 % of the change), the local checkpoint `spacing` and
    `width_below_spacing`, `learned_at` (onset, else the bracket's midpoint)
    and `fit`: "ok", "between checkpoints" (no checkpoint inside the rise: onset and width NaN, the
    levels and r2 those of a step at the bracket), "flat" or "poor" (onset, bracket and learned_at NaN)."""
    steps, score = np.asarray(steps, float), np.asarray(score, float)
    change = float(np.nanmax(score) - np.nanmin(score))
    row = {"onset": math.nan, "width": math.nan, "low": float(score[0]), "high": float(score[-1]), "r2": math.nan,
           "bracket_low": math.nan, "bracket_high": math.nan, "checkpoints_in_rise": 0, "spacing": math.nan,
           "width_below_spacing": False, "learned_at": math.nan}
    if change < MIN_CHANGE:
        return {**row, "fit": "flat"}
    progress = _progress(score)
    half = int(np.flatnonzero(progress < 0.5)[-1])  # the last checkpoint below half: bracket_low
    below_rise = int(np.flatnonzero(progress <= RISE[0])[-1])
    above = np.flatnonzero(progress[below_rise:] >= RISE[1])
    if half + 1 == len(steps) or not len(above):  # it does not end past half its change: not one rise
        return {**row, "fit": "poor"}
    bracket = {"bracket_low": float(steps[half]), "bracket_high": float(steps[half + 1]),
               "checkpoints_in_rise": int(above[0] - 1), "spacing": float(steps[half + 1] - steps[half])}
    if not bracket["checkpoints_in_rise"]:  # the whole rise between two checkpoints: a step at the bracket
        before, after = score[:half + 1].mean(), score[half + 1:].mean()
        r2 = _r2(score, np.where(np.arange(len(score)) <= half, before, after))
        if r2 < MIN_R2:
            return {**row, "r2": r2, "fit": "poor"}
        return {**row, **bracket, "low": float(before), "high": float(after), "r2": r2, "width_below_spacing": True,
                "learned_at": (bracket["bracket_low"] + bracket["bracket_high"]) / 2, "fit": BETWEEN}
    from scipy.optimize import OptimizeWarning, curve_fit

    span = float(steps[-1] - steps[0]) or 1.0
    guess = (float(score[0]), float(score[-1]), (bracket["bracket_low"] + bracket["bracket_high"]) / 2, span / 20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # the parameters' covariance is not used
            params, _ = curve_fit(logistic, steps, score, p0=guess, maxfev=20000,
                                  bounds=([-np.inf, -np.inf, steps[0] - span, span / 1e4],
                                          [np.inf, np.inf, steps[-1] + span, span]))
    except RuntimeError:
        return {**row, "fit": "poor"}
    r2 = _r2(score, logistic(steps, *params))
    low, high, onset, width = map(float, params)
    if r2 < MIN_R2:
        return {**row, "r2": r2, "fit": "poor"}
    at = int(np.clip(np.searchsorted(steps, onset, side="right"), 1, len(steps) - 1))
    spacing = float(steps[at] - steps[at - 1])  # the checkpoints either side of the onset
    return {"onset": onset, "width": width, "low": low, "high": high, "r2": r2, **bracket, "spacing": spacing,
            "width_below_spacing": bool(WIDTH_10_90 * width < spacing), "learned_at": onset, "fit": "ok"}


@torch.no_grad()
def position_scores(model, batch) -> pd.DataFrame:
    """Per output position (1-based), the score whose rise is its learning (`Task.position_scores`:
    a token task's greedy accuracy of each output; LRMC's 1 - masked MSE / copy-and-zero MSE per
    matrix entry)."""
    score = get_task(batch.task).position_scores(model, batch)
    return pd.DataFrame({"position": np.arange(1, len(score) + 1), "score": score.cpu().numpy()})


def fit_learning_times(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per position of a (step, position, score) table: its learning time (`fit_logistic`)."""
    rows = []
    for position, part in scores.sort_values("step").groupby("position"):
        rows.append({"position": int(position), **fit_logistic(part.step.to_numpy(), part.score.to_numpy())})
    return pd.DataFrame(rows)


def learning_times(run: Run, steps: Steps = "all", batch=None, batch_size: int = 128, progress: bool = True
                   ) -> pd.DataFrame:
    """Per output position of `run`: its learning time across the checkpoints (`fit_logistic`'s
    columns)."""
    batch = analysis_batch(run, batch_size) if batch is None else batch
    scores = across_checkpoints(run, position_scores, steps=steps, batch=batch, progress=progress)
    return fit_learning_times(scores)


def learning_order(times: pd.DataFrame) -> dict:
    """What the learning times say about the order: the positions placed in time (`fitted`: by a
    resolved onset; `between_checkpoints`: by a bracket only), the spread of their `learned_at`
    (min, median, max, interquartile range; a bracket counts at its midpoint), and whether the
    first position precedes the median `learned_at` of the others (`others_median`; the plateau
    paper's partial solution on MWS, P4): its resolved onset lies before it, or its whole bracket
    does (`bracket_high` before it; a bracket around the median decides nothing)."""
    placed = times[times.fit.isin(ORDERED)]
    learned = placed.learned_at.to_numpy(float)
    first, others = placed[placed.position == 1], placed[placed.position != 1].learned_at.to_numpy(float)
    median = float(np.median(others)) if len(others) else math.nan
    if not len(first):
        precedes = False
    elif first.fit.iloc[0] == "ok":
        precedes = bool(first.onset.iloc[0] < median)
    else:
        precedes = bool(first.bracket_high.iloc[0] < median)

    def first_value(column):
        return float(first[column].iloc[0]) if len(first) else math.nan

    spread = len(learned) > 0
    return {"positions": len(times), "fitted": int((placed.fit == "ok").sum()),
            "between_checkpoints": int((placed.fit == BETWEEN).sum()),
            "width_below_spacing": int(times.width_below_spacing[times.fit == "ok"].sum()),
            "learned_min": float(learned.min()) if spread else math.nan,
            "learned_median": float(np.median(learned)) if spread else math.nan,
            "learned_max": float(learned.max()) if spread else math.nan,
            "learned_iqr": float(np.subtract(*np.percentile(learned, [75, 25]))) if spread else math.nan,
            "first_fit": next(iter(times.fit[times.position == 1]), "absent"), "first_learned_at": first_value("learned_at"),
            "first_onset": first_value("onset"), "first_bracket_low": first_value("bracket_low"),
            "first_bracket_high": first_value("bracket_high"), "others_median": median,
            "first_precedes_median": precedes}
