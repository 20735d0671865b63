"""The registry's adapters of the weights lens: `NAME_tables(ctx)` and `NAME_figures(ctx, tables)` read what they need from the run context and call the lens's plain functions."""

from __future__ import annotations

import pandas as pd

from analyses.weights.figures import plot_swaps
from analyses.weights.swaps import swap_grid


def swaps_tables(ctx) -> dict[str, pd.DataFrame]:
    pre = ctx.option("pre", ctx.key["plateau"])
    post = ctx.option("post", ctx.final)
    components = ctx.option("components").split(";") if ctx.option("components") else None
    return {"swaps": swap_grid(ctx.run, pre, post, components, batch=ctx.batch, device=ctx.device,
                               progress=ctx.progress, anatomy=ctx.anatomy)}


def swaps_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    frame = tables["swaps"]
    pre, post = int(frame.from_step.min()), int(frame.from_step.max())
    metric = "loss_mask" if "matrix" in ctx.task.supports else ctx.task.phase_metric
    losses = [c for c in frame.columns if c.startswith(("loss", "acc", "corr"))]
    return {"note": f"<p>Pre-drop checkpoint {pre}, post-drop checkpoint {post}.</p>",
            "swaps": plot_swaps(frame, metric), "swaps_table": frame[["direction", "components", *losses]]}
