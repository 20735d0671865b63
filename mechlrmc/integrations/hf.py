"""`RecorderCallback`: a `transformers.Trainer` records its run as a mechlrmc run directory.

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[RecorderCallback("runs/hf", task="mws", sites={"final": "transformer.ln_f"})])

The recorder (`mechlrmc.record.Recorder`) is made at `on_train_begin` with the Trainer's model and
optimizer's settings; the model factory defaults to `from_config` here with the model's own config, so
`Run.load_model` rebuilds any Hugging Face model class. The run's `record.loop` keeps the
Trainer's arguments (learning rate, schedule, batch per device, accumulation, processes).

A step is recorded when the model has its weights after that step and before anything changes
them: at the next `on_step_begin`, or at the Trainer's closing log (before `load_best_model_at_end`
loads another model), with what the Trainer logged for it in between, keyed by the Trainer's own
step (so `eval_on_start`'s evaluation is step 0's): `loss` (the mean training loss since the last
log), `grad_norm`, `learning_rate`, `epoch` and any other scalar it logs, but its speed figures.
The Trainer's evaluation loss is `eval_loss` in a run without a task and `trainer_eval_loss` in a
run with one (whose `eval_loss` is the task's). The gradient norms of each component are taken at
`on_optimizer_step`, before the Trainer clears the gradients.

Under `torchrun`, every process makes its recorder and rank 0 writes (`mechlrmc.parallel`). A
Trainer resumed from its own checkpoint (`resume_from_checkpoint`) continues the run from its
restored step; the recorder loads nothing into the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from transformers import TrainerCallback

from mechlrmc.factory import FactoryError
from mechlrmc.record import Recorder
from mechlrmc.record_config import loop_summary

SPEED = ("_runtime", "_per_second", "total_flos")  # logged figures of speed, not of the run
ARGUMENTS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1",
             "adam_beta2", "adam_epsilon", "max_grad_norm", "per_device_train_batch_size",
             "gradient_accumulation_steps", "max_steps", "num_train_epochs", "seed", "optim", "bf16", "fp16")


def from_config(config: dict, architecture: str | None = None) -> transformers.PreTrainedModel:
    """A freshly initialised Hugging Face model of `config` (`PretrainedConfig.to_dict()`), of the
    class its `architectures` names (or `architecture`): the default factory of recorded HF runs."""
    name = architecture or (config.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if name else transformers.AutoModelForCausalLM
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FactoryError(f"architecture={name!r} is not a transformers model class: allowed a class of the "
                           f"transformers package (GPT2LMHeadModel, ...); for your own class give the Recorder "
                           f"model_factory='module:callable'")
    try:
        cfg = transformers.AutoConfig.for_model(**config)
    except (KeyError, ValueError) as e:
        raise FactoryError(f"config with model_type={config.get('model_type')!r} is not a transformers config "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): allowed "
                           f"PretrainedConfig.to_dict() of a transformers model") from None
    return cls._from_config(cfg)


def _arguments(args) -> dict[str, Any]:
    out = {key: getattr(args, key) for key in ARGUMENTS if hasattr(args, key)}
    out = {k: (v.value if hasattr(v, "value") else v) for k, v in out.items()}  # enums as their names
    return {"framework": f"transformers {transformers.__version__}",
            **{k: v for k, v in out.items() if v is None or isinstance(v, (bool, int, float, str))}}


class RecorderCallback(TrainerCallback):
    """Drives a `Recorder` from the Trainer's events; keyword arguments go to the `Recorder`."""

    def __init__(self, path: str | Path, **recorder_kwargs: Any):
        self.path, self.kwargs = Path(path), recorder_kwargs
        self.recorder: Recorder | None = None
        self.pending: int | None = None
        self.logs: dict[int, dict[str, float]] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        config = model.config.to_dict()
        config.pop("torch_dtype", None)
        config.pop("dtype", None)
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        kw = {"model_factory": "mechlrmc.integrations.hf:from_config",
              "factory_kwargs": {"config": config, "architecture": type(model).__name__},
              "eval_every": max(1, args.logging_steps if isinstance(args.logging_steps, int) else 1),
              "steps": state.max_steps or None, "batch_size": batch,
              "loop": {**loop_summary(optimizer, None, None), **_arguments(args)}, **self.kwargs}
        if state.global_step > 0:  # the Trainer restored its own checkpoint: go on from its step
            kw.update(resume=True, start_step=state.global_step)
        # the Trainer keeps its own resume state: the recorder writes weights and metrics only
        self.recorder = Recorder(self.path, model, source="transformers", record_start=False, **kw)
        self.pending = None if self.recorder.resumed else 0  # step 0 waits for eval_on_start's evaluation

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush()

    def on_optimizer_step(self, args, state, control, **kwargs):
        rec = self.recorder
        if rec is not None and rec.telemetry is not None and (state.global_step + 1) % rec.cfg.train.eval_every == 0:
            rec.keep_gradient_norms()  # the Trainer clears the gradients before on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        self.pending = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "train_runtime" in logs:  # the closing summary, logged before the best model is loaded
            self._flush()
            return
        row = self.logs.setdefault(state.global_step, {})
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith(SPEED):
                row[self._column(key)] = float(value)

    def _column(self, key: str) -> str:
        if self.recorder is not None and self.recorder.has_data and key.startswith("eval_"):
            return f"trainer_{key}"  # the task's evaluation owns eval_*
        return key

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()
        if self.recorder is not None:
            self.recorder.close()

    def _flush(self) -> None:
        if self.pending is None or self.recorder is None:
            return
        self.recorder.step(self.pending, **self.logs.pop(self.pending, {}))
        self.pending = None
