"""A user's loop state as safetensors and JSON: what a recorded run's resume state keeps
(`mechlrmc.record.Recorder`), without pickle.

A state dict (an optimizer's, an LR scheduler's, a GradScaler's) is split into its tensors, saved
as safetensors entries named `PREFIX.path.to.value`, and the rest, kept as JSON with each tensor
replaced by a reference to its entry. `join` puts it back, tensors on `device`. A value that is
neither a tensor nor JSON (a function a scheduler keeps) is a one-line `StateError` naming it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from mechlrmc.errors import UsageError

TENSOR = "__tensor__"
OPTIMIZER, SCHEDULER, SCALER = "optim", "scheduler", "scaler"  # the parts' names in a resume state


class StateError(UsageError, ValueError):
    """A loop's state that cannot be saved without pickle."""


def split(prefix: str, state: Any, what: str) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors {f"{prefix}.{path}": tensor}, the JSON of `state` with references to them)."""
    tensors: dict[str, torch.Tensor] = {}

    def at(path: str, key: object) -> str:
        return f"{path}.{key}" if path else str(key)

    def walk(value: Any, path: str) -> Any:
        if torch.is_tensor(value):
            tensors[f"{prefix}.{path}"] = value.detach()
            return {TENSOR: f"{prefix}.{path}"}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, at(path, f"k{i}")), walk(v, at(path, i))]
                                 for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return {"__tuple__" if isinstance(value, tuple) else "__list__":
                    [walk(v, at(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, float) and not math.isfinite(value):
            return {"__float__": repr(value)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
            return value.item()
        raise StateError(f"{what} holds {path or 'its root'} = {type(value).__name__}, which cannot be "
                         f"saved without pickle: allowed tensors, numbers, strings, lists and mappings of them")

    return tensors, json.dumps(walk(state, ""))


def join(layout: str, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> Any:
    """The state `split` took apart, its tensors moved to `device` (an optimizer's state follows
    its parameters; `load_state_dict` casts it)."""
    def build(value: Any) -> Any:
        if isinstance(value, dict):
            if TENSOR in value:
                return tensors[value[TENSOR]].to(device)
            if "__dict__" in value:
                return {build(k): build(v) for k, v in value["__dict__"]}
            if "__list__" in value:
                return [build(v) for v in value["__list__"]]
            if "__tuple__" in value:
                return tuple(build(v) for v in value["__tuple__"])
            if "__float__" in value:
                return float(value["__float__"])
        return value

    return build(json.loads(layout))


def restore(tensors: dict[str, torch.Tensor], layouts: dict[str, str], parts: dict[str, Any],
            device: torch.device, rank: int = 0) -> None:
    """Load a resume state (`resume_tensors`' tensors and layouts) into the parts (optimizer on
    `device`, the others on the CPU) and put back the RNG states (rank `rank`'s CPU state where
    each rank's was kept); a part given now but not then, or then but not now, is one line."""
    for name, part in parts.items():
        if (name in layouts) != (part is not None):
            given = "given" if part is not None else "not given"
            raise StateError(f"resume=True with the {name} {given}, but the run's resume state "
                             f"{'has' if name in layouts else 'has no'} {name} state: allowed the same "
                             f"optimizer, scheduler and scaler arguments as when it was recorded")
        if part is not None:
            part.load_state_dict(join(layouts[name], tensors, device if name == OPTIMIZER else "cpu"))
    own = f"rng.torch.{rank}"
    set_rng_states(tensors, own if own in tensors else "rng.torch")


def rng_states(cuda: bool) -> dict[str, torch.Tensor]:
    """torch's global CPU RNG state, and every CUDA device's where `cuda`."""
    states = {"rng.torch": torch.get_rng_state()}
    if cuda and torch.cuda.is_available():
        states.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_states(tensors: dict[str, torch.Tensor], cpu_key: str = "rng.torch") -> None:
    """Put back what `rng_states` kept (the CPU state under `cpu_key`)."""
    torch.set_rng_state(tensors[cpu_key])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def resume_tensors(model_state: dict[str, torch.Tensor], parts: dict[str, Any], rngs: list[torch.Tensor],
                   cuda: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a recorded run's resume state and the JSON layouts of its parts: the model's
    state (`model.NAME`), each part's (optimizer, scheduler, scaler) state dict where given, the RNG
    states, and each rank's CPU RNG state (`rng.torch.RANK`) where there are several."""
    from mechlrmc.resume import MODEL

    tensors = {f"{MODEL}{k}": v for k, v in model_state.items()}
    layouts = {}
    for name, part in parts.items():
        if part is not None:
            part_tensors, layouts[name] = split(name, part.state_dict(), f"the {name}'s state")
            tensors.update(part_tensors)
    tensors.update(rng_states(cuda))
    if len(rngs) > 1:
        tensors.update({f"rng.torch.{r}": s for r, s in enumerate(rngs)})
    return tensors, layouts
