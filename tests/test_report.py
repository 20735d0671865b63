"""The report opens offline in headless Chromium with every section filled and no JS error.

Needs Debian's `chromium` and `chromium-driver`; the fixture installs them with apt-get when they
are missing and this is root, and skips (saying why) where they cannot be installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from analyses.base import registry
from analyses.report import run_report as report_module
from mechlrmc.cli import main

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000")

# every plotly figure drew an SVG and holds at least one trace with data
FIGURES_JS = """
return Array.from(document.querySelectorAll('div.plotly-graph-div')).map(gd => ({
  id: gd.id,
  drawn: !!gd.querySelector('svg.main-svg'),
  filled: Array.isArray(gd._fullData) && gd._fullData.length > 0 && gd._fullData.some(
    t => ['x', 'y', 'z'].some(k => t[k] && t[k].length > 0)),
}));
"""


def _chromium_or_skip() -> None:
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("headless Chromium is missing and cannot be installed here (needs root and apt-get): "
                    "apt-get install chromium chromium-driver")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium / chromium-driver: {' '.join(command)} failed: "
                        f"{done.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    _chromium_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(condition, timeout: float = 30.0, every: float = 0.5):
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > end:
            return value
        time.sleep(every)


def test_quick_report_opens_offline_with_every_section_filled(reference_run, tmp_path, browser):
    path = tmp_path / "report.html"
    assert main(["report", str(reference_run.path), "-o", str(path), "--quick", "--quiet"]) == 0
    text = path.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text), "the report must not load scripts from anywhere"
    assert 'data-status="error"' not in text
    sections = re.findall(r'<section id="([^"]+)" data-status="ok">', text)
    lrmc = [a.name for a in registry.ANALYSES if a.name != "interventions" and "generation" not in a.requires]
    assert lrmc == sections

    browser.get(path.resolve().as_uri())
    figures = _wait(lambda: (f := browser.execute_script(FIGURES_JS)) and all(x["drawn"] for x in f) and f)
    assert figures and len(figures) >= len(sections) - 2
    assert [f["id"] for f in figures if not (f["drawn"] and f["filled"])] == []

    frames = browser.find_elements("css selector", "iframe.views")
    assert len(frames) == 3  # before, at and after the drop
    for frame in frames:
        browser.switch_to.frame(frame)
        views = _wait(lambda: browser.execute_script(
            "const v = document.querySelectorAll('div.view');"
            "return v.length > 0 && Array.from(v).every(d => d.childElementCount > 0) && v.length;"))
        browser.switch_to.default_content()
        assert views, "a circuitsvis view in the attention iframes rendered nothing"

    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe


def test_a_failing_section_is_reported_in_place(tiny_run, monkeypatch):
    def broken(ctx):
        raise RuntimeError("planted failure")

    entries = [registry.ANALYSES[0], registry.Analysis("broken", "Broken", "finding 0", "always fails", broken, broken)]
    monkeypatch.setattr(registry, "ANALYSES", entries)
    report = report_module.build_report(tiny_run, quick=True, progress=False)
    assert report.errors == {"broken": "RuntimeError: planted failure"}
    assert '<section id="overview" data-status="ok">' in report.html
    assert '<section id="broken" data-status="error">' in report.html
    assert "planted failure" in report.html
