"""Branching a run from a kept training state (step 0 included), stopping at the drop, and the
commitment table: where the fate is sealed, as a bracket of branching steps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.family.commitment import (SEALED_RATIO, between_seed_sd, branch_spec, commitment_bracket,
                                        commitment_table, commitment_tables)
from mechlrmc.cli import main
from mechlrmc.config import preset
from mechlrmc.runs import CheckpointError, Run
from mechlrmc.train import train
from mechlrmc.trials import SweepSpec, trial_status


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Run:
    cfg = preset("mws_tiny").override({"train.keep_states": [0, 10, 20]})
    return train(cfg, tmp_path_factory.mktemp("branch") / "parent", progress=False)


def _numbers(run: Run) -> pd.DataFrame:
    return run.metrics.drop(columns="wall_time")


def test_a_branch_on_the_parents_own_data_stream_repeats_it_exactly(parent, tmp_path):
    assert parent.kept_states == [0, 10, 20]
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
    assert err.count("\n") == 0 and "step 15" in err and "[0, 10, 20]" in err
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


def test_a_branch_from_step_0_has_the_runs_init_and_on_its_own_stream_other_data(parent, tmp_path):
    """Step 0 is a kept state like any other: on the parent's stream the branch repeats it exactly,
    on its own it starts from the same initialisation and sees other batches from the first step."""
    assert main(["train", "--from", str(parent.path), "--from-step", "0", "--out", str(tmp_path / "same"),
                 "--quiet"]) == 0
    pd.testing.assert_frame_equal(_numbers(Run(tmp_path / "same")), _numbers(parent))
    assert main(["train", "--from", str(parent.path), "--from-step", "0", "--out", str(tmp_path / "other"),
                 "--set", "train.data_seed=7", "--quiet"]) == 0
    other = Run(tmp_path / "other")
    for key, value in parent.state_dict(0).items():
        assert torch.equal(other.state_dict(0)[key], value), key
    mine, theirs = _numbers(other), _numbers(parent)
    pd.testing.assert_frame_equal(mine[mine.step == 0], theirs[theirs.step == 0])
    assert (mine.loss.iloc[1:].to_numpy() != theirs.loss.iloc[1:].to_numpy()).all()


def test_the_branch_spec_is_a_sweep_of_data_seeds_at_each_kept_step(parent):
    spec = SweepSpec.from_dict(branch_spec(parent, [0, 10, 20], branches=8, limit=30, stop_below=1.0))
    trials = spec.trials()
    assert len(trials) == 24
    assert {(t.config.train.branch_step, t.config.train.data_seed) for t in trials} == {
        (s, k) for s in (0, 10, 20) for k in range(1, 9)}
    assert all(t.config.train.branch_from == str(parent.path.resolve()) for t in trials)
    with pytest.raises(Exception, match="keeps no training state"):
        branch_spec(parent, [15])


def _branches(drops: dict[int, list[float]], limit: int = 400) -> pd.DataFrame:
    """A planted branch summary: the drop steps (NaN: censored at `limit`) of the branches of each step."""
    rows = [{"train.branch_step": step, "train.data_seed": k + 1, "drop_step": d,
             "final_step": limit if math.isnan(d) else d + 15} for step, ds in drops.items() for k, d in enumerate(ds)]
    return pd.DataFrame(rows)


def test_commitment_table_counts_spread_censoring_and_the_sealed_step():
    summary = _branches({50: [170, 230, math.nan], 100: [180, 185, 190], 150: [185, 185, 190]})
    table = commitment_table(summary, run_drop=185, tol=10)
    first = table.iloc[0]
    assert (first.dropped, first.censored, first.drop_steps) == (2, 1, "170 230 >400")
    assert not first.within and math.isnan(first.median_drop)
    assert table.spread.iloc[1] == pytest.approx(5.0) and table.within.iloc[1]
    assert table.sealed.tolist() == [False, True, True]
    assert table.ratio.isna().all() and table.criterion.iloc[0].startswith("absolute")
    assert (table.verdict == "sealed between steps 50 and 100").all()


def test_a_fate_planted_from_step_50_on_is_bracketed_between_25_and_50():
    """Branches that follow the parent's drop (170) from step 50 on and spread widely before: the fate
    is sealed after 25 and by 50, under either criterion."""
    rng = np.random.default_rng(1)
    wide = {s: list(170 + np.round(rng.normal(0, 20, 8) / 5) * 5) for s in (0, 10, 25)}
    summary = _branches({**wide, 50: [170] * 8, 100: [170] * 8, 150: [170] * 8})
    for table in (commitment_table(summary, 170, between_sd=12.0), commitment_table(summary, 170, tol=10)):
        assert table.sealed.tolist() == [False, False, False, True, True, True]
        assert commitment_bracket(table) == {"low": 25, "high": 50, "kind": "between",
                                             "text": "sealed between steps 25 and 50"}
        assert (table.verdict == "sealed between steps 25 and 50").all()
    unsealed_again = commitment_table(_branches({**wide, 50: [170] * 8, 100: [150, 200] * 4, 150: [170] * 8}),
                                      tol=10)
    assert commitment_bracket(unsealed_again)["low"] == 100  # the last unsealed step, not the first


def test_a_first_step_already_sealed_is_an_upper_bound_and_none_sealed_is_not_sealed_by_the_last():
    sealed = commitment_table(_branches({50: [170, 170, 175, 175], 100: [170] * 4}), tol=10)
    bracket = commitment_bracket(sealed)
    assert (bracket["kind"], bracket["high"], bracket["text"]) == ("upper bound", 50, "sealed by step 50 (upper bound)")
    assert math.isnan(bracket["low"]) and (sealed.verdict == bracket["text"]).all()
    never = commitment_table(_branches({50: [150, 200, math.nan], 150: [160, 180, 200]}), tol=10)
    bracket = commitment_bracket(never)
    assert (bracket["kind"], bracket["low"], bracket["text"]) == ("not sealed", 150, "not sealed by step 150")
    assert math.isnan(bracket["high"])


def _spread_exactly(sd: float, n: int, seed: int = 0) -> list[float]:
    """`n` drop steps around 170 whose sample standard deviation is exactly `sd`."""
    x = np.random.default_rng(seed).normal(size=n)
    return list(170 + (x - x.mean()) / x.std(ddof=1) * sd)


def test_the_relative_criterion_judges_the_upper_end_of_the_ratios_bootstrap_interval():
    between = 20.0
    table = commitment_table(_branches({0: _spread_exactly(0.5 * between, 40), 50: _spread_exactly(0.1 * between, 40),
                                        100: _spread_exactly(0.2 * between, 6)}), between_sd=between)
    assert table.ratio.tolist() == pytest.approx([0.5, 0.1, 0.2])
    assert (table.ratio_low < table.ratio).all() and (table.ratio < table.ratio_high).all()
    assert table.ratio_high.iloc[1] <= SEALED_RATIO < table.ratio_low.iloc[0]
    # 0.2 is below a quarter, but six branches cannot exclude more: the upper end decides, not sealed
    assert table.ratio_high.iloc[2] > SEALED_RATIO and table.within.tolist() == [False, True, False]
    assert table.criterion.iloc[0].startswith("relative") and "20 steps" in table.criterion.iloc[0]
    again = commitment_table(_branches({0: _spread_exactly(0.5 * between, 40)}), between_sd=between)
    assert again.ratio_high.iloc[0] == table.ratio_high.iloc[0]  # a fixed seed: the same interval
    with pytest.raises(Exception, match="between_sd"):
        commitment_table(_branches({0: [170, 175]}), between_sd=0.0)


def test_the_between_seed_sd_is_the_sd_of_the_init_seeds_mean_drop_steps():
    effects = {0: 150.0, 1: 170.0, 2: 190.0}
    rows = [{"run": f"d{d},s{s}", "seed": s, "train.seed": s, "train.data_seed": d, "drop_step": e + (d - 101) * 5}
            for s, e in effects.items() for d in (100, 101, 102)]
    summary = pd.DataFrame(rows)
    assert between_seed_sd(summary) == pytest.approx(20.0)  # the data's +-5 averages out per seed
    with pytest.raises(Exception, match="did not drop"):
        between_seed_sd(summary.assign(drop_step=summary.drop_step.where(summary.index > 0)))
    with pytest.raises(Exception, match="data.length"):
        between_seed_sd(summary.assign(**{"data.length": [6, 8, 10] * 3}))


def test_the_command_redoes_the_tables_from_a_branches_csv(tmp_path, capsys):
    planted = _branches({0: [150, 170, 190, 210], 25: [170] * 4, 50: [170] * 4}).assign(
        parent="seed=0", parent_seed=0, parent_drop_step=170)
    upper = _branches({25: [185, 185, 185, 185], 50: [185] * 4}).assign(parent="seed=1", parent_seed=1,
                                                                         parent_drop_step=185)
    csv = tmp_path / "commitment_branches.csv"
    pd.concat([planted, upper]).to_csv(csv, index=False)
    assert main(["analyze", "commitment", "--branches-csv", str(csv), "--between-sd", "12", "-o",
                 str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "seed=0: sealed between steps 0 and 25" in printed and "seed=1: sealed by step 25 (upper bound)" in printed
    assert "criterion: relative" in printed
    table = pd.read_csv(tmp_path / "out" / "commitment.csv")
    assert table.groupby("run").verdict.first().to_dict() == {"seed=0": "sealed between steps 0 and 25",
                                                               "seed=1": "sealed by step 25 (upper bound)"}
    assert table.seed.tolist() == [0, 0, 0, 1, 1] and (table.run_drop_step == [170] * 3 + [185] * 2).all()
    html = (tmp_path / "out" / "commitment.html").read_text()
    assert "sealed by step 25 (upper bound)" in html and "sealed between steps 0 and 25" in html
    assert main(["analyze", "commitment", "--branches-csv", str(csv), "-o", str(tmp_path / "o2")]) == 2
    assert "--tol" in capsys.readouterr().err
    assert main(["analyze", "commitment", "--branches-csv", str(csv), "--at", "0", "--tol", "10"]) == 2
    assert main(["analyze", "commitment", "--branches-csv", str(csv), "--between-sd", "-1"]) == 2


SHIPPED = Path(__file__).resolve().parents[1] / "analyses" / "families" / "mws_family"


def test_the_shipped_commitment_table_never_calls_an_upper_bound_a_point():
    """The shipped table is what its branches give under its stated criterion (relative once the
    crossed family's between-seed sd is in, absolute with two evaluations, 10 steps, until then)."""
    shipped = pd.read_csv(SHIPPED / "commitment.csv")
    between = shipped.between_sd.iloc[0]
    redone = commitment_tables(pd.read_csv(SHIPPED / "commitment_branches.csv"),
                               None if math.isnan(between) else between, tol=10)
    pd.testing.assert_frame_equal(shipped, redone, check_dtype=False)
    for _, part in shipped.groupby("run"):
        assert part.verdict.nunique() == 1
        if part.sealed.iloc[0]:
            assert (part.verdict == f"sealed by step {part.branch_step.min()} (upper bound)").all()


@pytest.mark.ray
@pytest.mark.slow
def test_the_commitment_command_branches_through_the_sweep_and_tabulates(parent, tmp_path, capsys):
    """Two branches from each of two kept states, trained by the sweep (Ray), stopped early by a high
    stop_below; mws_tiny never leaves its plateau, so every branch is censored and nothing is sealed."""
    out = tmp_path / "commitment"
    assert main(["analyze", "commitment", str(parent.path), "--at", "0", "10", "--branches", "2", "--limit", "30",
                 "--stop-below", "100", "--tol", "100", "-o", str(out), "--quiet"]) == 0
    table = pd.read_csv(out / "commitment.csv")
    assert table.branch_step.tolist() == [0, 10] and (table.branches == 2).all() and (table.censored == 2).all()
    branches = pd.read_csv(out / "commitment_branches.csv")
    assert sorted(branches["train.data_seed"]) == [1, 1, 2, 2] and (out / "commitment.html").is_file()
    assert all(Run(p).stopped is not None for p in (out / "parent").iterdir() if (p / "config.yaml").is_file())
    assert "parent: not sealed by step 10" in capsys.readouterr().out
    assert (table.verdict == "not sealed by step 10").all()
