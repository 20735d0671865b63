"""Early warnings of the drop: which trajectory measure moves first, and how many steps ahead.

"Hidden progress precedes the drop" is the plateau paper's central claim (docs/FINDINGS.md, P3).
For every measure tracked across a run's checkpoints this module finds, per run, the step at
which the measure has covered 10 % and 50 % of its total change, and its lead over the drop step.

- **Total change** is taken from the measure's level on the plateau (its median over the first
  half of the plateau, from `plateau_start` to midway to the drop; the first checkpoint when no
  plateau or drop is found) to the last checkpoint: what the measure does while the loss sits
  still, not the first steps of fitting the marginals (collapse, for one, rises in those).
- **Covered a fraction f** at the first checkpoint from which the measure stays at least f of the
  way for the rest of the run (a measure that wanders and comes back has not moved yet). The
  trajectory is smoothed by a running median of 3 checkpoints first.
- **Lead** = drop step - that step (positive: before the drop); also in plateau units, as a
  fraction of the plateau's length, lead / (drop step - `plateau_start`) (`lead_10_plateau`,
  `lead_50_plateau`): a measure that covers half its change halfway through the plateau leads by
  0.5, one that covers it at the plateau's start by 1, so that runs and tasks whose plateaus differ
  in length compare. `plateau_start` is `detect_phases`' (analyses.plateau.phases).

The measures, per checkpoint on the run's analysis batch (`warning_measures`):
- attention progress per head (the share of attention on the task's optimal map);
- collapse (mean pairwise cosine of the last hidden states) and repetition (sequence tasks: the
  greedy outputs' consecutive repeats; LRMC: the spread ratio of the masked predictions);
- weight and gradient norms per component (`mechlrmc.components` names: embed, pos_embed,
  attn.l, mlp.l, unembed);
- the top Hessian eigenvalue of the training loss (`hessian_eigenthings`' Lanczos);
- "essential dynamics": the first two principal components of the model's outputs along the
  checkpoint series (`essential_dynamics`);
- any further per-step table of (step, measure, value), e.g. the LLC, added by the caller.

`early_warning_table` states for a family, per measure, in how many runs it moves before the drop
and by how many steps and plateau lengths (median and range). `plot_drop_aligned` draws every
measure, normalised to its plateau-to-end change, against steps from each run's drop.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA

from mechlrmc import measures
from mechlrmc.runs import Run
from mechlrmc.tasks import get_task

FRACTIONS = (0.1, 0.5)


HESSIAN_BATCH = 32  # examples behind the Hessian-vector products (a fixed batch: the same quantity at every checkpoint)


HESSIAN_ITERATIONS = 10  # Lanczos steps (on an mws checkpoint at batch 64, 20 steps gave the same value to 4 digits)


def task_loss(model, batch) -> torch.Tensor:
    """The training objective on `batch`, as its task defines it (LRMC: MSE over all entries; a
    recorded loop: the loss it recorded with its batch)."""
    return get_task(batch.task).loss(measures.logits_of(model)(batch.tokens), batch)["loss"]


def component_norms(model, batch) -> pd.DataFrame:
    """Per component (`mechlrmc.components` names: embed, pos_embed, attn.l, mlp.l, unembed; the
    LayerNorms left out): the Frobenius norm of its weights and of the training loss's gradient."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(task_loss(model, batch), list(params.values()), allow_unused=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    weight = measures.norms_by_component(params.items())
    grad = measures.norms_by_component(zip(params, grads))
    rows = []
    for component in weight:
        if component.startswith("ln"):
            continue
        rows += [{"measure": f"weight norm {component}", "value": weight[component]},
                 {"measure": f"grad norm {component}", "value": grad.get(component, 0.0)}]
    return pd.DataFrame(rows)


def top_hessian_eigenvalue(model, batch, iterations: int = HESSIAN_ITERATIONS, seed: int = 0, loss_fn=None) -> float:
    """The largest-magnitude eigenvalue of the Hessian of `loss_fn(model, batch)` (default: the
    training loss) by Lanczos (`hessian_eigenthings.lanczos`, exact double-backward products)."""
    loss_fn = loss_fn or task_loss
    from hessian_eigenthings import HessianOperator, lanczos

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            operator = HessianOperator(model, [batch], loss_fn)
            result = lanczos(operator, k=1, max_iter=min(iterations, operator.size), seed=seed)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return float(torch.as_tensor(result.eigenvalues).reshape(-1)[0])


@torch.no_grad()
def _behaviour(model, batch, sites=None, native=None) -> pd.DataFrame:
    """Attention progress per head, collapse and repetition, as (measure, value) rows (none for a
    recorded loop's own batch: it has no outputs to generate and no optimal map); a sequence task's
    from `native`, its `native_measures` on `batch` where the caller has them."""
    task = get_task(batch.task)
    if task.generates:
        from analyses.plateau.sequences import native_measures

        native = native_measures(model, batch, sites) if native is None else native
        rows = [{"measure": f"attention progress L{r.layer}H{r.head}", "value": r.share_on_map}
                for r in native["attention_progress"].itertuples()]
        collapse = native["collapse"]
        if len(collapse):
            rows.append({"measure": "collapse", "value": float(collapse.cos_scored.iloc[-1])})
        rows.append({"measure": "repetition", "value": float(native["repetition"].rep.iloc[0])})
        return pd.DataFrame(rows)
    if "matrix" not in task.supports:
        return pd.DataFrame(columns=["measure", "value"])
    from analyses.plateau.dynamics import attention_progress, collapse, repetition

    rows = [{"measure": f"attention progress L{r.layer}H{r.head}", "value": r.share_on_map}
            for r in attention_progress(model, batch).itertuples()]
    rows.append({"measure": "collapse", "value": float(collapse(model, batch).cos_masked.iloc[-1])})
    rows.append({"measure": "repetition", "value": float(repetition(model, batch).spread_ratio.iloc[0])})
    return pd.DataFrame(rows)


def warning_measures(model, batch, hessian: bool = True, sites=None, native=None) -> pd.DataFrame:
    """Every per-checkpoint measure above at one checkpoint: rows (measure, value); `sites`
    (`mechlrmc.sites`) where the model is not mechlrmc's own; `native`: a sequence task's
    `analyses.plateau.sequences.native_measures` of this model on `batch`, where already computed."""
    parts = [part for part in (_behaviour(model, batch, sites, native), component_norms(model, batch)) if len(part)]
    if hessian:
        value = top_hessian_eigenvalue(model, batch[:HESSIAN_BATCH])
        parts.append(pd.DataFrame([{"measure": "top Hessian eigenvalue", "value": value}]))
    return pd.concat(parts, ignore_index=True)


@torch.no_grad()
def essential_dynamics(run: Run, steps: Iterable[int], batch, n_components: int = 2, load=None) -> pd.DataFrame:
    """PCA of the model's outputs on `batch` (flattened; sequence tasks: the log-probabilities at
    the scored positions) along the checkpoints: rows (step, measure "essential dynamics PCk", value)."""
    load = load or run.load_model
    steps = list(steps)
    outputs = []
    for step in steps:
        out = measures.logits_of(load(step))(batch.tokens).float()
        if get_task(batch.task).readout == "vocab":
            out = out[:, batch.scored].log_softmax(-1)
        outputs.append(out.flatten().cpu().numpy())
    scores = PCA(n_components=min(n_components, len(steps))).fit_transform(np.stack(outputs))
    return pd.DataFrame([{"step": s, "measure": f"essential dynamics PC{k + 1}", "value": float(scores[i, k])}
                         for i, s in enumerate(steps) for k in range(scores.shape[1])])


def milestones(trajectory: pd.DataFrame, drop_step: float, plateau_start: float = math.nan,
               fractions: tuple[float, ...] = FRACTIONS) -> pd.DataFrame:
    """Per measure of one run's (step, measure, value) table: its plateau level and final value,
    the step at which each fraction of that change is covered (`step_10`, `step_50`), its lead
    over `drop_step` (`lead_10`, `lead_50`; NaN without a drop) and that lead as a fraction of the
    plateau's length `drop_step - plateau_start` (`lead_10_plateau`, `lead_50_plateau`; NaN without
    a plateau start or a drop)."""
    length = drop_step - plateau_start
    length = length if length > 0 else math.nan  # no plateau start, no drop or no plateau: no plateau units
    rows = []
    for measure, part in trajectory.groupby("measure", sort=False):
        part = part.sort_values("step")
        steps = part.step.to_numpy()
        values = part.value.rolling(3, center=True, min_periods=1).median().to_numpy()
        start = int(np.searchsorted(steps, plateau_start)) if not math.isnan(plateau_start) else 0
        start = min(start, len(steps) - 1)
        middle = (plateau_start + drop_step) / 2 if not math.isnan(plateau_start + drop_step) else steps[start]
        first_half = values[start:][steps[start:] <= middle]
        begin = float(np.median(first_half)) if len(first_half) else values[start]
        end = values[-1]
        row = {"measure": measure, "start_step": int(steps[start]), "start_value": float(begin),
               "final_value": float(end), "change": float(end - begin)}
        for f in fractions:
            tag = f"{round(f * 100)}"
            if end == begin or not np.isfinite(end - begin):
                row[f"step_{tag}"] = row[f"lead_{tag}"] = row[f"lead_{tag}_plateau"] = math.nan
                continue
            progress = (values[start:] - begin) / (end - begin)
            below = np.flatnonzero(progress < f)
            first = 0 if len(below) == 0 else below[-1] + 1  # from here on it stays at least f of the way
            step = float(steps[start + first]) if first < len(progress) else math.nan
            row[f"step_{tag}"] = step
            row[f"lead_{tag}"] = drop_step - step if not math.isnan(drop_step) else math.nan
            row[f"lead_{tag}_plateau"] = row[f"lead_{tag}"] / length
        rows.append(row)
    return pd.DataFrame(rows)


def early_warning_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per measure of the runs' `milestones` (with a `run` column): in how many runs it has covered
    10 % (50 %) of its change before the drop, the lead in steps (median, min and max), the lead in
    plateau lengths (`lead_10_plateau_median`, ..., where the runs' milestones have it) and each run's
    lead in steps (`lead_10 seed=0`, ...)."""
    rows = []
    for measure, part in per_run.groupby("measure", sort=False):
        row = {"measure": measure, "runs": int(part.lead_10.notna().sum())}
        for tag in ("10", "50"):
            lead = part[f"lead_{tag}"].dropna()
            row[f"before_drop_{tag}"] = f"{int((lead > 0).sum())} of {len(lead)}"
            row[f"lead_{tag}_median"] = float(lead.median()) if len(lead) else math.nan
            row[f"lead_{tag}_min"] = float(lead.min()) if len(lead) else math.nan
            row[f"lead_{tag}_max"] = float(lead.max()) if len(lead) else math.nan
            if f"lead_{tag}_plateau" in part:
                share = part[f"lead_{tag}_plateau"].dropna()
                for stat in ("median", "min", "max"):
                    row[f"lead_{tag}_plateau_{stat}"] = float(getattr(share, stat)()) if len(share) else math.nan
        if "run" in part:  # each run's own lead
            row.update({f"lead_{tag} {r.run}": getattr(r, f"lead_{tag}") for tag in ("10", "50")
                        for r in part.itertuples()})
        rows.append(row)
    return pd.DataFrame(rows).sort_values("lead_50_median", ascending=False, na_position="last").reset_index(drop=True)


def normalised(trajectory: pd.DataFrame, marks: pd.DataFrame) -> pd.DataFrame:
    """The trajectory as progress (0 at the plateau's level, 1 at the end) per measure."""
    ref = marks.set_index("measure")
    out = trajectory.merge(ref[["start_value", "final_value"]], left_on="measure", right_index=True)
    span = (out.final_value - out.start_value).replace(0.0, np.nan)
    return out.assign(progress=(out.value - out.start_value) / span)


WARNING_BATCH = 128  # examples per checkpoint behind the measures


def run_trajectory(run: Run, batch=None, hessian: bool = True, load=None, progress: bool = True,
                   native=None) -> pd.DataFrame:
    """(step, measure, value) of `warning_measures` at every checkpoint (each cached in the run
    directory, `analyses.base.store`) and the essential dynamics of the whole series. `native(step)`:
    a sequence run's `native_measures` on `batch` at `step`, where the caller shares them (a report's
    context)."""
    from tqdm.auto import tqdm

    from analyses.base.store import cached
    from analyses.base.walk import analysis_batch

    batch = analysis_batch(run, WARNING_BATCH) if batch is None else batch
    load = load or run.load_model
    settings = {"batch": len(batch), "hessian": hessian, "hessian_batch": HESSIAN_BATCH,
                "hessian_iterations": HESSIAN_ITERATIONS}
    frames = [cached(run, "early_warning", step, settings,
                     lambda step=step: warning_measures(load(step), batch, hessian, run.sites,
                                                        native(step) if native else None))
              .assign(step=step) for step in tqdm(run.steps, desc=f"early warnings {run.path.name}", unit="ckpt",
                                                  disable=not progress)]
    frames.append(essential_dynamics(run, run.steps, batch, load=load))
    out = pd.concat(frames, ignore_index=True)
    return pd.concat([out[["step", "measure", "value"]], _totals(out)], ignore_index=True)


def _totals(trajectory: pd.DataFrame) -> pd.DataFrame:
    """`weight norm (all)` and `grad norm (all)` per step, from the components' norms."""
    rows = []
    for kind in ("weight norm", "grad norm"):
        part = trajectory[trajectory.measure.str.startswith(kind + " ")]
        total = part.groupby("step").value.apply(lambda v: float(np.sqrt((v ** 2).sum())))
        rows.append(pd.DataFrame({"step": total.index, "measure": f"{kind} (all)", "value": total.to_numpy()}))
    return pd.concat(rows, ignore_index=True)


def headline_measures(per_run: pd.DataFrame, heads: int = 3) -> list[str]:
    """The measures a figure shows: every one that is not per component or per head, the total
    norms, and the `heads` heads whose attention progress changes most (median |change| over runs)."""
    names = list(dict.fromkeys(per_run.measure))
    head = [m for m in names if m.startswith("attention progress")]
    part = per_run[per_run.measure.isin(head)].assign(size=lambda f: f.change.abs())
    top = part.groupby("measure")["size"].median().sort_values(ascending=False).index[:heads].tolist()
    single = [m for m in names if not m.startswith(("attention progress", "weight norm ", "grad norm "))]
    return [*top, *single, "weight norm (all)", "grad norm (all)"]


def run_milestones(run: Run, trajectory: pd.DataFrame) -> pd.DataFrame:
    """`milestones` of one run against its detected plateau start and drop (`detect_phases`)."""
    from analyses.plateau.phases import detect_phases

    phases = detect_phases(run).iloc[0]
    drop, start = float(phases.drop_step) if phases.dropped else math.nan, float(phases.plateau_start)
    return milestones(trajectory, drop, start).assign(run=run.path.name, drop_step=drop, plateau_start=start)


def family_early_warning(runs: list[Run], extra: dict[str, pd.DataFrame] | None = None, hessian: bool = True,
                         progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every run's trajectory (plus `extra[run name]`, e.g. its LLC as (step, measure, value)),
    its milestones, and the family's `early_warning_table`."""
    trajectories, marks = {}, {}
    for run in runs:
        trajectory = run_trajectory(run, hessian=hessian, progress=progress)
        if extra and run.path.name in extra:
            trajectory = pd.concat([trajectory, extra[run.path.name]], ignore_index=True)
        trajectories[run.path.name] = trajectory
        marks[run.path.name] = run_milestones(run, trajectory)
    per_run = pd.concat(marks.values(), ignore_index=True)
    long = pd.concat([t.assign(run=name) for name, t in trajectories.items()], ignore_index=True)
    return {"trajectories": long, "milestones": per_run, "early_warning": early_warning_table(per_run)}
