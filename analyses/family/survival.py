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
- `scaling_exponents(summary, variables)`: the exponents of  drop time ~ x1^a1 * x2^a2 ...  fitted
  jointly (a Weibull or log-normal accelerated-failure-time fit on log(x1), log(x2), ..., censored
  runs as censored), with how the fit was obtained; `scaling_exponent(summary, variable)` for one.
- `power_law_checks(summary, variables)`: does the power law fit, against one free level per value
  of each variable in turn (a likelihood-ratio test)? `power_law_check(summary, variable)` for one.
  What the check could have seen on a family of this size is `analyses.family.scaling_power`.
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
    its 95 % CI `ci_low`, `ci_high` (where the confidence band crosses 0.5), `median_reached` and
    `none_dropped` (not one run of the setting dropped: all it says is that the plateau outlasts
    the last step). When fewer than half the runs dropped before the censoring the median is not
    reached: `median_step` is inf (it lies beyond the last step seen), and so is an unbounded `ci_high`."""
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
                     "median_reached": math.isfinite(median), "none_dropped": not runs.dropped.any()})
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

# lifelines class and the parameter whose log is linear in the covariates, per model
FITTERS = {"weibull": ("WeibullAFTFitter", "lambda_"), "lognormal": ("LogNormalAFTFitter", "mu_")}
PENALIZER = 1e-3  # tried when an unpenalised fit does not converge (runs that drop almost together: a Weibull shape -> inf)


def _fitter_class(model: str):
    import lifelines

    if model not in FITTERS:
        raise ValueError(f"model={model!r}: allowed {list(MODELS)}")
    return getattr(lifelines, FITTERS[model][0])


def _covariate(variable: str) -> str:
    return f"log_{variable}"


def _log_design(summary: pd.DataFrame, variables: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The placed runs and their covariates log(variable), one column `log_<variable>` each, with
    every reason a power law in `variables` cannot be fitted named as a ValueError."""
    if not variables or len(set(variables)) < len(variables):
        raise ValueError(f"variables={variables}: allowed one or more distinct columns of the summary")
    runs = run_durations(summary)
    logs = {}
    for variable in variables:
        if variable not in summary.columns:
            raise ValueError(f"variable {variable!r} is not a column of the summary: allowed {list(summary.columns)}")
        values = pd.to_numeric(runs[variable], errors="coerce")
        if values.isna().any() or (values <= 0).any():
            raise ValueError(f"{variable} must be positive for a power law: got {sorted(set(runs[variable]))}")
        if values.nunique() < 2:
            raise ValueError(f"{variable} has {values.nunique()} distinct value(s) {sorted(set(values))}: "
                             f"a scaling exponent needs at least two")
        logs[_covariate(variable)] = np.log(values.to_numpy(float))
    logs = pd.DataFrame(logs)
    if np.linalg.matrix_rank(np.column_stack([np.ones(len(runs)), logs])) <= len(variables):
        raise ValueError(f"{variables} vary together in this family (one is a power of the others): "
                         f"their exponents cannot be told apart")
    if not runs.dropped.any():
        raise ValueError("no run dropped: every run is censored, the drop time cannot be fitted")
    if (runs.duration <= 0).any():
        raise ValueError("a drop or final step is <= 0: AFT fits need positive times")
    return runs, logs


def _fit_data(runs: pd.DataFrame, covariates: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """The lifelines frame (duration in units of the median duration, so that the fit converges;
    slopes are unchanged) and that unit."""
    scale = float(runs.duration.median())
    data = pd.DataFrame({"duration": runs.duration.to_numpy(float) / scale, "dropped": runs.dropped.to_numpy()})
    return pd.concat([data, covariates.reset_index(drop=True)], axis=1), scale


def scaling_exponents(summary: pd.DataFrame, variables: str | list[str], model: str = "weibull") -> pd.DataFrame:
    """The plateau's scaling exponents: drop time ~ prefactor * x1^a1 * x2^a2 ... for the columns
    `variables`, fitted jointly: one accelerated-failure-time fit (lifelines' Weibull or log-normal
    AFT) of the drop step on log(x1), log(x2), ..., in which a run that did not drop is censored at
    its final step (a setting where no run drops stays in the fit, censored). The coefficient on
    log(xj) is aj: the exponent of xj at fixed values of the others.

    One row per variable: `variable`, `model`, `exponent`, its 95 % CI `ci_low`, `ci_high`,
    `p_value` (of aj = 0: no dependence), `n`, `censored`, `prefactor` (the fitted median drop step
    at every variable = 1), `sigma` (the spread of log drop times: the log-normal's sd, the
    Weibull's 1/shape), `aic` (compare the two models on it; shared by the rows of one fit) and
    `fit`: "ok", or what is wrong with it (`_fit`): "penalised (0.001)" where the unpenalised fit
    did not converge and the fallback was used, "not converged" where lifelines warned about the
    fit it returned or its standard errors are not finite (its intervals are not to be trusted),
    "not identified by the drops" where the runs that dropped do not fix every exponent (a setting
    where no run dropped at the end of a variable's two levels: the exponent is only bounded).
    Standard errors are the robust (sandwich) ones: the noise law of plateau lengths is an
    assumption, and the model-based interval is too narrow when it is wrong."""
    variables = _by_list(variables)
    fitter_class = _fitter_class(model)
    runs, logs = _log_design(summary, variables)
    data, scale = _fit_data(runs, logs)
    fitter, fit = _fit(fitter_class, data, robust=True)
    fit = _identified(fit, logs, runs.dropped.to_numpy())
    location = FITTERS[model][1]
    prefactor = scale * float(fitter.predict_median(pd.DataFrame(0.0, index=[0], columns=logs.columns)).iloc[0])
    shape = float(fitter.params_[("sigma_" if model == "lognormal" else "rho_", "Intercept")])  # log sigma, log shape
    sigma = math.exp(shape if model == "lognormal" else -shape)
    rows = []
    for variable in variables:
        row = fitter.summary.loc[(location, _covariate(variable))]
        rows.append({"variable": variable, "model": model, "exponent": float(row["coef"]),
                     "ci_low": float(row["coef lower 95%"]), "ci_high": float(row["coef upper 95%"]),
                     "p_value": float(row["p"]), "n": len(runs), "censored": int((~runs.dropped).sum()),
                     "prefactor": prefactor, "sigma": sigma, "aic": float(fitter.AIC_), "fit": fit})
    return pd.DataFrame(rows)


def scaling_exponent(summary: pd.DataFrame, variable: str, model: str = "weibull") -> pd.DataFrame:
    """The plateau's scaling exponent a in  drop time ~ `variable`^a: `scaling_exponents` with one
    variable (its one row: exponent, CI, p_value, n, censored, prefactor, sigma, aic, fit)."""
    return scaling_exponents(summary, [variable], model)


def _fit(fitter_class, data: pd.DataFrame, **kwargs):
    """An AFT fit of `data` (duration, dropped, covariates) and how it was obtained: "ok"; where
    the fit does not converge, the same fit with a small L2 penalizer on the coefficients
    (`PENALIZER`), "penalised (0.001)"; "not converged" added where lifelines warned about the fit
    it returned (ConvergenceWarning, a Hessian it could not invert, negative variances) or its
    standard errors are not finite; a one-line ValueError when neither fit converges. Other
    warnings pass through."""
    import warnings

    from lifelines.exceptions import ApproximationWarning, ConvergenceError, ConvergenceWarning, StatisticalWarning

    doubtful = (ConvergenceWarning, ApproximationWarning, StatisticalWarning)
    for penalizer in (0.0, PENALIZER):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fitter = fitter_class(penalizer=penalizer).fit(data, "duration", "dropped", **kwargs)
            except ConvergenceError:
                continue
        for w in caught:
            if not issubclass(w.category, doubtful):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        doubts = any(issubclass(w.category, doubtful) for w in caught) or not np.isfinite(fitter.standard_errors_).all()
        return fitter, _flags(f"penalised ({penalizer:g})" if penalizer else "", "not converged" if doubts else "")
    raise ValueError(f"the {fitter_class.__name__} fit does not converge on these drop times (even with "
                     f"penalizer {PENALIZER}): try the other model")


def _flags(*flags: str) -> str:
    """A fit's label: "ok", or what is wrong with it, comma-separated."""
    return ", ".join(f for f in flags if f and f != "ok") or "ok"


def _identified(fit: str, covariates: pd.DataFrame, dropped: np.ndarray) -> str:
    """`fit`, with "not identified by the drops" where the runs that dropped do not span the
    covariates: the likelihood then rises without end as a setting with no drop moves away."""
    spanned = np.column_stack([np.ones(int(dropped.sum())), covariates.to_numpy(float)[dropped]])
    return _flags(fit, "not identified by the drops" if np.linalg.matrix_rank(spanned) <= covariates.shape[1] else "")


def _fit_label(power: str, free: str) -> str:
    return "ok" if power == free == "ok" else f"power law: {power}; free levels: {free}"


def power_law_checks(summary: pd.DataFrame, variables: str | list[str], model: str = "lognormal") -> pd.DataFrame:
    """Does a power law fit? For each of `variables`, a likelihood-ratio test of the joint AFT fit
    on log(x1), log(x2), ... (`scaling_exponents`: one slope per variable, the power law) against
    the same model with one free level per value of that variable (any shape), the other variables
    still log-linear; censored runs as censored.

    One row per variable: `variable`, `model`, `levels`, `loglik_power`, `loglik_free`,
    `lr_statistic`, `dof` (levels - 2), `p_value` (small: the power law is rejected), the largest
    ratio between a setting's Kaplan-Meier median and the power law's fitted median over the
    settings of all `variables`, `worst_median_ratio`, `fit` ("ok", else how each of the two fits
    was obtained, as in `scaling_exponents`) and `note`. A power law with two parameters fits any
    two levels: a variable with fewer than three gets NaN statistics and the note saying so."""
    from scipy.stats import chi2

    variables = _by_list(variables)
    fitter_class = _fitter_class(model)
    runs, logs = _log_design(summary, variables)
    data, scale = _fit_data(runs, logs)
    power, power_fit = _fit(fitter_class, data)
    power_fit = _identified(power_fit, logs, runs.dropped.to_numpy())
    medians = median_drop(summary, variables)
    settings = pd.DataFrame({_covariate(v): np.log(medians[v].astype(float)) for v in variables})
    ratio = medians.median_step.to_numpy(float) / (scale * power.predict_median(settings).to_numpy())
    ratio = ratio[np.isfinite(ratio)]
    worst = float(ratio[np.argmax(np.abs(np.log(ratio)))]) if len(ratio) else math.nan
    rows = []
    for variable in variables:
        values = np.exp(logs[_covariate(variable)].to_numpy())
        levels = np.unique(values)
        row = {"variable": variable, "model": model, "levels": len(levels),
               "loglik_power": float(power.log_likelihood_), "loglik_free": math.nan, "lr_statistic": math.nan,
               "dof": len(levels) - 2, "p_value": math.nan, "worst_median_ratio": worst, "fit": power_fit, "note": ""}
        if len(levels) < 3:
            rows.append({**row, "note": f"power-law check for {variable}: needs three levels, the family has "
                                        f"{len(levels)}"})
            continue
        free = data.drop(columns=_covariate(variable))
        for level in levels[1:]:
            free[f"is_{variable}={level:g}"] = (values == level).astype(float)
        try:
            free_fit, free_label = _fit(fitter_class, free)
            free_label = _identified(free_label, free.drop(columns=["duration", "dropped"]), runs.dropped.to_numpy())
        except ValueError as e:
            rows.append({**row, "note": f"power-law check for {variable}: the free-level fit failed ({e})"})
            continue
        statistic = max(0.0, 2 * (free_fit.log_likelihood_ - power.log_likelihood_))
        rows.append({**row, "loglik_free": float(free_fit.log_likelihood_), "lr_statistic": statistic,
                     "p_value": float(chi2.sf(statistic, len(levels) - 2)), "fit": _fit_label(power_fit, free_label)})
    return pd.DataFrame(rows)


def power_law_check(summary: pd.DataFrame, variable: str, model: str = "lognormal") -> pd.DataFrame:
    """Does a power law in `variable` fit? `power_law_checks` with one variable (its one row)."""
    return power_law_checks(summary, [variable], model)


def k_of_n(summary: pd.DataFrame) -> str:
    """How many runs dropped, of those placed, and how many are censored (no drop by their last
    step): "4 of 5 dropped, 1 censored"."""
    runs = run_durations(summary)
    return f"{int(runs.dropped.sum())} of {len(runs)} dropped, {int((~runs.dropped).sum())} censored"
