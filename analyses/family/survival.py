"""Survival analysis of the time to the drop: how long runs stay on the plateau, per setting of a
family (`family_summary`: one row per run, `drop_step` NaN where the run did not drop, `final_step`
its last evaluated step, and the grid columns that define a setting).

A run that has not dropped by its last step is *censored* at that step, not a miss: all we know is
that its plateau lasts longer than `final_step`. Counting it as "no drop" (or leaving it out)
biases the drop time down; the Kaplan-Meier curve and the accelerated-failure-time fits below use
it for exactly what it says. Runs with neither a `drop_step` nor a `final_step` (no evaluation)
carry no information and are left out.

- `drop_survival(summary, by)`: the Kaplan-Meier fraction of runs still on the plateau against the
  step, with its 95 % confidence band, per setting.
- `median_drop(summary, by)`: the median time to the drop and its 95 % CI per setting.
- `logrank(summary, by)`: do the settings' drop times differ (multivariate and pairwise log-rank)?
- `scaling_exponent(summary, variable)`: the exponent a in  drop time ~ variable^a  (a Weibull or
  log-normal accelerated-failure-time fit on log(variable), censored runs as censored).
- `power_law_check(summary, variable)`: does a power law fit, against one free level per setting
  (a likelihood-ratio test)?
- `k_of_n(summary)`: "k of N dropped, m censored".
- the figures, `plot_survival(table)` and `plot_scaling(summary, variable, fit)`, are in `analyses.family.figures`.

lifelines is imported inside the functions: it takes over a second to import.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

MODELS = ("weibull", "lognormal")
# Kaplan-Meier products such as 5/6 * 3/5 come out as 0.5000000000000001; rounded, a curve that
# sits exactly on 0.5 gives the median where it reaches 0.5 (lifelines: the first S(t) <= 0.5).
_DECIMALS = 12


# ----- durations ---------------------------------------------------------------------------------

def _by_list(by: str | list[str] | None) -> list[str]:
    return [] if by is None else [by] if isinstance(by, str) else list(by)


def run_durations(summary: pd.DataFrame) -> pd.DataFrame:
    """The runs that can be placed, with `duration` (the drop step, or the final step for a run
    that did not drop) and `dropped` (False: censored at `duration`)."""
    missing = {"drop_step", "final_step"} - set(summary.columns)
    if missing:
        raise ValueError(f"summary lacks column(s) {sorted(missing)}: allowed a family_summary table "
                         f"with drop_step (NaN: no drop) and final_step (the last evaluated step)")
    dropped = summary.drop_step.notna()
    duration = summary.drop_step.where(dropped, summary.final_step).astype(float)
    placed = duration.notna()
    return summary[placed].assign(duration=duration[placed], dropped=dropped[placed])


def _setting(values: tuple, keys: list[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values)) or "all"


def _settings(summary: pd.DataFrame, by: str | list[str] | None):
    """(setting label, {by column: value}, runs with duration/dropped) for each setting, in the
    order of the `by` values."""
    keys = _by_list(by)
    runs = run_durations(summary)
    if not keys:
        yield "all", {}, runs
        return
    missing = set(keys) - set(summary.columns)
    if missing:
        raise ValueError(f"by names column(s) {sorted(missing)} not in the summary: allowed {list(summary.columns)}")
    for values, group in runs.groupby(keys, sort=True, dropna=False):
        yield _setting(values, keys), dict(zip(keys, values)), group


def _kaplan_meier(runs: pd.DataFrame, label: str):
    from lifelines import KaplanMeierFitter

    return KaplanMeierFitter().fit(runs.duration, event_observed=runs.dropped, label=label)


# ----- Kaplan-Meier ----------------------------------------------------------------------------

def drop_survival(summary: pd.DataFrame, by: str | list[str] | None = None) -> pd.DataFrame:
    """The Kaplan-Meier estimate of the fraction of runs still on the plateau (not yet dropped)
    after each step, per setting (`by` columns; one setting "all" when None).

    One row per (setting, event step), starting with step 0 (survival 1): `setting`, the `by`
    columns, `step`, `at_risk` (runs still on the plateau just before the step), `dropped` (runs
    dropping at it), `censored` (runs whose last step it is, without a drop), `survival` and its
    pointwise 95 % confidence band `ci_low`, `ci_high` (lifelines' exponential Greenwood)."""
    frames = []
    for setting, values, runs in _settings(summary, by):
        if not len(runs):
            continue
        km = _kaplan_meier(runs, setting)
        events = km.event_table
        ci = km.confidence_interval_survival_function_
        frames.append(pd.DataFrame({
            "setting": setting, **values, "step": events.index.to_numpy(float),
            "at_risk": events.at_risk.to_numpy(int), "dropped": events.observed.to_numpy(int),
            "censored": events.censored.to_numpy(int),
            "survival": km.survival_function_.iloc[:, 0].reindex(events.index).round(_DECIMALS).to_numpy(),
            "ci_low": ci.iloc[:, 0].reindex(events.index).to_numpy(),
            "ci_high": ci.iloc[:, 1].reindex(events.index).to_numpy(),
        }))
    if not frames:
        raise ValueError("no run has a drop_step or a final_step: nothing to place on a survival curve")
    return pd.concat(frames, ignore_index=True)


def median_drop(summary: pd.DataFrame, by: str | list[str] | None = None) -> pd.DataFrame:
    """The median time to the drop per setting, from its Kaplan-Meier curve: the first step at
    which at most half the runs are still on the plateau.

    One row per setting: `setting`, the `by` columns, `n`, `dropped`, `censored`, `median_step`,
    its 95 % CI `ci_low`, `ci_high` (where the confidence band crosses 0.5), and `median_reached`.
    When fewer than half the runs dropped before the censoring the median is not reached:
    `median_step` is inf (it lies beyond the last step seen), and so is an unbounded `ci_high`."""
    from lifelines.utils import median_survival_times

    rows = []
    for setting, values, runs in _settings(summary, by):
        if not len(runs):
            continue
        km = _kaplan_meier(runs, setting)
        median = median_survival_times(km.survival_function_.round(_DECIMALS))
        ci = median_survival_times(km.confidence_interval_survival_function_.round(_DECIMALS))
        rows.append({"setting": setting, **values, "n": len(runs), "dropped": int(runs.dropped.sum()),
                     "censored": int((~runs.dropped).sum()), "median_step": float(median),
                     "ci_low": float(ci.iloc[0, 0]), "ci_high": float(ci.iloc[0, 1]),
                     "median_reached": math.isfinite(median)})
    return pd.DataFrame(rows)


def logrank(summary: pd.DataFrame, by: str | list[str]) -> pd.DataFrame:
    """Log-rank tests of whether the settings' drop-time distributions differ, censoring included.

    The first row is the multivariate test across all settings (`comparison` "all N settings"),
    then one row per pair of settings (`setting_a`, `setting_b`); columns `test_statistic`
    (chi-squared), `dof` and `p_value`. Pairwise p-values are not corrected for multiple tests."""
    from lifelines.statistics import multivariate_logrank_test, pairwise_logrank_test

    labelled = [runs.assign(setting=setting) for setting, _, runs in _settings(summary, by) if len(runs)]
    if len(labelled) < 2:
        raise ValueError(f"logrank needs at least two settings of {_by_list(by)}; the summary has {len(labelled)}")
    runs = pd.concat(labelled)
    order = [frame.setting.iloc[0] for frame in labelled]
    overall = multivariate_logrank_test(runs.duration, runs.setting, runs.dropped)
    rows = [{"comparison": f"all {len(order)} settings", "setting_a": None, "setting_b": None,
             "test_statistic": float(overall.test_statistic), "dof": int(overall.degrees_of_freedom),
             "p_value": float(overall.p_value)}]
    pairs = pairwise_logrank_test(runs.duration, runs.setting, runs.dropped).summary
    for (a, b), row in pairs.iterrows():
        a, b = sorted((a, b), key=order.index)
        rows.append({"comparison": f"{a} vs {b}", "setting_a": a, "setting_b": b,
                     "test_statistic": float(row.test_statistic), "dof": 1, "p_value": float(row.p)})
    return pd.DataFrame(rows)


# ----- scaling ---------------------------------------------------------------------------------

def scaling_exponent(summary: pd.DataFrame, variable: str, model: str = "weibull") -> pd.DataFrame:
    """The plateau's scaling exponent a in  drop time ~ `variable`^a: an accelerated-failure-time
    fit (lifelines' Weibull or log-normal AFT) of the drop step on log(`variable`), in which a run
    that did not drop is censored at its final step. The coefficient on log(variable) is a.

    One row: `variable`, `model`, `exponent`, its 95 % CI `ci_low`, `ci_high`, `p_value` (of a = 0:
    no dependence), `n`, `censored`, `prefactor` (the fitted median drop step at variable = 1, so
    the median is prefactor * variable^a) and `aic` (compare the two models on it). Standard errors
    are the robust (sandwich) ones: the noise law of plateau lengths is an assumption, and the
    model-based interval is too narrow when it is wrong."""
    from lifelines import LogNormalAFTFitter, WeibullAFTFitter

    fitters = {"weibull": (WeibullAFTFitter, "lambda_"), "lognormal": (LogNormalAFTFitter, "mu_")}
    if model not in fitters:
        raise ValueError(f"model={model!r}: allowed {list(MODELS)}")
    if variable not in summary.columns:
        raise ValueError(f"variable {variable!r} is not a column of the summary: allowed {list(summary.columns)}")
    runs = run_durations(summary)
    values = pd.to_numeric(runs[variable], errors="coerce")
    if values.isna().any() or (values <= 0).any():
        raise ValueError(f"{variable} must be positive for a power law: got {sorted(set(runs[variable]))}")
    if values.nunique() < 2:
        raise ValueError(f"{variable} has {values.nunique()} distinct value(s) {sorted(set(values))}: "
                         f"a scaling exponent needs at least two")
    if not runs.dropped.any():
        raise ValueError("no run dropped: every run is censored, the drop time cannot be fitted")
    if (runs.duration <= 0).any():
        raise ValueError("a drop or final step is <= 0: AFT fits need positive times")
    covariate = f"log_{variable}"
    scale = float(runs.duration.median())  # durations in units of their median: the fit converges (the slope is unchanged)
    data = pd.DataFrame({"duration": runs.duration / scale, "dropped": runs.dropped, covariate: np.log(values)})
    fitter_class, location = fitters[model]  # the parameter whose log is linear in the covariates
    fitter = _fit(fitter_class, data, robust=True)
    row = fitter.summary.loc[(location, covariate)]
    prefactor = scale * float(fitter.predict_median(pd.DataFrame({covariate: [0.0]})).iloc[0])
    return pd.DataFrame([{
        "variable": variable, "model": model, "exponent": float(row["coef"]),
        "ci_low": float(row["coef lower 95%"]), "ci_high": float(row["coef upper 95%"]),
        "p_value": float(row["p"]), "n": len(runs), "censored": int((~runs.dropped).sum()),
        "prefactor": prefactor, "aic": float(fitter.AIC_),
    }])


PENALIZER = 1e-3  # tried when an unpenalised fit does not converge (runs that drop almost together: a Weibull shape -> inf)


def _fit(fitter_class, data: pd.DataFrame, **kwargs):
    """An AFT fit of `data` (duration, dropped, covariates); where it does not converge, the same
    fit with a small L2 penalizer on the coefficients (`PENALIZER`); a one-line ValueError after that."""
    import warnings

    from lifelines.exceptions import ConvergenceError, ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for penalizer in (0.0, PENALIZER):
            try:
                return fitter_class(penalizer=penalizer).fit(data, "duration", "dropped", **kwargs)
            except ConvergenceError:
                continue
    raise ValueError(f"the {fitter_class.__name__} fit does not converge on these drop times (even with "
                     f"penalizer {PENALIZER}): try the other model")


def power_law_check(summary: pd.DataFrame, variable: str, model: str = "lognormal") -> pd.DataFrame:
    """Does a power law fit? A likelihood-ratio test of the AFT fit on log(`variable`) (one slope:
    the power law) against the same model with one free level per value of `variable` (any shape),
    censored runs as censored. One row: `loglik_power`, `loglik_free`, `lr_statistic`, `dof`
    (values - 2), `p_value` (small: the power law is rejected) and the largest ratio between a
    setting's Kaplan-Meier median and the power law's fitted median, `worst_median_ratio`."""
    from lifelines import LogNormalAFTFitter, WeibullAFTFitter
    from scipy.stats import chi2

    fitter_class = {"weibull": WeibullAFTFitter, "lognormal": LogNormalAFTFitter}[model]
    runs = run_durations(summary)
    values = pd.to_numeric(runs[variable])
    levels = sorted(values.unique())
    if len(levels) < 3:
        raise ValueError(f"{variable} has {len(levels)} distinct values: a power law with two parameters fits "
                         f"any two; the check needs at least three")
    scale = float(runs.duration.median())  # in units of the median, as `scaling_exponent` fits
    base = pd.DataFrame({"duration": runs.duration.to_numpy() / scale, "dropped": runs.dropped.to_numpy()})
    power = _fit(fitter_class, base.assign(log_x=np.log(values.to_numpy())))
    free = base.copy()
    for level in levels[1:]:
        free[f"is_{level:g}"] = (values.to_numpy() == level).astype(float)
    free_fit = _fit(fitter_class, free)
    statistic = max(0.0, 2 * (free_fit.log_likelihood_ - power.log_likelihood_))
    dof = len(levels) - 2
    medians = median_drop(summary, variable)
    fitted = scale * power.predict_median(pd.DataFrame({"log_x": np.log(medians[variable].astype(float))})).to_numpy()
    ratio = medians.median_step.to_numpy(float) / fitted
    ratio = ratio[np.isfinite(ratio)]
    worst = float(ratio[np.argmax(np.abs(np.log(ratio)))]) if len(ratio) else math.nan
    return pd.DataFrame([{"variable": variable, "model": model, "loglik_power": float(power.log_likelihood_),
                          "loglik_free": float(free_fit.log_likelihood_), "lr_statistic": statistic, "dof": dof,
                          "p_value": float(chi2.sf(statistic, dof)), "worst_median_ratio": worst}])


def k_of_n(summary: pd.DataFrame) -> str:
    """How many runs dropped, of those placed, and how many are censored (no drop by their last
    step): "4 of 5 dropped, 1 censored"."""
    runs = run_durations(summary)
    return f"{int(runs.dropped.sum())} of {len(runs)} dropped, {int((~runs.dropped).sum())} censored"
