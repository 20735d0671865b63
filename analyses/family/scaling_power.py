"""What the power-law check could have seen: the rejection rate of `power_law_checks` on planted
families of the same size as a given one (the same runs, hence the same levels and runs per
setting, the same step limit), drawn once from a true power law (the rate should be about alpha)
and once from power laws broken by a stated amount (the rate is the check's power against that
break). A verdict "no evidence against the power law" means little where the power is low.

- `power_law_power(design, variable, fit, limit, bump=..., kink=...)`: one planted scenario.
- `power_law_power_table(summary, variables, fits)`: the true law, a bump and a kink, per variable
  and model, for a family (what `mechlrmc analyze scaling` writes as power_law_power.csv).
- `max_loglik(y, dropped, X, model)`: the maximised censored log-likelihood of the AFT model,
  vectorised over planted families (Newton steps on all of them at once): lifelines' fit takes
  about a second per check, this takes milliseconds per thousand. It is the likelihood lifelines
  maximises, up to terms that cancel in the likelihood ratio (tests/test_survival.py checks that the
  ratio equals `power_law_check`'s).

Planted drop times are continuous; a family's are read on its evaluation grid (every 10 steps in
mws_length), which adds a little noise the planted families do not have.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.special import log_ndtr
from scipy.stats import binomtest, chi2

from analyses.family.survival import run_durations

_LOG_2PI = math.log(2 * math.pi)
POWER_COLUMNS = ["variable", "model", "change", "reps", "rejected", "ci_low", "ci_high", "censored"]


def _terms(z: np.ndarray, dropped: np.ndarray, model: str):
    """Each run's log-likelihood in z = (log t - X beta) / sigma (a drop: the log density, less
    log sigma; a censored run: the log survival) and its first two derivatives in z; the noise is
    standard normal (lognormal AFT) or standard minimum-Gumbel (Weibull AFT: log of an Exp(1))."""
    if model == "lognormal":
        tail = log_ndtr(-z)
        mills = np.exp(-0.5 * z ** 2 - 0.5 * _LOG_2PI - tail)  # density / survival
        return (np.where(dropped, -0.5 * z ** 2 - 0.5 * _LOG_2PI, tail), np.where(dropped, -z, -mills),
                np.where(dropped, -1.0, -mills * (mills - z)))
    ez = np.exp(np.minimum(z, 300.0))
    return np.where(dropped, z - ez, -ez), np.where(dropped, 1 - ez, -ez), -ez


def _loglik(theta: np.ndarray, y: np.ndarray, dropped: np.ndarray, X: np.ndarray, model: str):
    sigma = np.exp(theta[:, -1:])  # [reps, 1]
    z = (y - theta[:, :-1] @ X.T) / sigma  # [reps, n]
    g, g1, g2 = _terms(z, dropped, model)
    return g.sum(1) - theta[:, -1] * dropped.sum(1), z, g1, g2, sigma


def max_loglik(y: np.ndarray, dropped: np.ndarray, X: np.ndarray, model: str, iters: int = 100) -> np.ndarray:
    """The maximum over (beta, log sigma) of the censored log-likelihood of  y = X beta + sigma * e
    for each of `reps` families: y [reps, n] the log durations, dropped [reps, n] (False: censored
    at that y), X [n, p] the design shared by all, e as in the AFT `model`. Returns [reps].
    Newton steps with backtracking on all families still improving at once (a family is done when
    a step gains less than 1e-10); where a level has no drop the likelihood's supremum is
    approached (its coefficient runs off), as lifelines' fit does."""
    beta = np.linalg.lstsq(X, y.T, rcond=None)[0].T  # [reps, p]: start from least squares, censoring ignored
    spread = (y - beta @ X.T).std(1)
    theta = np.column_stack([beta, np.log(np.maximum(spread, 1e-3))])
    best = _loglik(theta, y, dropped, X, model)[0]
    active, p = np.arange(len(y)), X.shape[1]
    for _ in range(iters):
        start, ys, ds = theta[active], y[active], dropped[active]
        ll, z, g1, g2, sigma = _loglik(start, ys, ds, X, model)
        grad = np.column_stack([-(g1 @ X) / sigma, -ds.sum(1) - (g1 * z).sum(1)])  # [active, p + 1]
        hess = np.empty((len(active), p + 1, p + 1))
        hess[:, :p, :p] = np.einsum("rn,np,nq->rpq", g2, X, X) / sigma[:, :, None] ** 2
        hess[:, :p, p] = hess[:, p, :p] = ((g2 * z + g1) @ X) / sigma
        hess[:, p, p] = (g2 * z ** 2 + g1 * z).sum(1)
        try:
            step = -np.linalg.solve(hess, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # a coefficient running off: a singular Hessian
            step = -np.einsum("rij,rj->ri", np.linalg.pinv(hess), grad)
        uphill = (step * grad).sum(1) > 0
        step[~uphill] = grad[~uphill]  # not a maximum's Hessian here: a gradient step
        rate, waiting = 1.0, np.arange(len(active))
        for _ in range(40):  # halve the step of the families it did not improve
            trial = start[waiting] + rate * step[waiting]
            gain = _loglik(trial, ys[waiting], ds[waiting], X, model)[0]
            ok = gain >= ll[waiting]
            theta[active[waiting[ok]]], best[active[waiting[ok]]] = trial[ok], gain[ok]
            waiting, rate = waiting[~ok], rate / 2
            if not len(waiting):
                break
        active = active[best[active] - ll > 1e-10]
        if not len(active):
            break
    return best


def _designs(design: pd.DataFrame, variables: list[str], variable: str) -> tuple[np.ndarray, np.ndarray]:
    """The power law's design (1, log x1, log x2, ...) and the free-level one (1, one indicator per
    level of `variable` but the first, log of the others), as `power_law_checks` fits them."""
    logs = np.log(design[variables].to_numpy(float))
    ones = np.ones((len(design), 1))
    values = design[variable].to_numpy(float)
    levels = np.unique(values)
    indicators = (values[:, None] == levels[None, 1:]).astype(float)
    others = logs[:, [v != variable for v in variables]]
    return np.hstack([ones, logs]), np.hstack([ones, indicators, others])


def power_law_power(design: pd.DataFrame, variable: str, fit: pd.DataFrame, limit: float, bump: float = 1.0,
                    kink: float = 0.0, reps: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """The rejection rate of the power-law check for `variable` on `reps` planted families.

    `design`: one row per run with the variables' values (a family's own runs: the same levels,
    the same runs per setting); `fit`: the `scaling_exponents` rows of one model (its `exponent`
    per variable, `prefactor`, `sigma`, `model`). A planted run's median drop step is the fit's
    power law, prefactor * x1^a1 * x2^a2 ..., broken where asked: times `bump` at the middle level
    of `variable` (the upper of two), and with the exponent of `variable` changed by `kink` above
    the geometric middle of its range. Its drop step is that median times the model's noise
    (log-normal with the fitted sigma; Weibull with shape 1/sigma), censored at `limit`.

    Returns `variable`, `model`, `change` (what broke the law; "none" for the true law), `reps`,
    `rejected` (the share of families whose check gives p < alpha), its 95 % interval `ci_low`,
    `ci_high` (Clopper-Pearson), `censored` (the mean share of planted runs censored)."""
    fit = fit.set_index("variable")
    variables = list(fit.index)
    model = fit.model.iloc[0]
    if variable not in variables:
        raise ValueError(f"variable {variable!r} has no exponent in the fit: allowed {variables}")
    values = design[variable].to_numpy(float)
    levels = np.unique(values)
    if len(levels) < 3:
        raise ValueError(f"power-law check for {variable}: needs three levels, the family has {len(levels)}")
    log_median = math.log(fit.prefactor.iloc[0]) + np.log(design[variables].to_numpy(float)) @ fit.exponent.to_numpy()
    middle, centre = levels[len(levels) // 2], math.sqrt(levels[0] * levels[-1])
    log_median = log_median + math.log(bump) * (values == middle) + kink * np.maximum(0, np.log(values / centre))
    sigma = float(fit.sigma.iloc[0])
    rng = np.random.default_rng(seed)
    if model == "lognormal":
        log_t = log_median + sigma * rng.standard_normal((reps, len(design)))
    else:  # t = lambda * E^sigma, E ~ Exp(1), whose median is lambda * ln(2)^sigma
        log_t = log_median - sigma * math.log(math.log(2)) + sigma * np.log(rng.exponential(size=(reps, len(design))))
    dropped = log_t <= math.log(limit)
    log_t = np.minimum(log_t, math.log(limit))
    power_design, free_design = _designs(design, variables, variable)
    statistic = 2 * (max_loglik(log_t, dropped, free_design, model) - max_loglik(log_t, dropped, power_design, model))
    rejected = int((chi2.sf(np.maximum(statistic, 0), len(levels) - 2) < alpha).sum())
    changes = []
    if bump != 1:
        changes.append(f"median x{bump:g} at {variable}={middle:g}")
    if kink:
        changes.append(f"exponent {kink:+g} above {variable}={centre:.3g}")
    ci = binomtest(rejected, reps).proportion_ci()
    return {"variable": variable, "model": model, "change": "; ".join(changes) or "none", "reps": reps,
            "rejected": rejected / reps, "ci_low": ci.low, "ci_high": ci.high, "censored": float(1 - dropped.mean())}


def power_law_power_table(summary: pd.DataFrame, variables: list[str], fits: pd.DataFrame, bump: float = 1.3,
                          kink: float = 0.5, reps: int = 1000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """What the power-law check could have seen on this family: `power_law_power` for each model
    in `fits` (`scaling_exponents` rows) and each variable with three levels or more, once for the
    true power law, once with a setting's median times `bump`, once with the exponent changed by
    `kink` halfway (log scale) along the variable's range. The planted families have the family's
    runs, its fitted exponents and sigma, and its step limit: the last step any run reached (the
    limit itself where a run is censored; where runs stop at their drop and none is censored, a
    lower bound on it: the planted families are censored at least as often as the family could
    have been)."""
    runs = run_durations(summary)
    limit = float(np.fmax(runs.final_step.to_numpy(float), runs.duration.to_numpy(float)).max())
    rows = []
    for _, fit in fits.groupby("model", sort=False):
        for variable in variables:
            if runs[variable].nunique() < 3:
                continue
            for change in ({}, {"bump": bump}, {"kink": kink}):
                rows.append(power_law_power(runs, variable, fit, limit, **change, reps=reps, alpha=alpha, seed=seed))
    return pd.DataFrame(rows, columns=POWER_COLUMNS)
