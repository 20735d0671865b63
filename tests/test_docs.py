"""The documentation site builds cleanly (`mkdocs build --strict`: no broken link, no page outside
the nav, no mkdocstrings warning), and the README stays a front page that points into it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (site / "index.html").is_file()
    config = site / "reference" / "config" / "index.html"
    assert config.is_file() and 'id="mechlrmc.config"' in config.read_text()  # mkdocstrings rendered the module
    assert (site / "reference" / "analyses" / "index.html").is_file()


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "make demo" in text and "make test" in text
