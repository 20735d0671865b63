"""The attention scrubber: one offline page whose slider changes the patterns and labels shown."""

from __future__ import annotations

import re

import pytest
from test_report import _wait, browser  # noqa: F401  (the headless Chromium fixture)

from analyses.attention.figures import plot_attention_scrubber
from analyses.attention.views import save_attention_scrubber
from analyses.attention.scrubber import pattern_frame, scrub_data
from analyses.base.walk import analysis_batch

HEATMAPS_JS = """
const gd = document.querySelector('div.plotly-graph-div');
return {active: gd.layout.sliders[0].active,
        z: JSON.stringify(gd.data.map(t => Array.from(t.z, row => Array.from(row)))),
        titles: gd.layout.annotations.map(a => a.text)};
"""


def test_pattern_frame_rows_sum_to_one(tiny_run):
    batch = analysis_batch(tiny_run, 16)
    frame = pattern_frame(tiny_run.load_model(40), batch)
    cfg = tiny_run.config.model
    assert len(frame) == cfg.n_layers * cfg.n_heads * batch.tokens.shape[1] ** 2
    sums = frame.groupby(["layer", "head", "query"]).weight.sum()
    assert sums.between(1 - 1e-5, 1 + 1e-5).all()


def test_one_slider_step_per_checkpoint_with_that_steps_labels(tiny_run):
    patterns, taxonomy = scrub_data(tiny_run, batch=analysis_batch(tiny_run, 16), progress=False)
    taxonomy.loc[(taxonomy.step == 40) & (taxonomy.layer == 1) & (taxonomy["head"] == 0), "label"] = "row"
    data = tiny_run.config.data
    fig = plot_attention_scrubber(patterns, taxonomy, data.m, data.n)
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == [str(s) for s in tiny_run.steps]
    heads = tiny_run.config.model.n_heads
    assert steps[-1].args[1][f"annotations[{heads}].text"] == "L1H0 row"
    assert len(steps[-1].args[0]["z"]) == tiny_run.config.model.n_layers * heads


def test_slider_changes_the_picture_offline(reference_run, tmp_path, browser):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains

    path = save_attention_scrubber(reference_run, tmp_path / "scrubber.html", steps=[0, 2000, 8000],
                                   batch=analysis_batch(reference_run, 32), progress=False)
    assert not re.search(r"<script[^>]*\bsrc=", path.read_text()), "the page must not load scripts from anywhere"
    browser.get(path.resolve().as_uri())
    assert _wait(lambda: browser.execute_script("return !!document.querySelector('rect.slider-rail-touch-rect')"))
    before = browser.execute_script(HEATMAPS_JS)
    graph = browser.find_element("css selector", "div.plotly-graph-div")
    shot_before = graph.screenshot_as_png
    rail = browser.find_element("css selector", "rect.slider-rail-touch-rect")
    ActionChains(browser).move_to_element_with_offset(rail, rail.size["width"] // 2 - 4, 0).click().perform()
    after = _wait(lambda: (s := browser.execute_script(HEATMAPS_JS))["active"] != before["active"] and s)
    assert after, "clicking the slider's end did not move it"
    assert before["active"] == 0 and after["active"] == 2
    assert after["z"] != before["z"]
    # the row and column heads of the trained model are named in the titles at the last checkpoint
    assert any(t.endswith((" row", " column")) for t in after["titles"]), after["titles"]
    assert after["titles"] != before["titles"]
    assert graph.screenshot_as_png != shot_before
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe


def test_wrong_shape_is_refused(tiny_run):
    patterns, taxonomy = scrub_data(tiny_run, steps=[40], batch=analysis_batch(tiny_run, 8), progress=False)
    with pytest.raises(ValueError, match="expected m\\*n = 9"):
        plot_attention_scrubber(patterns[patterns["query"] < 3], taxonomy, 3, 3)
