"""Branching a run from a kept training state, stopping at the drop, and the commitment table."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from analyses.family.commitment import branch_spec, commitment_point, commitment_table
from mechlrmc.cli import main
from mechlrmc.config import preset
from mechlrmc.runs import CheckpointError, Run
from mechlrmc.train import train
from mechlrmc.trials import SweepSpec, trial_status


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Run:
    cfg = preset("mws_tiny").override({"train.keep_states": [10, 20]})
    return train(cfg, tmp_path_factory.mktemp("branch") / "parent", progress=False)


def _numbers(run: Run) -> pd.DataFrame:
    return run.metrics.drop(columns="wall_time")


def test_a_branch_on_the_parents_own_data_stream_repeats_it_exactly(parent, tmp_path):
    assert parent.kept_states == [10, 20]
    assert main(["train", "--from", str(parent.path), "--from-step", "10", "--out", str(tmp_path / "same"),
                 "--quiet"]) == 0
    same = Run(tmp_path / "same")
    assert same.config.train.branch_step == 10 and same.steps == [10, 20, 30]
    pd.testing.assert_frame_equal(_numbers(same), _numbers(parent))
    for key, value in parent.state_dict(30).items():
        assert torch.equal(same.state_dict(30)[key], value), key


def test_a_branch_with_its_own_data_seed_starts_from_the_same_state_and_sees_other_data(parent, tmp_path):
    assert main(["train", "--from", str(parent.path), "--from-step", "20", "--out", str(tmp_path / "other"),
                 "--set", "train.data_seed=7", "--quiet"]) == 0
    other = Run(tmp_path / "other")
    mine, theirs = _numbers(other), _numbers(parent)
    pd.testing.assert_frame_equal(mine[mine.step <= 20], theirs[theirs.step <= 20])
    assert other.metrics.loss.iloc[-1] != parent.metrics.loss.iloc[-1]


def test_branching_from_a_step_without_a_kept_state_is_one_line(parent, tmp_path, capsys):
    assert main(["train", "--from", str(parent.path), "--from-step", "15", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step 15" in err and "[10, 20]" in err
    assert not (tmp_path / "b" / "config.yaml").exists()
    with pytest.raises(CheckpointError, match="allowed"):
        parent.load_state(15)


def test_a_run_stops_at_its_drop_and_counts_as_finished(tmp_path):
    cfg = preset("mws_tiny").override({"train.stop_below": 100.0, "train.stop_patience": 2})
    run = train(cfg, tmp_path / "stop", progress=False)
    evals = run.evals
    assert run.stopped["step"] == 20 == evals.step.iloc[-1]  # evaluations at 0, 10, 20: the 2nd one in a row
    assert run.steps[-1] == 20 and run.finished
    assert trial_status(run.path, cfg) == "finished"
    assert train(cfg, tmp_path / "stop", resume=True, progress=False).steps == [0, 10, 20]  # nothing more


def test_the_branch_spec_is_a_sweep_of_data_seeds_at_each_kept_step(parent):
    spec = SweepSpec.from_dict(branch_spec(parent, [10, 20], branches=3, limit=30, stop_below=1.0))
    trials = spec.trials()
    assert len(trials) == 6
    assert {(t.config.train.branch_step, t.config.train.data_seed) for t in trials} == {
        (s, k) for s in (10, 20) for k in (1, 2, 3)}
    assert all(t.config.train.branch_from == str(parent.path.resolve()) for t in trials)
    with pytest.raises(Exception, match="keeps no training state"):
        branch_spec(parent, [15])


def test_commitment_table_counts_spread_censoring_and_the_sealed_step():
    summary = pd.DataFrame({
        "train.branch_step": [50] * 3 + [100] * 3 + [150] * 3,
        "drop_step": [170, 230, math.nan, 180, 185, 190, 185, 185, 190],
        "final_step": [185, 245, 400, 195, 200, 205, 200, 200, 205],
    })
    table = commitment_table(summary, run_drop=185, tol=10)
    first = table.iloc[0]
    assert (first.dropped, first.censored, first.drop_steps) == (2, 1, "170 230 >400")
    assert not first.within_tol and math.isnan(first.median_drop)
    assert table.spread.iloc[1] == pytest.approx(5.0) and table.within_tol.iloc[1]
    assert table.sealed.tolist() == [False, True, True]
    assert commitment_point(table) == 100
    assert commitment_point(commitment_table(summary[summary["train.branch_step"] == 50], tol=10)) != 100


@pytest.mark.ray
@pytest.mark.slow
def test_the_commitment_command_branches_through_the_sweep_and_tabulates(parent, tmp_path, capsys):
    """Two branches from each of two kept states, trained by the sweep (Ray), stopped early by a high
    stop_below; mws_tiny never leaves its plateau, so every branch is censored and nothing is sealed."""
    out = tmp_path / "commitment"
    assert main(["analyze", "commitment", str(parent.path), "--at", "10", "20", "--branches", "2", "--limit", "30",
                 "--stop-below", "100", "--tol", "100", "-o", str(out), "--quiet"]) == 0
    table = pd.read_csv(out / "commitment.csv")
    assert table.branch_step.tolist() == [10, 20] and (table.branches == 2).all() and (table.censored == 2).all()
    branches = pd.read_csv(out / "commitment_branches.csv")
    assert sorted(branches["train.data_seed"]) == [1, 1, 2, 2] and (out / "commitment.html").is_file()
    assert all(Run(p).stopped is not None for p in (out / "parent").iterdir() if (p / "config.yaml").is_file())
    assert "parent: never sealed" in capsys.readouterr().out
