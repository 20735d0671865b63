from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mechlrmc.config import preset
from mechlrmc.runs import Run
from mechlrmc.train import train

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_RUN = ROOT / "checkpoints" / "cpu"
# The vector ISA torch's kernels dispatched to when the shipped run was trained (benchmarks/RESULTS.md:
# an AVX-512 AMD EPYC). Its floats are exact only on that ISA: another one rounds differently from step 0.
REFERENCE_ISA = "AVX512"

torch.set_num_threads(1)  # the test models are tiny; one thread is fastest and deterministic


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


RAY_WORDS = ("sweep", "intervention", "ray", "cluster")  # tests that start Ray run one after another


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, as `make test` runs), the tests that start Ray
    (a sweep, a cluster, a driver that trains runs through the sweep, a notebook that calls one)
    share one worker, one at a time, so two local Ray instances never compete for the machine; the
    rest spread over both."""
    import inspect

    for item in items:
        source = inspect.getsource(item.function).lower() if hasattr(item, "function") else ""
        notebook = getattr(item, "callspec", None) and item.callspec.params.get("path")
        if isinstance(notebook, Path) and notebook.suffix == ".ipynb":
            source += notebook.read_text().lower()
        if item.path.name in ("test_cluster.py", "test_sweep.py") or any(w in source for w in RAY_WORDS):
            item.add_marker(pytest.mark.xdist_group("ray"))
