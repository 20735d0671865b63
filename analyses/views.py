"""Attention views: circuitsvis patterns of every head of a checkpoint as one offline HTML page.

Per layer: the pattern averaged over a batch (tokens named by position), then single examples,
each preceded by its data. On LRMC the positions are `r{i}c{j}`, the example is its matrix with
the masked entries marked and the tokens show their value or MASK; on a sequence task
(`mechlrmc.tasks.tokens`) the positions are `x1..xL`, `SEP`, `y1..`, the example is its sequence
and the tokens show their value. A causal model's views hide the upper triangle; linear attention
(signed scores, no softmax) is drawn on a symmetric scale. The circuitsvis script is inlined once
per page, so the file works offline.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import circuitsvis as cv
import torch

from analyses.cache import cache_hooks, mean_patterns, pattern_names
from mechlrmc.tasks.lrmc import Batch, row_col_index
from mechlrmc.tasks.tokens import SequenceBatch
from mechlrmc.errors import OptionError
from mechlrmc.model import HookedEncoder

_RENDER = "CircuitsVis.render("
_SCRIPT = re.compile(r'<div id="([^"]+)"[^>]*>\s*<script crossorigin type="module">(.*)</script>', re.S)


def position_labels(m: int, n: int) -> list[str]:
    rows, cols = row_col_index(m, n)
    return [f"r{i}c{j}" for i, j in zip(rows.tolist(), cols.tolist())]


def sequence_labels(length: int) -> list[str]:
    """Names of a sequence task's model inputs: `x1..xL`, `SEP`, `y1..y(L-1)`."""
    return [f"x{i}" for i in range(1, length + 1)] + ["SEP"] + [f"y{j}" for j in range(1, length)]


def token_names(batch: Batch | SequenceBatch) -> list[str]:
    """Names of the batch's positions (LRMC `r{i}c{j}`, a sequence task `x1..`, `SEP`, `y1..`)."""
    if isinstance(batch, SequenceBatch):
        return sequence_labels(batch.length)
    return position_labels(batch.m, batch.n)


def example_labels(batch: Batch | SequenceBatch, example: int) -> list[str]:
    """Token names of one example: position and value, or MASK at masked entries (LRMC)."""
    if isinstance(batch, SequenceBatch):
        return [f"{name}:{t}" for name, t in zip(token_names(batch), batch.tokens[example].tolist())]
    values, observed = batch.values[example].tolist(), batch.observed[example].tolist()
    return [f"{p}:{v:+.2f}" if o else f"{p}:MASK"
            for p, v, o in zip(position_labels(batch.m, batch.n), values, observed)]


def _example_table(batch: Batch | SequenceBatch, example: int) -> str:
    """The example as an HTML table: LRMC's matrix (masked entries grey with the hidden truth in
    brackets), or a sequence's inputs and outputs in two rows."""
    if isinstance(batch, SequenceBatch):
        rows = (("x", batch.inputs[example].tolist()), ("y", batch.outputs[example].tolist()))
        cells = "".join(f"<tr><td class='masked'>{name}</td>" + "".join(f"<td>{v}</td>" for v in values) + "</tr>"
                        for name, values in rows)
        return f'<table class="matrix">{cells}</table>'
    values = batch.matrices[example].tolist()
    observed = batch.observed[example].view(batch.m, batch.n).tolist()
    cells = "".join(
        "<tr>" + "".join(
            f"<td>{v:+.2f}</td>" if o else f'<td class="masked">[{v:+.2f}]</td>' for v, o in zip(row, obs)
        ) + "</tr>"
        for row, obs in zip(values, observed)
    )
    return f'<table class="matrix">{cells}</table>'


def _split(rendered: cv.utils.render.RenderedHTML) -> tuple[str, str, str]:
    """(div id, circuitsvis bundle, render call) of one rendered view."""
    match = _SCRIPT.search(rendered.local_src)
    if match is None or _RENDER not in match.group(2):
        raise RuntimeError("circuitsvis' local_src has an unexpected layout: cannot inline its script")
    bundle, call = match.group(2).split(_RENDER, 1)
    return match.group(1), bundle, _RENDER + call


def attention_page(
    model: HookedEncoder,
    batch: Batch | SequenceBatch,
    examples: tuple[int, ...] = (0, 1),
    head_labels: dict[tuple[int, int], str] | None = None,
    title: str = "Attention patterns",
    chunk_size: int = 512,
) -> str:
    """A standalone HTML page of all heads: averaged over `batch` and for each of `examples`.
    `head_labels` ({(layer, head): label}, e.g. from `head_taxonomy`) are appended to head names."""
    bad = [e for e in examples if not 0 <= e < len(batch)]
    if bad:
        raise OptionError(f"examples {bad} are out of range: allowed 0 <= example < {len(batch)}")
    names = pattern_names(model)
    averaged = mean_patterns(model, batch.tokens, chunk_size=chunk_size)  # [layer, head, q, k]
    chosen = batch[torch.tensor(examples, dtype=torch.long)]
    _, cache = cache_hooks(model, chosen.tokens, names)
    labels = head_labels or {}
    sections, calls, bundle = [], [], None

    causal, signed = bool(getattr(model.cfg, "causal", False)), getattr(model.cfg, "attention", "softmax") != "softmax"

    def view(pattern: torch.Tensor, tokens: list[str], layer: int, max_value: float | None = None) -> str:
        nonlocal bundle
        head_names = [f"L{layer}H{h}" + (f" {labels[layer, h]}" if (layer, h) in labels else "")
                      for h in range(pattern.shape[0])]
        top = float(pattern.abs().max()) if signed or max_value is None else max_value
        rendered = cv.attention.attention_heads(attention=pattern, tokens=tokens,
                                                attention_head_names=head_names, mask_upper_tri=causal,
                                                max_value=top, min_value=-top if signed else 0.0)
        div, script, call = _split(rendered)
        bundle = bundle or script
        calls.append(call)
        return f'<div id="{div}" class="view"></div>'

    for layer, name in enumerate(names):
        top = float(averaged[layer].abs().max())
        scale = f"-{top:.2f} to {top:.2f}, signed linear attention" if signed else f"0 to {top:.2f}"
        over = "sequences" if isinstance(batch, SequenceBatch) else "random masks"
        sections.append(f"<h2>Layer {layer}</h2><h3>Averaged over {len(batch)} {over} "
                        f"(colour scale {scale})</h3>")
        sections.append(view(averaged[layer], token_names(batch), layer, top))
        for i, example in enumerate(examples):
            what = "inputs x, outputs y" if isinstance(batch, SequenceBatch) else "masked entries grey, truth in brackets"
            sections.append(f"<h3>Example {example} ({what})</h3>")
            sections.append(_example_table(chosen, i))
            sections.append(view(cache[name][i], example_labels(chosen, i), layer, None if signed else 1.0))
    style = ("body{font-family:sans-serif;margin:20px} table.matrix{border-collapse:collapse;margin:6px 0}"
             " .matrix td{border:1px solid #bbb;padding:3px 7px;text-align:right;font-family:monospace}"
             " .matrix td.masked{background:#ddd;color:#777}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}"
            f'<script crossorigin type="module">{bundle}\n{";".join(calls)}</script></body></html>')


def save_attention_views(model: HookedEncoder, batch: Batch, path: str | Path, **kwargs) -> Path:
    """Write `attention_page(model, batch, **kwargs)` to `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(attention_page(model, batch, **kwargs))
    return path


# ----- registry entry (analyses.registry) -------------------------------------------------------

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
    from analyses.page import Page

    parts = {}
    for moment, step in _view_steps(ctx).items():
        at = tables["views"][tables["views"].step == step]
        labels = {(r.layer, r.head): r.label for r in at.itertuples()} or None
        page = attention_page(ctx.model(step), ctx.batch, examples=(0,), head_labels=labels,
                              title=f"{ctx.run.path.name}, {moment}: attention at step {step}")
        parts[f"views/attention_step_{step:06d}"] = Page(page, f"attention at step {step}")
    return parts
