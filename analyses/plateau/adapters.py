"""The registry's adapters of the plateau lens: `NAME_tables(ctx)` and `NAME_figures(ctx, tables)` read what they need from the run context and call the lens's plain functions."""

from __future__ import annotations

import math

import pandas as pd

from analyses.plateau.dynamics import attention_progress, collapse, dynamics_summary, load_interventions, repetition
from analyses.plateau.early_warning import WARNING_BATCH, early_warning_table, run_milestones, run_trajectory
from analyses.plateau.figures import (drop_aligned_figure, plot_dynamics, plot_interventions, plot_native_dynamics,
    plot_phases, plot_sequence_phases)


def phases_tables(ctx) -> dict[str, pd.DataFrame]:
    return {"phases": ctx.phases.to_frame().T.reset_index(drop=True)}


def phases_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    if ctx.task.generates:
        return {"phases": plot_sequence_phases(ctx.run, tables["phases"])}
    return {"phases": plot_phases(ctx.run, tables["phases"]).update_layout(width=None)}


SEQUENCE_BATCH = 128  # sequences per checkpoint of plateau_dynamics (the paper measured on 64)


def plateau_dynamics_tables(ctx) -> dict[str, pd.DataFrame]:
    """Every measure at every checkpoint (or the asked ones), on `SEQUENCE_BATCH` sequences."""
    from tqdm.auto import tqdm

    parts = {}
    for step in tqdm(ctx.every_step, desc="plateau dynamics", unit="ckpt", disable=not ctx.progress):
        for name, frame in ctx.native(step, SEQUENCE_BATCH).items():
            parts.setdefault(name, []).append(frame.assign(step=step))
    tables = {name: pd.concat(frames, ignore_index=True) for name, frames in parts.items()}
    return {name: t[["step", *[c for c in t if c != "step"]]] for name, t in tables.items()}


def plateau_dynamics_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    rep = tables["repetition"].set_index("step")
    plateau = rep.loc[[s for s in rep.index if s in _plateau_steps(ctx)]]
    note = (f"<p>{min(len(ctx.batch), SEQUENCE_BATCH)} sequences generated greedily from the prompt at each of {len(rep)} checkpoints. "
            f"On the plateau the greedy outputs repeat at up to {plateau.rep.max():.2f} against the truth's "
            f"{rep.rep_true.median():.2f}; at the end {rep.rep.iloc[-1]:.2f}.</p>" if len(plateau) else "")
    return {"note": note, "plateau_dynamics": plot_native_dynamics(tables, ctx.phases.drop_step),
            "repetition_table": tables["repetition"]}


def _plateau_steps(ctx) -> list[int]:
    p = ctx.phases
    if pd.isna(p.plateau_start):
        return []
    end = p.drop_step if p.dropped else p.final_step
    return [s for s in ctx.run.steps if p.plateau_start <= s < end]


DYNAMICS_BATCH = 256  # matrices per checkpoint of the LRMC dynamics


def dynamics_tables(ctx) -> dict[str, pd.DataFrame]:
    batch = ctx.batch[:DYNAMICS_BATCH]
    return {"repetition": ctx.walk(repetition, batch=batch),
            **{fn.__name__: ctx.walk(fn, batch=batch, anatomy=True) for fn in (collapse, attention_progress)}}


def dynamics_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    return {"dynamics": plot_dynamics(tables, ctx.run.metrics), "dynamics_summary": dynamics_summary(tables)}


def interventions_tables(ctx) -> dict[str, pd.DataFrame]:
    return {"interventions": load_interventions(ctx.interventions)}


def interventions_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    frame = tables["interventions"]
    return {"interventions": plot_interventions(frame), "interventions_table": frame.drop(columns="run")}


def early_warning_tables(ctx) -> dict[str, pd.DataFrame]:
    """The run's measures at every checkpoint (the Hessian on request, `--hessian yes`: it is most
    of the cost) and their milestones against its drop; a sequence run's measures from the context's
    generations (`ctx.native`), shared with the plateau dynamics."""
    native = (lambda step: ctx.native(step, WARNING_BATCH)) if ctx.task.generates else None
    trajectory = run_trajectory(ctx.run, ctx.batch[:WARNING_BATCH], hessian=ctx.option("hessian", "no") == "yes",
                                load=ctx.model, progress=ctx.progress, native=native)
    marks = run_milestones(ctx.run, trajectory)
    return {"trajectories": trajectory.assign(run=ctx.run.path.name), "milestones": marks,
            "early_warning": early_warning_table(marks)}


def early_warning_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    marks = tables["milestones"]
    shown = marks[["measure", "start_step", "start_value", "final_value", "step_10", "lead_10", "lead_10_plateau",
                   "step_50", "lead_50", "lead_50_plateau"]]
    drop, start = marks.drop_step.iloc[0], marks.plateau_start.iloc[0]
    plateau = ("" if math.isnan(start) else
               f" In plateau units (lead_10_plateau, lead_50_plateau): the lead as a fraction of the plateau's "
               f"{drop - start:.0f} steps from its start at step {start:.0f} (0.5: halfway through the plateau).")
    note = ("<p>No drop was detected: leads are undefined.</p>" if math.isnan(drop) else
            f"<p>Drop at step {int(drop)}. Lead: steps before the drop at which a measure has covered 10 % (50 %) "
            f"of its change from the plateau's level to the end, for good (positive: before the drop).{plateau}</p>")
    return {"note": note, "drop_aligned": drop_aligned_figure(tables),
            "milestones_table": shown.sort_values("lead_10", ascending=False)}



def learning_times_tables(ctx) -> dict[str, pd.DataFrame]:
    """Each output position's score at every checkpoint, its learning time (onset or bracket), and their
    order (a sequence run's scores, the greedy accuracy per position, from the context's generations)."""
    from analyses.plateau.learning_times import LEARNING_BATCH, fit_learning_times, learning_order, position_scores

    if ctx.task.generates:
        scores = pd.concat([ctx.native(step, LEARNING_BATCH)["partial_solution"][["position", "greedy_acc"]]
                            .rename(columns={"greedy_acc": "score"}).assign(step=step) for step in ctx.every_step],
                           ignore_index=True)[["step", "position", "score"]]
    else:
        scores = ctx.walk(position_scores, steps=ctx.every_step, batch=ctx.batch[:LEARNING_BATCH])
    times = fit_learning_times(scores)
    return {"position_scores": scores, "learning_times": times, "learning_order": pd.DataFrame([learning_order(times)])}


def learning_order_text(order) -> str:
    """The report's sentence on a run's `learning_order`: how many positions the checkpoints place
    by an onset and how many by a bracket only, the spread, and where position 1 falls."""
    between = (f"; {order.between_checkpoints} learned between two checkpoints (placed at the bracket's midpoint: "
               "no onset or width is resolved)" if order.between_checkpoints else "")
    narrow = (f"; {order.width_below_spacing} rise faster than the checkpoint spacing (width not resolved)"
              if order.width_below_spacing else "")
    if order.first_fit == "ok":
        first = f"position 1 (onset at step {order.first_onset:.0f})"
    elif order.first_fit == "between checkpoints":
        first = f"position 1 (learned between steps {order.first_bracket_low:.0f} and {order.first_bracket_high:.0f})"
    else:
        first = f"position 1 ({order.first_fit})"
    verdict = ("no other position is placed" if math.isnan(order.others_median) else
               f"{first} {'precedes' if order.first_precedes_median else 'does not precede'} the median of the others "
               f"(step {order.others_median:.0f})")
    return (f"{order.fitted} of {order.positions} positions with a resolved onset{between}{narrow}. Learned from step "
            f"{order.learned_min:.0f} to {order.learned_max:.0f} (median {order.learned_median:.0f}, interquartile range "
            f"{order.learned_iqr:.0f} steps); {verdict}.")


def learning_times_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    from analyses.plateau.figures import plot_learning_times

    order = tables["learning_order"].iloc[0]
    note = ("<p>No position's score rises once across the checkpoints.</p>" if not order.fitted + order.between_checkpoints
            else f"<p>{learning_order_text(order)}</p>")
    return {"note": note, "learning_times": plot_learning_times(tables["learning_times"], tables["position_scores"],
                                                                ctx.phases.drop_step),
            "learning_times_table": tables["learning_times"]}
