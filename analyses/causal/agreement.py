"""How far the estimates of patching agree with exact patching (finding 6): the estimators (attribution, integrated gradients, joint integrated gradients) beside exact patching on every site, their Pearson and Spearman agreement per site, and where each holds or fails."""

from __future__ import annotations

import pandas as pd
import torch

from analyses.causal.attribution import attribution_sweep
from analyses.causal.patching import DEFAULT_SITES, corrupt, patching
from mechlrmc.anatomy import Anatomy
from mechlrmc.config import DataConfig
from mechlrmc.tasks.lrmc import Batch

ESTIMATORS = ("attribution", "integrated_gradients", "joint_integrated_gradients")  # columns of `compare_with_patching`


HOLDS_PEARSON = 0.9  # attribution_verdict: an estimate holds at Pearson >= this


FAILS_PEARSON = 0.5  # ... and fails below this


def compare_with_patching(model: torch.nn.Module, batch: Batch, data_cfg: DataConfig, corruption: str = "negate",
                          sites: dict[str, tuple[str, ...]] | None = None, seed: int = 0,
                          steps: int | None = None, anatomy: Anatomy | None = None,
                          metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Exact (batched) patching and attribution side by side: one row per patch and metric, with
    columns `exact` and `attribution`, and, if `steps` is given, `integrated_gradients` and
    `joint_integrated_gradients` (`steps` points each; for `metrics` only, default both recovery
    metrics: one backward each, the other NaN)."""
    from analyses.causal.integrated_gradients import integrated_gradients_sweep, joint_integrated_gradients_sweep

    keys = ["site", "granularity", "layer", "pos", "head"]
    sites = sites or DEFAULT_SITES
    corrupted = corrupt(batch, corruption, data_cfg, seed)
    frames = {"exact": patching(model, batch, data_cfg, corruption, sites, seed, anatomy=anatomy),
              "attribution": attribution_sweep(model, batch, corrupted, sites, anatomy=anatomy)}
    if steps is not None:
        frames["integrated_gradients"] = integrated_gradients_sweep(model, batch, corrupted, sites, steps,
                                                                    anatomy=anatomy, metrics=metrics)
        frames["joint_integrated_gradients"] = joint_integrated_gradients_sweep(model, batch, corrupted, sites, steps,
                                                                                anatomy=anatomy, metrics=metrics)
    long = [f.melt(id_vars=keys, value_vars=["recovery_mask", "recovery_obs"], var_name="metric", value_name=name)
            for name, f in frames.items()]
    out = long[0]
    for other in long[1:]:
        out = out.merge(other, on=[*keys, "metric"])
    return out.assign(corruption=corruption)


def attribution_agreement(frame: pd.DataFrame) -> pd.DataFrame:
    """Per estimator (each of ESTIMATORS that `frame` has a column of), (step,) site, granularity
    and metric: Pearson and Spearman correlation of the estimate with exact patching, the largest
    miss and the slope of the estimate on exact."""
    by = [c for c in ("step", "site", "granularity", "metric") if c in frame]

    def agree(part: pd.DataFrame) -> pd.Series:
        x, y = part.exact.to_numpy(), part.estimate.to_numpy()
        varied = len(part) > 2 and x.std() > 0 and y.std() > 0
        return pd.Series({
            "patches": len(part),
            "pearson": part.exact.corr(part.estimate) if varied else float("nan"),
            "spearman": part.exact.rank().corr(part.estimate.rank()) if varied else float("nan"),  # of ranks
            "max_abs_error": float(abs(y - x).max()),
            "slope": float((x * y).sum() / (x * x).sum()) if (x * x).sum() > 0 else float("nan"),
        })

    tables = [frame.rename(columns={name: "estimate"}).groupby(by, sort=False)[["exact", "estimate"]].apply(agree)
              .reset_index().assign(estimator=name) for name in ESTIMATORS if name in frame]
    out = pd.concat(tables, ignore_index=True)
    return out[["estimator", *out.columns[:-1]]]


def attribution_verdict(agreement: pd.DataFrame, moments: dict[str, int]) -> pd.DataFrame:
    """Where each estimate holds and where it fails (finding 6), per checkpoint: one row per
    (moment, step, estimator, site, granularity) of `attribution_agreement` at the steps of `moments`
    ({name: step}, in its order), with its `pearson` and a `verdict`: "holds" (pearson >=
    HOLDS_PEARSON), "fails" (< FAILS_PEARSON) or "partial". Rows without a Pearson correlation
    (a constant estimate or exact recovery) are left out. `estimator` and `metric` columns are kept
    if present."""
    keys = [c for c in ("estimator", "site", "granularity", "metric") if c in agreement]
    frames = [agreement[agreement.step == step].dropna(subset=["pearson"])[[*keys, "pearson"]]
              .assign(moment=moment, step=step) for moment, step in moments.items()]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*keys, "pearson", "moment", "step"])
    verdict = pd.Series("partial", index=out.index)
    verdict[out.pearson >= HOLDS_PEARSON] = "holds"
    verdict[out.pearson < FAILS_PEARSON] = "fails"
    return out.assign(verdict=verdict)[["moment", "step", *keys, "pearson", "verdict"]]
