"""The registry's adapters of the representations lens: `NAME_tables(ctx)` and `NAME_figures(ctx, tables)` read what they need from the run context and call the lens's plain functions."""

from __future__ import annotations

from functools import partial

import pandas as pd

from analyses.representations.embeddings import embedding_geometry, position_tsne, token_embedding_plane
from analyses.representations.figures import (plot_embedding_geometry, plot_position_tsne, plot_probes,
    plot_token_embeddings)
from analyses.representations.probes import first_step_encoded, probe, probe_summary


def probes_tables(ctx) -> dict[str, pd.DataFrame]:
    targets = ctx.option("targets", ",".join(ctx.task.probe_defaults)).split(",")
    frame = ctx.walk(probe, targets=ctx.task.check_probe_targets(targets), anatomy=True)
    groups = [p for p in ("masked", "observed") if p in set(frame.positions)] or [ctx.task.probe_focus]
    summary = pd.concat({p: probe_summary(frame, "r2", p) for p in groups}, names=["positions"])
    return {"probes": frame, "probes_summary": summary.reset_index()}


def probes_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    frame, focus = tables["probes"], ctx.task.probe_focus
    first = first_step_encoded(frame, positions=focus).rename("first_step_r2_over_0.5").reset_index()
    return {"probes": plot_probes(frame, "r2", focus), f"probes_{focus}": probe_summary(frame, "r2", focus),
            "first_encoded": first}


def embeddings_tables(ctx) -> dict[str, pd.DataFrame]:
    data = ctx.run.config.data
    geometry = partial(embedding_geometry, anatomy=ctx.anatomy)  # the model's own tables (not a bridged copy)
    return {"embeddings": ctx.walk(geometry, precision=data.precision, value_max=data.value_max)}


def embeddings_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    data = ctx.run.config.data
    model = ctx.model(int(tables["embeddings"].step.max()))
    return {"embeddings": plot_embedding_geometry(tables["embeddings"]),
            "token_embeddings": plot_token_embeddings(token_embedding_plane(model, ctx.batch, data.precision,
                                                                            data.value_max, anatomy=ctx.anatomy)),
            "position_tsne": plot_position_tsne(position_tsne(model, data.m, data.n, anatomy=ctx.anatomy))}
