from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mechlrmc import cluster
from mechlrmc.config import preset
from mechlrmc.runs import Run
from mechlrmc.train import train

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_RUN = ROOT / "checkpoints" / "cpu"
# The vector ISA torch's kernels dispatched to when the shipped run was trained (benchmarks/RESULTS.md:
# an AVX-512 AMD EPYC). Its floats are exact only on that ISA: another one rounds differently from step 0.
REFERENCE_ISA = "AVX512"

torch.set_num_threads(1)  # the test models are tiny; one thread is fastest and deterministic
# and every process the tests start (notebook kernels, command-line children, spawned pools, Ray's workers) on
# one thread too: `make test` runs two workers on two cores, and a child of two threads beside a busy worker
# waits at each kernel's barrier for the core it does not get (notebook 02: 97 s instead of 12)
os.environ["OMP_NUM_THREADS"] = "1"


def execute_notebook(path: Path, env: dict[str, str]):
    """Runs every cell of the notebook at `path` with the python3 kernel of this interpreter, the
    kernel started with `env` added to this process's environment; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, kernel_name="python3", timeout=600,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    return nb


def notebook_errors(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


@pytest.fixture
def no_png(monkeypatch):
    """The commands' figures are written as HTML only: kaleido's PNG export starts a browser (seconds),
    and the commands already fall back to the HTML where it fails."""
    import plotly.graph_objects as go

    def refuse(*args, **kwargs):
        raise RuntimeError("no PNG in the tests")

    monkeypatch.setattr(go.Figure, "write_image", refuse)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Run:
    """A 40-step run of the `tiny` preset (checkpoints 0, 10, 20, 40): real files, seconds to make."""
    return train(preset("tiny"), tmp_path_factory.mktemp("runs") / "tiny", progress=False)


@pytest.fixture(scope="session")
def reference_run() -> Run:
    """The shipped `cpu` reference run in checkpoints/cpu (plateau, drop and completion)."""
    if not (REFERENCE_RUN / "config.yaml").is_file():
        pytest.fail(f"the shipped reference run is missing from {REFERENCE_RUN}")
    return Run(REFERENCE_RUN)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, as `make test` runs), the tests marked `ray`
    (a sweep, a cluster, a driver that trains runs through the sweep, a notebook that calls one)
    share one worker, one at a time, so two local Ray instances never compete for the machine; the
    rest spread over both."""
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request, monkeypatch):
    """A test that joins or starts Ray in this process without the `ray` mark fails, naming the mark
    (so the grouping above stays exact)."""
    if request.node.get_closest_marker("ray"):
        return

    def unmarked(*args, **kwargs):
        pytest.fail(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray", pytrace=False)

    monkeypatch.setattr(cluster, "connect", unmarked)
