"""Attribution patching (finding 6, docs/FINDINGS.md, first order): activation patching by one gradient.

Patching the clean activation a_clean of a site into the corrupted run moves the recovery metric
of `analyses.patching` by approximately

    attribution = sum over the patched entries of (a_clean - a_corrupt) * d recovery / d a,

the gradient taken at the corrupted run. One forward and one backward of the corrupted batch give
the gradient at every site at once; one cached clean forward gives the differences. Every patch
of every site and granularity of `analyses.patching` is then a sum over its entries. The two
recovery metrics (masked and observed positions) are handled in the same pass: the corrupted
batch is stacked twice and each copy is back-propagated from one metric.

The estimate is exact when the output is linear in the patched activation (e.g. the last MLP's
output with no final LayerNorm). Where LayerNorm, GELU or softmax bend the path it can miss
badly; `compare_with_patching` and `attribution_agreement` measure by how much, for this estimate
and for the two of `analyses.integrated_gradients`, which integrate the gradient along the path
instead (each layer on its own path, or all layers of a site on one).
"""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import torch

from analyses.patching import DEFAULT_SITES, _frame, _masks, _patch_grid, corrupt, hook_name, patching
from mechlrmc.config import DataConfig
from mechlrmc.tasks.lrmc import Batch
from mechlrmc.model import HookedEncoder

ESTIMATORS = ("attribution", "integrated_gradients", "joint_integrated_gradients")  # columns of `compare_with_patching`
HOLDS_PEARSON = 0.9  # attribution_verdict: an estimate holds at Pearson >= this
FAILS_PEARSON = 0.5  # ... and fails below this


def metric_weights(clean: torch.Tensor, corrupted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """d recovery / d prediction for the masked and observed metrics [2, batch, pos].

    Recovery is linear in the prediction: <pred - corrupted, w> with w = (clean - corrupted) on the
    chosen positions divided by its squared norm there. When clean and corrupted outputs coincide
    there is nothing to recover and w is zero (exact patching would divide 0 by 0)."""
    direction = clean - corrupted  # [b, pos]
    weights = []
    for where in ((~observed).float(), observed.float()):
        den = (direction.pow(2) * where).sum()
        weights.append(torch.where(den > 0, direction * where / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0))
    return torch.stack(weights)


def _gradients(model: HookedEncoder, tokens: torch.Tensor, names: list[str], weights: torch.Tensor):
    """Activations of `names` on `tokens` and the gradients of both metrics there:
    ({name: [b, ...]}, {name: [2, b, ...]}), from one forward and one backward of 2b rows."""
    b = tokens.shape[0]
    acts: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook) -> torch.Tensor:
        acts[hook.name] = act
        return act

    def track(act: torch.Tensor, hook) -> torch.Tensor:  # gradients even for a frozen model
        return act if act.requires_grad else act.requires_grad_()

    with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", track), *[(n, keep) for n in names]]):
        pred = model(torch.cat([tokens, tokens]))  # [2b, pos]: copy 0 masked metric, copy 1 observed
        total = (pred.view(2, b, -1) * weights).sum()
        grads = torch.autograd.grad(total, [acts[n] for n in names])
    values = {n: acts[n][:b].detach() for n in names}
    return values, {n: g.view(2, b, *g.shape[1:]) for n, g in zip(names, grads)}


def patch_estimates(grids: dict[tuple[str, str], list[tuple[int, int, int]]],
                    entries: dict[tuple[str, str], dict[int, torch.Tensor]], n_heads: int, pos: int) -> pd.DataFrame:
    """The table of patch estimates from per-entry ones: each patch of `grids` ((site, granularity)
    -> patches) is the sum of `entries[site, granularity][layer]` ([2, pos, (head)], the masked and
    observed metrics) over the entries it replaces."""
    frames = []
    for (site, granularity), grid in grids.items():
        per_layer = entries[site, granularity]
        masks = _masks(grid, pos, n_heads, site).float()  # [K, pos, (head)]
        per_patch = torch.stack([per_layer[l] for l, _, _ in grid], 1)  # [2, K, pos, (head)]
        estimate = (per_patch * masks.to(per_patch)).flatten(2).sum(-1)  # [2, K]
        frame = _frame(grid, {"recovery_mask": estimate[0], "recovery_obs": estimate[1]})
        frames.append(frame.assign(site=site, granularity=granularity))
    return pd.concat(frames, ignore_index=True)


def attribution_sweep(model: HookedEncoder, clean: Batch, corrupted: Batch,
                      sites: dict[str, tuple[str, ...]] | None = None) -> pd.DataFrame:
    """First-order recovery of every patch of every (site, granularity) in `sites` (default
    `DEFAULT_SITES`) from one clean forward, one corrupted forward and one backward. One row per
    (site, granularity, layer, pos, head) as `batched_sweep` (-1: all positions / heads)."""
    sites = sites or DEFAULT_SITES
    device = next(model.parameters()).device
    clean_tokens, corrupt_tokens = clean.tokens.to(device), corrupted.tokens.to(device)
    grids = {(s, g): _patch_grid(model, s, g, clean_tokens.shape[1]) for s, grans in sites.items() for g in grans}
    names = sorted({hook_name(s, l) for (s, _), grid in grids.items() for l, _, _ in grid})
    with torch.no_grad():
        clean_pred, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: n in names)
        corrupt_pred = model(corrupt_tokens)
    weights = metric_weights(clean_pred, corrupt_pred, clean.observed.to(device))
    corrupt_acts, grads = _gradients(model, corrupt_tokens, names, weights)
    # per name: the estimate of each entry, summed over the batch and the feature axis [2, pos, (head)]
    per_entry = {n: ((clean_cache[n] - corrupt_acts[n]) * grads[n]).sum(-1).sum(1) for n in names}
    entries = {(s, g): {l: per_entry[hook_name(s, l)] for l, _, _ in grid} for (s, g), grid in grids.items()}
    return patch_estimates(grids, entries, model.cfg.n_heads, clean_tokens.shape[1])


def attribution(model: HookedEncoder, batch: Batch, data_cfg: DataConfig, corruption: str = "negate",
                sites: dict[str, tuple[str, ...]] | None = None, seed: int = 0) -> pd.DataFrame:
    """Attribution patching of `batch` against one corruption: the table of `patching` (same
    columns and rows) with `method="attribution"`. Maps over a run with `across_checkpoints`."""
    corrupted = corrupt(batch, corruption, data_cfg, seed)
    return attribution_sweep(model, batch, corrupted, sites).assign(corruption=corruption, method="attribution")


def compare_with_patching(model: HookedEncoder, batch: Batch, data_cfg: DataConfig, corruption: str = "negate",
                          sites: dict[str, tuple[str, ...]] | None = None, seed: int = 0,
                          steps: int | None = None) -> pd.DataFrame:
    """Exact (batched) patching and attribution side by side: one row per patch and metric, with
    columns `exact` and `attribution`, and, if `steps` is given, `integrated_gradients` and
    `joint_integrated_gradients` (`steps` points each)."""
    from analyses.integrated_gradients import (  # it builds on this module
        integrated_gradients_sweep, joint_integrated_gradients_sweep)

    keys = ["site", "granularity", "layer", "pos", "head"]
    sites = sites or DEFAULT_SITES
    corrupted = corrupt(batch, corruption, data_cfg, seed)
    frames = {"exact": patching(model, batch, data_cfg, corruption, sites, seed),
              "attribution": attribution_sweep(model, batch, corrupted, sites)}
    if steps is not None:
        frames["integrated_gradients"] = integrated_gradients_sweep(model, batch, corrupted, sites, steps)
        frames["joint_integrated_gradients"] = joint_integrated_gradients_sweep(model, batch, corrupted, sites, steps)
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


def plot_attribution_vs_patching(frame: pd.DataFrame, metric: str = "recovery_mask", step: int | None = None,
                                 estimator: str = "attribution"):
    """Scatter of an estimate (a column of ESTIMATORS) against exact recovery, one panel per site /
    granularity, the diagonal marking perfect agreement; with a `step` column, one colour per step
    (or only `step`)."""
    part = frame[frame.metric == metric].copy()
    if step is not None:
        part = part[part.step == step]
    part["panel"] = part.site + " / " + part.granularity
    color = "step" if "step" in part and part.step.nunique() > 1 else None
    if color:
        part["step"] = part.step.astype(str)
    fig = px.scatter(part, x="exact", y=estimator, color=color, facet_col="panel", facet_col_wrap=4,
                     hover_data=["layer", "pos", "head"], opacity=0.6,
                     title=f"{estimator.replace('_', ' ').capitalize()} against exact patching: {metric} (finding 6)")
    for trace_x, trace_y in {(t.xaxis, t.yaxis) for t in fig.data}:  # the diagonal in each panel's own range
        points = [v for t in fig.data if (t.xaxis, t.yaxis) == (trace_x, trace_y) for v in (*t.x, *t.y)]
        lo, hi = float(min(points)), float(max(points))
        fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line=dict(color="grey", dash="dot"),
                      xref=trace_x, yref=trace_y)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    return fig.update_xaxes(matches=None).update_yaxes(matches=None).update_layout(template="plotly_white")



# ----- registry entry (analyses.registry) -------------------------------------------------------

def attribution_tables(ctx) -> dict[str, pd.DataFrame]:
    """Attribution, both integrated gradients and exact patching at the key checkpoints, clean X against -X."""
    from analyses.integrated_gradients import DEFAULT_STEPS

    batch = ctx.batch[: ctx.budget.patch_batch]
    frames = [compare_with_patching(ctx.model(step), batch, ctx.run.config.data, steps=DEFAULT_STEPS)
              .assign(step=step, moment=moment) for moment, step in ctx.key.items()]
    frame = pd.concat(frames, ignore_index=True)
    agreement = attribution_agreement(frame[frame.metric == "recovery_mask"])
    return {"attribution": frame, "attribution_agreement": agreement,
            "attribution_verdict": attribution_verdict(agreement, ctx.key)}


def attribution_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    from analyses.integrated_gradients import DEFAULT_STEPS

    frame, agreement = tables["attribution"], tables["attribution_agreement"]
    first, last = min(ctx.key.values()), max(ctx.key.values())
    table = agreement.pivot(index=["estimator", "site", "granularity"], columns="step",
                            values=["pearson", "spearman", "slope"])
    return {"note": f"<p>Clean X against -X, {min(len(ctx.batch), ctx.budget.patch_batch)} matrices, recovery at "
                    f"masked positions; checkpoints {', '.join(f'{m} {s}' for m, s in ctx.key.items())}. Dotted line: "
                    "estimate = exact. -X is not a small perturbation: where the path from -X to X crosses "
                    "LayerNorm, GELU and softmax curvature the first-order estimate misses. Integrated gradients "
                    f"({DEFAULT_STEPS} points along each layer's path, positions moved in groups that share no row or "
                    "column, `analyses.integrated_gradients`) follows the path; it costs about as much as the "
                    "batched exact sweep on this small model. Joint integrated gradients moves every layer of a "
                    "site on one path with the same points: several times cheaper, and it misses the interaction "
                    "between the layers.</p>",
            "attribution_verdict": tables["attribution_verdict"],
            "attribution_first": plot_attribution_vs_patching(frame, step=first).update_layout(
                title=f"Attribution against exact patching at step {first}"),
            "attribution_last": plot_attribution_vs_patching(frame, step=last).update_layout(
                title=f"Attribution against exact patching at step {last}"),
            "integrated_gradients_last": plot_attribution_vs_patching(
                frame, step=last, estimator="integrated_gradients").update_layout(
                title=f"Integrated gradients ({DEFAULT_STEPS} steps) against exact patching at step {last}"),
            "joint_integrated_gradients_last": plot_attribution_vs_patching(
                frame, step=last, estimator="joint_integrated_gradients").update_layout(
                title=f"Joint integrated gradients ({DEFAULT_STEPS} steps) against exact patching at step {last}"),
            "attribution_table": table}
