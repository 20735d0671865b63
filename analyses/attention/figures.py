"""Figures of the attention lens: plotly figures drawn from the tables its estimators return (no computation beyond layout)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.attention.heads import SCORES
from mechlrmc.errors import OptionError

SHORT_LABELS = {"self": "S", "row": "R", "column": "C", "observed-only": "O", "uniform": "", "other": ""}


def plot_taxonomy(taxonomy: pd.DataFrame, queries: str = "all", drop_step: float | None = None) -> go.Figure:
    """Heatmap of the taxonomy scores over training: one row per (layer, head), one column per
    checkpoint, a menu to pick the score; cells carry the label's letter (R, C, S, O) and the
    hover the full label. Needs a `step` column
    (`across_checkpoints(run, head_taxonomy)`)."""
    frame = taxonomy[taxonomy.queries == queries]
    if frame.empty:
        raise OptionError(f"no rows with queries={queries!r}: available {sorted(taxonomy.queries.unique())}")
    frame = frame.assign(name=[f"L{l}H{h}" for l, h in zip(frame["layer"], frame["head"])])
    heads = list(dict.fromkeys(frame.sort_values(["layer", "head"]).name))
    steps = sorted(frame.step.unique())
    x = [str(s) for s in steps]
    labels = frame.pivot(index="name", columns="step", values="label").loc[heads, steps]
    # cell text: R row, C column, S self, O observed-only (a token task: M map, P previous, S self, F first)
    short = labels.map(lambda label: SHORT_LABELS.get(label, str(label)[:1].upper()))
    scores = [s for s in SCORES if s in frame] or [c for c in frame if c.startswith("share_")]
    fig = go.Figure()
    for i, score in enumerate(scores):
        z = frame.pivot(index="name", columns="step", values=score).loc[heads, steps]
        fig.add_heatmap(z=z.to_numpy(), x=x, y=heads, zmin=0, zmax=1, colorscale="Viridis", visible=i == 0,
                        customdata=labels.to_numpy(), name=score, text=short.to_numpy(), texttemplate="%{text}",
                        hovertemplate="%{y} step %{x}<br>" + score + " %{z:.3f}<br>label %{customdata}<extra></extra>")
    buttons = [dict(label=s, method="update", args=[{"visible": [j == i for j in range(len(scores))]},
                                                     {"title": f"Attention share: {s} ({queries} queries)"}])
               for i, s in enumerate(scores)]
    if drop_step is not None and not pd.isna(drop_step):
        nearest = min(steps, key=lambda s: abs(s - drop_step))
        fig.add_vline(x=steps.index(nearest), line_color="red", line_dash="dash",
                      annotation_text=f"drop ~{int(drop_step)}")
    fig.update_layout(title=f"Attention share: {scores[0]} ({queries} queries)", xaxis_title="step",
                      xaxis_type="category", yaxis_autorange="reversed", template="plotly_white",
                      updatemenus=[dict(buttons=buttons, x=1.0, y=1.12, xanchor="right")],
                      width=max(700, 40 * len(steps) + 200), height=max(400, 18 * len(heads) + 150))
    return fig


LABEL_COLOURS = {"row": "#1f77b4", "column": "#d62728", "self": "#2ca02c", "observed-only": "#9467bd"}


def _title(layer: int, head: int, label: str) -> str:
    return f"L{layer}H{head} {label}"


def plot_attention_scrubber(patterns: pd.DataFrame, taxonomy: pd.DataFrame, m: int | None = None,
                            n: int | None = None, drop_step: float | None = None,
                            names: list[str] | None = None, causal: bool = False) -> go.Figure:
    """Layers x heads grid of average attention patterns with a slider over checkpoints; subplot
    titles carry each head's label at that step (LRMC: row heads blue, column heads red; a sequence
    task: its share on the optimal map). Positions are LRMC's `r{i}c{j}` of an m x n matrix, or
    the given `names` (the batch's `position_names()`); a `causal` model's upper triangle is left blank."""
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


