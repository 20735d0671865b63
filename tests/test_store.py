"""Cached measurements: reused for the same checkpoint and settings, never when either changed."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from analyses.base.store import cached, clear, entry_path
from mechlrmc.runs import CheckpointError, Run


@pytest.fixture
def run(tiny_run, tmp_path) -> Run:
    return Run(shutil.copytree(tiny_run.path, tmp_path / "run"))


def _counter():
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"chain": [0, 1], "loss": [0.125, 0.25], "burnin": [True, False]})

    return calls, compute


def test_a_second_call_reads_the_entry_and_the_frame_survives_the_round_trip(run):
    calls, compute = _counter()
    first = cached(run, "probe", 20, {"lr": 1e-3}, compute)
    second = cached(run, "probe", 20, {"lr": 1e-3}, compute)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, second)
    assert entry_path(run, "probe", 20, {"lr": 1e-3}).is_file()
    assert not list(run.path.glob("cache/**/.*tmp*")), "no temporary file is left behind"


def test_other_settings_steps_or_weights_are_computed_anew(run):
    calls, compute = _counter()
    cached(run, "probe", 20, {"lr": 1e-3}, compute)
    cached(run, "probe", 20, {"lr": 2e-3}, compute)  # other settings
    cached(run, "probe", 40, {"lr": 1e-3}, compute)  # another checkpoint
    assert len(calls) == 3
    run.save_checkpoint(20, run.state_dict(40))  # step 20 retrained: a new hash in the manifest
    cached(run, "probe", 20, {"lr": 1e-3}, compute)
    assert len(calls) == 4
    clear(run)
    cached(run, "probe", 40, {"lr": 1e-3}, compute)
    assert len(calls) == 5


def test_an_entry_of_modified_weights_is_never_used(run):
    calls, compute = _counter()
    cached(run, "probe", 20, {}, compute)
    file = run.checkpoint_path(20)
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        cached(run, "probe", 20, {}, compute)
    assert len(calls) == 1


def test_a_read_only_run_still_computes(run):
    calls, compute = _counter()
    shutil.rmtree(run.path / "cache", ignore_errors=True)
    (run.path / "cache").write_text("not a folder")  # nothing can be stored under it
    frame = cached(run, "probe", 20, {}, compute)
    assert len(frame) == 2 and len(calls) == 1
