"""Attention views are standalone offline HTML, and `mechlrmc analyze attention` writes its files."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from analyses.attention.views import attention_page
from mechlrmc.cli import main
from mechlrmc.config import preset
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import sample


def test_page_is_offline_and_complete():
    cfg = preset("tiny")
    model = HookedEncoder(cfg, seed=0).eval()
    batch = sample(cfg.data, 32, torch.Generator().manual_seed(0))
    page = attention_page(model, batch, examples=(0, 3), head_labels={(1, 0): "row"})
    assert "unpkg.com" not in page and "https://" not in page.split("<script")[0]
    assert page.count("var CircuitsVis=") == 1  # the bundle is inlined once
    views = cfg.model.n_layers * (1 + 2)
    assert page.count("CircuitsVis.render(") == views and page.count('class="view"') == views
    assert "L1H0 row" in page and "L0H1" in page
    labels = batch.example_names(3)
    assert sum(l.endswith(":MASK") for l in labels) == int(batch.masked[3].sum())
    masked_cells = int(batch.masked[0].sum() + batch.masked[3].sum())  # one matrix table per layer
    assert page.count('class="masked"') == cfg.model.n_layers * masked_cells
    with pytest.raises(ValueError, match=r"examples \[32\]"):
        attention_page(model, batch, examples=(32,))


def test_analyze_attention_command(tiny_run, tmp_path):
    out = tmp_path / "out"
    assert main(["analyze", "attention", str(tiny_run.path), "-o", str(out), "--batch-size", "64"]) == 0
    taxonomy = pd.read_csv(out / "taxonomy.csv")
    assert sorted(taxonomy.step.unique()) == tiny_run.steps
    assert len(taxonomy) == len(tiny_run.steps) * 2 * 2 * 2  # steps x layers x heads x query groups
    assert set(pd.read_csv(out / "taxonomy_structured.csv").queries) == {"masked", "observed"}
    assert (out / "taxonomy.html").stat().st_size > 1e5 and (out / "phases.csv").is_file()
    views = sorted((out / "views").glob("attention_step_*.html"))
    assert views and "CircuitsVis.render(" in views[-1].read_text()
    scrubber = (out / "scrubber.html").read_text()
    assert all(f'"label":"{s}"' in scrubber for s in tiny_run.steps)  # one slider step per checkpoint
