"""One offline HTML page from sections of parts: the layout shared by the run and family reports.

A part is a plotly figure, a DataFrame (shown as a table), a `Page` (a standalone HTML document,
shown in an iframe: circuitsvis views) or a string (an HTML fragment: a caption or a note).
`assemble` computes each section with its builder and lays the results out: a table of contents,
then one `<section>` per entry with its caption, finding tag and time. plotly's JS is inlined once
in the head, so the file opens offline. A section whose builder raises shows the error in place
(`data-status="error"`) and the others are still written; `Report.errors` lists the failures.
"""

from __future__ import annotations

import html
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from mechlrmc.runs import atomic_write


@dataclass(frozen=True)
class Page:
    """A standalone HTML document (an iframe in the report, its own file from `mechlrmc analyze`)."""

    html: str
    title: str = ""


Part = go.Figure | pd.DataFrame | Page | str


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    finding: str  # the finding it reproduces (docs/FINDINGS.md)
    caption: str  # one line: what it shows
    build: Callable[[object], list[Part] | Drawn]  # the shared context -> the parts to show (with their tables)


@dataclass
class Drawn:
    """What a section's builder may return instead of its bare parts: the parts and the tables they
    were drawn from (kept in `Report.tables`)."""

    parts: list[Part]
    tables: dict[str, pd.DataFrame]


@dataclass
class Report:
    html: str
    errors: dict[str, str] = field(default_factory=dict)  # section key -> error message
    seconds: dict[str, float] = field(default_factory=dict)
    context: object = None  # the sections' shared context (its cached tables)
    tables: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)  # section key -> its tables, by name

    def write(self, path: str | Path) -> Path:
        """The HTML written to `path` (parents created), atomically: a reader sees the old file or
        the whole new one, never half a report."""
        path = Path(path)
        atomic_write(path, self.html.encode("utf-8"))
        return path


def render(part: Part, index: int) -> str:
    """One part as an HTML fragment (`index` numbers the figures' div ids)."""
    if isinstance(part, go.Figure):
        return part.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{index}",
                            config={"displaylogo": False, "responsive": True})
    if isinstance(part, pd.DataFrame):
        plain_index = part.index.name is None and part.index.equals(pd.RangeIndex(len(part)))
        return part.to_html(classes="table", float_format=lambda v: f"{v:.4g}", na_rep="-", border=0,
                            index=not plain_index)
    if isinstance(part, Page):
        return (f'<iframe class="views" title="{html.escape(part.title, quote=True)}" '
                f'srcdoc="{html.escape(part.html, quote=True)}"></iframe>')
    return part


def _section_html(section: Section, content: str, status: str, seconds: float) -> str:
    return (f'<section id="{section.key}" data-status="{status}"><h2>{html.escape(section.title)}</h2>'
            f'<p class="caption">{html.escape(section.caption)} <span class="finding">'
            f'{html.escape(section.finding)}</span> <span class="time">{seconds:.1f} s</span></p>{content}</section>')


@dataclass
class Result:
    """What one section's builder gave: its parts (and tables), or the error line and traceback; and its time."""

    parts: list[Part] | None
    error: str | None = None
    trace: str = ""
    seconds: float = 0.0
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def run_section(section: Section, ctx) -> Result:
    """Build one section, catching its failure (one failing analysis must not take the page down)."""
    import torch

    start = time.perf_counter()
    try:
        with torch.no_grad():
            built = section.build(ctx)
            result = Result(built.parts, tables=built.tables) if isinstance(built, Drawn) else Result(list(built))
    except Exception as e:
        result = Result(None, f"{type(e).__name__}: {e}", traceback.format_exc(limit=-3))
    result.seconds = time.perf_counter() - start
    return result


def assemble(title: str, intro: str, sections: Iterable[Section], ctx, progress: bool = True,
             results: dict[str, Result] | None = None) -> Report:
    """Build each section (or take its `Result` from `results`, by section key: e.g. computed in
    another process) and lay the page out (see the module docstring)."""
    import plotly.offline

    sections = list(sections)
    report = Report(html="", context=ctx)
    bodies, figure_index = [], 0
    for section in tqdm(sections, desc="report", unit="section", disable=not progress):
        result = (results or {}).get(section.key) or run_section(section, ctx)
        report.seconds[section.key] = result.seconds
        report.tables[section.key] = result.tables
        if result.error is None:
            rendered = []
            for part in result.parts:
                rendered.append(render(part, figure_index))
                figure_index += isinstance(part, go.Figure)
            content, status = "\n".join(rendered), "ok"
        else:
            report.errors[section.key] = result.error
            content = (f'<div class="error"><b>This section failed:</b> {html.escape(result.error)}'
                       f"<pre>{html.escape(result.trace)}</pre></div>")
            status = "error"
        bodies.append(_section_html(section, content, status, result.seconds))
    toc = "".join(f'<li><a href="#{s.key}">{html.escape(s.title)}</a> <span class="finding">'
                  f'{html.escape(s.finding)}</span>{" (failed)" if s.key in report.errors else ""}</li>'
                  for s in sections)
    report.html = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style><script>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{intro}</p>"
        f"<nav><ol>{toc}</ol></nav>{''.join(bodies)}</body></html>"
    )
    return report


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1280px;color:#222;padding:0 16px}
h1{font-size:1.6em} h2{margin-top:2.2em;border-bottom:1px solid #ddd;padding-bottom:4px}
.caption{color:#444} .finding{background:#eef3fb;color:#1f4e8c;border-radius:4px;padding:1px 6px;
font-size:.85em;white-space:nowrap} .time{color:#999;font-size:.8em}
table.table{border-collapse:collapse;font-size:.85em;margin:10px 0;display:block;overflow-x:auto;max-width:100%}
.table td,.table th{border:1px solid #ddd;padding:3px 8px;text-align:right}
.error{background:#fdecea;border:1px solid #e0a0a0;padding:8px 12px;border-radius:4px}
.error pre{white-space:pre-wrap;font-size:.8em}
iframe.views{width:100%;height:900px;border:1px solid #ddd;margin:8px 0}
nav ol{columns:2}
"""
