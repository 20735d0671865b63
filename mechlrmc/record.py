"""The Recorder: a few lines in any PyTorch loop turn it into a mechlrmc run directory.

    from mechlrmc import Recorder
    with Recorder("runs/mine", model, model_factory="mypkg.models:build", factory_kwargs={...},
                  task="mws", optimizer=opt, checkpoints="log", log="tensorboard") as rec:
        for step in range(rec.start_step + 1, steps + 1):
            ...                                      # the user's own step
            rec.step(step, loss=loss.item(), lr=sched.get_last_lr()[0])

The run directory has the guarantees of one `mechlrmc train` makes (`mechlrmc.runs`): one writer,
atomic safetensors checkpoints with a manifest of their hashes, metrics flushed row by row,
provenance. Its `config.yaml` has the task's data section, the recorder's own settings (`train`)
and a `record` section instead of `model`: the factory that rebuilds the user's model, its sites,
the checkpoint schedule, the model in brief and what the loop said of itself (`record.loop`),
never invented defaults. docs/any-run.md is the manual; in brief:

- **Steps**: step 0 is the model as handed over (evaluated and checkpointed at once); the loop
  reports each step after its update, from 1 on, increasing.
- **Metrics**: `loss` is the loop's training loss; a loop without a task passes its evaluation
  loss as `eval_loss`; any other scalar becomes a column of `metrics.csv` and goes to telemetry.
  A column the task's evaluation writes is refused in one line, never overwritten.
- **Checkpoints**: "log" (`mechlrmc.config.log_steps`), an interval or a list of steps, a `dense`
  window every `dense_every` steps, step 0 and the last step.
- **Resume**: given the `optimizer` (and `scheduler`, AMP `scaler`), each checkpoint writes a resume
  state (weights, their states, each rank's CPU RNG, the CUDA RNG); `resume=True` loads it and
  `rec.start_step` says where to go on. Under a framework that restores its own state,
  `start_step=` continues the run from the framework's step and loads nothing into the model.
- **Task**, **sites**, **telemetry**: the task evaluates the model every `eval_every` steps on its
  fixed batch, reading its internals at the sites (each must run in the forward); `log` sends the
  measures of `mechlrmc train` to TensorBoard or W&B.
- **Wrapped, compiled, distributed** (`mechlrmc.parallel`): the module inside DDP, DataParallel or
  `torch.compile` is recorded under its own names. Under `torch.distributed` every rank makes a
  Recorder and calls it at the same steps; rank 0 writes, evaluates the plain module (no
  collective) and checkpoints; an FSDP2 model is evaluated and gathered by every rank together.

The recorder never changes the loop's numbers: it evaluates (and the telemetry measures) in eval
mode without gradients inside `torch.random.fork_rng` and puts the train flag back. A loop with
the recorder equals the loop without it, bit for bit, dropout and data drawn from the global RNG
included (tests/test_record_jobs.py).
"""

from __future__ import annotations

import contextlib
import json
import numbers
import time
from pathlib import Path
from typing import Any

import torch

from mechlrmc import loop_state, parallel, provenance, telemetry
from mechlrmc.config import ConfigError, RecordConfig, RunConfig, TrainConfig
from mechlrmc.errors import UsageError
from mechlrmc.factory import check_factory, check_fits, factory_spec
from mechlrmc.loop_state import OPTIMIZER, SCALER, SCHEDULER
from mechlrmc.record_config import describe_model, loop_summary
from mechlrmc.resume import MODEL
from mechlrmc.runs import CheckpointError, Run, RunLock
from mechlrmc.sites import SiteError, Sites
from mechlrmc.tasks import get_task
from mechlrmc.tasks.base import TaskConfig

UNKNOWN_STEPS = 10**12  # train.steps of a run whose loop did not say its length, until it closes
EVAL_BATCH = 256
MAY_CHANGE = ("train.steps", "train.log", "record.workdir", "record.loop")
RESERVED = ("step", "wall_time")


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


def _scalar(name: str, value: Any) -> float:
    """A metric's value as a float: a number, a numpy scalar or a one-element tensor."""
    if torch.is_tensor(value) and value.numel() == 1:
        return float(value.detach().float().item())
    numpy_scalar = hasattr(value, "item") and getattr(value, "shape", None) == ()
    if (isinstance(value, numbers.Real) and not isinstance(value, bool)) or numpy_scalar:
        return float(value)
    raise RecordError(f"metric {name}={value!r} is not a number: allowed a number, a numpy scalar or a one-element "
                      f"tensor")


def _device(model: torch.nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")  # a model without weights runs where its inputs are


class Recorder:
    """Records a user's loop and model into the run directory `path` (see the module docstring)."""

    def __init__(self, path: str | Path, model: torch.nn.Module, *, model_factory: Any = None,
                 factory_kwargs: dict | None = None, task: str | TaskConfig | None = None,
                 checkpoints: str | int | list[int] = "log", dense: tuple[int, int] | list[int] = (),
                 dense_every: int = 1, eval_every: int = 10, steps: int | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, scaler: Any = None,
                 sites: dict | Sites | str | None = None, log: str = "none", eval_batch_size: int = EVAL_BATCH,
                 resume: bool = False, start_step: int | None = None, batch_size: int | None = None,
                 loop: dict | None = None, source: str = "loop", record_start: bool = True):
        self.model = parallel.unwrap(model)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.rank, self.distributed = parallel.rank(), parallel.world_size() > 1
        self.writer, self.sharded = self.rank == 0, parallel.is_sharded(self.model)
        self.sites = (Sites.auto(self.model) if sites == "auto" else sites if isinstance(sites, Sites)
                      else Sites.from_dict(sites) if sites else Sites.of(self.model)).resolve(self.model)
        self.sites.check(self.model)
        factory = factory_spec(model_factory)
        kwargs = dict(factory_kwargs or {})
        try:
            json.dumps(kwargs)
        except TypeError as e:
            raise RecordError(f"factory_kwargs={kwargs!r} are not JSON ({e}): allowed numbers, strings, lists, "
                              f"mappings") from None
        if factory:  # the factory rebuilds this model: same names and shapes
            check_factory(factory, kwargs, self.model.state_dict(), "the model given to the Recorder")
        self.device = _device(self.model)
        train = TrainConfig(steps=steps or UNKNOWN_STEPS, eval_every=eval_every, log_every=1,
                            eval_batch_size=eval_batch_size, log=log, device=self.device.type,
                            threads=torch.get_num_threads())
        record = RecordConfig(model_factory=factory, factory_kwargs=kwargs, sites=self.sites.to_dict(),
                              checkpoints=list(checkpoints) if isinstance(checkpoints, (list, tuple)) else checkpoints,
                              dense=tuple(dense), dense_every=dense_every, source=source, workdir=str(Path.cwd()),
                              loop=loop_summary(optimizer, batch_size, loop))
        self.cfg = RunConfig(data=_data_config(task), model=None, train=train, record=record)
        self.task = self.cfg.task
        self.has_data = self.task.has_data
        self.evaluates = self.has_data and (self.writer or self.sharded)  # a sharded forward needs every rank
        telemetry.require(log)
        self.eval_data = self.task.eval_batch(self.cfg) if self.evaluates else None
        shapes = self._check_output() if self.evaluates else {}
        self.cfg.record.model = describe_model(self.model, self.sites, shapes)
        self.callbacks: dict[str, list] = {}
        self.last_metrics: dict[str, float] = {}
        self.kept_grad_norms: dict[str, float] | None = None
        self.step_done, self.saved, self.closed = -1, -1, False
        self.wall_time, self._tick = 0.0, time.perf_counter()
        self.start_step, self.resumed, self.run, self.lock, self.telemetry = 0, False, None, None, None
        path = Path(path)
        exists = (resume or start_step is not None) and (path / "config.yaml").is_file()
        if self.sharded and resume and start_step is None and exists:
            raise RecordError("resume=True with a sharded (FSDP2) model: its resume state is the framework's; allowed "
                              "start_step=<the step the framework resumed from>")
        if self.distributed:
            torch.distributed.barrier()  # every rank has looked before rank 0 writes
        if self.writer:
            if not exists:
                Run.check_new(path)
            self.lock = RunLock(path).acquire()
        try:
            if self.writer:
                self.run = self._open(path, exists, start_step)
            if exists and start_step is None:
                self._load(self.run or Run(path))  # rank 0's opened run; the other ranks read it
            elif start_step is not None and exists:
                self.start_step = self.step_done = self.saved = int(start_step)
            self.resumed = self.start_step > 0
            if self.writer:
                self.run.save_provenance(provenance.collect(self.device))
                self.view = _TrainerView(self)
                self.telemetry = telemetry.attach(self.view)
            if not self.resumed and record_start:
                self.step(0)  # the model as handed over, before the loop's first update
        except BaseException:
            self._release()
            raise

    # ----- opening and resuming -----
    def _open(self, path: Path, exists: bool, start_step: int | None) -> Run:
        if not exists:
            return Run.create(path, self.cfg)
        run = Run(path)
        diff = run.config.differences(self.cfg, ignore=MAY_CHANGE)
        if diff:
            raise ConfigError(f"resume=True with settings that differ from the recorded run's (saved, asked): "
                              f"{diff}; allowed the run's own, except {', '.join(MAY_CHANGE)}")
        run.remove_temporary_files()
        if start_step is not None:  # the framework restored its own state at start_step
            if start_step == 0:
                run.restart()
            else:
                run.truncate_metrics(start_step)
                run.drop_checkpoints_after(start_step)
            run.save_config(self.cfg)
            return run
        if not run.has_resume_state and any(s > 0 for s in run.steps):
            raise CheckpointError(f"{path} has no resume state (the loop gave the Recorder no optimizer): "
                                  f"it cannot be resumed; allowed a new directory")
        if not run.has_resume_state:
            run.restart()
        return run

    def _load(self, run: Run) -> None:
        """The run's resume state into the model, optimizer, scheduler, scaler and RNG (every rank
        reads it; rank 0 cuts the run's metrics and checkpoints back to its step)."""
        if not run.has_resume_state:
            return
        if self.optimizer is None:
            raise RecordError("resume=True needs the loop's optimizer: allowed Recorder(..., optimizer=opt, resume=True)")
        tensors, meta = run.load_resume_state()
        model_state = {k[len(MODEL):]: v for k, v in tensors.items() if k.startswith(MODEL)}
        check_fits(self.model, model_state, f"{run.path / 'resume.safetensors'}")
        self.model.load_state_dict(model_state)
        loop_state.restore(tensors, json.loads(meta["states"]), self._parts, self.device, self.rank)
        self.start_step, self.wall_time = int(meta["step"]), float(meta["wall_time"])
        self.step_done = self.saved = self.start_step
        if self.writer:
            run.truncate_metrics(self.start_step)
            run.drop_checkpoints_after(self.start_step)

    @property
    def _parts(self) -> dict[str, Any]:
        """The loop's state-holding parts by their names in the resume state (None: not given)."""
        return {OPTIMIZER: self.optimizer, SCHEDULER: self.scheduler, SCALER: self.scaler}

    def _check_output(self) -> dict[str, tuple[int, ...]]:
        """The model's output on two evaluation examples has the shape the task reads, and every
        site runs in its forward (`Sites.capture`); {site: output shape}."""
        tokens = self.eval_data[:2].tokens.to(self.device)
        batch, pos = tokens.shape
        vocab = self.cfg.data.vocab_size
        try:
            with self._quiet():
                out, acts = self.sites.capture(self.model, tokens)
        except SiteError:
            raise
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
        return {name: tuple(value.shape) for name, value in acts.items()}

    # ----- the loop's calls -----
    def add_callback(self, event: str, fn) -> None:
        """Events, as the Trainer's: `on_eval`, `on_checkpoint`, `on_close`."""
        self.callbacks.setdefault(event, []).append(fn)

    def _fire(self, event: str) -> None:
        for fn in self.callbacks.get(event, []):
            fn(self.view)

    def step(self, step: int, evaluate: bool | None = None, **metrics: Any) -> None:
        """Record the loop's step `step` (after its update): a metrics row of `metrics` (`loss`,
        `eval_loss` for a run without a task, any other scalar as its own column), the task's
        evaluation every `eval_every` steps (or when `evaluate`), a checkpoint when scheduled."""
        if self.closed:
            raise RecordError(f"step {step}: the recorder of {self.cfg.data.task!r} run is closed")
        if isinstance(step, numbers.Integral) and not isinstance(step, bool):
            step = int(step)
        if isinstance(step, int) and self.step_done < 0 and step != 0:
            raise RecordError(f"step={step!r} comes before step 0: allowed 0 first (the model before training)")
        if not isinstance(step, int) or step <= self.step_done:
            raise RecordError(f"step={step!r} goes backwards or repeats: allowed an integer > {self.step_done} "
                              f"(the last recorded step; step 0 is the model before training, recorded by the "
                              f"Recorder itself)")
        row: dict[str, Any] = {"step": step, **self._metrics_row(metrics)}
        self.wall_time += time.perf_counter() - self._tick
        if evaluate or (evaluate is None and (step % self.cfg.train.eval_every == 0 or step == 0)):
            self.last_metrics = row
            with self._quiet():  # the evaluation and the telemetry's measures: nothing reaches the loop
                row.update(self._evaluate())
                if self.writer:
                    self._fire("on_eval")
        row["wall_time"] = self.wall_time
        if self.writer:
            self.run.append_metrics([row])
        self.step_done = step
        self.kept_grad_norms = None
        if self.cfg.record.is_checkpoint_step(step) or step == self.cfg.train.steps:
            self.checkpoint()
        self._tick = time.perf_counter()

    def _metrics_row(self, metrics: dict[str, Any]) -> dict[str, float]:
        computed = {c for c in self.task.metric_columns if c.startswith("eval_")} if self.has_data else set()
        for name in metrics:
            if name in RESERVED or name in computed:
                raise RecordError(f"metric {name!r} is a column the recorder writes itself"
                                  f"{' (the task evaluates it)' if name in computed else ''}: allowed another name "
                                  f"(for example 'loop_{name}')")
        return {name: _scalar(name, value) for name, value in metrics.items()}

    def _evaluate(self) -> dict[str, float]:
        if not self.evaluates:
            return {}
        ev = self.task.evaluate(self.model, self.eval_data, self.sites)
        return {f"eval_{k}": v for k, v in ev.items()}

    @contextlib.contextmanager
    def _quiet(self):
        """Eval mode, no gradients, and torch's CPU and CUDA RNG states put back
        (`torch.random.fork_rng`): the loop sees nothing."""
        training = self.model.training
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self.model.eval()
            try:
                yield
            finally:
                self.model.train(training)

    def keep_gradient_norms(self) -> None:
        """Take the gradient norms of each component now (after the backward, before the loop clears
        the gradients) for the next recorded step's telemetry: for loops and frameworks that zero
        the gradients before the step is recorded (the Trainer callback calls it)."""
        from mechlrmc import measures

        self.kept_grad_norms = measures.component_norms(self.model, grads=True)

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
        if self.writer:
            self.run.save_batch(inputs, targets, loss)

    def checkpoint(self) -> None:
        """Write the weights of the last recorded step (and, given the optimizer, a resume state).
        Every rank calls it (at the same steps): a sharded model's weights are gathered to rank 0."""
        step = self.step_done
        if step < 0 or step == self.saved:
            return
        state = parallel.full_state_dict(self.model)
        rngs = parallel.gather_rng() if self.optimizer is not None and not self.sharded else []
        if self.writer:
            self.run.save_checkpoint(step, state)
            if rngs:
                self._save_resume(step, state, rngs)
            self._fire("on_checkpoint")
        self.saved = step

    def _save_resume(self, step: int, state: dict[str, torch.Tensor], rngs: list[torch.Tensor]) -> None:
        from mechlrmc import resume as resume_file

        tensors, layouts = loop_state.resume_tensors(state, self._parts, rngs, cuda=self.device.type == "cuda")
        self.run.save_resume_state(step, tensors, {**resume_file.meta(self.wall_time), "states": json.dumps(layouts)})

    def close(self, failed: bool = False) -> Run | None:
        """The last checkpoint (unless the loop failed), the run's length in its config, the lock
        released (rank 0's run; None on the other ranks)."""
        if self.closed:
            return self.run
        self.closed = True
        try:
            if not failed and self.step_done >= 0:
                self.checkpoint()
                if self.writer and self.cfg.train.steps == UNKNOWN_STEPS:
                    self.cfg = self.cfg.override({"train.steps": max(self.step_done, 1)})
                    self.run.save_config(self.cfg)
        finally:
            self._release()
        return self.run

    def _release(self) -> None:
        try:
            if self.writer and self.run is not None:
                self._fire("on_close")
        finally:
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


class _TrainerView:
    """What the live telemetry (`mechlrmc.telemetry`) reads of a trainer, for a recorder: its config,
    model, task, run, evaluation batch, sites, last metrics row, current step and the gradient
    norms the loop kept (`Recorder.keep_gradient_norms`)."""

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

    @property
    def grad_norms(self) -> dict[str, float] | None:
        return self.recorder.kept_grad_norms

    def add_callback(self, event: str, fn) -> None:
        self.recorder.add_callback(event, fn)
