"""Per-position learning times: a planted logistic rise is recovered, flat and noisy positions are
named unfit, and every task's position scores run across a run's checkpoints."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analyses.plateau.figures import plot_learning_times
from analyses.plateau.learning_times import (WIDTH_10_90, fit_learning_times, fit_logistic, learning_order,
                                             learning_times, logistic)


def planted(onsets: dict[int, float], width: float = 8.0, noise: float = 0.01, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 201, 10.0)
    return pd.DataFrame([{"step": s, "position": p, "score": v + rng.normal(0, noise)}
                         for p, onset in onsets.items()
                         for s, v in zip(steps, logistic(steps, 0.06, 1.0, onset, width))])


def test_a_planted_rise_is_recovered():
    steps = np.arange(0, 201, 5.0)
    fit = fit_logistic(steps, logistic(steps, 0.1, 0.9, 120.0, 6.0))
    assert fit["fit"] == "ok" and fit["r2"] > 0.999
    assert fit["onset"] == pytest.approx(120.0, abs=0.5) and fit["width"] == pytest.approx(6.0, rel=0.05)
    assert fit["low"] == pytest.approx(0.1, abs=0.01) and fit["high"] == pytest.approx(0.9, abs=0.01)
    assert WIDTH_10_90 == pytest.approx(4.394, abs=1e-3)


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
    assert order["first_precedes_median"] and order["onset_median"] == pytest.approx(160, abs=3)
    assert order["fitted"] == 10 and order["onset_min"] == pytest.approx(30, abs=2)
    late = learning_order(fit_learning_times(planted({1: 190.0, 2: 60.0, 3: 80.0})))
    assert not late["first_precedes_median"]
    fig = plot_learning_times(times, planted(onsets), drop_step=160)
    assert len(fig.data) == 1 + 10 and "10 of 10 positions fitted" in fig.layout.title.text


def test_learning_times_of_a_run_give_one_row_per_position(tiny_run):
    """LRMC's positions (3 x 3 matrices): one row each, fitted or named unfit (the tiny run has no drop)."""
    times = learning_times(tiny_run, batch_size=64, progress=False)
    assert list(times.position) == list(range(1, 10))
    assert set(times.fit) <= {"ok", "flat", "poor"}
    assert times.loc[times.fit != "ok", "onset"].isna().all()
