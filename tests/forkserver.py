"""For tests that start, kill and limit many short training processes, and compare their runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from mechlrmc.runs import Run

ROOT = Path(__file__).resolve().parents[1]

SERVER = r'''
import glob, json, os, resource, signal, sys, time, traceback
import torch
torch.set_num_threads(1)
import mechlrmc.train  # noqa: F401  (the heavy imports happen once, here)
from mechlrmc.cli import build_parser, main
build_parser()  # imports the analysis commands
torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first construction imports torch._dynamo
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        if job.get("fsize") is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
        err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(err, 2)
        sys.stdout = open(os.devnull, "w")
        try:
            rc = main(job["argv"])
        except SystemExit as e:
            rc = e.code
        except BaseException:
            traceback.print_exc()
            rc = 99
        os._exit(rc or 0)
    killed, tmp_seen, status = False, False, None
    patterns = [os.path.join(job["out"], ".*.tmp*"), os.path.join(job["out"], "checkpoints", ".*.tmp*")]
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        elapsed = time.perf_counter() - start
        writing = job.get("on_write") and any(glob.glob(p) for p in patterns)
        appeared = job.get("on_file") and os.path.exists(os.path.join(job["out"], job["on_file"]))
        if (job.get("after") is not None and elapsed >= job["after"]) or writing or appeared:
            os.kill(pid, signal.SIGKILL)
            killed, tmp_seen = True, bool(writing)
            status = os.waitpid(pid, 0)[1]
        else:
            time.sleep(0.0003 if job.get("on_write") or job.get("on_file") else 0.002)
    err = open(job["stderr"]).read() if os.path.exists(job["stderr"]) else ""  # killed before opening it
    print(json.dumps({"stderr": err, "killed": killed, "during_write": tmp_seen, "status": status,
                      "seconds": time.perf_counter() - start}), flush=True)
'''


class Server:
    """Runs `mechlrmc.cli.main(argv)` in forked children of one process that imported torch once.

    `run(argv, out, after=s)` SIGKILLs the child `s` seconds after the fork, `on_write=True` as soon
    as a temporary file (a write in progress) appears in the run directory, `on_file=name` as soon
    as that file exists in it, `fsize=n` runs it under
    `RLIMIT_FSIZE` n. The server kills only its own unreaped child, so a PID is never reused under it.
    """

    def __init__(self, logs: Path):
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.jobs = 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, argv: list[str], out: Path, after: float | None = None, on_write: bool = False,
            on_file: str | None = None, fsize: int | None = None) -> dict:
        """{"status": wait status, "killed", "during_write", "seconds", "stderr": the child's stderr}"""
        self.jobs += 1
        job = {"argv": [*argv, "--out", str(out)], "out": str(out), "after": after, "on_write": on_write,
               "on_file": on_file, "fsize": fsize, "stderr": str(self.logs / f"job{self.jobs}.err")}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def assert_same_run(a: Run, b: Run) -> None:
    """Same checkpoints (bitwise), metrics (but wall time) and final resume state."""
    assert a.steps == b.steps
    pd.testing.assert_frame_equal(a.metrics.drop(columns="wall_time"), b.metrics.drop(columns="wall_time"))
    for step in a.steps:
        sa, sb = a.state_dict(step), b.state_dict(step)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), step
    ra, rb = a.load_resume_state()[0], b.load_resume_state()[0]
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
