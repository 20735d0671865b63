"""Init or data: how much of the spread of drop steps each factor of a crossed family explains.

A crossed family trains every init seed (`train.seed`: the weights) with every data seed
(`train.data_seed`: the batches' stream), as `sweeps/mws_init_data.yaml` does. The log of each
run's drop step is modelled with one random intercept per level of each factor:

    log drop = mu + a[init] + b[data] + e,    a ~ N(0, s_a^2),  b ~ N(0, s_b^2),  e ~ N(0, s_e^2)

fitted by REML (statsmodels `MixedLM`, crossed variance components). A factor's share is its
variance over the total, s_a^2 / (s_a^2 + s_b^2 + s_e^2); the residual holds what neither factor
explains (with one run per cell, their interaction too). The intervals are a parametric
bootstrap: families drawn from the fitted model, each refitted.

`MixedLM` knows no censoring: every run must have dropped. A family with a run that did not is
refused, with the runs named; train it with a later step limit (`steps:` of the sweep).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from mechlrmc.errors import OptionError

REPS = 300  # bootstrap families behind each interval
MODEL = "MixedLM (REML), crossed random intercepts on log drop step"


def _design(summary: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """The runs as (y = log drop step, f0, f1, ...), after checking that every run dropped."""
    if len(factors) < 1:
        raise OptionError("factors is empty: allowed one or more varied keys, e.g. train.seed train.data_seed")
    missing = [f for f in factors if f not in summary.columns]
    if missing:
        raise OptionError(f"factor(s) {missing} are not columns of the summary: allowed "
                          f"{[c for c in summary.columns if '.' in c]}")
    if "drop_step" not in summary:
        raise OptionError("the summary has no drop_step column: allowed a family_summary table")
    censored = summary[summary.drop_step.isna()]
    if len(censored):
        names = ", ".join(map(str, censored.get("run", censored.index)))
        raise OptionError(f"{len(censored)} of {len(summary)} runs did not drop ({names}): the random-effects "
                          f"model knows no censoring; train them to a later step limit")
    for f in factors:
        if summary[f].nunique() < 2:
            raise OptionError(f"factor {f} has one level ({summary[f].iloc[0]}): allowed factors with >= 2 levels")
    data = pd.DataFrame({"y": np.log(summary.drop_step.to_numpy(float))})
    for i, f in enumerate(factors):
        data[f"f{i}"] = summary[f].astype(str).to_numpy()
    return data


def _fit(data: pd.DataFrame, n_factors: int) -> tuple[np.ndarray, float, float, bool]:
    """REML variance components: (one per factor, in order), the residual variance, the mean, converged."""
    from statsmodels.regression.mixed_linear_model import MixedLM

    vc = {f"f{i}": f"0 + C(f{i})" for i in range(n_factors)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boundary fits (a component at 0) warn; they are reported as 0
        model = MixedLM.from_formula("y ~ 1", groups=np.ones(len(data)), re_formula="0", vc_formula=vc, data=data)
        result = model.fit(reml=True, method=["powell", "lbfgs"])  # the gradient methods stall on these small designs
    names = model.exog_vc.names  # statsmodels orders the components by name
    components = np.array([max(0.0, float(result.vcomp[names.index(f"f{i}")])) for i in range(n_factors)])
    return components, float(result.scale), float(result.fe_params.iloc[0]), bool(result.converged)


def drop_variance(summary: pd.DataFrame, factors: list[str], reps: int = REPS, seed: int = 0) -> pd.DataFrame:
    """The variance of the log drop step split between `factors` (columns of a `family_summary`,
    e.g. ["train.seed", "train.data_seed"]) and their residual.

    One row per factor and one `residual`: `factor`, `levels`, `variance` (of log drop step),
    `sd_ratio` (exp(sd): the typical multiplicative effect on the drop step), `share` (of the total;
    the shares sum to one), its 95 % parametric-bootstrap interval `ci_low`, `ci_high` (`reps`
    families drawn from the fit), and `model`, `runs`, `converged`."""
    data = _design(summary, list(factors))
    k = len(factors)
    components, residual, mean, converged = _fit(data, k)
    codes = [pd.factorize(data[f"f{i}"])[0] for i in range(k)]
    rng = np.random.default_rng(seed)
    shares = np.empty((reps, k + 1))
    for r in range(reps):
        y = mean + rng.normal(0, math.sqrt(residual), len(data))
        for i in range(k):
            y = y + rng.normal(0, math.sqrt(components[i]), codes[i].max() + 1)[codes[i]]
        boot_components, boot_residual, _, _ = _fit(data.assign(y=y), k)
        values = np.append(boot_components, boot_residual)
        shares[r] = values / values.sum()
    variances = np.append(components, residual)
    low, high = np.percentile(shares, [2.5, 97.5], axis=0)
    rows = []
    for i, name in enumerate([*factors, "residual"]):
        rows.append({"factor": name, "levels": int(data[f"f{i}"].nunique()) if i < k else len(data),
                     "variance": float(variances[i]), "sd_ratio": float(math.exp(math.sqrt(variances[i]))),
                     "share": float(variances[i] / variances.sum()), "ci_low": float(low[i]),
                     "ci_high": float(high[i]), "model": MODEL, "runs": len(data), "converged": converged})
    return pd.DataFrame(rows)


def variance_verdict(table: pd.DataFrame) -> str:
    """One sentence: which factor sets the drop step, with its share and interval."""
    parts = [f"{r.factor} {r.share:.0%} [{r.ci_low:.0%}, {r.ci_high:.0%}]" for r in table.itertuples()]
    top = table.sort_values("share", ascending=False).iloc[0]
    return (f"share of the variance of log drop step over {int(table.runs.iloc[0])} runs: {'; '.join(parts)} "
            f"(largest: {top.factor})")


def drop_grid(summary: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """The drop steps as a grid: rows the first factor's levels, columns the second's."""
    if len(factors) != 2:
        raise OptionError(f"a grid needs two factors, got {list(factors)}")
    return summary.pivot_table(index=factors[0], columns=factors[1], values="drop_step", aggfunc="mean")
