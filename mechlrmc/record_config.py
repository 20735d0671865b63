"""The `record` section of a recorded run's config (`mechlrmc.record.Recorder`): the factory that
rebuilds the user's model, the sites its internals are read at, and the checkpoint schedule."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from mechlrmc.validation import ConfigError
from mechlrmc.validation import require as _require


# what a report says of a recorded loop, in this order (record.loop keeps every setting the loop told)
BRIEF_LOOP = ("optimizer", "lr", "betas", "weight_decay", "batch_size", "processes", "framework", "lr_scheduler_type",
              "warmup_steps", "gradient_accumulation_steps", "accumulate_grad_batches", "max_grad_norm")


@dataclass
class RecordConfig:
    """A run recorded from a user's own loop and model (`mechlrmc.record.Recorder`): how to rebuild
    the model (`model_factory`, an importable "module:callable" or "path/to/file.py:callable",
    called with `factory_kwargs`; empty: notebooks pass the model class to `Run.load_model`),
    where its internals are read (`sites`, `mechlrmc.sites.Sites.to_dict`), the checkpoint
    schedule (`checkpoints`: "log", an interval, or a list of steps; `dense`: a [first, last]
    window checkpointed every `dense_every` steps), what drove the recorder (`source`) and the
    working directory it ran in (`workdir`: a relative factory file is also looked for there), what
    the loop said of itself (`loop`: optimizer, hyper-parameters, batch size, a framework's
    arguments) and the model in brief (`model`: class, layers, heads, width, parameters)."""

    model_factory: str = ""
    factory_kwargs: dict = field(default_factory=dict)
    sites: dict = field(default_factory=dict)
    checkpoints: Any = "log"
    dense: tuple[int, ...] = ()
    dense_every: int = 1
    source: str = "loop"
    workdir: str = ""  # the working directory it was recorded in: where a relative factory file is found
    loop: dict = field(default_factory=dict)  # what the loop said of itself (`mechlrmc.record.loop_summary`)
    model: dict = field(default_factory=dict)  # the model in brief (`describe_model`)

    def __post_init__(self) -> None:
        _require(isinstance(self.factory_kwargs, dict), "record.factory_kwargs", self.factory_kwargs,
                 "a mapping of JSON values")
        _require(self.model_factory == "" or ":" in self.model_factory, "record.model_factory", self.model_factory,
                 "'module:callable' or 'path/to/file.py:callable'")
        checkpoints = self.checkpoints
        _require(checkpoints == "log" or (isinstance(checkpoints, int) and not isinstance(checkpoints, bool)
                                          and checkpoints >= 1)
                 or (isinstance(checkpoints, (list, tuple)) and all(isinstance(c, int) and c >= 0 for c in checkpoints)),
                 "record.checkpoints", checkpoints, "'log', an interval >= 1, or a list of steps >= 0")
        _require(len(self.dense) in (0, 2) and (not self.dense or 0 <= self.dense[0] <= self.dense[1]),
                 "record.dense", list(self.dense), "[] or [first, last] with 0 <= first <= last")
        _require(self.dense_every >= 1, "record.dense_every", self.dense_every, "an integer >= 1")
        _require(isinstance(self.loop, dict), "record.loop", self.loop, "a mapping of JSON values")
        _require(isinstance(self.model, dict), "record.model", self.model, "a mapping of JSON values")

    def model_line(self) -> str:
        """The model in one line: "GPT2LMHeadModel: 2 layers, 2 heads, width 128, 431,232 parameters"."""
        m = self.model
        parts = [f"{m[key]} {name}" for key, name in (("layers", "layers"), ("heads", "heads")) if key in m]
        parts += [f"width {m['width']}"] if "width" in m else []
        parts += [f"{m['parameters']:,} parameters"] if "parameters" in m else []
        return f"{m.get('class', 'a model')}: {', '.join(parts)}" if parts else m.get("class", "a model")

    def loop_line(self) -> str:
        """What the loop told, in brief (`BRIEF_LOOP` keys where present; the rest is in `loop`):
        "AdamW, lr 0.001, weight_decay 0.0, batch_size 16, transformers 5.25.0, ..."."""
        told = [f"{self.loop[key]}" if key in ("optimizer", "framework") else f"{key} {self.loop[key]}"
                for key in BRIEF_LOOP if key in self.loop]
        return ", ".join(told) or "nothing"

    def is_checkpoint_step(self, step: int) -> bool:
        """Whether the schedule checkpoints `step` (step 0 always)."""
        if step == 0 or (self.dense and self.dense[0] <= step <= self.dense[1]
                         and (step - self.dense[0]) % self.dense_every == 0):
            return True
        if self.checkpoints == "log":
            return step in log_steps(step)
        if isinstance(self.checkpoints, int):
            return step % self.checkpoints == 0
        return step in self.checkpoints


def log_steps(until: int, per_decade: int = 10) -> set[int]:
    """Log-spaced steps up to `until`: 1, 2, 3, ..., about `per_decade` per factor of ten (rounded,
    distinct), the schedule `record.checkpoints="log"` keeps."""
    steps, k = set(), 0
    while True:
        step = round(10 ** (k / per_decade))
        if step > until:
            return steps
        steps.add(step)
        k += 1


# the names Hugging Face, TransformerLens and mechlrmc configs give a model's depth, heads and width
_CONFIG_NAMES = {"layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
                 "heads": ("num_attention_heads", "n_head", "n_heads"),
                 "width": ("hidden_size", "n_embd", "d_model")}


def describe_model(model, sites=None, shapes: dict | None = None) -> dict:
    """The model in brief: its class, parameter count and, where known, layers, heads and width:
    from its config (`model.config` or `model.cfg`, under the usual names), else from what its sites
    gave on a forward (`shapes`: {site: output shape}; one attention site per layer, its heads,
    the final hidden state's width)."""
    out = {"class": type(model).__name__, "parameters": int(sum(p.numel() for p in model.parameters()))}
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    for key, names in _CONFIG_NAMES.items():
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = value
                break
    shapes = shapes or {}
    if sites is not None:
        patterns = [shapes[a] for a in sites.attention if a in shapes]
        if patterns and "layers" not in out:
            out["layers"] = len(patterns)
        if patterns and "heads" not in out:
            out["heads"] = patterns[0][1] if len(patterns[0]) == 4 else 1
        if sites.final in shapes and "width" not in out:
            out["width"] = shapes[sites.final][-1]
    return out


def loop_summary(optimizer: torch.optim.Optimizer | None, batch_size: int | None,
                 loop: dict | None) -> dict[str, Any]:
    """What the loop said of itself: its optimizer's class and hyper-parameters (the first
    parameter group's numbers and flags), the batch size, the processes, and `loop`'s own entries
    (a framework's arguments), as JSON values."""
    import torch  # here: the config (and the command line) starts without torch

    from mechlrmc.parallel import world_size

    out: dict[str, Any] = {}
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    if optimizer is not None:
        out["optimizer"] = type(optimizer).__name__
        group = optimizer.param_groups[0]
        for key, value in group.items():
            if key == "params":
                continue
            if torch.is_tensor(value) and value.numel() == 1:
                value = float(value)
            if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
                value = list(value)
            if value is None or isinstance(value, (bool, int, float, str, list)):
                out[key] = value
        if len(optimizer.param_groups) > 1:
            out["param_groups"] = len(optimizer.param_groups)
    if batch_size is not None:
        out["batch_size"] = int(batch_size)
    if world_size() > 1:
        out["processes"] = world_size()
    try:
        out.update(json.loads(json.dumps(loop or {})))
    except TypeError as e:
        raise ConfigError(f"loop={loop!r} is not JSON ({e}): allowed numbers, strings, lists, mappings") from None
    return out
