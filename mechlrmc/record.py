"""The Recorder: a few lines in any PyTorch loop turn it into a mechlrmc run directory.

    from mechlrmc import Recorder
    with Recorder("runs/mine", model, model_factory="mypkg.models:build", factory_kwargs={...},
                  task="mws", checkpoints="log", log="tensorboard") as rec:
        for step in range(1, steps + 1):
            ...                                      # the user's own step
            rec.step(step, loss=loss.item())         # a metrics row; a checkpoint when scheduled

The run directory has the guarantees of one `mechlrmc train` makes (`mechlrmc.runs`): one writer
(the lock is held from the first write to `close`), atomic checkpoint writes in safetensors, a
manifest of their hashes, metrics flushed row by row, provenance. Its `config.yaml` has the task's
data section, the schedule (`train`) and a `record` section instead of `model`: the factory that
rebuilds the user's model, the sites its internals are read at and the checkpoint schedule.

- **Steps**: step 0 is the model as handed to the Recorder (evaluated and checkpointed when it
  is made); the loop reports each step after its update, from 1 on, increasing.
- **Checkpoints** (`checkpoints`): "log" (log-spaced: steps 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20,
  25, 32, ...: `mechlrmc.config.log_steps`), an interval, or a list of steps; plus a dense window
  `dense=(first, last)` every `dense_every` steps, and always step 0 and the last step. Given the
  user's `optimizer`, each checkpoint also writes a resume state (weights, optimizer state, torch's
  global RNG state); `Recorder(..., resume=True)` loads it and `rec.start_step` says where to go on.
- **Task** (`task`): a registered task's name, "module:object", or a task's data config
  (`MWSConfig(length=8)`). With one, every `eval_every` steps the task evaluates the model on its
  fixed evaluation batch (`Task.evaluate` with the recorder's `sites`), so every lens the task
  supports applies. Without one (`data.task = "loop"`), the run has the loop's own losses (and
  `eval_loss` where the loop passes one), and the lenses that need no data apply.
- **Sites** (`sites`, `mechlrmc.sites`): names of the submodules whose output is a hidden state
  (`{"final": "ln_f"}`: collapse there) or an attention pattern (`{"attention": [...]}`); default:
  those the model declares (mechlrmc's own model does), else none.
- **Telemetry** (`log`: "tensorboard", "wandb", "both"): the same measures as `mechlrmc train`,
  at the evaluation steps.

The recorder never changes the loop's numbers: it evaluates in eval mode without gradients, puts
the model's train/eval flag back, restores torch's global RNG state afterwards and draws nothing
from it (the task's batches have their own generator). A loop with the recorder equals the loop
without it, bit for bit (tests/test_record.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from mechlrmc import provenance, telemetry
from mechlrmc.config import ConfigError, RecordConfig, RunConfig, TrainConfig
from mechlrmc.errors import UsageError
from mechlrmc.factory import build_model, check_fits
from mechlrmc.runs import CheckpointError, Run, RunLock
from mechlrmc.sites import Sites
from mechlrmc.tasks import get_task
from mechlrmc.tasks.base import TaskConfig

UNKNOWN_STEPS = 10**12  # train.steps of a run whose loop did not say its length, until it closes
EVAL_BATCH = 256
OPTIMIZER = "optim."
TORCH_RNG = "rng.torch"
MAY_CHANGE = ("train.steps", "train.log", "record.workdir")


class RecordError(UsageError, ValueError):
    """A call the recorder cannot honour (a step that goes backwards, a task that does not fit)."""


def _data_config(task: str | TaskConfig | None) -> TaskConfig:
    if task is None:
        return get_task("loop").config()
    if isinstance(task, TaskConfig):
        get_task(task.task)
        return task
    if isinstance(task, str):
        return get_task(task).config()
    raise RecordError(f"task={task!r} is invalid: allowed None, a task name, 'module:object' or a task's data config")


def _factory_name(factory: Any) -> str:
    if factory is None or isinstance(factory, str):
        return factory or ""
    module, name = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        raise RecordError(f"model_factory={factory!r} cannot be imported again: allowed 'module:callable', "
                          f"'path/to/file.py:callable', or a class or function defined in an importable module")
    return f"{module}:{name}"


class Recorder:
    """Records a user's loop and model into the run directory `path` (see the module docstring)."""

    def __init__(self, path: str | Path, model: torch.nn.Module, *, model_factory: Any = None,
                 factory_kwargs: dict | None = None, task: str | TaskConfig | None = None,
                 checkpoints: str | int | list[int] = "log", dense: tuple[int, int] | list[int] = (),
                 dense_every: int = 1, eval_every: int = 10, steps: int | None = None,
                 optimizer: torch.optim.Optimizer | None = None, sites: dict | Sites | None = None,
                 log: str = "none", eval_batch_size: int = EVAL_BATCH, resume: bool = False,
                 source: str = "loop"):
        self.model, self.optimizer = model, optimizer
        self.sites = sites if isinstance(sites, Sites) else Sites.from_dict(sites) if sites else Sites.of(model)
        self.sites.check(model)
        factory = _factory_name(model_factory)
        kwargs = dict(factory_kwargs or {})
        try:
            json.dumps(kwargs)
        except TypeError as e:
            raise RecordError(f"factory_kwargs={kwargs!r} are not JSON ({e}): allowed numbers, strings, lists, "
                              f"mappings") from None
        if factory:  # the factory rebuilds this model: same names and shapes (its init draws from a forked RNG)
            with torch.random.fork_rng(devices=[]):
                check_fits(build_model(factory, kwargs), model.state_dict(), "the model given to the Recorder")
        record = RecordConfig(model_factory=factory, factory_kwargs=kwargs, sites=self.sites.to_dict(),
                              checkpoints=list(checkpoints) if isinstance(checkpoints, (list, tuple)) else checkpoints,
                              dense=tuple(dense), dense_every=dense_every, source=source, workdir=str(Path.cwd()))
        self.device = next(model.parameters()).device
        train = TrainConfig(steps=steps or UNKNOWN_STEPS, eval_every=eval_every, log_every=1,
                            eval_batch_size=eval_batch_size, log=log, device=self.device.type,
                            threads=torch.get_num_threads())
        self.cfg = RunConfig(data=_data_config(task), model=None, train=train, record=record)
        self.task = self.cfg.task
        self.has_data = self.task.has_data
        telemetry.require(log)
        self.eval_data = self.task.eval_batch(self.cfg) if self.has_data else None
        if self.has_data:
            self._check_output()
        self.callbacks: dict[str, list] = {}
        self.last_metrics: dict[str, float] = {}
        self.step_done, self.saved, self.closed = -1, -1, False
        self.wall_time, self._tick = 0.0, time.perf_counter()
        if not (resume and Path(path, "config.yaml").is_file()):
            Run.check_new(path)
        self.lock = RunLock(path).acquire()
        try:
            self.run, self.resumed = self._open(Path(path), resume)
            self.view = _TrainerView(self)
            self.telemetry = telemetry.attach(self.view)
            if not self.resumed:
                self.step(0)  # the model as handed over, before the loop's first update
        except BaseException:
            self._fire("on_close")
            self.lock.release()
            raise

    # ----- opening and resuming -----
    def _open(self, path: Path, resume: bool) -> tuple[Run, bool]:
        if resume and (path / "config.yaml").is_file():
            run = Run(path)
            diff = run.config.differences(self.cfg, ignore=MAY_CHANGE)
            if diff:
                raise ConfigError(f"resume=True with settings that differ from the recorded run's (saved, asked): "
                                  f"{diff}; allowed the run's own, except {', '.join(MAY_CHANGE)}")
            run.remove_temporary_files()
            if run.has_resume_state:
                self._load(run)
                run.truncate_metrics(self.start_step)
                run.save_provenance(provenance.collect(self.device))
                return run, True
            if any(s > 0 for s in run.steps):
                raise CheckpointError(f"{path} has no resume state (the loop gave the Recorder no optimizer): "
                                      f"it cannot be resumed; allowed a new directory")
            run.restart()
        else:
            run = Run.create(path, self.cfg)
        run.save_provenance(provenance.collect(self.device))
        self.start_step = 0
        return run, False

    def _load(self, run: Run) -> None:
        from mechlrmc import resume as resume_file

        if self.optimizer is None:
            raise RecordError("resume=True needs the loop's optimizer: allowed Recorder(..., optimizer=opt, resume=True)")
        tensors, meta = run.load_resume_state()
        model_state = {k[len(resume_file.MODEL):]: v for k, v in tensors.items() if k.startswith(resume_file.MODEL)}
        check_fits(self.model, model_state, f"{run.path / 'resume.safetensors'}")
        self.model.load_state_dict(model_state)
        layout = json.loads(meta["optimizer"])
        for index, keys in layout["tensors"].items():
            for key in keys:
                layout["state"].setdefault(index, {})[key] = tensors[f"{OPTIMIZER}{index}.{key}"].to(self.device)
        self.optimizer.load_state_dict({"state": {int(i): s for i, s in layout["state"].items()},
                                        "param_groups": layout["param_groups"]})
        torch.set_rng_state(tensors[TORCH_RNG])
        self.start_step, self.wall_time = int(meta["step"]), float(meta["wall_time"])
        self.step_done = self.saved = self.start_step

    def _check_output(self) -> None:
        """The model's output on two evaluation examples has the shape the task reads."""
        from mechlrmc.measures import logits_of

        tokens = self.eval_data[:2].tokens.to(self.device)
        batch, pos = tokens.shape
        vocab = self.cfg.data.vocab_size
        try:
            with self._quiet():
                out = logits_of(self.model)(tokens)
        except (IndexError, RuntimeError, ValueError) as e:
            raise RecordError(f"task={self.cfg.data.task!r} does not fit the model: on its tokens [{batch}, {pos}] "
                              f"(ids 0..{vocab - 1}) the model fails ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); allowed a model that reads "
                              f"{pos} positions of a vocabulary of {vocab}") from None
        if self.task.readout == "vocab":
            ok = out.dim() == 3 and tuple(out.shape[:2]) == (batch, pos) and out.shape[2] >= vocab
            want = f"logits [batch, {pos}, >= {vocab}]"
        else:
            ok, want = tuple(out.shape) == (batch, pos), f"predictions [batch, {pos}]"
        if not ok:
            raise RecordError(f"task={self.cfg.data.task!r} does not fit the model: on tokens [{batch}, {pos}] it "
                              f"returns {list(out.shape)}; allowed {want}")

    # ----- the loop's calls -----
    def add_callback(self, event: str, fn) -> None:
        """Events, as the Trainer's: `on_eval`, `on_checkpoint`, `on_close`."""
        self.callbacks.setdefault(event, []).append(fn)

    def _fire(self, event: str) -> None:
        for fn in self.callbacks.get(event, []):
            fn(self.view)

    def step(self, step: int, evaluate: bool | None = None, **metrics: float) -> None:
        """Record the loop's step `step` (after its update): a metrics row of `metrics` (`loss`, and
        any of the task's train metrics; `eval_loss` for a run without a task), the task's
        evaluation every `eval_every` steps (or when `evaluate`), a checkpoint when scheduled."""
        if self.closed:
            raise RecordError(f"step {step}: the recorder of {self.run.path} is closed")
        if not isinstance(step, int) or isinstance(step, bool) or step <= self.step_done:
            raise RecordError(f"step={step!r} goes backwards or repeats: allowed an integer > {self.step_done} "
                              f"(the last recorded step; step 0 is the model before training, recorded by the "
                              f"Recorder itself)")
        self.wall_time += time.perf_counter() - self._tick
        known = set(self.run.metric_columns)
        row: dict[str, Any] = {"step": step, **{k: float(v) for k, v in metrics.items() if k in known}}
        extra = {k: v for k, v in metrics.items() if k not in known}
        if extra:
            raise RecordError(f"metrics {sorted(extra)} are not columns of data.task={self.cfg.data.task!r}: "
                              f"allowed {sorted(known - {'step', 'wall_time'})}")
        if evaluate or (evaluate is None and (step % self.cfg.train.eval_every == 0 or step == 0)):
            row.update(self._evaluate(row))
            self.last_metrics = row
            self._fire("on_eval")
        row["wall_time"] = self.wall_time
        self.run.append_metrics([row])
        self.step_done = step
        if self.cfg.record.is_checkpoint_step(step) or step == self.cfg.train.steps:
            self.checkpoint()
        self._tick = time.perf_counter()

    def _evaluate(self, row: dict) -> dict[str, float]:
        if not self.has_data:
            return {"eval_loss": row.get("eval_loss", row.get("loss", math.nan))}
        with self._quiet():
            ev = self.task.evaluate(self.model, self.eval_data, self.sites)
        return {f"eval_{k}": v for k, v in ev.items()}

    @contextlib.contextmanager
    def _quiet(self):
        """Eval mode, no gradients, and torch's RNG state put back (`torch.random.fork_rng`): the
        loop sees nothing."""
        training = self.model.training
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self.model.eval()
            try:
                yield
            finally:
                self.model.train(training)

    def record_batch(self, inputs: torch.Tensor, targets: torch.Tensor, loss: str = "cross_entropy") -> None:
        """Keep one batch of the loop's own data (`batch.safetensors`): with it, a run without a task
        gets the lenses that need a batch and its loss (gradient norms, the top Hessian eigenvalue,
        the essential dynamics). `loss`: "cross_entropy" (logits [..., vocab], class targets [...])
        or "mse" (targets of the output's shape)."""
        from mechlrmc.tasks.loop import LOSSES

        if loss not in LOSSES:
            raise RecordError(f"loss={loss!r} is invalid: allowed one of {LOSSES}")
        if len(inputs) != len(targets):
            raise RecordError(f"inputs ({len(inputs)} examples) and targets ({len(targets)}) differ in length: "
                              f"allowed one target per input")
        self.run.save_batch(inputs, targets, loss)

    def checkpoint(self) -> None:
        """Write the weights of the last recorded step (and, given the optimizer, a resume state)."""
        step = self.step_done
        if step < 0 or step == self.saved:
            return
        self.run.save_checkpoint(step, self.model.state_dict())
        if self.optimizer is not None:
            self._save_resume(step)
        self.saved = step
        self._fire("on_checkpoint")

    def _save_resume(self, step: int) -> None:
        from mechlrmc import resume as resume_file

        state = self.optimizer.state_dict()
        tensors = {f"{resume_file.MODEL}{k}": v for k, v in self.model.state_dict().items()}
        layout: dict[str, Any] = {"state": {}, "tensors": {}, "param_groups": state["param_groups"]}
        for index, values in state["state"].items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"{OPTIMIZER}{index}.{key}"] = value
                    layout["tensors"].setdefault(str(index), []).append(key)
                else:
                    layout["state"].setdefault(str(index), {})[key] = value
        tensors[TORCH_RNG] = torch.get_rng_state()
        self.run.save_resume_state(step, tensors, {**resume_file.meta(self.wall_time),
                                                   "optimizer": json.dumps(layout)})

    def close(self, failed: bool = False) -> Run:
        """The last checkpoint (unless the loop failed), the run's length in its config, the lock released."""
        if self.closed:
            return self.run
        self.closed = True
        try:
            if not failed and self.step_done >= 0:
                self.checkpoint()
                if self.cfg.train.steps == UNKNOWN_STEPS:
                    self.cfg = self.cfg.override({"train.steps": max(self.step_done, 1)})
                    self.run.save_config(self.cfg)
        finally:
            try:
                self._fire("on_close")
            finally:
                self.lock.release()
        return self.run

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


class _TrainerView:
    """What the live telemetry (`mechlrmc.telemetry`) reads of a trainer, for a recorder: its config,
    model, task, run, evaluation batch, sites, last metrics row and current step."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.model, self.task, self.run, self.device = recorder.model, recorder.task, recorder.run, recorder.device
        self.eval_data, self.sites, self.resumed = recorder.eval_data, recorder.sites, recorder.resumed

    @property
    def cfg(self) -> RunConfig:
        return self.recorder.cfg

    @property
    def step(self) -> int:
        return max(self.recorder.step_done, 0)

    @property
    def last_metrics(self) -> dict[str, float]:
        return self.recorder.last_metrics

    def add_callback(self, event: str, fn) -> None:
        self.recorder.add_callback(event, fn)
