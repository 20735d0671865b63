"""One writer per run, readers never blocked, and write failures that lose nothing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from forkserver import Server, assert_same_run

from mechlrmc.cli import main
from mechlrmc.config import preset
from mechlrmc.runs import METRIC_COLUMNS, Run, RunLock, RunLockedError
from mechlrmc.train import Trainer

# a model small enough that metrics.csv (log_every=1) outgrows the resume state
SMALL = ["train", "--preset", "tiny", "--steps", "200", "--quiet", "--set", "train.threads=1",
         "--set", "data.value_max=1", "--set", "data.precision=0.1", "--set", "model.d_model=4",
         "--set", "model.n_heads=1", "--set", "model.d_mlp=4", "--set", "model.n_layers=1",
         "--set", "train.log_every=1", "--set", "train.checkpoint_every=25"]


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return Run(shutil.copytree(tiny_run.path, tmp_path / "copy"))


def test_second_writer_is_refused_naming_pid_and_host(run_copy, capsys):
    with run_copy.lock():
        rc = main(["train", "--out", str(run_copy.path), "--resume", "--steps", "50", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in err
        with pytest.raises(RunLockedError):
            Trainer(preset("tiny").override(["train.steps=50"]), run_copy.path, resume=True, progress=False)
        # readers are not blocked by the writer
        assert run_copy.steps == [0, 10, 20, 40] and len(run_copy.metrics) > 0
        run_copy.load_model(40)
    assert main(["train", "--out", str(run_copy.path), "--resume", "--steps", "50", "--quiet"]) == 0
    assert Run(run_copy.path).steps[-1] == 50


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = ("import os, signal, sys; from mechlrmc.runs import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    holder = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert holder.returncode == -signal.SIGKILL and holder.stdout == "locked\n"
    assert (tmp_path / "run" / "writer.lock").read_text().startswith('{"pid"')
    with RunLock(tmp_path / "run"):  # the OS dropped the dead holder's lock
        pass


def test_trainer_releases_the_lock_when_training_fails(tmp_path):
    trainer = Trainer(preset("tiny"), tmp_path / "run", progress=False)

    def fail(t):
        if t.step == 3:
            raise RuntimeError("boom")

    trainer.add_callback("on_step_end", fail)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    with RunLock(tmp_path / "run"):
        pass


def test_readers_never_see_half_a_metrics_row(run_copy):
    rows = len(run_copy.metrics)
    with open(run_copy.path / "metrics.csv", "a") as f:
        f.write("45,0.1,0.0")  # a writer in the middle of appending a row
    assert len(run_copy.metrics) == rows
    assert list(run_copy.metrics.columns) == list(METRIC_COLUMNS)


@pytest.mark.parametrize("scenario", ["checkpoint", "resume", "metrics"])
def test_file_size_limit_stops_training_cleanly_and_resume_continues_exactly(tmp_path, scenario):
    server = Server(tmp_path / "logs")
    try:
        reference = tmp_path / "reference"
        assert server.run(SMALL, reference)["status"] == 0
        resume_size = (reference / "resume.safetensors").stat().st_size
        checkpoint_size = (reference / "checkpoints" / "step_000000.safetensors").stat().st_size
        assert (reference / "metrics.csv").stat().st_size > resume_size + 1000 > checkpoint_size + 1000
        limit, file = {
            "checkpoint": (checkpoint_size - 1, "checkpoints/step_000000.safetensors"),
            "resume": (resume_size - 1, "resume.safetensors"),
            "metrics": (resume_size + 1000, "metrics.csv"),
        }[scenario]
        out = tmp_path / "limited"
        failed = server.run(SMALL, out, fsize=limit)
        assert os.WEXITSTATUS(failed["status"]) == 1, failed
        lines = failed["stderr"].strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in failed["stderr"]
        assert lines[0].startswith(f"mechlrmc: error: could not write {out / file}: the file-size limit")
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]
        run = Run(out)
        for step in run.steps:
            run.verify(step)
        assert (out / "metrics.csv").read_text().endswith("\n")
        resumed = server.run([*SMALL, "--resume"], out)
        assert resumed["status"] == 0, resumed
        assert_same_run(Run(reference), Run(out))
    finally:
        server.close()
