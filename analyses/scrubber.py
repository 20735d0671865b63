"""Attention across training, scrubbed: one figure whose slider walks through the checkpoints.

Every head's attention pattern averaged over a batch of random masks, or of sequences on a
sequence task ([layer, head, query, key]),
drawn as a layers x heads grid of heatmaps, each titled with the head's taxonomy label at that
checkpoint (`analyses.heads.head_taxonomy`). Moving the slider swaps the patterns and labels, so a
reader watches the row and column heads of finding 4 (docs/FINDINGS.md) form around the drop. The figure is
plain plotly (slider steps restyle the heatmaps), so it works offline wherever plotly.js is
inlined once; all checkpoints' patterns travel in the file, rounded to 3 decimals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.cache import mean_patterns
from analyses.heads import head_taxonomy
from analyses.sequences import head_map_share
from analyses.views import token_names
from analyses.walk import Steps, across_checkpoints, analysis_batch
from mechlrmc.tasks.lrmc import Batch
from mechlrmc.model import HookedEncoder
from mechlrmc.runs import Run

LABEL_COLOURS = {"row": "#1f77b4", "column": "#d62728", "self": "#2ca02c", "observed-only": "#9467bd"}


def pattern_frame(model: HookedEncoder, batch: Batch) -> pd.DataFrame:
    """Average attention pattern of every head as a long table (layer, head, query, key, weight)."""
    patterns = mean_patterns(model, batch.tokens)  # [layer, head, q, k]
    index = pd.MultiIndex.from_product([range(s) for s in patterns.shape], names=["layer", "head", "query", "key"])
    return pd.DataFrame({"weight": patterns.flatten().numpy()}, index=index).reset_index()


def scrub_data(run: Run, steps: Steps = None, batch: Batch | None = None, progress: bool = True
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(average patterns, head labels over all queries) at every selected checkpoint (default:
    all); the labels are LRMC's taxonomy, or a sequence task's share on its optimal map."""
    patterns = across_checkpoints(run, pattern_frame, steps=steps, batch=batch, progress=progress)
    if run.config.data.task == "lrmc":
        labels = across_checkpoints(run, head_taxonomy, steps=steps, batch=batch, progress=progress, queries="all")
    else:
        labels = across_checkpoints(run, head_map_share, steps=steps, batch=batch, progress=progress).assign(queries="all")
    return patterns, labels


def _title(layer: int, head: int, label: str) -> str:
    return f"L{layer}H{head} {label}"


def plot_attention_scrubber(patterns: pd.DataFrame, taxonomy: pd.DataFrame, m: int | None = None,
                            n: int | None = None, drop_step: float | None = None,
                            names: list[str] | None = None, causal: bool = False) -> go.Figure:
    """Layers x heads grid of average attention patterns with a slider over checkpoints; subplot
    titles carry each head's label at that step (LRMC: row heads blue, column heads red; a sequence
    task: its share on the optimal map). Positions are LRMC's `r{i}c{j}` of an m x n matrix, or
    the given `names` (`views.token_names`); a `causal` model's upper triangle is left blank."""
    steps = sorted(patterns.step.unique())
    names = names or [f"r{i}c{j}" for i in range(m) for j in range(n)]
    layers, heads, pos = int(patterns.layer.max()) + 1, int(patterns["head"].max()) + 1, len(names)
    found = patterns["query"].max() + 1
    if found != pos:
        raise ValueError(f"patterns have {found} positions: expected " + (f"m*n = {pos}" if m else f"{pos} names"))
    grids = (patterns.sort_values(["step", "layer", "head", "query", "key"]).weight.to_numpy()
             .astype(float).reshape(len(steps), layers, heads, pos, pos).round(3))
    if causal:  # blank, not zero, above the diagonal
        grids[..., np.triu_indices(pos, 1)[0], np.triu_indices(pos, 1)[1]] = np.nan
    labels = taxonomy[taxonomy.queries == "all"].set_index(["step", "layer", "head"]).label
    fig = make_subplots(rows=layers, cols=heads, horizontal_spacing=0.012, vertical_spacing=0.05,
                        subplot_titles=[_title(l, h, labels.get((steps[0], l, h), "")) for l in range(layers)
                                        for h in range(heads)])
    for l in range(layers):
        for h in range(heads):
            fig.add_heatmap(z=grids[0, l, h], x=names, y=names, coloraxis="coloraxis", row=l + 1, col=h + 1,
                            hovertemplate=f"L{l}H{h}<br>query %{{y}}<br>key %{{x}}<br>weight %{{z:.3f}}<extra></extra>")
    relative = "" if drop_step is None or pd.isna(drop_step) else "drop {:+d}"
    slider_steps = []
    for k, step in enumerate(steps):
        titles = {}
        for i, (l, h) in enumerate((l, h) for l in range(layers) for h in range(heads)):
            label = labels.get((step, l, h), "")
            titles[f"annotations[{i}].text"] = _title(l, h, label)
            titles[f"annotations[{i}].font.color"] = LABEL_COLOURS.get(label, "#444")
        tag = f"{step}" + (f" ({relative.format(int(step - drop_step))})" if relative else "")
        slider_steps.append(dict(method="update", label=tag,
                                 args=[{"z": [grids[k, l, h].tolist() for l in range(layers) for h in range(heads)]},
                                       titles]))
    for i, (l, h) in enumerate((l, h) for l in range(layers) for h in range(heads)):
        fig.layout.annotations[i].font = dict(size=10, color=LABEL_COLOURS.get(labels.get((steps[0], l, h)), "#444"))
    fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False, autorange="reversed")
    low, high = min(0.0, float(np.nanquantile(grids, 0.005))), float(np.nanquantile(grids, 0.995))
    signed = low < 0  # linear attention: signed scores on a diverging scale
    colours = "RdBu_r" if signed else "Viridis"
    return fig.update_layout(
        title="Average attention of every head across training (queries down, keys across; title: head label)",
        coloraxis=dict(colorscale=colours, cmin=low, cmax=high, **({"cmid": 0.0} if signed else {}),
                       colorbar=dict(title="weight<br>(top 0.5 %<br>saturated)")),
        sliders=[dict(active=0, steps=slider_steps, currentvalue=dict(prefix="checkpoint "), pad=dict(t=30))],
        template="plotly_white", height=int(min(600, max(170, 1000 / heads)) * layers) + 200,
        margin=dict(l=30, r=30, t=80, b=30))


def save_attention_scrubber(run: Run, path: str | Path, steps: Steps = None, batch: Batch | None = None,
                            drop_step: float | None = None, progress: bool = True) -> Path:
    """Compute `scrub_data` and write the scrubber as one offline HTML file (plotly.js inlined)."""
    batch = batch if batch is not None else analysis_batch(run)
    patterns, taxonomy = scrub_data(run, steps, batch, progress)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_attention_scrubber(patterns, taxonomy, drop_step=drop_step, names=token_names(batch),
                                  causal=run.config.model.causal)
    fig.write_html(path, include_plotlyjs=True)
    return path



# ----- registry entry (analyses.registry) -------------------------------------------------------

SCRUB_BATCH = 256  # matrices behind each average pattern


def scrubber_tables(ctx) -> dict[str, pd.DataFrame]:
    return {"patterns": ctx.walk(pattern_frame, steps=ctx.every_step, batch=ctx.batch[:SCRUB_BATCH])}


def scrubber_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    patterns = tables["patterns"]
    steps = sorted(patterns.step.unique())
    sequences = ctx.run.config.data.task != "lrmc"
    over = "sequences" if sequences else "random masks"
    labels = ("share of attention on the task's optimal map" if sequences
              else "label at that step (row heads blue, column heads red)")
    note = (f"<p>{len(steps)} checkpoints, patterns averaged over {min(SCRUB_BATCH, len(ctx.batch))} {over}. "
            f"Drag the slider: titles give each head's {labels}.</p>")
    taxonomy = ctx.taxonomy[ctx.taxonomy.step.isin(steps)]
    fig = plot_attention_scrubber(patterns, taxonomy, drop_step=ctx.phases.drop_step, names=token_names(ctx.batch),
                                  causal=ctx.run.config.model.causal)
    return {"note": note, "scrubber": fig}
