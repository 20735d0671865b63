"""Init or data (`analyses.family.variance`): the variance of the log drop step of a crossed family
split between its factors, checked on planted families whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analyses.family.variance import drop_variance, variance_verdict
from mechlrmc.errors import OptionError

FACTORS = ["train.seed", "train.data_seed"]


def _crossed(init_sd: float, data_sd: float, noise_sd: float = 0.02, seed: int = 0) -> pd.DataFrame:
    """A 5 x 5 crossed family whose log drop step is an init effect + a data effect + noise."""
    rng = np.random.default_rng(seed)
    init, data = rng.normal(0, init_sd, 5), rng.normal(0, data_sd, 5)
    rows = [{"run": f"train.data_seed={100 + j},seed={i}", "train.seed": i, "train.data_seed": 100 + j,
             "drop_step": float(np.round(150 * np.exp(init[i] + data[j] + rng.normal(0, noise_sd))))}
            for i in range(5) for j in range(5)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("planted", ["train.seed", "train.data_seed"])
def test_a_family_set_by_one_factor_comes_back_as_such(planted):
    summary = _crossed(*((0.3, 0.0) if planted == "train.seed" else (0.0, 0.3)))
    table = drop_variance(summary, FACTORS, reps=40).set_index("factor")
    other = FACTORS[1 - FACTORS.index(planted)]
    assert list(table.index) == [*FACTORS, "residual"]
    assert table.share.sum() == pytest.approx(1.0)
    assert table.loc[planted, "share"] > 0.9 and table.loc[planted, "ci_low"] > 0.5
    assert table.loc[other, "share"] < 0.05 and table.loc[other, "ci_high"] < 0.3
    assert (table.ci_low <= table.share + 1e-9).all() and (table.share <= table.ci_high + 1e-9).all()
    assert f"largest: {planted}" in variance_verdict(table.reset_index())


def test_both_factors_and_noise_share_the_variance():
    summary = _crossed(0.25, 0.25, noise_sd=0.1, seed=3)
    table = drop_variance(summary, FACTORS, reps=40).set_index("factor")
    assert table.loc["train.seed", "share"] > 0.2 and table.loc["train.data_seed", "share"] > 0.2
    assert 0.005 < table.loc["residual", "share"] < 0.4  # planted: 0.01 of ~0.135
    assert table.converged.all()


def test_a_run_that_did_not_drop_is_refused_by_name():
    summary = _crossed(0.3, 0.0)
    summary.loc[7, "drop_step"] = np.nan
    with pytest.raises(OptionError, match=r"1 of 25 runs did not drop \(train.data_seed=102,seed=1\)"):
        drop_variance(summary, FACTORS)
    with pytest.raises(OptionError, match="not columns of the summary"):
        drop_variance(_crossed(0.3, 0.0), ["train.seed", "data.length"])


def test_analyze_variance_on_a_shipped_summary(tmp_path, capsys, no_png):
    from mechlrmc.cli import main

    family = tmp_path / "family"
    family.mkdir()
    _crossed(0.0, 0.3).drop(columns="train.seed").assign(seed=lambda s: s.run.str[-1].astype(int)).to_csv(
        family / "family_summary.csv", index=False)
    assert main(["analyze", "variance", str(family), "--factors", *FACTORS, "--reps", "20",
                 "-o", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "variance.csv")
    assert table.factor.tolist() == [*FACTORS, "residual"]
    assert (tmp_path / "out" / "variance.html").is_file()
    assert "(largest: train.data_seed)" in capsys.readouterr().out
