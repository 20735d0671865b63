"""The registry's adapters of the completion lens: `NAME_tables(ctx)` and `NAME_figures(ctx, tables)` read what they need from the run context and call the lens's plain functions."""

from __future__ import annotations

import pandas as pd

from analyses.completion.baselines import P_MASKS, compare_baselines, evaluate_ood
from analyses.completion.copying import DEFAULT_VALUES, copy_check, summarize_copy
from analyses.completion.figures import plot_baselines, plot_copy, plot_ood


def _step(ctx) -> int:
    return ctx.run.nearest_step(ctx.option("step")) if ctx.option("step") is not None else ctx.final


def baselines_tables(ctx) -> dict[str, pd.DataFrame]:
    step = _step(ctx)
    frame = compare_baselines(ctx.model(step), ctx.run.config.data, tuple(ctx.option("p_masks", P_MASKS)),
                              ctx.option("n_matrices", ctx.budget.n_matrices), progress=ctx.progress)
    return {"baselines": frame.assign(step=step)}


def baselines_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    frame = tables["baselines"]
    table = frame.pivot(index="p_mask", columns="predictor", values=["mse_mask", "nuclear_norm"])
    table[("mse_mask_to_nuclear", "model")] = frame[frame.predictor == "model"].set_index("p_mask").mse_mask_to_nuclear
    return {"note": f"<p>Model at step {int(frame.step.iloc[0])}; {ctx.option('n_matrices', ctx.budget.n_matrices)} "
                    f"matrices per p_mask (trained at p_mask {ctx.run.config.data.p_mask}).</p>",
            "baselines": plot_baselines(frame), "baselines_table": table.drop(columns=[("mse_mask", "truth")])}


def ood_tables(ctx) -> dict[str, pd.DataFrame]:
    step = _step(ctx)
    frame = evaluate_ood(ctx.model(step), ctx.run.config.data, n_matrices=ctx.option("n_matrices", ctx.budget.n_matrices),
                         layout=ctx.option("layout", "pad"), progress=ctx.progress)
    return {"ood": frame.assign(step=step)}


def ood_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    frame = tables["ood"]
    table = frame.pivot(index="variant", columns="predictor", values="mse_mask").loc[frame.variant.unique()]
    table["model_to_nuclear"] = frame[frame.predictor == "model"].set_index("variant").mse_mask_to_nuclear
    return {"note": "<p>Smaller matrices sit in the top-left block of the trained position grid, the rest masked; "
                    "larger ones have no learned positions and are refused.</p>",
            "ood": plot_ood(frame), "ood_table": table.drop(columns="truth")}


def copy_tables(ctx) -> dict[str, pd.DataFrame]:
    copies = ctx.walk(copy_check, data_cfg=ctx.run.config.data, values=tuple(ctx.option("values", DEFAULT_VALUES)))
    return {"copy": copies, "copy_summary": summarize_copy(copies)}


def copy_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    return {"copy": plot_copy(tables["copy"]).update_layout(width=None), "copy_summary": tables["copy_summary"]}
