"""The notebooks run top to bottom against the shipped run (outputs are kept out of the repo)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from conftest import execute_notebook, notebook_errors

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
STARTS_RAY = {"03_components_and_dynamics"}  # its freeze_sweep trains through the sweep
# 06 trains the worked example's minGPT; tests/test_record.py runs it and builds the report of the run it
# records (one training for both)
RUN_ELSEWHERE = {"06_your_own_loop"}


def test_there_are_six_notebooks_without_outputs():
    assert [p.stem for p in NOTEBOOKS] == ["01_quick_tour", "02_probes_and_patching", "03_components_and_dynamics",
                                          "04_attribution_and_llc", "05_your_own_task", "06_your_own_loop"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert stale == [], f"{path.name}: cells {stale} carry outputs; strip them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.ray] if p.stem in STARTS_RAY else [])
                                  for p in NOTEBOOKS if p.stem not in RUN_ELSEWHERE],
                         ids=[p.stem for p in NOTEBOOKS if p.stem not in RUN_ELSEWHERE])
def test_notebook_runs(path, reference_run, tmp_path):
    """Executes every cell with the python3 kernel of this interpreter; any exception fails. MECHLRMC_QUICK
    shortens what a notebook trains (03's component-wise runs: 40 steps, not 300)."""
    nb = execute_notebook(path, {"MECHLRMC_RUN": str(reference_run.path), "MECHLRMC_QUICK": "1"})
    assert notebook_errors(nb) == []
