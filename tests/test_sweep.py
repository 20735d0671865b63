"""Run families on Ray Tune (`mechlrmc sweep`): validation before launch, trials that equal plain
runs, a killed sweep that finishes on re-run with the same numbers, and failures that stay local."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mechlrmc.config import RunConfig
from mechlrmc.runs import Run
from mechlrmc.sweep import sweep
from mechlrmc.train import train
from mechlrmc.trials import SweepError, SweepSpec

CLI = [sys.executable, "-m", "mechlrmc.cli"]


def _spec(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _same_metrics(a: Path, b: Path) -> None:
    ma, mb = Run(a).metrics.drop(columns="wall_time"), Run(b).metrics.drop(columns="wall_time")
    pd.testing.assert_frame_equal(ma, mb)


def test_trials_are_named_from_varied_values_and_record_what_determines_them():
    spec = SweepSpec.from_dict({"preset": "tiny", "steps": 30, "set": {"train.batch_size": 8},
                                "grid": {"train.lr": [0.001, 0.002], "model.n_heads": [1, 2]}, "seeds": 2,
                                "resources": {"cpus_per_trial": 2}})
    trials = spec.trials()
    assert [t.name for t in trials][:3] == ["train.lr=0.001,model.n_heads=1,seed=0",
                                           "train.lr=0.001,model.n_heads=1,seed=1",
                                           "train.lr=0.001,model.n_heads=2,seed=0"]
    assert len(trials) == 8 and len({t.name for t in trials}) == 8
    last = trials[-1].config
    assert (last.train.lr, last.model.n_heads, last.train.seed) == (0.002, 2, 1)
    assert (last.train.steps, last.train.batch_size, last.train.threads, last.train.device) == (30, 8, 2, "cpu")
    assert SweepSpec.from_dict({"preset": "tiny", "seeds": [3, 7]}).trials()[1].name == "seed=7"


@pytest.mark.parametrize("spec, message", [
    ({"preset": "tiny", "grid": {"train.lr": [0.001, -1.0]}}, r"trial 'train.lr=-1.0,seed=0': train.lr=-1.0"),
    ({"preset": "tiny", "grid": {"model.n_heads": [2, 3]}}, r"trial 'model.n_heads=3,seed=0': model.d_model"),
    ({"preset": "tiny", "set": {"train.nope": 1}}, r"unknown key 'train.nope'"),
    ({"preset": "tiny", "seeds": 0}, r"seeds=0 is invalid"),
    ({"preset": "tiny", "seeds": [1, 1]}, r"distinct"),
    ({"preset": "tiny", "resources": {"cpus_per_trial": 0}}, r"cpus_per_trial=0"),
    ({"preset": "tiny", "colour": "red"}, r"unknown sweep key\(s\) \['colour'\]"),
    ({"steps": 10}, r"exactly one of 'preset' or 'config'"),
    ({"preset": "tiny", "grid": {"train.lr": 0.1}}, r"grid.train.lr=0.1 is invalid"),
])
def test_invalid_spec_is_rejected_before_anything_starts(tmp_path, spec, message):
    with pytest.raises(SweepError, match=message):
        sweep(SweepSpec.from_dict(spec), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_rejects_an_invalid_trial_in_one_line(tmp_path):
    spec = _spec(tmp_path, preset="tiny", grid={"train.lr": [0.001, -1.0]}, seeds=2)
    done = subprocess.run([*CLI, "sweep", str(spec), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert "trial 'train.lr=-1.0,seed=0'" in done.stderr and "train.lr=-1.0" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_directory_with_another_config_is_refused_before_launch(tmp_path):
    spec = SweepSpec.from_dict({"preset": "tiny", "seeds": [0]})
    other = spec.trials()[0].config.override(["train.lr=0.01"])
    Run.create(tmp_path / "out" / "seed=0", other)
    with pytest.raises(SweepError, match="seed=0.*another config"):
        sweep(spec, tmp_path / "out", progress=False)


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_on_local_ray_equals_plain_runs(tmp_path):
    spec = _spec(tmp_path, preset="tiny", steps=40, grid={"train.lr": [0.001, 0.002]}, seeds=2)
    done = subprocess.run([*CLI, "sweep", str(spec), "--out", str(tmp_path / "family"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "4 of 4 trials finished" in done.stdout
    summary = pd.read_csv(tmp_path / "family" / "summary.csv")
    assert summary.run.tolist() == ["train.lr=0.001,seed=0", "train.lr=0.001,seed=1",
                                    "train.lr=0.002,seed=0", "train.lr=0.002,seed=1"]
    assert (summary.status == "finished").all() and (summary.step == 40).all()
    assert yaml.safe_load((tmp_path / "family" / "sweep.yaml").read_text())["seeds"] == 2
    for name in summary.run:  # the plain runs in this process (no interpreter start-up each)
        trial = tmp_path / "family" / name
        plain = train(RunConfig.from_yaml(trial / "config.yaml"), tmp_path / "plain" / name, progress=False)
        _same_metrics(trial, plain.path)
        assert Run(trial).config == plain.config
    # a second launch finds everything finished and touches nothing
    family = tmp_path / "family"
    stamps = {p: p.stat().st_mtime_ns for p in family.rglob("*") if p.is_file() and p.parent != family}
    again = subprocess.run([*CLI, "sweep", str(spec), "--out", str(tmp_path / "family"), "--quiet"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "4 of 4 trials finished" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert not (tmp_path / "family" / ".tune").exists()  # Tune's own records are not kept
    assert json.loads((tmp_path / "family" / summary.run[0] / "provenance.json").read_text())["node_id"]


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_killed_with_its_process_group_finishes_on_rerun(tmp_path):
    spec = _spec(tmp_path, preset="tiny", steps=400, seeds=2)
    out = tmp_path / "family"
    proc = subprocess.Popen([*CLI, "sweep", str(spec), "--out", str(out), "--quiet"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "seed=0" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") > 30:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert Run(out / "seed=0").steps[-1] < 400  # killed mid-way
    assert list((out / ".tune").glob("launch-*"))  # the killed driver's Tune records
    done = subprocess.run([*CLI, "sweep", str(spec), "--out", str(out), "--quiet"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert not (out / ".tune").exists()  # the re-run finished the family and dropped the stale records
    for name in ("seed=0", "seed=1"):
        plain = train(RunConfig.from_yaml(out / name / "config.yaml"), tmp_path / "plain" / name, progress=False)
        _same_metrics(out / name, plain.path)
        a, b = Run(out / name), plain
        assert a.steps == b.steps
        for step in (a.steps[1], a.steps[-1]):
            sa, sb = a.state_dict(step), b.state_dict(step)
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the failing trial asks for CUDA, which exists here")
def test_a_failing_trial_is_reported_while_the_others_finish(tmp_path):
    spec = _spec(tmp_path, preset="tiny", steps=20, grid={"train.device": ["cuda", "cpu"]}, seeds=[0])
    done = subprocess.run([*CLI, "sweep", str(spec), "--out", str(tmp_path / "family"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    summary = pd.read_csv(tmp_path / "family" / "summary.csv").set_index("run")
    assert summary.status.to_dict() == {"train.device=cuda,seed=0": "failed", "train.device=cpu,seed=0": "finished"}
    assert "CUDA" in summary.error["train.device=cuda,seed=0"]
    log = (tmp_path / "family" / "errors" / "train.device=cuda,seed=0.txt").read_text()
    assert "ConfigError" in log and "no CUDA device" in log and "\x1b" not in log  # the error, no colour codes
    assert "Traceback" not in done.stderr
    assert "trial 'train.device=cuda,seed=0' failed" in done.stderr and "1 of 2 trials finished" in done.stdout


@pytest.mark.ray
def test_an_unreachable_address_is_one_line_within_the_timeout(tmp_path, capsys):
    """--address of a port where nothing listens: one line naming the address within --connect-timeout, exit
    code 1, and nothing left behind (no sweep.yaml, no ray.log)."""
    from mechlrmc.cli import main

    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _spec(tmp_path, preset="tiny", steps=5, seeds=1)
    start = time.monotonic()
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}",
                 "--connect-timeout", "2", "--quiet"]) == 1
    assert time.monotonic() - start < 2 + 10  # the timeout, and importing Ray
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mechlrmc: error: could not reach the Ray cluster at 127.0.0.1:{port} "
                                               "within 2 s (Connection refused)")
    assert "--connect-timeout" in err[0]
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}",
                 "--connect-timeout", "-1"]) == 2
    assert "--connect-timeout=-1.0 is invalid: allowed a number of seconds > 0" in capsys.readouterr().err


@pytest.mark.ray
def test_a_head_that_accepts_connections_but_never_answers_is_one_line_within_the_timeout(tmp_path, capsys):
    """A port that accepts TCP connections and says nothing (a stopped head): one line within
    --connect-timeout, not after Ray's own fixed wait of about 40 s."""
    from mechlrmc.cli import main

    spec = _spec(tmp_path, preset="tiny", steps=5, seeds=1)
    with socket.socket() as head:
        head.bind(("127.0.0.2", 0))
        head.listen()
        address = f"127.0.0.2:{head.getsockname()[1]}"
        start = time.monotonic()
        assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--address", address,
                     "--connect-timeout", "3", "--quiet"]) == 1
        assert time.monotonic() - start < 3 + 10  # the timeout, and importing Ray
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mechlrmc: error: could not connect to the Ray cluster at {address}")
    assert "did not answer within 3 s" in err[0]
    assert not (tmp_path / "out").exists()
