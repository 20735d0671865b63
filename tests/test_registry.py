"""The one list of analyses: every entry resolves, the CLI writes its tables and figures, a new
entry appears in the report and the CLI, and a report loads each checkpoint once."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import plotly.graph_objects as go

from analyses.base import registry
from analyses.base.context import QUICK, Context
from analyses.report.run_report import build_report
from mechlrmc.cli import main
from mechlrmc.runs import Run


def test_every_entry_names_functions_that_exist():
    names = [a.name for a in registry.ANALYSES]
    assert len(names) == len(set(names))
    for analysis in registry.ANALYSES:
        assert callable(analysis._resolve(analysis.tables)) and callable(analysis._resolve(analysis.figures))
        assert analysis.finding and analysis.caption and isinstance(analysis.requires, tuple)
    for members in registry.GROUPS.values():
        assert all(registry.get(m) for m in members)


def test_analyze_writes_the_entrys_tables_as_csv_and_figures_as_html(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "taxonomy", str(tiny_run.path), "-o", str(out), "--batch-size", "64", "--quiet"]) == 0
    taxonomy = pd.read_csv(out / "taxonomy.csv")
    assert sorted(taxonomy.step.unique()) == tiny_run.steps  # the entry's default: every checkpoint
    assert set(pd.read_csv(out / "taxonomy_structured.csv").queries) == {"masked", "observed"}
    assert "plotly" in (out / "taxonomy.html").read_text()[:5000].lower()
    assert (out / "head_onsets.csv").is_file() and (out / "head_counts.csv").is_file()
    assert "wrote" in capsys.readouterr().out


def test_a_new_entry_is_one_function_pair_and_one_item_of_the_list(tiny_run, tmp_path, monkeypatch):
    def tables(ctx):
        return {"mean_w_e": ctx.walk(lambda model, batch: pd.DataFrame({"mean": [float(model.W_E.detach().mean())]}))}

    def figures(ctx, tables):
        return {"mean_w_e_plot": go.Figure(go.Scatter(x=tables["mean_w_e"].step, y=tables["mean_w_e"]["mean"]))}

    planted = registry.Analysis("mean_embedding", "Mean embedding", "finding 8", "mean of W_E", tables, figures)
    monkeypatch.setattr(registry, "ANALYSES", [registry.ANALYSES[0], planted])
    report = build_report(tiny_run, quick=True, progress=False, workers=1)
    assert '<section id="mean_embedding" data-status="ok">' in report.html
    out = tmp_path / "out"
    assert main(["analyze", "mean_embedding", str(tiny_run.path), "-o", str(out), "--quiet"]) == 0
    assert len(pd.read_csv(out / "mean_w_e.csv")) == len(tiny_run.steps)
    assert (out / "mean_w_e_plot.html").is_file()


def test_a_report_loads_each_checkpoint_once(tiny_run, monkeypatch):
    loads = Counter()
    original = Run.load_model

    def counting(self, step, *args, **kwargs):
        loads[step] += 1
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(Run, "load_model", counting)
    report = build_report(tiny_run, quick=True, progress=False, workers=1)
    assert not report.errors, report.errors
    assert loads and max(loads.values()) == 1, loads


def test_the_context_shares_one_taxonomy_across_sections(tiny_run):
    ctx = Context(tiny_run, QUICK, progress=False)
    for name in ("taxonomy", "views", "scrubber"):
        analysis = registry.get(name)
        analysis.draw(ctx, analysis.compute(ctx))
    assert ctx.taxonomy is ctx.__dict__["taxonomy"]  # computed once, then reused
    assert set(ctx.taxonomy.step) == set(tiny_run.steps)
