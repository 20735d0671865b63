"""The layout of a run's `resume.safetensors`: what exact resume reads and writes, defined once.

Tensors: `model.<name>` (the whole state dict, frozen parameters included),
`adam.<param>.step|exp_avg|exp_avg_sq` (only for parameters Adam has stepped: none at step 0, none
for a frozen parameter) and `rng.data` (the data generator's state). Metadata: `step` (written by
`Run.save_resume_state`) and `wall_time` (`repr` of the seconds trained so far).

The trainer (`mechlrmc.train`) and the reference import (`mechlrmc.reference`) both write through
`pack`/`meta`, and the trainer reads through `unpack`/`read_meta`. A run resumes under a config
that differs from its own only in `MAY_CHANGE` (a longer `train.steps` continues a finished run;
the telemetry switches change no result).
"""

from __future__ import annotations

import torch

MODEL = "model."
ADAM = "adam."
RNG = "rng.data"
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")
MAY_CHANGE = ("train.steps", "train.log", "train.log_images_every")  # may differ between a run and its resume


def pack(model_state: dict[str, torch.Tensor], adam_state_by_name: dict[str, dict[str, torch.Tensor]],
         generator_state: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a resume file: the model's state dict, Adam's `step`/`exp_avg`/`exp_avg_sq`
    of each parameter (by name) that has state, and the data generator's state."""
    tensors = {f"{MODEL}{k}": v for k, v in model_state.items()}
    for name, state in adam_state_by_name.items():
        for key in ADAM_KEYS:
            tensors[f"{ADAM}{name}.{key}"] = state[key]
    tensors[RNG] = generator_state
    return tensors


def unpack(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]],
                                                     torch.Tensor]:
    """`pack`'s arguments back: (model state dict, Adam state by parameter name, generator state)."""
    model = {k[len(MODEL):]: v for k, v in tensors.items() if k.startswith(MODEL)}
    adam: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith(ADAM):
            name, key = k[len(ADAM):].rsplit(".", 1)
            adam.setdefault(name, {})[key] = v
    return model, adam, tensors[RNG]


def meta(wall_time: float) -> dict[str, str]:
    """The metadata of a resume file besides its step."""
    return {"wall_time": repr(float(wall_time))}


def read_meta(meta: dict[str, str]) -> tuple[int, float]:
    """(step, wall time) of a resume file's metadata."""
    return int(meta["step"]), float(meta["wall_time"])
