"""Sweeps on a real 2-node Ray cluster on this machine: a head on 127.0.0.2 and a worker on 127.0.0.3
(1 CPU each, started with `ray start`, token auth on with a token of the test's own). Trials run on
both nodes, a killed worker node costs one line and a re-run, and the results equal plain runs; a
trial too big for any node and a local cluster without --address are one line each.

The test starts its nodes in their own sessions, with its own Ray temp dir, ports and token, and
stops only the processes whose environment carries its marker (`ray stop` would stop every Ray on
the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mechlrmc.config import RunConfig
from mechlrmc.runs import Run
from mechlrmc.train import train

RAY = next((str(p) for p in [Path(sys.executable).with_name("ray")] if p.is_file()), shutil.which("ray"))
pytestmark = pytest.mark.ray  # every test here starts a Ray cluster (the ray_cluster fixture)

CLI = [sys.executable, "-m", "mechlrmc.cli"]
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
MARKER = "MECHLRMC_TEST_CLUSTER"  # in the environment of every process a node of the test starts


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ours(value: str) -> list[int]:
    """Pids of the processes whose environment holds MARKER=`value`: what one node of the test started."""
    tag = f"{MARKER}={value}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if tag in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _kill(value: str) -> None:
    for pid in _ours(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _Cluster:
    """A head and a worker node started with `ray start` on two loopback addresses."""

    def __init__(self, root: Path):
        self.tag = uuid.uuid4().hex[:8]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_TMPDIR=str(root), RAY_AUTH_TOKEN=uuid.uuid4().hex)  # the test's own token
        self.address = ""

    def start(self) -> None:
        self.address = self._start(HEAD_IP, "head")
        self._start(WORKER_IP, "worker")

    def _start(self, ip: str, role: str) -> str:
        p = _free_ports(9)
        args = [RAY, "start", "--node-ip-address", ip, "--num-cpus", "1", "--disable-usage-stats",
                "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
                "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5])]
        if role == "head":
            args += ["--head", "--port", str(p[6]), "--ray-client-server-port", str(p[7]), "--dashboard-port", str(p[8]),
                     "--include-dashboard", "false", "--temp-dir", str(Path(self.env["RAY_TMPDIR"]) / "ray")]
        else:
            args += ["--address", self.address]
        env = {**self.env, "RAY_AUTH_MODE": "token", MARKER: f"{self.tag}-{role}"}
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return f"{ip}:{p[6]}"

    def kill(self, role: str) -> None:
        _kill(f"{self.tag}-{role}")

    def stop(self) -> None:
        for role in ("worker", "head"):
            self.kill(role)


@pytest.fixture(scope="module")
def ray_cluster():
    root = Path(tempfile.mkdtemp(prefix="mlc-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = _Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _sweep(cluster: _Cluster, spec: Path, out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mechlrmc sweep` as a user of the cluster runs it: the token in the environment, RAY_AUTH_MODE unset."""
    return subprocess.run([*CLI, "sweep", str(spec), "--out", str(out), *args], env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)


def _spec(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _node_ip(run: Path) -> str | None:
    file = run / "provenance.json"
    return json.loads(file.read_text()).get("node_ip") if file.is_file() else None


@pytest.mark.slow
def test_sweep_on_two_nodes_survives_a_worker_kill_and_equals_plain_runs(ray_cluster, tmp_path):
    spec = _spec(tmp_path, preset="tiny", steps=300, set={"train.checkpoint_every": 100, "train.eval_every": 20},
                 grid={"train.lr": [0.001, 0.002]}, seeds=2)
    out = tmp_path / "family"
    proc = subprocess.Popen([*CLI, "sweep", str(spec), "--out", str(out), "--address", ray_cluster.address],
                            env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.time() + 180
    while victim is None and time.time() < deadline and proc.poll() is None:
        for run in out.glob("*,seed=*"):
            if _node_ip(run) == WORKER_IP and (run / "metrics.csv").is_file() \
                    and (run / "metrics.csv").read_text().count("\n") > 20:
                victim = run
        time.sleep(0.05)
    assert victim is not None, "no trial ran on the worker node long enough to be killed"
    ray_cluster.kill("worker")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr  # the killed trial failed, the others finished on the head
    lines = [line for line in stderr.splitlines() if line.strip() and not line.strip().startswith("sweep")]
    assert len(lines) == 2, stderr  # beside the status line: the node's death and the trial that failed with it
    assert lines[0].startswith(f"mechlrmc: node {WORKER_IP} (") and "left the cluster" in lines[0]
    assert lines[1].startswith(f"trial {victim.name!r} failed: ")
    assert "Traceback" not in stderr + stdout and "raylet" not in stdout  # Ray's own account is in ray.log
    assert len(stdout.strip().splitlines()) <= 6  # the summary table (4 rows and a header) and one line
    assert (out / "ray.log").is_file()
    summary = pd.read_csv(out / "summary.csv").set_index("run")
    assert summary.status[victim.name] == "failed" and (summary.status == "finished").sum() == 3
    assert Run(victim).steps[-1] < 300
    placed = {name: _node_ip(out / name) for name in summary.index}
    assert set(placed.values()) == {HEAD_IP, WORKER_IP}  # trials ran on both nodes

    again = _sweep(ray_cluster, spec, out, "--address", ray_cluster.address, "--quiet")
    assert again.returncode == 0, again.stderr
    assert "4 of 4 trials finished" in again.stdout
    resumed = json.loads((victim / "provenance.json").read_text())
    assert resumed["node_ip"] == WORKER_IP and [r["node_ip"] for r in resumed["resumed_on"]] == [HEAD_IP]
    assert resumed["resumed_on"][0]["step"] > 0 and resumed["host"] == socket.gethostname()
    assert not (out / ".tune").exists()  # Tune's records of both launches are gone
    for name in summary.index:
        plain = train(RunConfig.from_yaml(out / name / "config.yaml"), tmp_path / "plain" / name, progress=False)
        a = Run(out / name)
        pd.testing.assert_frame_equal(a.metrics.drop(columns="wall_time"), plain.metrics.drop(columns="wall_time"))
        assert a.steps == plain.steps
        sa, sb = a.state_dict(a.steps[-1]), plain.state_dict(plain.steps[-1])
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_trial_too_big_for_every_node_is_one_line_before_launch(ray_cluster, tmp_path):
    spec = _spec(tmp_path, preset="tiny", steps=5, seeds=1, resources={"cpus_per_trial": 2})
    start = time.monotonic()
    done = _sweep(ray_cluster, spec, tmp_path / "out", "--address", ray_cluster.address, timeout=120)
    assert done.returncode == 2 and time.monotonic() - start < 60
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "trial 'seed=0' asks for 2 CPUs" in done.stderr and "has 1 CPU and 0 GPUs" in done.stderr
    assert "cpus_per_trial <= 1" in done.stderr
    assert not (tmp_path / "out").exists()  # no sweep.yaml, no ray.log, no trial


def test_a_wrong_token_is_one_line_saying_what_to_export(ray_cluster, tmp_path):
    spec = _spec(tmp_path, preset="tiny", steps=5, seeds=1)
    env = {**ray_cluster.env, "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    done = subprocess.run([*CLI, "sweep", str(spec), "--out", str(tmp_path / "out"), "--address",
                           ray_cluster.address, "--connect-timeout", "20"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "uses token authentication" in done.stderr and "RAY_AUTH_MODE=token" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_local_cluster_without_address_gets_a_private_instance_and_one_line(ray_cluster, tmp_path):
    """`ray start --head` has run on this machine (its address file is in RAY_TMPDIR) and no address is
    given: the sweep says so in one line and runs on a private instance, not on the cluster."""
    assert (Path(ray_cluster.env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster").is_file()
    spec = _spec(tmp_path, preset="tiny", steps=10, seeds=1)
    done = _sweep(ray_cluster, spec, tmp_path / "out", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"mechlrmc: a Ray cluster runs on this machine at {ray_cluster.address}; this sweep starts a private "
        f"local instance (--address {ray_cluster.address} runs it on that cluster)"]
    assert _node_ip(tmp_path / "out" / "seed=0") not in (HEAD_IP, WORKER_IP)
