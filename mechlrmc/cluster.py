"""Ray for a sweep: joining a cluster or starting a private instance, and keeping Ray quiet.

`connect(address, timeout)` joins the cluster at `address` (or $RAY_ADDRESS) within `timeout`
seconds: it waits for the head's port, asks its GCS for an answer (in a child process killed at
the deadline), then lets Ray make one attempt; a failure is one `ClusterError` line. Where a token
exists (~/.ray/auth_token, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH) and $RAY_AUTH_MODE is unset it is
passed through: a cluster with token auth accepts it and one without ignores it; a refused token is
one line saying what to export. Without an address, a private local instance is started, even
where a cluster started by `ray start` runs on this machine (one line says so and how to use that
cluster). `check_fits` refuses, before launch, a trial that no live node can hold; `output_to`
sends Ray's own output (raylet dumps, node-death messages) to a log file; `NodeWatch` turns a
node's death into one line. A core module: it never imports the analysis layer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

from mechlrmc.errors import OptionError, UsageError

CONNECT_TIMEOUT = 60.0  # seconds `connect` waits for a cluster's head by default
TOKEN_HELP = ("export RAY_AUTH_MODE=token and give this machine the cluster's token (copy the head's "
              "~/.ray/auth_token here, or export RAY_AUTH_TOKEN)")


class ClusterError(UsageError, ConnectionError):
    """The Ray cluster named by --address or $RAY_ADDRESS cannot be reached or joined."""

    exit_code = 1


def _pass_token_through() -> None:
    """Use this machine's Ray token where one exists and $RAY_AUTH_MODE is unset (Ray itself does so
    only for a cluster it finds on its own, not for an address it is given)."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `ray://host:port`; None where the address names no port ("auto")."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def _answers(host: str, port: int, timeout: float) -> str:
    """'' where a TCP connection to host:port opens within `timeout` seconds, else why not."""
    try:
        with socket.create_connection((host, port), timeout=max(timeout, 0.01)):
            return ""
    except OSError as e:
        return e.strerror or type(e).__name__


# asks a GCS for its cluster id; exits 0 where it answers (InnerGcsClient: Ray >= 2.10)
_GCS_PROBE = "import sys; from ray._raylet import InnerGcsClient; InnerGcsClient.standalone(sys.argv[1], None, int(sys.argv[2]))"


def _gcs_answers(address: str, seconds: float) -> str:
    """'' where the cluster's GCS at `address` answers within `seconds`, else why not. Asked from a
    child process, killed at the deadline: a head that accepts connections but never answers (a
    stopped process) costs `seconds`, not Ray's own fixed ~40 s, and leaves nothing running."""
    try:
        done = subprocess.run([sys.executable, "-c", _GCS_PROBE, address, str(int(seconds * 1000))],
                              capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return f"its GCS did not answer within {seconds:.0f} s"
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("[")]
    if done.returncode == 0 or (lines and "ImportError" in lines[-1]):  # answered, or a Ray without the probe
        return ""
    return lines[-1] if lines else f"the probe of its GCS exited with code {done.returncode}"


def local_cluster() -> str | None:
    """The address of a cluster started by `ray start` on this machine (Ray's ray_current_cluster
    file) whose head answers; None where there is none."""
    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(None)
    host_port = _host_port(address) if address else None
    return address if host_port and not _answers(*host_port, timeout=1.0) else None


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables the user has not set, for the block only."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def connect(address: str | None = None, timeout: float = CONNECT_TIMEOUT, say: TextIO | None = None) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS) within `timeout` seconds, else start a private
    local instance sized to this machine (a note on a local cluster goes to `say`, default stderr).
    Returns whether this call started Ray (and so must shut it down)."""
    import ray
    from ray.exceptions import RayError

    if not 0 < timeout < math.inf:
        raise OptionError(f"--connect-timeout={timeout} is invalid: allowed a number of seconds > 0")
    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # a failed trial is one line, its traceback a file
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default 15 starves trials on a busy machine
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        running = local_cluster()
        if running:
            print(f"mechlrmc: a Ray cluster runs on this machine at {running}; this sweep starts a private local "
                  f"instance (--address {running} runs it on that cluster)", file=say or sys.stderr)
        try:
            ray.init(address="local", num_cpus=os.cpu_count(), **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"could not start a local Ray instance: {one_line(e)}") from None
        return True
    deadline = time.monotonic() + timeout
    where = f"the Ray cluster at {address}"
    host_port = _host_port(address)
    while host_port:
        why = _answers(*host_port, timeout=min(2.0, deadline - time.monotonic()))
        if not why:
            break
        if time.monotonic() + 0.5 >= deadline:
            raise ClusterError(f"could not reach {where} within {timeout:g} s ({why}): allowed the address of a "
                               "running head node (`ray start --head` prints it); --connect-timeout sets the wait")
        time.sleep(0.5)
    _pass_token_through()
    why = _gcs_answers(address, max(1.0, deadline - time.monotonic()))
    if not why:
        left = max(1, math.ceil(deadline - time.monotonic()))
        try:  # one attempt, bounded by what is left of the timeout
            with _env(RAY_gcs_server_port_wait_time_s="1", RAY_gcs_rpc_server_connect_timeout_s=str(left)):
                ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, RayError) as e:
            why = " ".join(f"{type(x).__name__} {x}" for x in (e, e.__cause__) if x is not None)
            why = why if "Authentication" in why or "InvalidAuthToken" in why else one_line(e)
    if "Authentication" in why or "InvalidAuthToken" in why:
        raise ClusterError(f"{where} uses token authentication and refused this machine's token, or found "
                           f"none (RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')}): {TOKEN_HELP}")
    if why:
        raise ClusterError(f"could not connect to {where}: {why}; allowed the address of a running head node "
                           "(`ray start --head` prints it)")
    return True


def nodes() -> list[dict]:
    """The live nodes of the connected cluster: id, ip, raylet port, CPUs and GPUs of each."""
    import ray

    return [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "port": n["NodeManagerPort"],
             "CPU": n["Resources"].get("CPU", 0.0), "GPU": n["Resources"].get("GPU", 0.0)}
            for n in ray.nodes() if n["Alive"]]


def _count(n: float, unit: str) -> str:
    return f"{n:g} {unit}" + ("" if n == 1 else "s")


def check_fits(trial: str, cpus: float, gpus: float) -> None:
    """A SweepError naming `trial`, what it asks for and what the largest node has, where no live node holds it."""
    from mechlrmc.trials import SweepError  # not at import: the CLI reads CONNECT_TIMEOUT without torch

    live = nodes()
    if any(n["CPU"] >= cpus and n["GPU"] >= gpus for n in live):
        return
    largest = max(live, key=lambda n: (n["GPU"] >= gpus, n["CPU"], n["GPU"]), default={"CPU": 0.0, "GPU": 0.0})
    allowed = [f"cpus_per_trial <= {largest['CPU']:g}"] if cpus > largest["CPU"] else []
    allowed += [f"gpus_per_trial <= {largest['GPU']:g}"] if gpus > largest["GPU"] else []
    raise SweepError(f"trial {trial!r} asks for {_count(cpus, 'CPU')} and {_count(gpus, 'GPU')}, but the largest of "
                     f"the {len(live)} live Ray node(s) has {_count(largest['CPU'], 'CPU')} and "
                     f"{_count(largest['GPU'], 'GPU')}: allowed resources.{' and '.join(allowed)}")


class NodeWatch:
    """Which nodes left the cluster since the last look: marked dead by Ray, or a raylet whose port no
    longer answers (seconds after a kill, long before Ray's health checks give up on the node)."""

    def __init__(self, every: float = 5.0):
        self.every = every
        self.alive = {n["id"]: n for n in nodes()}
        self.gone: set[str] = set()
        self.seen = time.monotonic()

    def died(self, now: bool = False) -> list[str]:
        """One line for each node that died since the last call (looked at every `every` seconds, or `now`)."""
        if not now and time.monotonic() - self.seen < self.every:
            return []
        self.seen = time.monotonic()
        listed = {n["id"]: n for n in nodes() if n["id"] not in self.gone}
        alive = {k: n for k, n in listed.items() if k not in self.alive or not _answers(n["ip"], n["port"], 1.0)}
        gone = {k: n for k, n in self.alive.items() if k not in alive}
        self.gone.update(gone)
        self.alive = alive
        return [f"node {n['ip']} ({k[:12]}) left the cluster: its running trials fail; re-run the sweep to resume them"
                for k, n in gone.items()]


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[TextIO]:
    """Send everything written to this process's stdout and stderr (Ray's C++ logs, raylet state
    dumps and node-death messages that Ray's threads print) to `log`; yields a stream on the
    terminal for the status line. Where `sys.stderr` is not the process's stderr (a notebook,
    pytest) it is the stream yielded, and Ray's prints there stay where they were."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        terminal = os.fdopen(os.dup(2), "w", buffering=1) if sys.stderr.fileno() == 2 else sys.stderr
    except (AttributeError, OSError, ValueError):
        terminal = sys.stderr
    fds = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield terminal
    finally:
        for stream in (sys.stdout, sys.stderr, terminal):
            stream.flush()
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        if terminal is not sys.stderr:
            terminal.close()


def one_line(error: BaseException) -> str:
    """The innermost message of a (Ray-wrapped) exception, on one line."""
    cause = getattr(error, "cause", None) or error.__cause__ or error
    text = f"{type(cause).__name__}: {cause}"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
