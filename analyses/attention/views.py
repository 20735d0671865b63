"""Attention views: circuitsvis patterns of every head of a checkpoint as one offline HTML page.

Per layer: the pattern averaged over a batch (positions named by the batch: `position_names`),
then single examples, each preceded by its data (`example_rows`) and with its tokens named by
the batch (`example_names`): on LRMC the positions are `r{i}c{j}`, the example is its matrix with
the masked entries marked; on a sequence task the positions are `x1..xL`, `SEP`, `y1..` and the
example is its sequence. A causal model's views hide the upper triangle; linear attention
(signed scores, no softmax) is drawn on a symmetric scale. The circuitsvis script is inlined once
per page, so the file works offline.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import circuitsvis as cv
import torch

from analyses.attention.figures import plot_attention_scrubber
from analyses.attention.scrubber import scrub_data
from analyses.base.cache import chunked_patterns, mean_patterns
from analyses.base.walk import Steps, analysis_batch
from mechlrmc.anatomy import Anatomy, subject_of
from mechlrmc.errors import OptionError
from mechlrmc.runs import Run
from mechlrmc.tasks.lrmc import Batch

_RENDER = "CircuitsVis.render("


_SCRIPT = re.compile(r'<div id="([^"]+)"[^>]*>\s*<script crossorigin type="module">(.*)</script>', re.S)


def _example_table(batch, example: int) -> str:
    """One example as an HTML table (the batch's `example_rows`: greyed cells marked)."""
    cells = "".join("<tr>" + "".join(f'<td class="masked">{html.escape(text)}</td>' if grey else
                                     f"<td>{html.escape(text)}</td>" for text, grey in row) + "</tr>"
                    for row in batch.example_rows(example))
    return f'<table class="matrix">{cells}</table>'


def _split(rendered: cv.utils.render.RenderedHTML) -> tuple[str, str, str]:
    """(div id, circuitsvis bundle, render call) of one rendered view."""
    match = _SCRIPT.search(rendered.local_src)
    if match is None or _RENDER not in match.group(2):
        raise RuntimeError("circuitsvis' local_src has an unexpected layout: cannot inline its script")
    bundle, call = match.group(2).split(_RENDER, 1)
    return match.group(1), bundle, _RENDER + call


def attention_page(
    model: torch.nn.Module,
    batch,
    examples: tuple[int, ...] = (0, 1),
    head_labels: dict[tuple[int, int], str] | None = None,
    title: str = "Attention patterns",
    chunk_size: int = 512,
    anatomy: Anatomy | None = None,
) -> str:
    """A standalone HTML page of all heads: averaged over `batch` and for each of `examples`.
    `head_labels` ({(layer, head): label}, e.g. from `head_taxonomy`) are appended to head names."""
    bad = [e for e in examples if not 0 <= e < len(batch)]
    if bad:
        raise OptionError(f"examples {bad} are out of range: allowed 0 <= example < {len(batch)}")
    model, anatomy = subject_of(model, anatomy)
    averaged = mean_patterns(model, batch.tokens, chunk_size=chunk_size, anatomy=anatomy)  # [layer, head, q, k]
    chosen = batch[torch.tensor(examples, dtype=torch.long)]
    _, patterns = next(chunked_patterns(model, chosen.tokens, anatomy=anatomy, chunk_size=len(examples)))
    labels = head_labels or {}
    sections, calls, bundle = [], [], None
    causal = bool(getattr(getattr(model, "cfg", None), "causal", False)) or bool(
        (averaged.abs().sum((0, 1)).triu(1) == 0).all() and averaged.shape[-1] > 1)
    signed = anatomy.pattern_kind == "linear" or getattr(getattr(model, "cfg", None), "attention", "softmax") == "linear"

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

    for layer in range(anatomy.n_layers):
        top = float(averaged[layer].abs().max())
        scale = f"-{top:.2f} to {top:.2f}, signed linear attention" if signed else f"0 to {top:.2f}"
        over = batch.description
        sections.append(f"<h2>Layer {layer}</h2><h3>Averaged over {len(batch)} {over} "
                        f"(colour scale {scale})</h3>")
        sections.append(view(averaged[layer], batch.position_names(), layer, top))
        for i, example in enumerate(examples):
            what = batch.example_caption
            sections.append(f"<h3>Example {example} ({what})</h3>")
            sections.append(_example_table(chosen, i))
            sections.append(view(patterns[layer][i], chosen.example_names(i), layer, None if signed else 1.0))
    style = ("body{font-family:sans-serif;margin:20px} table.matrix{border-collapse:collapse;margin:6px 0}"
             " .matrix td{border:1px solid #bbb;padding:3px 7px;text-align:right;font-family:monospace}"
             " .matrix td.masked{background:#ddd;color:#777}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}"
            f'<script crossorigin type="module">{bundle}\n{";".join(calls)}</script></body></html>')


def save_attention_views(model: torch.nn.Module, batch: Batch, path: str | Path, **kwargs) -> Path:
    """Write `attention_page(model, batch, **kwargs)` to `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(attention_page(model, batch, **kwargs))
    return path


def save_attention_scrubber(run: Run, path: str | Path, steps: Steps = None, batch: Batch | None = None,
                            drop_step: float | None = None, progress: bool = True) -> Path:
    """Compute `scrub_data` and write the scrubber as one offline HTML file (plotly.js inlined)."""
    batch = batch if batch is not None else analysis_batch(run)
    patterns, taxonomy = scrub_data(run, steps, batch, progress)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_attention_scrubber(patterns, taxonomy, drop_step=drop_step, names=batch.position_names(),
                                  causal=run.config.model.causal)
    fig.write_html(path, include_plotlyjs=True)
    return path
