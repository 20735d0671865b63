"""Early warnings of the drop: milestones and leads (in steps and in plateau lengths) on planted
trajectories, the family count, the top Hessian eigenvalue and the component norms on cases with a
known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.plateau.early_warning import (component_norms, early_warning_table, essential_dynamics, milestones,
    top_hessian_eigenvalue)
from analyses.plateau.figures import plot_drop_aligned
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks import get_task, preset

STEPS = np.arange(0, 401, 10)


def _trajectory(**measures) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({"step": STEPS, "measure": name, "value": values})
                      for name, values in measures.items()], ignore_index=True)


def test_a_ramp_before_the_drop_leads_it_by_the_planted_steps():
    ramp = np.clip((STEPS - 100) / 100, 0, 1)  # 0 until step 100, 1 from step 200
    late = np.clip((STEPS - 250) / 50, 0, 1)  # moves only after the drop at 250
    marks = milestones(_trajectory(ramp=ramp, late=late), drop_step=250, plateau_start=20).set_index("measure")
    assert marks.loc["ramp", "step_10"] == 110 and marks.loc["ramp", "lead_10"] == 140
    assert marks.loc["ramp", "step_50"] == 150 and marks.loc["ramp", "lead_50"] == 100
    assert marks.loc["late", "step_10"] == 260 and marks.loc["late", "lead_10"] == -10
    assert marks.loc["ramp", "change"] == pytest.approx(1.0)


def test_the_lead_in_plateau_units_is_the_planted_fraction_of_the_plateau():
    """Two runs whose plateaus differ in length (100 to 300, 0 to 400): a measure that covers half its
    change halfway through each plateau leads by 100 and 200 steps, and by 0.5 plateau in both."""
    short = np.clip((STEPS - 150) / 100, 0, 1)  # half its change at step 200, midway from 100 to 300
    marks = milestones(_trajectory(ramp=short), drop_step=300, plateau_start=100).set_index("measure")
    assert marks.loc["ramp", "step_50"] == 200 and marks.loc["ramp", "lead_50"] == 100
    assert marks.loc["ramp", "lead_50_plateau"] == pytest.approx(0.5)
    assert marks.loc["ramp", "lead_10_plateau"] == pytest.approx(140 / 200)  # 10 % at step 160
    per_run = pd.concat([marks.reset_index().assign(run="short"),
                         milestones(_trajectory(ramp=short), drop_step=400, plateau_start=0).assign(run="long")],
                        ignore_index=True)
    assert per_run.lead_50.tolist() == [100, 200] and per_run.lead_50_plateau.tolist() == pytest.approx([0.5, 0.5])
    row = early_warning_table(per_run).set_index("measure").loc["ramp"]
    assert row.lead_50_plateau_median == pytest.approx(0.5) and row.lead_50_plateau_max == pytest.approx(0.5)
    assert row.lead_10_plateau_min == pytest.approx(240 / 400) and row.lead_10_plateau_max == pytest.approx(0.7)
    assert row.lead_50_median == 150  # the steps' columns stay
    unknown = milestones(_trajectory(ramp=short), drop_step=300).set_index("measure")  # no plateau start
    assert unknown.loc["ramp", "lead_50"] == 100 and np.isnan(unknown.loc["ramp", "lead_50_plateau"])


def test_a_measure_that_wanders_and_comes_back_has_not_moved_yet():
    spike = np.where((STEPS >= 50) & (STEPS <= 90), 1.0, 0.0) + np.clip((STEPS - 300) / 50, 0, 1)
    marks = milestones(_trajectory(spike=spike), drop_step=250).set_index("measure")
    assert marks.loc["spike", "step_10"] == 310  # the early excursion does not count


def test_the_family_table_counts_runs_that_move_before_the_drop():
    ramp = np.clip((STEPS - 100) / 100, 0, 1)
    per_run = pd.concat([milestones(_trajectory(ramp=ramp), drop_step=d).assign(run=f"seed={i}")
                         for i, d in enumerate((250, 300, 105))], ignore_index=True)
    row = early_warning_table(per_run).set_index("measure").loc["ramp"]
    assert row.before_drop_10 == "2 of 3" and row.lead_10_median == 140 and row.lead_10_min == -5
    assert row.before_drop_50 == "2 of 3" and row.lead_50_max == 150 and row["lead_10 seed=1"] == 190
    fig = plot_drop_aligned({f"seed={i}": _trajectory(ramp=ramp) for i in range(3)},
                            {f"seed={i}": per_run[per_run.run == f"seed={i}"] for i in range(3)},
                            {"seed=0": 250, "seed=1": 300, "seed=2": 105})
    assert len(fig.data) == 3 and fig.data[1].x[0] == -300


def test_top_hessian_eigenvalue_of_least_squares_is_that_of_2_xtx_over_n():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=generator) * torch.arange(1, 7), torch.randn(64, generator=generator)
    model = torch.nn.Linear(6, 1, bias=False)
    loss = lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()
    expected = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())
    assert top_hessian_eigenvalue(model, (x, y), loss_fn=loss) == pytest.approx(expected, rel=1e-3)


def test_component_norms_of_a_token_model():
    cfg = preset("mws_tiny")
    model = HookedEncoder(cfg, seed=0)
    batch = get_task("mws").sample(cfg.data, 16, torch.Generator().manual_seed(0))
    norms = component_norms(model, batch).set_index("measure").value
    assert norms["weight norm embed"] == pytest.approx(float(model.W_E.detach().norm()), rel=1e-6)
    assert {"grad norm attn.0", "grad norm mlp.0", "weight norm pos_embed"} <= set(norms.index)
    assert (norms[[i for i in norms.index if i.startswith("grad")]] > 0).all()
    assert all(p.requires_grad for p in model.parameters())  # left as found


def test_essential_dynamics_of_outputs_moving_along_one_line_is_that_line():
    """Checkpoints whose outputs move along one direction at a planted pace: PC1 follows the pace."""
    pace = [0.0, 1.0, 3.0, 6.0, 10.0]
    direction = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))

    class Planted(torch.nn.Module):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, tokens):
            return direction * self.t

    batch = type("B", (), {"tokens": torch.zeros(4, 3), "task": "lrmc"})()  # a batch says its task
    frame = essential_dynamics(None, range(len(pace)), batch, load=lambda s: Planted(pace[s]))
    pc1 = frame[frame.measure == "essential dynamics PC1"].value.to_numpy()
    assert abs(np.corrcoef(pc1, pace)[0, 1]) == pytest.approx(1.0, abs=1e-6)
