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
- **Lead** = drop step - that step (positive: before the drop).

The measures, per checkpoint on the run's analysis batch (`warning_measures`):
- attention progress per head (the share of attention on the task's optimal map);
- collapse (mean pairwise cosine of the last hidden states) and repetition (sequence tasks: the
  greedy outputs' consecutive repeats; LRMC: the spread ratio of the masked predictions);
- weight and gradient norms per component (`analyses.components` names: embed, pos_embed,
  attn.l, mlp.l, unembed);
- the top Hessian eigenvalue of the training loss (`hessian_eigenthings`' Lanczos);
- "essential dynamics": the first two principal components of the model's outputs along the
  checkpoint series (`essential_dynamics`);
- any further per-step table of (step, measure, value), e.g. the LLC, added by the caller.

`early_warning_table` states for a family, per measure, in how many runs it moves before the drop
and by how many steps (median and range). `plot_drop_aligned` draws every measure, normalised to
its plateau-to-end change, against steps from each run's drop.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from sklearn.decomposition import PCA

from analyses.components import component_params
from mechlrmc.runs import Run
from mechlrmc.tasks import get_task
from mechlrmc.tasks.tokens import SequenceBatch

FRACTIONS = (0.1, 0.5)
HESSIAN_BATCH = 32  # examples behind the Hessian-vector products (a fixed batch: the same quantity at every checkpoint)
HESSIAN_ITERATIONS = 10  # Lanczos steps (on an mws checkpoint at batch 64, 20 steps gave the same value to 4 digits)


def _task_loss(model, batch) -> torch.Tensor:
    """The training objective on `batch` (LRMC: MSE over all entries; a sequence task: its loss)."""
    return get_task(batch.cfg.task if isinstance(batch, SequenceBatch) else "lrmc").loss(model(batch.tokens), batch)["loss"]


def _components(model) -> dict[str, list[str]]:
    names = [n for n, _ in model.named_parameters()]
    layered = [f"{c}.{l}" for l in range(model.cfg.n_layers) for c in ("attn", "mlp")]
    found = {c: component_params(c, names, model.cfg.n_layers) for c in ("embed", "pos_embed", *layered, "unembed")}
    return {c: p for c, p in found.items() if p}


def component_norms(model, batch) -> pd.DataFrame:
    """Per component: the Frobenius norm of its weights and of the training loss's gradient."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(_task_loss(model, batch), list(params.values()), allow_unused=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    grad = {n: g for n, g in zip(params, grads)}
    rows = []
    for component, names in _components(model).items():
        w = math.sqrt(sum(float(params[n].detach().pow(2).sum()) for n in names))
        g = math.sqrt(sum(float(grad[n].pow(2).sum()) for n in names if grad[n] is not None))
        rows += [{"measure": f"weight norm {component}", "value": w}, {"measure": f"grad norm {component}", "value": g}]
    return pd.DataFrame(rows)


def top_hessian_eigenvalue(model, batch, iterations: int = HESSIAN_ITERATIONS, seed: int = 0, loss_fn=None) -> float:
    """The largest-magnitude eigenvalue of the Hessian of `loss_fn(model, batch)` (default: the
    training loss) by Lanczos (`hessian_eigenthings.lanczos`, exact double-backward products)."""
    loss_fn = loss_fn or _task_loss
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
def _behaviour(model, batch) -> pd.DataFrame:
    """Attention progress per head, collapse and repetition, as (measure, value) rows."""
    if isinstance(batch, SequenceBatch):
        from analyses.sequences import native_measures

        native = native_measures(model, batch)
        rows = [{"measure": f"attention progress L{r.layer}H{r.head}", "value": r.share_on_map}
                for r in native["attention_progress"].itertuples()]
        collapse = native["collapse"]
        rows.append({"measure": "collapse", "value": float(collapse.cos_scored.iloc[-1])})
        rows.append({"measure": "repetition", "value": float(native["repetition"].rep.iloc[0])})
        return pd.DataFrame(rows)
    from analyses.dynamics import attention_progress, collapse, repetition

    rows = [{"measure": f"attention progress L{r.layer}H{r.head}", "value": r.share_on_map}
            for r in attention_progress(model, batch).itertuples()]
    rows.append({"measure": "collapse", "value": float(collapse(model, batch).cos_masked.iloc[-1])})
    rows.append({"measure": "repetition", "value": float(repetition(model, batch).spread_ratio.iloc[0])})
    return pd.DataFrame(rows)


def warning_measures(model, batch, hessian: bool = True) -> pd.DataFrame:
    """Every per-checkpoint measure above at one checkpoint: rows (measure, value)."""
    parts = [_behaviour(model, batch), component_norms(model, batch)]
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
        out = load(step)(batch.tokens).float()
        if isinstance(batch, SequenceBatch):
            out = out[:, batch.scored].log_softmax(-1)
        outputs.append(out.flatten().cpu().numpy())
    scores = PCA(n_components=min(n_components, len(steps))).fit_transform(np.stack(outputs))
    return pd.DataFrame([{"step": s, "measure": f"essential dynamics PC{k + 1}", "value": float(scores[i, k])}
                         for i, s in enumerate(steps) for k in range(scores.shape[1])])


# ----- milestones and leads ----------------------------------------------------------------------

def milestones(trajectory: pd.DataFrame, drop_step: float, plateau_start: float = math.nan,
               fractions: tuple[float, ...] = FRACTIONS) -> pd.DataFrame:
    """Per measure of one run's (step, measure, value) table: its plateau level and final value,
    the step at which each fraction of that change is covered (`step_10`, `step_50`) and its lead
    over `drop_step` (`lead_10`, `lead_50`; NaN without a drop)."""
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
                row[f"step_{tag}"] = row[f"lead_{tag}"] = math.nan
                continue
            progress = (values[start:] - begin) / (end - begin)
            below = np.flatnonzero(progress < f)
            first = 0 if len(below) == 0 else below[-1] + 1  # from here on it stays at least f of the way
            step = float(steps[start + first]) if first < len(progress) else math.nan
            row[f"step_{tag}"] = step
            row[f"lead_{tag}"] = drop_step - step if not math.isnan(drop_step) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def early_warning_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per measure of the runs' `milestones` (with a `run` column): in how many runs it has covered
    10 % (50 %) of its change before the drop, the lead in steps (median, min and max) and each
    run's lead (`lead_10 seed=0`, ...)."""
    rows = []
    for measure, part in per_run.groupby("measure", sort=False):
        row = {"measure": measure, "runs": int(part.lead_10.notna().sum())}
        for tag in ("10", "50"):
            lead = part[f"lead_{tag}"].dropna()
            row[f"before_drop_{tag}"] = f"{int((lead > 0).sum())} of {len(lead)}"
            row[f"lead_{tag}_median"] = float(lead.median()) if len(lead) else math.nan
            row[f"lead_{tag}_min"] = float(lead.min()) if len(lead) else math.nan
            row[f"lead_{tag}_max"] = float(lead.max()) if len(lead) else math.nan
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


def plot_drop_aligned(frames: dict[str, pd.DataFrame], marks: dict[str, pd.DataFrame], drops: dict[str, float],
                      measures: list[str] | None = None, cols: int = 3) -> go.Figure:
    """Each measure's progress (0 at its plateau level, 1 at the end) against steps from each
    run's drop, one line per run: what moves before 0 is an early warning."""
    chosen = measures or list(dict.fromkeys(m for frame in frames.values() for m in frame.measure))
    rows = math.ceil(len(chosen) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=chosen, shared_xaxes=True,
                        vertical_spacing=min(0.08, 0.5 / max(rows, 1)), horizontal_spacing=0.06)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for r, (run, frame) in enumerate(frames.items()):
        drop = drops.get(run, math.nan)
        if math.isnan(drop):
            continue
        prog = normalised(frame, marks[run])
        for i, measure in enumerate(chosen):
            part = prog[prog.measure == measure].sort_values("step")
            fig.add_scatter(x=part.step - drop, y=part.progress, mode="lines", name=run, legendgroup=run,
                            showlegend=i == 0, line=dict(color=palette[r % len(palette)], width=1.5),
                            row=i // cols + 1, col=i % cols + 1)
    for i in range(len(chosen)):
        fig.add_vline(x=0, line_dash="dot", line_color="gray", row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(range=[-0.5, 1.5])
    return fig.update_layout(template="plotly_white", height=220 * rows + 120,
                             title="Measures aligned at each run's drop (0: the plateau's level, 1: the end; x: steps from the drop)")


# ----- runs and families -------------------------------------------------------------------------

WARNING_BATCH = 128  # examples per checkpoint behind the measures


def run_trajectory(run: Run, batch=None, hessian: bool = True, load=None, progress: bool = True) -> pd.DataFrame:
    """(step, measure, value) of `warning_measures` at every checkpoint (each cached in the run
    directory, `analyses.store`) and the essential dynamics of the whole series."""
    from tqdm.auto import tqdm

    from analyses.store import cached
    from analyses.walk import analysis_batch

    batch = analysis_batch(run, WARNING_BATCH) if batch is None else batch
    load = load or run.load_model
    settings = {"batch": len(batch), "hessian": hessian, "hessian_batch": HESSIAN_BATCH,
                "hessian_iterations": HESSIAN_ITERATIONS}
    frames = [cached(run, "early_warning", step, settings, lambda step=step: warning_measures(load(step), batch, hessian))
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
    from analyses.phases import detect_phases

    phases = detect_phases(run).iloc[0]
    drop = float(phases.drop_step) if phases.dropped else math.nan
    return milestones(trajectory, drop, float(phases.plateau_start)).assign(run=run.path.name, drop_step=drop)


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


def drop_aligned_figure(tables: dict[str, pd.DataFrame]) -> go.Figure:
    """`plot_drop_aligned` of `family_early_warning`'s tables (or one run's)."""
    long, per_run = tables["trajectories"], tables["milestones"]
    frames = {name: part.drop(columns="run") for name, part in long.groupby("run", sort=False)}
    marks = {name: part for name, part in per_run.groupby("run", sort=False)}
    drops = per_run.groupby("run").drop_step.first().to_dict()
    shown = [m for m in headline_measures(per_run) if m in set(long.measure)]
    return plot_drop_aligned(frames, marks, drops, measures=shown)


# ----- registry entry (analyses.registry) -------------------------------------------------------

def early_warning_tables(ctx) -> dict[str, pd.DataFrame]:
    """The run's measures at every checkpoint (the Hessian on request, `--hessian yes`: it is most
    of the cost) and their milestones against its drop."""
    trajectory = run_trajectory(ctx.run, ctx.batch[:WARNING_BATCH], hessian=ctx.option("hessian", "no") == "yes",
                                load=ctx.model, progress=ctx.progress)
    marks = run_milestones(ctx.run, trajectory)
    return {"trajectories": trajectory.assign(run=ctx.run.path.name), "milestones": marks,
            "early_warning": early_warning_table(marks)}


def early_warning_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    marks = tables["milestones"]
    shown = marks[["measure", "start_step", "start_value", "final_value", "step_10", "lead_10", "step_50", "lead_50"]]
    drop = marks.drop_step.iloc[0]
    note = ("<p>No drop was detected: leads are undefined.</p>" if math.isnan(drop) else
            f"<p>Drop at step {int(drop)}. Lead: steps before the drop at which a measure has covered 10 % (50 %) "
            "of its change from the plateau's level to the end, for good (positive: before the drop).</p>")
    return {"note": note, "drop_aligned": drop_aligned_figure(tables),
            "milestones_table": shown.sort_values("lead_10", ascending=False)}
