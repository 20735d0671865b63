from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mechlrmc.config import preset
from mechlrmc.runs import Run
from mechlrmc.train import train

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_RUN = ROOT / "checkpoints" / "cpu"

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
