"""What a run was made with: software versions, device, threads, deterministic algorithms.

Training on one thread is deterministic on one machine type and software stack, not across them:
float reductions differ between CPU models and library versions in the last bits, and a plateau
amplifies such bits into a different drop step. `collect()` records what explains a difference;
`differences()` says what changed between two records (a resumed run warns about it).
"""

from __future__ import annotations

import platform
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
    }


# fields that name a machine type: the same recipe and seed give the same numbers only on one
MACHINE_FIELDS = ("cpu_id", "cpu_capability")


def same_machine(a: dict | None, b: dict | None) -> bool:
    """Whether two provenance records name one machine type (both record the same CPU id and ISA)."""
    return a is not None and b is not None and all(
        a.get(k) is not None and a.get(k) == b.get(k) for k in MACHINE_FIELDS)


def differences(saved: dict, current: dict) -> dict[str, tuple]:
    """The compared fields that differ, as {field: (saved, current)}."""
    return {k: (saved.get(k), current.get(k)) for k in COMPARED if saved.get(k) != current.get(k)}


def describe(provenance: dict | None) -> str:
    """A few lines for `mechlrmc info`."""
    if provenance is None:
        return "provenance: not recorded (the run was made before runs recorded it)"
    return "provenance:\n" + "\n".join(f"  {k}: {v}" for k, v in provenance.items())
