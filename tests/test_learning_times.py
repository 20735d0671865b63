"""Per-position learning times: a planted logistic rise is recovered, a jump between two checkpoints
is bracketed and not given an onset, flat and noisy positions are named unfit, position 1 is
compared with the others' median, and every task's position scores run across a run's checkpoints."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analyses.plateau.figures import plot_learning_times
from analyses.family.sequence_findings import learning_order_value
from analyses.plateau.adapters import learning_order_text
from analyses.plateau.learning_times import (WIDTH_10_90, fit_learning_times, fit_logistic, learning_order,
                                             learning_times, logistic)


def planted(onsets: dict[int, float], width: float = 8.0, noise: float = 0.01, seed: int = 0,
            jumps: dict[int, float] | None = None) -> pd.DataFrame:
    """Scores every 10 steps: a logistic rise at each of `onsets`, a jump from 0.06 to 1 at each of
    `jumps` (the score is 1 from that step on)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 201, 10.0)
    curves = {**{p: logistic(steps, 0.06, 1.0, onset, width) for p, onset in onsets.items()},
              **{p: np.where(steps >= at, 1.0, 0.06) for p, at in (jumps or {}).items()}}
    return pd.DataFrame([{"step": s, "position": p, "score": v + rng.normal(0, noise)}
                         for p, curve in sorted(curves.items()) for s, v in zip(steps, curve)])


def test_a_planted_rise_is_recovered():
    steps = np.arange(0, 201, 5.0)
    fit = fit_logistic(steps, logistic(steps, 0.1, 0.9, 120.0, 6.0))
    assert fit["fit"] == "ok" and fit["r2"] > 0.999
    assert fit["onset"] == pytest.approx(120.0, abs=0.5) and fit["width"] == pytest.approx(6.0, rel=0.05)
    assert fit["low"] == pytest.approx(0.1, abs=0.01) and fit["high"] == pytest.approx(0.9, abs=0.01)
    assert WIDTH_10_90 == pytest.approx(4.394, abs=1e-3)


def test_a_jump_between_two_checkpoints_is_bracketed_not_given_an_onset():
    """Checkpoints every 10 steps, the score 0.06 up to step 120 and 1 from step 130: the checkpoints
    say "between 120 and 130", not an onset at 125 with a sub-step width and R^2 = 1."""
    steps = np.arange(0, 201, 10.0)
    score = np.where(steps >= 130, 1.0, 0.06) + np.random.default_rng(2).normal(0, 0.01, len(steps))
    fit = fit_logistic(steps, score)
    assert fit["fit"] == "between checkpoints" and np.isnan(fit["onset"]) and np.isnan(fit["width"])
    assert (fit["bracket_low"], fit["bracket_high"]) == (120, 130) and fit["learned_at"] == 125
    assert fit["width_below_spacing"] and fit["spacing"] == 10 and fit["checkpoints_in_rise"] == 0
    assert fit["low"] == pytest.approx(0.06, abs=0.01) and fit["high"] == pytest.approx(1.0, abs=0.01)
    falling = fit_logistic(steps, 1 - score)  # a falling score is bracketed the same way
    assert falling["fit"] == "between checkpoints" and (falling["bracket_low"], falling["bracket_high"]) == (120, 130)
    fast = fit_logistic(steps, logistic(steps, 0.06, 1.0, 128.0, 1.5))  # one checkpoint inside a 6.6-step rise
    assert fast["fit"] == "ok" and fast["onset"] == pytest.approx(128, abs=0.5)
    assert fast["width_below_spacing"] and (fast["bracket_low"], fast["bracket_high"]) == (120, 130)
    assert fast["checkpoints_in_rise"] == 1
    times = fit_learning_times(planted({1: 60.0}, jumps={2: 130.0}))
    fig = plot_learning_times(times)
    assert len(fig.data) == 2 and list(fig.data[1].x) == [125] and list(fig.data[1].error_x.array) == [5]
    assert "1 of 2 positions fitted; 1 between checkpoints" in fig.layout.title.text


def test_a_smooth_rise_sampled_densely_keeps_its_fitted_onset():
    """Checkpoints every 2 steps through a 40-step rise: the onset is resolved, within a step of the
    planted 151.3, inside its bracket, and its width is no artefact of the spacing."""
    steps = np.arange(0, 301, 2.0)
    score = logistic(steps, 0.06, 1.0, 151.3, 9.0) + np.random.default_rng(3).normal(0, 0.01, len(steps))
    fit = fit_logistic(steps, score)
    assert fit["fit"] == "ok" and fit["onset"] == pytest.approx(151.3, abs=1.0) and fit["learned_at"] == fit["onset"]
    assert (fit["bracket_low"], fit["bracket_high"]) == (150, 152) and fit["spacing"] == 2
    assert not fit["width_below_spacing"] and fit["width"] == pytest.approx(9.0, rel=0.1)
    assert fit["checkpoints_in_rise"] >= 15  # a 10-90 % rise of ~40 steps


def test_flat_and_noisy_positions_are_unfit_not_given_an_onset():
    steps = np.arange(0, 201, 10.0)
    flat = fit_logistic(steps, np.full(len(steps), 0.06) + 0.01 * np.sin(steps))
    noisy = fit_logistic(steps, np.random.default_rng(1).choice([0.0, 1.0], len(steps)))
    assert flat["fit"] == "flat" and np.isnan(flat["onset"])
    assert noisy["fit"] == "poor" and np.isnan(noisy["onset"])


def test_the_order_of_planted_onsets_and_the_first_position_early():
    """Output 1 learned at step 30, the rest at 150-170 (the plateau paper's partial solution):
    one row per position, the onsets in order, position 1 before the median."""
    onsets = {1: 30.0, **{p: 150.0 + 2 * p for p in range(2, 11)}}
    times = fit_learning_times(planted(onsets))
    assert list(times.position) == list(range(1, 11)) and (times.fit == "ok").all()
    np.testing.assert_allclose(times.onset, list(onsets.values()), atol=2.0)
    order = learning_order(times)
    assert order["first_precedes_median"] and order["others_median"] == pytest.approx(162, abs=3)
    assert order["fitted"] == 10 and order["learned_min"] == pytest.approx(30, abs=2)
    late = learning_order(fit_learning_times(planted({1: 190.0, 2: 60.0, 3: 80.0})))
    assert not late["first_precedes_median"]
    fig = plot_learning_times(times, planted(onsets), drop_step=160)
    assert len(fig.data) == 1 + 10 and "10 of 10 positions fitted" in fig.layout.title.text


def test_position_1_is_compared_with_the_median_of_the_others():
    """Onsets 20, 30, 50 (position 1), 80, 90: position 1 is the median of all five, so it does not
    precede that; it precedes the others' median, 55, as `learning_order`'s docstring says. Learned
    between two checkpoints, it precedes where its whole bracket does, and not when the bracket
    holds the median."""
    others = {2: 20.0, 3: 30.0, 4: 80.0, 5: 90.0}
    order = learning_order(fit_learning_times(planted({1: 50.0, **others})))
    assert order["others_median"] == pytest.approx(55, abs=1.5) and order["learned_median"] == pytest.approx(50, abs=1.5)
    assert order["first_fit"] == "ok" and order["first_precedes_median"]
    early = learning_order(fit_learning_times(planted(others, jumps={1: 40.0})))  # between steps 30 and 40
    assert early["first_fit"] == "between checkpoints" and np.isnan(early["first_onset"])
    assert (early["first_bracket_low"], early["first_bracket_high"]) == (30, 40) and early["first_precedes_median"]
    assert early["fitted"] == 4 and early["between_checkpoints"] == 1 and early["first_learned_at"] == 35
    straddles = learning_order(fit_learning_times(planted(others, jumps={1: 60.0})))  # 50 to 60, around 55
    assert not straddles["first_precedes_median"]
    assert "output 1 between steps 30 and 40" in learning_order_value(early)
    assert "learned between steps 50 and 60) does not precede" in learning_order_text(pd.Series(straddles))


def test_learning_times_of_a_run_give_one_row_per_position(tiny_run):
    """LRMC's positions (3 x 3 matrices): one row each, fitted or named unfit (the tiny run has no drop)."""
    times = learning_times(tiny_run, batch_size=64, progress=False)
    assert list(times.position) == list(range(1, 10))
    assert set(times.fit) <= {"ok", "between checkpoints", "flat", "poor"}
    assert times.loc[times.fit != "ok", "onset"].isna().all()
    placed = times.fit.isin(["ok", "between checkpoints"])
    assert times.loc[~placed, ["bracket_low", "learned_at"]].isna().all().all()
    assert (times.loc[placed, "bracket_high"] > times.loc[placed, "bracket_low"]).all()
