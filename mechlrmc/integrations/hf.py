"""`RecorderCallback`: a `transformers.Trainer` records its run as a mechlrmc run directory.

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[RecorderCallback("runs/hf", task="mws", sites={"final": "transformer.ln_f"})])

The recorder (`mechlrmc.record.Recorder`) is made at `on_train_begin` with the Trainer's model and
optimizer, so the run resumes with its Adam state; the model factory defaults to `from_config`
here with the model's own config, so `Run.load_model` rebuilds any Hugging Face model class.

A step is recorded when the model has its weights after that step and before the next update: at
the next `on_step_begin` (or at `on_train_end`), with what the Trainer logged for it in between
(`loss`, the mean training loss since the last log; `eval_loss` where it evaluated). A step the
Trainer did not log has no training loss in the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from transformers import TrainerCallback

from mechlrmc.record import Recorder


def from_config(config: dict, architecture: str | None = None) -> transformers.PreTrainedModel:
    """A freshly initialised Hugging Face model of `config` (`PretrainedConfig.to_dict()`), of the
    class its `architectures` names (or `architecture`): the default factory of recorded HF runs."""
    cfg = transformers.AutoConfig.for_model(**config)
    name = architecture or (config.get("architectures") or [None])[0]
    cls = getattr(transformers, name) if name else transformers.AutoModelForCausalLM
    return cls._from_config(cfg) if hasattr(cls, "_from_config") else cls(cfg)


class RecorderCallback(TrainerCallback):
    """Drives a `Recorder` from the Trainer's events; keyword arguments go to the `Recorder`."""

    def __init__(self, path: str | Path, **recorder_kwargs: Any):
        self.path, self.kwargs = Path(path), recorder_kwargs
        self.recorder: Recorder | None = None
        self.pending: int | None = None
        self.logs: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        config = model.config.to_dict()
        config.pop("torch_dtype", None)
        kw = {"model_factory": "mechlrmc.integrations.hf:from_config",
              "factory_kwargs": {"config": config, "architecture": type(model).__name__},
              "eval_every": max(1, args.logging_steps if isinstance(args.logging_steps, int) else 1),
              "steps": state.max_steps or None, **self.kwargs}
        self.recorder = Recorder(self.path, model, optimizer=optimizer, source="transformers",
                                 **kw)

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush()

    def on_step_end(self, args, state, control, **kwargs):
        self.pending = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            if logs and key in logs:
                self.logs[key] = float(logs[key])

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()
        if self.recorder is not None:
            self.recorder.close()

    def _flush(self) -> None:
        if self.pending is None or self.recorder is None:
            return
        known = set(self.recorder.run.metric_columns)
        self.recorder.step(self.pending, **{k: v for k, v in self.logs.items() if k in known})
        self.pending, self.logs = None, {}
