"""Drop detection on synthetic metrics with a known plateau and drop, and on the reference run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses.plateau.figures import plot_phases
from analyses.plateau.phases import detect_phases, steps_around_drop
from mechlrmc.config import preset
from mechlrmc.runs import Run


def _synthetic_run(path, drop_at: float | None = 5500.0, last: int = 9000) -> Run:
    """A run whose eval L_mask sits at r/9 (+-3 % noise) from step 250, then falls to 0.01 around
    `drop_at` (a sigmoid 300 steps wide); the train losses are noisier and have a fake early dip."""
    cfg = preset("cpu")
    run = Run.create(path, cfg)
    rng = np.random.default_rng(0)
    level = cfg.data.plateau_mask_loss
    rows = []
    for step in range(0, last + 1, 50):
        fall = 0.0 if drop_at is None else 1 / (1 + np.exp(-(step - drop_at) / 300))
        mask = np.exp((1 - fall) * np.log(level) + fall * np.log(0.01)) * (1 + 0.03 * rng.standard_normal())
        obs = 0.13 if step == 0 else 1e-4
        mask = 0.13 if step == 0 else mask
        row = {"step": step, "wall_time": step / 100}
        if step:
            noisy = mask * (0.2 if step == 1000 else 1 + 0.3 * rng.standard_normal())
            row.update(loss=0.3 * noisy, loss_obs=obs, loss_mask=noisy)
        if step % 250 == 0:
            row.update(eval_loss=0.3 * mask + 0.7 * obs, eval_loss_obs=obs, eval_loss_mask=mask, eval_corr_mask=0.0)
        rows.append(row)
    run.append_metrics(rows)
    for step in [0, 250, 500, 750, 1000, *range(1500, last + 1, 500)]:
        run.save_checkpoint(step, {"x": torch.zeros(1)})
    return run


def test_detects_plateau_and_drop(tmp_path):
    run = _synthetic_run(tmp_path / "run")
    p = detect_phases(run).iloc[0]
    assert p.dropped
    assert 5000 <= p.drop_step <= 6000  # steepest descent of log L_mask is at the sigmoid's centre
    assert p.plateau_start == 250  # step 0 does not copy yet (L_obs = 0.13)
    assert 4000 <= p.plateau_end < p.drop_step
    assert p.plateau_over_analytic == pytest.approx(1.0, abs=0.05)
    assert p.post_drop_loss_mask == pytest.approx(0.01, rel=0.1)
    assert p.analytic_loss == pytest.approx(0.3 / 9)


def test_flat_run_has_no_drop(tmp_path):
    run = _synthetic_run(tmp_path / "run", drop_at=None)
    p = detect_phases(run).iloc[0]
    assert not p.dropped and np.isnan(p.drop_step)
    assert p.plateau_end == 9000 and p.plateau_over_analytic == pytest.approx(1.0, abs=0.05)


def test_steps_around_drop_spread_over_phases(tmp_path):
    run = _synthetic_run(tmp_path / "run")
    steps = steps_around_drop(run, 7)
    drop = detect_phases(run).iloc[0].drop_step
    assert len(steps) == 7 and set(steps) <= set(run.steps)
    assert sum(s < drop for s in steps) >= 3 and sum(s > drop for s in steps) >= 3
    assert min(abs(s - drop) for s in steps) <= 250
    assert steps_around_drop(run, 100) == run.steps


def test_plot_marks_phases(tmp_path):
    run = _synthetic_run(tmp_path / "run")
    fig = plot_phases(run)
    assert len(fig.data) == 6 and fig.layout.yaxis.type == "log"
    assert {s.x0 for s in fig.layout.shapes if s.x0 == s.x1} >= {detect_phases(run).iloc[0].drop_step}


def test_reference_run_plateau_is_copy_and_zero(reference_run):
    p = detect_phases(reference_run).iloc[0]
    assert p.dropped and p.plateau_start < p.plateau_end < p.drop_step
    assert p.plateau_over_analytic == pytest.approx(1.0, abs=0.1)  # finding 1 (docs/FINDINGS.md)
    assert p.post_drop_loss_mask < 0.5 * p.plateau_loss_mask
