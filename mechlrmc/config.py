"""Typed configuration: data, model and training, grouped in a `RunConfig`.

Every config is a dataclass that validates itself on construction and names the bad field and the
allowed range in its error. `RunConfig.to_yaml` / `RunConfig.from_yaml` round-trip exactly, and
`preset(name)` returns the named configurations of every task (`paper`, `cpu`, `tiny`, `mws`, ...).
The data section belongs to the run's task (`data.task`, default `lrmc`; `mechlrmc.tasks`), which
defines and validates its fields; `DataConfig` is LRMC's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from mechlrmc import tasks
from mechlrmc.tasks import DEFAULT_TASK, get_task
from mechlrmc.record_config import RecordConfig, log_steps  # noqa: F401 (part of the config API)
from mechlrmc.validation import ConfigError, check_types, require

NORMS = ("post", "pre")
ATTENTIONS = ("softmax", "linear")
ACTIVATIONS = ("gelu", "gelu_tanh")
INITS = ("bert", "gpt")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
ADAM_IMPLEMENTATIONS = ("foreach", "fused")
LOGS = ("none", "tensorboard", "wandb", "both")

_require = require
_check_types = check_types


def __getattr__(name: str) -> Any:
    if name == "DataConfig":  # the LRMC data config, loaded with its task (torch) on first use
        return get_task(DEFAULT_TASK).config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ModelConfig:
    """The transformer. The defaults are the LRMC paper's bidirectional post-LayerNorm BERT.

    Variants: `causal` (a causal mask), `attention="linear"` (the plateau paper's: the pattern is
    the scaled scores QK^T/sqrt(d_head), zero above the diagonal, no softmax), `norm="pre"` (pre-LN
    blocks and a final LayerNorm), `init="gpt"` (normal(0, init_range) weights, zero biases, the
    residual output projections W_O and W_out at init_range/sqrt(2 n_layers)), `act_fn="gelu_tanh"`
    (tanh-approximate GELU) and `readout_bias` (the read-out's bias; the task picks a scalar or a
    vocabulary read-out). `mask_embedding_zero` reproduces the reference: MASK is HF BERT's padding id, so its embedding
    row is zero and never trained. `n_ctx` is the size of the position table (0: the sequence
    length m*n); make it larger to evaluate on bigger matrices.
    """

    d_model: int = 768
    n_layers: int = 4
    n_heads: int = 8
    d_mlp: int = 3072
    norm: str = "post"
    mask_embedding_zero: bool = True
    n_ctx: int = 0
    init_range: float = 0.02
    ln_eps: float = 1e-12
    causal: bool = False
    attention: str = "softmax"
    act_fn: str = "gelu"
    init: str = "bert"
    readout_bias: bool = True

    def __post_init__(self) -> None:
        _check_types(self, "model")
        _require(self.attention in ATTENTIONS, "model.attention", self.attention, f"one of {ATTENTIONS}")
        _require(self.act_fn in ACTIVATIONS, "model.act_fn", self.act_fn, f"one of {ACTIVATIONS}")
        _require(self.init in INITS, "model.init", self.init, f"one of {INITS}")
        for name in ("d_model", "n_layers", "n_heads", "d_mlp"):
            value = getattr(self, name)
            _require(value >= 1, f"model.{name}", value, "an integer >= 1")
        _require(
            self.d_model % self.n_heads == 0,
            "model.d_model", self.d_model, f"a multiple of model.n_heads={self.n_heads}",
        )
        _require(self.norm in NORMS, "model.norm", self.norm, f"one of {NORMS}")
        _require(self.n_ctx >= 0, "model.n_ctx", self.n_ctx, "an integer >= 0 (0 means the task's sequence length)")
        _require(0 < self.init_range < math.inf, "model.init_range", self.init_range, "a finite number > 0")
        _require(0 < self.ln_eps < 1, "model.ln_eps", self.ln_eps, "0 < ln_eps < 1")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class TrainConfig:
    """Online training: a fresh batch every step, Adam at a constant learning rate, MSE on all
    entries. Checkpoints at every multiple of `checkpoint_every`, at every multiple of
    `checkpoint_every_early` up to `checkpoint_early_until` (denser early), at the listed
    `checkpoint_steps`, and at the last step. `attn_intervention_scale` = c != 1 scales every head's
    attention on the task's optimal attention map by c from step `attn_intervention_start` on
    (`mechlrmc.intervention`).

    Speed switches: `compile` runs the forward and backward through `torch.compile`, and `adam`
    picks PyTorch's Adam kernel: "foreach" (multi-tensor, bitwise the same as the per-tensor loop)
    or "fused" (one kernel, faster, float results differ in the last
    bits). `compile` and "fused" are for speed but change the float trajectory: a run with them does
    not reproduce a run without them bit for bit (the default does). `threads` sets torch's
    intra-op thread count while the run trains (0: leave it); the caller's own count is restored
    when training ends or fails.

    Live telemetry (`mechlrmc.telemetry`, the `telemetry` extra): `log` sends every evaluation's
    metrics and mechanistic measures to "tensorboard", "wandb" or "both" ("none": off), and each
    head's average attention pattern as an image every `log_images_every` steps (0: every 10th
    evaluation). It reads the model and never draws a random number, so it changes no result.

    The data stream: `data_seed` seeds the training batches (-1: the same as `seed`); a run whose
    `data_seed` differs from `seed` starts from the same weights and sees other data.

    Stopping at the drop: with `stop_below` > 0 a run ends (a finished run, `stopped.json` saying why)
    once its task's phase metric (`Task.phase_metric`) has been at or below `stop_below` for
    `stop_patience` evaluations in a row; `train.steps` is then the limit.

    Branching (`mechlrmc train --from RUN --from-step S`): `keep_states` lists the steps at which the
    whole training state (weights, Adam, data generator) is kept in `states/`, so that a run can be
    continued from them in branches; `branch_from`/`branch_step` name the run and step a branch
    starts from (its weights and Adam state; its own `data_seed`'s stream, or the parent's own
    generator state where the data seeds agree: then the branch repeats its parent exactly)."""

    steps: int = 50_000
    batch_size: int = 256
    lr: float = 1e-4
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    eval_batch_size: int = 1024
    eval_seed: int = 12345
    checkpoint_every: int = 2000
    checkpoint_every_early: int = 500
    checkpoint_early_until: int = 2000
    checkpoint_steps: tuple[int, ...] = ()
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    adam: str = "foreach"
    threads: int = 0
    attn_intervention_scale: float = 1.0
    attn_intervention_start: int = 0
    log: str = "none"
    log_images_every: int = 0
    data_seed: int = -1
    stop_below: float = 0.0
    stop_patience: int = 3
    keep_states: tuple[int, ...] = ()
    branch_from: str = ""
    branch_step: int = 0

    def __post_init__(self) -> None:
        _check_types(self, "train")
        for name in ("steps", "batch_size", "log_every", "eval_every", "eval_batch_size",
                     "checkpoint_every", "checkpoint_every_early"):
            value = getattr(self, name)
            _require(value >= 1, f"train.{name}", value, "an integer >= 1")
        _require(
            self.lr > 0 and math.isfinite(self.lr), "train.lr", self.lr, "a finite number > 0"
        )
        for name in ("seed", "eval_seed"):
            value = getattr(self, name)
            _require(0 <= value < 2**62, f"train.{name}", value, "an integer in [0, 2**62)")
        _require(
            self.checkpoint_early_until >= 0,
            "train.checkpoint_early_until", self.checkpoint_early_until, "an integer >= 0",
        )
        bad = [s for s in self.checkpoint_steps if not 0 <= s <= self.steps]
        _require(not bad, "train.checkpoint_steps", bad, f"steps in [0, train.steps={self.steps}]")
        _require(self.device in DEVICES, "train.device", self.device, f"one of {DEVICES}")
        _require(self.dtype in DTYPES, "train.dtype", self.dtype, f"one of {DTYPES}")
        _require(self.adam in ADAM_IMPLEMENTATIONS, "train.adam", self.adam, f"one of {ADAM_IMPLEMENTATIONS}")
        _require(self.threads >= 0, "train.threads", self.threads, "an integer >= 0 (0: torch's default)")
        _require(
            0 < self.attn_intervention_scale < math.inf, "train.attn_intervention_scale",
            self.attn_intervention_scale, "a finite number > 0 (1: no intervention)",
        )
        _require(
            self.attn_intervention_start >= 0, "train.attn_intervention_start",
            self.attn_intervention_start, "an integer >= 0",
        )
        _require(self.log in LOGS, "train.log", self.log, f"one of {LOGS}")
        _require(
            self.log_images_every >= 0 and self.log_images_every % self.eval_every == 0,
            "train.log_images_every", self.log_images_every,
            f"0 (every 10th evaluation) or a multiple of train.eval_every={self.eval_every}",
        )
        _require(-1 <= self.data_seed < 2**62, "train.data_seed", self.data_seed,
                 "-1 (the same as train.seed) or an integer in [0, 2**62)")
        _require(self.stop_below >= 0 and math.isfinite(self.stop_below), "train.stop_below", self.stop_below,
                 "a finite number >= 0 (0: never stop early)")
        _require(self.stop_patience >= 1, "train.stop_patience", self.stop_patience, "an integer >= 1")
        bad = [s for s in self.keep_states if not 0 <= s <= self.steps]
        _require(not bad, "train.keep_states", bad, f"steps in [0, train.steps={self.steps}]")
        _require(0 <= self.branch_step < self.steps, "train.branch_step", self.branch_step,
                 f"a step in [0, train.steps={self.steps})")

    @property
    def data_stream_seed(self) -> int:
        """The seed of the training batches' stream (`data_seed`, or `seed` where it is -1)."""
        return self.seed if self.data_seed < 0 else self.data_seed

    def is_checkpoint_step(self, step: int) -> bool:
        return (
            step == 0
            or step in self.keep_states
            or step == self.branch_step and bool(self.branch_from)
            or step == self.steps
            or step % self.checkpoint_every == 0
            or (step <= self.checkpoint_early_until and step % self.checkpoint_every_early == 0)
            or step in self.checkpoint_steps
        )


# the train keys of a recorded run: the recorder's own settings (the loop's are in record.loop)
RECORDED_TRAIN_KEYS = ("steps", "eval_every", "log_every", "eval_batch_size", "eval_seed", "device", "threads", "log")


@dataclass
class RunConfig:
    """Everything that defines a training run. A recorded run (`record` set) has no `model`
    section: its model is the user's, rebuilt by `record.model_factory`."""

    data: Any = field(default_factory=lambda: get_task(DEFAULT_TASK).config())  # the task's data config
    model: ModelConfig | None = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    record: RecordConfig | None = None

    def __post_init__(self) -> None:
        task = get_task(getattr(self.data, "task", None)) if isinstance(getattr(self.data, "task", None), str) else None
        if task is None or not isinstance(self.data, task.config):
            raise ConfigError(f"data must be the data config of a task in {tasks.task_names()}, got {self.data!r}")
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {self.train!r}")
        if self.record is not None:
            if not isinstance(self.record, RecordConfig):
                raise ConfigError(f"record must be a RecordConfig, got {self.record!r}")
            if self.model is None:
                return
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"model must be a ModelConfig, got {self.model!r}")
        _require(
            self.model.n_ctx == 0 or self.model.n_ctx >= self.data.seq_len,
            "model.n_ctx", self.model.n_ctx,
            f"0 or >= the sequence length of data.task={self.data.task!r} ({self.data.seq_len_text})",
        )
        task.check(self)

    @property
    def task(self):
        """The run's task (`mechlrmc.tasks`)."""
        return get_task(self.data.task)

    @property
    def n_ctx(self) -> int:
        return (self.model.n_ctx if self.model else 0) or self.data.seq_len

    @property
    def recorded(self) -> bool:
        """A run recorded from a user's loop and model (`mechlrmc.record`), not trained by mechlrmc."""
        return self.record is not None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = dataclasses.asdict(self)
        out["data"] = {"task": self.data.task, **out["data"]}
        for key in ("checkpoint_steps", "keep_states"):
            out["train"][key] = list(getattr(self.train, key))
        if self.record is None:
            del out["record"]
        else:  # a recorded run's train section: what the recorder decides, nothing of the loop's invented
            out["train"] = {k: v for k, v in out["train"].items() if k in RECORDED_TRAIN_KEYS}
            out["record"]["dense"] = list(self.record.dense)
            if isinstance(self.record.checkpoints, tuple):
                out["record"]["checkpoints"] = list(self.record.checkpoints)
        if self.model is None:
            del out["model"]
        return out

    def differences(self, other: RunConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
        """`{"section.key": (self's value, other's value)}` for every key that differs, but those in
        `ignore` (a run resumes under a config whose only differences are in `("train.steps",)`)."""
        mine, theirs = self.to_dict(), other.to_dict()
        keys = [(s, k) for s in {**mine, **theirs} for k in {**mine.get(s, {}), **theirs.get(s, {})}]
        return {f"{s}.{k}": (mine.get(s, {}).get(k), theirs.get(s, {}).get(k)) for s, k in keys
                if mine.get(s, {}).get(k) != theirs.get(s, {}).get(k) and f"{s}.{k}" not in ignore}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"a run config of type {type(raw).__name__} is invalid: allowed a mapping with sections data, model, train")
        unknown = set(raw) - {"data", "model", "train", "record"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown, key=str)}: allowed data, model, train, record")
        sections: dict[str, Any] = {}
        for name in ("data", "model", "train", "record"):
            if name in ("model", "record") and name not in raw and ("record" in raw) == (name == "model"):
                sections[name] = None  # a recorded run has no model section; a trained one no record
                continue
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"config section {name}={values!r} is invalid: allowed a mapping of keys to values")
            kind, of_task = {"model": ModelConfig, "train": TrainConfig, "record": RecordConfig}.get(name), ""
            if name == "data":  # a config without `task` (the shipped runs') is LRMC
                values = dict(values)
                task = get_task(values.pop("task", DEFAULT_TASK))
                kind, of_task = task.config, f" for data.task={task.name!r}"
            allowed = {f.name for f in fields(kind)}
            bad = sorted(set(values) - allowed, key=str)
            if bad:
                raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in bad]}{of_task}: allowed {sorted(allowed)}")
            if name == "record" and isinstance(values.get("dense"), list):
                values = {**values, "dense": tuple(values["dense"])}
            sections[name] = kind(**values)
        return cls(**sections)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror or e}): allowed a readable YAML file") from e
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML ({' '.join(str(e).split())}): "
                              f"allowed a mapping with sections data, model, train") from e
        return cls.from_dict(raw)

    def override(self, assignments: list[str] | dict[str, Any]) -> RunConfig:
        """A copy with dotted keys replaced: `["train.lr=3e-4", "model.n_heads=4"]`.

        Values are parsed as YAML scalars, so `1e-3`, `true` and `[1, 2]` mean what they say.
        """
        if isinstance(assignments, dict):
            pairs = list(assignments.items())
        else:
            pairs = []
            for item in assignments:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} is invalid: allowed section.key=value, e.g. train.lr=1e-3")
                key, text = item.split("=", 1)
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise ConfigError(f"{key.strip()}={text!r} is not a YAML value: allowed e.g. 3, 1e-3, true, [1, 2], cpu") from None
                pairs.append((key.strip(), value))
        raw = self.to_dict()
        new_task = dict(pairs).get("data.task", raw["data"]["task"])
        if new_task != raw["data"]["task"]:  # another task: start from its defaults
            raw["data"] = {"task": new_task}
        for key, value in pairs:
            section, _, name = key.partition(".")
            if section not in raw or not name:
                raise ConfigError(f"override key {key!r} is invalid: allowed data.*, model.* or train.*")
            if name not in raw[section] and not (section == "data" and new_task != self.data.task):
                of_task = f" for data.task={self.data.task!r}" if section == "data" else ""
                raise ConfigError(f"unknown key {key!r}{of_task}: allowed {sorted(raw[section])}")
            if isinstance(value, str) and isinstance(raw[section].get(name), float):
                try:
                    value = float(value)  # YAML reads "1e-3" as a string
                except ValueError:
                    raise ConfigError(f"{key}={value!r} has the wrong type: expected float") from None
            raw[section][name] = value
        return RunConfig.from_dict(raw)


class _Presets(Mapping):
    """`PRESETS[name]` is the function that makes preset `name`; iterating lists every task's preset
    names without importing a task (the command line starts without torch)."""

    def __getitem__(self, name: str) -> Callable[[], RunConfig]:
        if name not in tasks.preset_names():
            raise KeyError(name)
        return lambda: tasks.preset(name)

    def __iter__(self) -> Iterator[str]:
        return iter(tasks.preset_names())

    def __len__(self) -> int:
        return len(tasks.preset_names())


PRESETS = _Presets()


def preset(name: str) -> RunConfig:
    """A fresh copy of the named preset (`paper`, `cpu`, `tiny` of LRMC; `mws`, ... of the token tasks)."""
    return tasks.preset(name)
