"""The registry's adapters of the attention lens: `NAME_tables(ctx)` and `NAME_figures(ctx, tables)` read what they need from the run context and call the lens's plain functions."""

from __future__ import annotations

import pandas as pd

from analyses.attention.figures import plot_attention_scrubber, plot_taxonomy
from analyses.attention.heads import head_onsets, map_onsets, structured_taxonomy
from analyses.attention.scrubber import pattern_frame
from analyses.attention.views import attention_page


def taxonomy_tables(ctx) -> dict[str, pd.DataFrame]:
    if "matrix" not in ctx.task.supports:  # a token task: the shares on its reference maps
        return {"taxonomy": ctx.taxonomy}
    structured = ctx.walk(structured_taxonomy, data_cfg=ctx.run.config.data, anatomy=True)
    return {"taxonomy": ctx.taxonomy, "taxonomy_structured": structured}


def taxonomy_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    taxonomy, final = tables["taxonomy"], int(tables["taxonomy"].step.max())
    last = taxonomy[(taxonomy.step == final) & (taxonomy.queries == "all")]
    labels = last.label if "matrix" in ctx.task.supports else last.label.str.split().str[0]
    counts = labels.value_counts().rename_axis("label").reset_index(name=f"heads at step {final}")
    onsets = (head_onsets(taxonomy, ctx.phases.drop_step) if "matrix" in ctx.task.supports
              else map_onsets(taxonomy, ctx.phases.drop_step))
    return {"taxonomy": plot_taxonomy(taxonomy, drop_step=ctx.phases.drop_step).update_layout(width=None),
            "head_counts": counts, "head_onsets": onsets}


def _view_steps(ctx) -> dict[str, int]:
    asked = ctx.option("views")
    if asked:
        return {f"step {s}": s for s in sorted({ctx.run.nearest_step(int(s)) for s in asked})}
    return ctx.key


def views_tables(ctx) -> dict:
    """The checkpoints drawn, with the head labels shown on them (from the shared taxonomy)."""
    steps = _view_steps(ctx)
    taxonomy = ctx.taxonomy
    labelled = taxonomy[taxonomy.step.isin(list(steps.values())) & (taxonomy.queries == "all")]
    moments = {step: moment for moment, step in steps.items()}
    return {"views": labelled[["step", "layer", "head", "label"]].assign(moment=labelled.step.map(moments))}


def views_figures(ctx, tables: dict) -> dict:
    from analyses.report.page import Page

    parts = {}
    for moment, step in _view_steps(ctx).items():
        at = tables["views"][tables["views"].step == step]
        labels = {(r.layer, r.head): r.label for r in at.itertuples()} or None
        page = attention_page(ctx.subject(step), ctx.batch, examples=(0,), head_labels=labels, anatomy=ctx.anatomy,
                              title=f"{ctx.run.path.name}, {moment}: attention at step {step}")
        parts[f"views/attention_step_{step:06d}"] = Page(page, f"attention at step {step}")
    return parts


SCRUB_BATCH = 256  # matrices behind each average pattern


def scrubber_tables(ctx) -> dict[str, pd.DataFrame]:
    return {"patterns": ctx.walk(pattern_frame, steps=ctx.every_step, batch=ctx.batch[:SCRUB_BATCH], anatomy=True)}


def scrubber_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    patterns = tables["patterns"]
    steps = sorted(patterns.step.unique())
    over = ctx.batch.description
    labels = ("label at that step (row heads blue, column heads red)" if "matrix" in ctx.task.supports
              else "share of attention on the task's optimal map")
    note = (f"<p>{len(steps)} checkpoints, patterns averaged over {min(SCRUB_BATCH, len(ctx.batch))} {over}. "
            f"Drag the slider: titles give each head's {labels}.</p>")
    taxonomy = ctx.taxonomy[ctx.taxonomy.step.isin(steps)]
    fig = plot_attention_scrubber(patterns, taxonomy, drop_step=ctx.phases.drop_step, names=ctx.batch.position_names(),
                                  causal=ctx.run.config.model.causal if not ctx.run.config.recorded else True)
    return {"note": note, "scrubber": fig}
