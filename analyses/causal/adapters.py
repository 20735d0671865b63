"""The registry's adapters of the causal lens: `NAME_tables(ctx)` and `NAME_figures(ctx, tables)` read what they need from the run context and call the lens's plain functions."""

from __future__ import annotations

import pandas as pd

from analyses.causal.ablation import COMPONENT_KINDS, component_ablation_sweep, head_ablation_sweep
from analyses.causal.agreement import attribution_agreement, attribution_verdict, compare_with_patching
from analyses.causal.figures import (plot_ablation, plot_component_ablation, plot_attribution_vs_patching, plot_patching, plot_patching_steps,
    plot_sequence_patching)
from analyses.causal.patching import patching
from analyses.causal.sequence_patching import patching_agreement, sequence_patching

REPORT_SITES = {"z": ("layer_head",), "attn_out": ("layer", "layer_pos"), "mlp_out": ("layer", "layer_pos")}


def patching_tables(ctx) -> dict[str, pd.DataFrame]:
    """The sweeps at the last checkpoint (or the asked steps), on the first `patch_batch` matrices."""
    steps = ctx.steps if ctx.steps_asked is not None else [ctx.final]
    batch = ctx.batch[: ctx.option("patch_batch", ctx.budget.patch_batch)]
    return {"patching": ctx.walk(patching, steps=steps, batch=batch, data_cfg=ctx.run.config.data,
                                 corruption=ctx.option("corruption", "negate"), sites=REPORT_SITES, anatomy=True)}


def patching_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    frame = tables["patching"]
    last = frame[frame.step == frame.step.max()]
    per_layer = last[last.granularity == "layer"].pivot(index="layer", columns="site",
                                                        values=["recovery_mask", "recovery_obs"])
    parts = {"note": f"<p>Clean X against the corruption {ctx.option('corruption', 'negate')!r} (same mask), "
                     f"{frame.step.nunique()} checkpoint(s), the last at step {int(frame.step.max())}.</p>",
             "patching_heads": plot_patching(last, "z", "layer_head"),
             "patching_positions": plot_patching(last, "attn_out", "layer_pos"),
             "patching_layers_table": per_layer}
    if frame.step.nunique() > 1:
        parts["patching_layers"] = plot_patching_steps(frame, "attn_out")
    return parts


def attribution_tables(ctx) -> dict[str, pd.DataFrame]:
    """Attribution, both integrated gradients and exact patching at the key checkpoints, clean X against -X
    (the path estimators for the masked recovery only: the one the section compares and draws)."""
    from analyses.causal.integrated_gradients import DEFAULT_STEPS

    batch = ctx.batch[: ctx.budget.patch_batch]
    frames = [compare_with_patching(ctx.subject(step), batch, ctx.run.config.data, steps=DEFAULT_STEPS,
                                    anatomy=ctx.anatomy, metrics=("recovery_mask",))
              .assign(step=step, moment=moment) for moment, step in ctx.key.items()]
    frame = pd.concat(frames, ignore_index=True)
    agreement = attribution_agreement(frame[frame.metric == "recovery_mask"])
    return {"attribution": frame, "attribution_agreement": agreement,
            "attribution_verdict": attribution_verdict(agreement, ctx.key)}


def attribution_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    from analyses.causal.integrated_gradients import DEFAULT_STEPS

    frame, agreement = tables["attribution"], tables["attribution_agreement"]
    first, last = min(ctx.key.values()), max(ctx.key.values())
    table = agreement.pivot(index=["estimator", "site", "granularity"], columns="step",
                            values=["pearson", "spearman", "slope"])
    return {"note": f"<p>Clean X against -X, {min(len(ctx.batch), ctx.budget.patch_batch)} matrices, recovery at "
                    f"masked positions; checkpoints {', '.join(f'{m} {s}' for m, s in ctx.key.items())}. Dotted line: "
                    "estimate = exact. -X is not a small perturbation: where the path from -X to X crosses "
                    "LayerNorm, GELU and softmax curvature the first-order estimate misses. Integrated gradients "
                    f"({DEFAULT_STEPS} points along each layer's path, positions moved in groups that share no row or "
                    "column, `analyses.causal.integrated_gradients`) follows the path; it costs about as much as the "
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


PATCH_BATCH = 64  # sequences per checkpoint in the report


def sequence_patching_tables(ctx) -> dict[str, pd.DataFrame]:
    """Both estimators at the key checkpoints (plateau, drop, end) or the asked steps."""
    steps = ctx.steps if ctx.steps_asked is not None else sorted(set(ctx.key.values()))
    frame = ctx.walk(sequence_patching, steps=steps, batch=ctx.batch[:PATCH_BATCH], anatomy=True)
    return {"sequence_patching": frame, "agreement": patching_agreement(frame)}


def sequence_patching_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    frame, agreement = tables["sequence_patching"], tables["agreement"]
    moment = {step: name for name, step in ctx.key.items()}
    parts = {"note": f"<p>{min(len(ctx.batch), PATCH_BATCH)} sequences, each against the next one of the batch; "
                     "recovery of the logit difference between the clean and corrupted answers at the output "
                     "positions. Per position: the site's recovery (z: summed over heads).</p>"}
    for step in sorted(frame.step.unique()):
        gap = frame[frame.step == step].ld_gap.iloc[0]
        title = (f"step {step} ({moment.get(step, 'asked')}): LD(clean) - LD(corrupted) = {gap:.3f}")
        parts[f"patching_step_{step}"] = plot_sequence_patching(frame[frame.step == step], ctx.batch.position_names(), title)
    parts["agreement_table"] = agreement
    return parts


def ablation_tables(ctx) -> dict[str, pd.DataFrame]:
    """Every head ablated at the last checkpoint (or at the asked steps)."""
    steps = ctx.steps if ctx.steps_asked is not None else [ctx.final]
    kinds = tuple(ctx.option("kinds", ("zero", "mean")))
    tables = {"ablation": ctx.walk(head_ablation_sweep, steps=steps, kinds=kinds, anatomy=True)}
    if ctx.anatomy.has("attn_out", "mlp_out"):
        tables["component_ablation"] = ctx.walk(component_ablation_sweep, steps=steps, anatomy=True,
                                                kinds=tuple(k for k in kinds if k in COMPONENT_KINDS))
    return tables


def ablation_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    sweep, metric = tables["ablation"], ablation_metric(ctx.task)
    worst = sweep.sort_values(f"delta_{metric}", ascending=False).groupby("step").head(8)
    parts = {"ablation": plot_ablation(sweep, str(sweep.kind.iloc[0]), measure=f"delta_{metric}"),
             "ablation_top": worst[["step", "layer", "head", "kind", metric, f"delta_{metric}"]]}
    if "component_ablation" in tables:
        components = tables["component_ablation"]
        parts["component_ablation"] = plot_component_ablation(components, f"delta_{metric}")
        parts["component_ablation_table"] = components[["step", "component", "kind", metric, f"delta_{metric}"]]
    return parts


def ablation_metric(task) -> str:
    """The loss an ablation figure ranks heads by: LRMC's L_mask, a token task's loss on the outputs,
    else the task's phase metric."""
    return "loss_mask" if "matrix" in task.supports else task.phase_metric
