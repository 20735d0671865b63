"""What a run was made with: software versions, device, threads, deterministic algorithms.

Training on one thread is deterministic on one machine type and software stack, not across them:
float reductions differ between CPU models and library versions in the last bits, and a plateau
amplifies such bits into a different drop step. `collect()` records what explains a difference,
and where the run was made (`node()`: host, and the Ray node inside a sweep); `differences()` says
what changed between two records (a resumed run warns about it).
"""

from __future__ import annotations

import platform
import socket
import sys
from importlib import metadata

import torch

# fields whose change breaks bitwise equality of a resumed run with an uninterrupted one
COMPARED = ("torch", "transformer_lens", "mechlrmc", "python", "device", "cpu_id", "cpu_capability", "threads",
            "deterministic")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_id() -> str:
    """Vendor, family, model and stepping (`AuthenticAMD family 25 model 17 stepping 1`): a
    virtual machine may show only a generic model name ("AMD EPYC") for different processors."""
    info = _cpuinfo()
    if "cpu family" not in info:
        return platform.machine()
    return (f"{info.get('vendor_id', '?')} family {info['cpu family']} model {info.get('model', '?')} "
            f"stepping {info.get('stepping', '?')}")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model()}"


def node() -> dict[str, str | None]:
    """Where this process runs: the host name and, in a Ray worker (a sweep's trial), the Ray node's
    id and IP, so a sweep on a cluster records which node trained each trial. Never imports Ray."""
    ray = sys.modules.get("ray")
    in_ray = ray is not None and ray.is_initialized()
    return {"host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id() if in_ray else None,
            "node_ip": ray.util.get_node_ip_address() if in_ray else None}


def collect(device: torch.device | str = "cpu") -> dict[str, object]:
    """The provenance of a run trained on `device` from this process, as a JSON-ready dict."""
    return {
        "torch": torch.__version__,
        "transformer_lens": _version("transformer-lens"),
        "mechlrmc": _version("mechlrmc"),
        "python": platform.python_version(),
        "device": device_name(device),
        "cpu_id": cpu_id(),
        # the vector ISA torch's CPU kernels were dispatched to (AVX2, AVX512, ...): machines with the
        # same model name but another ISA (a VM may hide AVX-512) round differently from step 0
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "platform": platform.platform(),
        **node(),
    }


# What decides a run's floats, most decisive first: the vector ISA torch's CPU kernels dispatch to,
# then the software that computes; the CPU id within one ISA has not been seen to change them.
SOFTWARE_FIELDS = ("torch", "python", "transformer_lens")

# `machine_match` levels, best first (`find_family` ranks shipped families by this order)
MATCH_LEVELS = ("identical", "same ISA and software", "same ISA", "unknown", "different ISA")


def _known(p: dict | None, key: str) -> bool:
    return p is not None and p.get(key) not in (None, "", "not installed")


def machine_match(a: dict | None, b: dict | None) -> str:
    """How closely two provenance records match on what decides the numbers, one of `MATCH_LEVELS`:
    "identical" (ISA, software and CPU id), "same ISA and software" (the CPU id differs or is not
    recorded), "same ISA" (a software version differs or is not recorded on both), "different ISA",
    or "unknown" (the ISA is not recorded on both)."""
    if not (_known(a, "cpu_capability") and _known(b, "cpu_capability")):
        return "unknown"
    if a["cpu_capability"] != b["cpu_capability"]:
        return "different ISA"
    if not all(_known(a, k) and _known(b, k) and a[k] == b[k] for k in SOFTWARE_FIELDS):
        return "same ISA"
    same_cpu = _known(a, "cpu_id") and _known(b, "cpu_id") and a["cpu_id"] == b["cpu_id"]
    return "identical" if same_cpu else "same ISA and software"


def machine_name(p: dict | None) -> str:
    """One line naming a recorded machine: device, CPU id, ISA and torch ("an unrecorded machine" for None)."""
    if p is None:
        return "an unrecorded machine"
    return (f"{p.get('device') or 'an unnamed device'} ({p.get('cpu_id') or 'CPU id not recorded'}, "
            f"{p.get('cpu_capability') or 'ISA not recorded'}, torch {p.get('torch') or 'not recorded'})")


def match_sentence(family: dict | None, run: dict | None) -> str:
    """One sentence for a report: how the machine a family was measured on compares with a run's,
    and what that means for comparing one seed's numbers."""
    level = machine_match(family, run)
    where = f"The family was measured on {machine_name(family)} and this run on {machine_name(run)}"
    if level == "identical":
        return (f"The family was measured on this run's machine type, {machine_name(family)}: the same seed "
                "gives the same numbers, so each seed's numbers apply as they are.")
    if level == "same ISA and software":
        return (f"{where}: the same vector ISA and software versions, only the CPU id differs or is not recorded, "
                "so the same seed is expected to give the same numbers.")
    if level == "same ISA":
        differ = [k for k in SOFTWARE_FIELDS if not (_known(family, k) and _known(run, k) and family[k] == run[k])]
        verb = "differs or is" if len(differ) == 1 else "differ or are"
        return (f"{where}: the same vector ISA, but {' and '.join(differ)} {verb} not recorded on both, so a seed "
                "may round differently: compare the distributions, and a seed's numbers only if they agree.")
    if level == "different ISA":
        return (f"{where}: another vector ISA, which rounds differently from step 0, so compare the "
                "distributions, not a seed's numbers.")
    return (f"{where}: the vector ISA is not recorded on both, so whether a seed's numbers carry over is "
            "unknown; compare the distributions.")


def differences(saved: dict, current: dict) -> dict[str, tuple]:
    """The compared fields that differ, as {field: (saved, current)}."""
    return {k: (saved.get(k), current.get(k)) for k in COMPARED if saved.get(k) != current.get(k)}


def describe(provenance: dict | None) -> str:
    """A few lines for `mechlrmc info`."""
    if provenance is None:
        return "provenance: not recorded (the run was made before runs recorded it)"
    return "provenance:\n" + "\n".join(f"  {k}: {v}" for k, v in provenance.items())
