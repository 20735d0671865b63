"""Survival analysis of the time to the drop: a planted family's Kaplan-Meier curve matches the
product-limit numbers worked by hand, runs that never dropped count as censored, log-rank tells
separated settings from identical ones, and the AFT fit recovers a planted scaling exponent."""

import math

import numpy as np
import pandas as pd
import pytest

from analyses.family.figures import plot_scaling, plot_survival
from analyses.family.survival import (drop_survival, k_of_n, logrank, median_drop, power_law_check, scaling_exponent,
                                      scaling_exponents)

NAN = math.nan


def _planted() -> pd.DataFrame:
    """Six runs: drops at 100, 200, 200, 300; two never drop (last steps 250 and 400)."""
    return pd.DataFrame({"run": [f"seed={i}" for i in range(6)], "seed": range(6),
                         "drop_step": [100, 200, 200, NAN, 300, NAN],
                         "final_step": [500, 500, 500, 250, 500, 400]})


def test_kaplan_meier_matches_hand_product_limit():
    table = drop_survival(_planted())
    # step:      0   100  200  250  300  400
    # at risk:   6    6    5    3    2    1
    # dropped:   0    1    2    0    1    0
    # censored:  0    0    0    1    0    1
    # S(t):      1   5/6  5/6 * (1 - 2/5) = 1/2   1/2   1/2 * (1 - 1/2) = 1/4   1/4
    assert table.setting.unique().tolist() == ["all"]
    assert table.step.tolist() == [0, 100, 200, 250, 300, 400]
    assert table.at_risk.tolist() == [6, 6, 5, 3, 2, 1]
    assert table.dropped.tolist() == [0, 1, 2, 0, 1, 0]
    assert table.censored.tolist() == [0, 0, 0, 1, 0, 1]
    np.testing.assert_allclose(table.survival, [1, 5 / 6, 0.5, 0.5, 0.25, 0.25])
    assert (table.ci_low <= table.survival).all() and (table.survival <= table.ci_high).all()
    assert table.ci_low.iloc[0] == table.ci_high.iloc[0] == 1


def test_median_and_k_of_n_count_censored_runs():
    median = median_drop(_planted()).iloc[0]
    assert (median.n, median.dropped, median.censored) == (6, 4, 2)
    assert median.median_step == 200 and median.median_reached  # S first reaches 1/2 at 200
    assert median.ci_low <= 200 <= median.ci_high
    assert k_of_n(_planted()) == "4 of 6 dropped, 2 censored"
    never = _planted().assign(drop_step=[100, NAN, NAN, NAN, NAN, NAN])
    unreached = median_drop(never).iloc[0]
    assert not unreached.median_reached and math.isinf(unreached.median_step)


def _two_settings(drops_a, drops_b, final: int = 2000) -> pd.DataFrame:
    drops = [*drops_a, *drops_b]
    return pd.DataFrame({"length": [8] * len(drops_a) + [16] * len(drops_b), "drop_step": drops,
                         "final_step": final})


def test_settings_get_their_own_curves_and_logrank_separates_them():
    rng = np.random.default_rng(0)
    early, late = rng.uniform(100, 200, 10), rng.uniform(1000, 1500, 10)
    late[-2:] = NAN  # two slow runs censored at the final step
    separated = _two_settings(early, late)
    table = drop_survival(separated, by="length")
    assert table.setting.unique().tolist() == ["length=8", "length=16"]
    assert table.groupby("setting").survival.first().eq(1).all()
    assert table[table.setting == "length=16"].censored.sum() == 2
    test = logrank(separated, "length")
    assert test.comparison.tolist() == ["all 2 settings", "length=8 vs length=16"]
    assert test.p_value.iloc[0] < 1e-3

    same = _two_settings(early, early)
    assert logrank(same, "length").p_value.iloc[0] > 0.5


def _power_law_family(exponent: float = 1.5, cutoff: float = 2500, seed: int = 4) -> pd.DataFrame:
    """Drop steps t = 10 L^exponent * lognormal(0, 0.3), 20 runs per L; the few above `cutoff`
    are censored there (no drop by the last step)."""
    rng = np.random.default_rng(seed)
    length = np.repeat([8, 12, 16, 24, 32], 20)
    t = 10 * length ** exponent * rng.lognormal(0, 0.3, length.size)
    return pd.DataFrame({"length": length, "drop_step": np.where(t < cutoff, t, NAN), "final_step": cutoff})


@pytest.mark.parametrize("model", ["weibull", "lognormal"])
def test_scaling_exponent_recovers_planted_power_law(model):
    family = _power_law_family()
    fit = scaling_exponent(family, "length", model=model).iloc[0]
    assert 0 < fit.censored < 10 and fit.n == 100
    assert abs(fit.exponent - 1.5) < 0.15
    assert fit.ci_low < 1.5 < fit.ci_high
    assert fit.p_value < 1e-6
    assert 0.5 * 10 < fit.prefactor < 2 * 10  # the median at L = 1: 10 (log-normal noise has median 1)


def test_aic_prefers_the_planted_noise_law():
    family = _power_law_family()
    aic = {model: scaling_exponent(family, "length", model=model).aic.iloc[0] for model in ("weibull", "lognormal")}
    assert aic["lognormal"] < aic["weibull"]


def test_scaling_exponent_refuses_what_has_no_power_law():
    family = _power_law_family()
    with pytest.raises(ValueError, match="distinct"):
        scaling_exponent(family.assign(length=8), "length")
    with pytest.raises(ValueError, match="positive"):
        scaling_exponent(family.assign(length=family.length - 8), "length")
    with pytest.raises(ValueError, match="allowed"):
        scaling_exponent(family, "length", model="gamma")


def test_plots_draw_one_group_per_setting():
    rng = np.random.default_rng(0)
    family = _two_settings(rng.uniform(100, 200, 6), [*rng.uniform(1000, 1500, 4), NAN, NAN])
    fig = plot_survival(drop_survival(family, by="length"))
    groups = list(dict.fromkeys(trace.legendgroup for trace in fig.data))
    assert groups == ["length=8", "length=16"]
    assert [t.name for t in fig.data if t.showlegend is not False] == ["length=8 (n=6)", "length=16 (n=6)"]
    assert all(t.line.shape == "hv" for t in fig.data if t.mode == "lines")

    planted = _power_law_family()
    fit = scaling_exponent(planted, "length", model="lognormal")
    fig = plot_scaling(planted, "length", fit)
    assert fig.layout.xaxis.type == fig.layout.yaxis.type == "log"
    assert [t.marker.symbol for t in fig.data if t.mode == "markers"] == ["circle", "circle-open"]
    assert f"{fit.exponent.iloc[0]:.2f}" in fig.data[-1].name


def test_power_law_check_accepts_a_planted_power_law_and_rejects_a_step():
    rng = np.random.default_rng(3)
    lengths = np.repeat([8, 12, 16, 24], 8)
    power = pd.DataFrame({"L": lengths, "drop_step": 10 * lengths ** 1.5 * np.exp(rng.normal(0, 0.1, len(lengths))),
                          "final_step": 2000.0})
    assert power_law_check(power, "L").p_value.iloc[0] > 0.05
    steps = np.where(lengths >= 16, 900.0, 100.0) * np.exp(rng.normal(0, 0.1, len(lengths)))  # a jump, not a law
    jump = power.assign(drop_step=steps)
    check = power_law_check(jump, "L").iloc[0]
    assert check.p_value < 1e-3 and check.dof == 2 and abs(np.log(check.worst_median_ratio)) > 0.3


def _two_variable_family(seed: int = 0, runs: int = 6, limit: float = 200.0, noise: str = "lognormal") -> pd.DataFrame:
    """Drop steps with median 30 L^0.5 d^-0.3 over L in 4..32 and d in 16..64, `runs` per setting,
    times log-normal noise (sd 0.2 in log) or Weibull noise (shape 5); those above `limit`
    censored there."""
    rng = np.random.default_rng(seed)
    grid = pd.MultiIndex.from_product([[4, 8, 16, 32], [16, 32, 64]], names=["data.length", "model.d_model"])
    family = grid.repeat(runs).to_frame(index=False)
    spread = (rng.lognormal(0, 0.2, len(family)) if noise == "lognormal"
              else (rng.exponential(size=len(family)) / math.log(2)) ** 0.2)
    t = 30 * family["data.length"] ** 0.5 * family["model.d_model"] ** -0.3 * spread
    return family.assign(drop_step=np.where(t < limit, t, NAN), final_step=limit)


@pytest.mark.parametrize("model", ["weibull", "lognormal"])
def test_joint_fit_recovers_both_planted_exponents_under_censoring(model):
    family = _two_variable_family(seed=1, limit=50.0, noise=model)  # seeds 0-7: 30 of 32 intervals cover the truth
    fits = scaling_exponents(family, ["data.length", "model.d_model"], model).set_index("variable")
    assert fits.censored.iloc[0] > 5 and (fits.fit == "ok").all()
    for variable, planted in (("data.length", 0.5), ("model.d_model", -0.3)):
        assert fits.ci_low[variable] < planted < fits.ci_high[variable]
    assert fits.ci_high["model.d_model"] < 0 < fits.ci_low["data.length"]
    fig = plot_scaling(family, ["data.length", "model.d_model"], fits.reset_index())
    assert len([t for t in fig.data if t.mode == "lines"]) == 3  # the joint law at each width
    assert f"data.length^{fits.exponent['data.length']:.2f}" in fig.layout.title.text
    assert f"model.d_model^{fits.exponent['model.d_model']:.2f}" in fig.layout.title.text
    one = scaling_exponent(family[family["model.d_model"] == 32], "data.length", model).iloc[0]
    assert one.fit == "ok" and one.ci_low < 0.5 < one.ci_high  # the one-variable API, with its fit column


def test_scaling_command_with_two_levels_says_the_check_needs_three(tmp_path, capsys, no_png):
    from mechlrmc.cli import main

    family = _two_variable_family(runs=3)
    family = family[family["data.length"].isin([4, 8]) & (family["model.d_model"] == 32)]
    (tmp_path / "fam").mkdir()
    family.to_csv(tmp_path / "fam" / "family_summary.csv", index=False)  # a shipped table, no runs
    out = tmp_path / "out"
    assert main(["analyze", "scaling", str(tmp_path / "fam"), "--by", "data.length", "-o", str(out),
                 "--power-reps", "20"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("power-law check for data.length: needs three levels, the family has 2") == 1
    assert {"scaling.csv", "median_drop.csv", "logrank.csv", "power_law.csv"} <= {p.name for p in out.iterdir()}
    assert len(pd.read_csv(out / "scaling.csv")) == 2
    assert pd.read_csv(out / "power_law.csv").p_value.isna().all()


def test_a_penalised_or_unconverged_fit_is_named_in_the_row(monkeypatch):
    """The fallback and lifelines' warnings reach the `fit` column. Runs that drop almost together
    make the unpenalised fit fail only now and then (it depends on the optimiser's path), so the
    failure is planted in the fitter: unpenalised it does not converge; another warns."""
    import warnings

    import lifelines
    from lifelines.exceptions import ConvergenceError, ConvergenceWarning

    class Stiff(lifelines.WeibullAFTFitter):
        def fit(self, *args, **kwargs):
            if not self.penalizer:
                raise ConvergenceError("the Weibull shape runs off")
            return super().fit(*args, **kwargs)

    class Warned(lifelines.LogNormalAFTFitter):
        def fit(self, *args, **kwargs):
            warnings.warn("Newton-Raphson did not converge", ConvergenceWarning)
            return super().fit(*args, **kwargs)

    monkeypatch.setattr(lifelines, "WeibullAFTFitter", Stiff)
    monkeypatch.setattr(lifelines, "LogNormalAFTFitter", Warned)
    family = _power_law_family()
    penalised = scaling_exponent(family, "length", "weibull").iloc[0]
    assert penalised.fit == "penalised (0.001)" and penalised.ci_low < 1.5 < penalised.ci_high
    assert scaling_exponent(family, "length", "lognormal").fit.iloc[0] == "not converged"
    check = power_law_check(family, "length", "lognormal").iloc[0]
    assert check.fit == "power law: not converged; free levels: not converged"


def test_a_setting_where_no_run_drops_is_flagged_and_fitted_censored(tmp_path, capsys, no_png):
    from mechlrmc.cli import main

    family = _two_variable_family(runs=3)
    never = (family["data.length"] == 32) & (family["model.d_model"] == 16)
    family.loc[never, "drop_step"] = NAN  # censored at the limit, 200
    medians = median_drop(family, ["data.length", "model.d_model"])
    assert medians.none_dropped.tolist() == [False] * 9 + [True, False, False]
    (tmp_path / "fam").mkdir()
    family.to_csv(tmp_path / "fam" / "family_summary.csv", index=False)
    assert main(["analyze", "scaling", str(tmp_path / "fam"), "--by", "data.length", "model.d_model",
                 "-o", str(tmp_path / "out"), "--power-reps", "20"]) == 0
    assert "no run dropped at data.length=32, model.d_model=16" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "out" / "median_drop.csv").none_dropped.sum() == 1
    fits = pd.read_csv(tmp_path / "out" / "scaling.csv")  # both models fitted, the three runs censored
    assert len(fits) == 4 and (fits.censored == 3).all() and (fits.n == 36).all() and (fits.fit == "ok").all()


def test_fast_likelihood_ratio_is_lifelines_and_the_power_simulation_separates_law_from_break():
    from analyses.family.scaling_power import _designs, max_loglik, power_law_power
    from analyses.family.survival import power_law_checks, run_durations

    family = _two_variable_family(limit=40.0)
    variables = ["data.length", "model.d_model"]
    runs = run_durations(family)
    y, dropped = np.log(runs.duration.to_numpy())[None], runs.dropped.to_numpy()[None]
    for model in ("weibull", "lognormal"):
        checks = power_law_checks(family, variables, model).set_index("variable")
        for variable in variables:
            power, free = _designs(runs, variables, variable)
            statistic = 2 * (max_loglik(y, dropped, free, model) - max_loglik(y, dropped, power, model))[0]
            assert statistic == pytest.approx(checks.lr_statistic[variable], rel=1e-3, abs=1e-4)

    design = pd.DataFrame({"L": np.repeat([4, 8, 16, 32], 12)})  # 6 per level: 7-11 %, chi-squared is optimistic
    law = pd.DataFrame({"variable": ["L"], "model": ["lognormal"], "exponent": [0.5], "prefactor": [30.0],
                        "sigma": [0.2]})
    true = power_law_power(design, "L", law, limit=250, reps=400, seed=1)
    broken = power_law_power(design, "L", law, limit=250, bump=1.3, reps=400, seed=1)
    assert true["change"] == "none" and 0.01 < true["rejected"] < 0.1  # alpha = 0.05, loosely
    assert broken["change"] == "median x1.3 at L=16" and broken["rejected"] > 0.6
    assert 0 < true["censored"] < 0.1
