"""The registry's adapters of the weights lens: `NAME_tables(ctx)` and `NAME_figures(ctx, tables)` read what they need from the run context and call the lens's plain functions."""

from __future__ import annotations

import pandas as pd

from analyses.weights.figures import plot_swaps
from analyses.weights.swaps import swap_grid
from mechlrmc.components import SWAP_SET


def swaps_tables(ctx) -> dict[str, pd.DataFrame]:
    pre = ctx.option("pre", ctx.key["plateau"])
    post = ctx.option("post", ctx.final)
    components = ctx.option("components").split(";") if ctx.option("components") else SWAP_SET
    return {"swaps": swap_grid(ctx.run, pre, post, components, batch=ctx.batch, device=ctx.device,
                               progress=ctx.progress)}


def swaps_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    frame = tables["swaps"]
    pre, post = int(frame.from_step.min()), int(frame.from_step.max())
    return {"note": f"<p>Pre-drop checkpoint {pre}, post-drop checkpoint {post}.</p>", "swaps": plot_swaps(frame),
            "swaps_table": frame[["direction", "components", "loss", "loss_obs", "loss_mask", "corr_mask"]]}
