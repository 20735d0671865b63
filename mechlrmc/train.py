"""Online training: a fresh batch of the run's task every step, Adam at a constant lr, the task's loss.

The trainer knows the model only through `forward(tokens)` and the task only through its protocol
(`mechlrmc.tasks.base`: sample, eval batch, loss, metrics, optimal attention map); it never
branches on a task's name. Logging, evaluation
and checkpoints follow the `TrainConfig` schedule; anything else hangs on callbacks
(`trainer.add_callback("on_step_end", fn)`), the live telemetry of `train.log` too
(`mechlrmc.telemetry`). The trainer is handed its model (default: a fresh
`HookedEncoder` of the config's seed) and the names of its trainable parameters (default: all);
the others are frozen (`requires_grad=False`, not in the optimizer), so component-wise training
(`analyses.weights.freeze`) is an ordinary `Trainer`.

Exact resume: at every checkpoint the weights, Adam state, data-generator state and wall time go
to `resume.safetensors` (its layout: `mechlrmc.resume`); a resumed run replays the same batches
and reproduces the same metrics as an uninterrupted one on the same machine type and software
(`provenance.json` records them; a resume elsewhere warns). A run killed before its first resume state restarts from step 0.

One writer per run: the trainer holds the run's `RunLock` from before its first write until
training ends or fails.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import torch

from mechlrmc import provenance, telemetry
from mechlrmc import resume as resume_file
from mechlrmc.config import ConfigError, RunConfig
from mechlrmc.errors import OptionError
from mechlrmc.intervention import AttentionIntervention
from mechlrmc.model import HookedEncoder
from mechlrmc.progress import log_interval, progress_bar
from mechlrmc.runs import CheckpointError, Run, RunLock

DATA_SEED_OFFSET = 1_000_003  # data and init draw from different generators of the same seed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' is invalid here: no CUDA device is available; allowed 'auto' or 'cpu'")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module | Iterable[torch.nn.Parameter], cfg: RunConfig) -> torch.optim.Adam:
    """Adam at the constant `train.lr` over a model's (or the given) parameters, with the kernel
    `train.adam` picks ("foreach" updates every parameter bitwise as the per-tensor loop does,
    and faster)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    fused = cfg.train.adam == "fused"
    return torch.optim.Adam(params, lr=cfg.train.lr, foreach=not fused, fused=fused)


class Trainer:
    """Trains a `HookedEncoder` (or only its `trainable` parameters) on the config's task into a run
    directory."""

    def __init__(self, cfg: RunConfig, out: str | Path, model: HookedEncoder | None = None,
                 trainable: Iterable[str] | None = None, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.task = cfg.task
        self.callbacks: dict[str, list[Callable]] = defaultdict(list)
        self.device = resolve_device(cfg.train.device)
        self.caller_threads = torch.get_num_threads()  # restored by `close()`
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit fails the write instead of killing
        telemetry.require(cfg.train.log)  # before anything is written
        if progress:
            log_interval()  # a bad MECHLRMC_PROGRESS_EVERY, too
        model = HookedEncoder(cfg, seed=cfg.train.seed) if model is None else model
        params = _trainable_parameters(model, trainable)  # before anything is written
        if cfg.train.branch_from and not resume:
            self._branch_parent(cfg)
        if not (resume and Path(out, "config.yaml").is_file()):
            Run.check_new(out)  # before the lock creates the directory
        self.lock = RunLock(out).acquire()  # one writer per run, taken before anything is written
        if cfg.train.threads:  # before the provenance records them; `close()` gives the caller's back
            torch.set_num_threads(cfg.train.threads)
        try:
            self.run, resume = self._open_run(cfg, Path(out), resume)
        except BaseException:
            self.close()
            raise
        self.resumed = resume  # from a resume state (which comes after step 0's evaluation and checkpoint)
        self.model = model.to(self.device)
        self.model.cfg.device = str(self.device)
        self.optimizer = make_optimizer(params, cfg)
        self.generator = torch.Generator().manual_seed(cfg.train.data_stream_seed + DATA_SEED_OFFSET)
        self.eval_data = self.task.eval_batch(cfg)
        self.step = 0
        self.wall_time = 0.0
        self.progress = progress
        self.last_metrics: dict[str, float] = {}
        self.below = 0  # evaluations in a row with the phase metric at or below train.stop_below
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.intervention = None
        if cfg.train.attn_intervention_scale != 1.0:
            self.intervention = AttentionIntervention(cfg.train.attn_intervention_scale,
                                                      renormalise=cfg.model.attention == "softmax")
        try:
            if resume:
                self._load_resume_state()
            self.telemetry = telemetry.attach(self)  # None where train.log is "none"
        except BaseException:
            self.close()
            raise

    def add_callback(self, event: str, fn: Callable[[Trainer], None]) -> None:
        """Events: `on_step_end`, `on_eval` (also at step 0 of a new run; the row is `last_metrics`),
        `on_checkpoint`, `on_train_end`, and `on_close` (training ended or failed)."""
        self.callbacks[event].append(fn)

    def _fire(self, event: str) -> None:
        for fn in self.callbacks[event]:
            fn(self)

    def close(self) -> None:
        """Release the run's writer lock and give the caller back its torch thread count, which
        `train.threads` changed for the run (done by `train()` when training ends or fails)."""
        try:
            self._fire("on_close")
        finally:
            torch.set_num_threads(self.caller_threads)
            self.lock.release()

    # ----- resume -----
    def _open_run(self, cfg: RunConfig, out: Path, resume: bool) -> tuple[Run, bool]:
        """The run directory, created or reopened; `resume` is False where there is nothing to resume."""
        if resume and (out / "config.yaml").is_file():
            run = Run(out)
            self.run = run
            self._check_resumable(cfg)
            run.remove_temporary_files()
            if run.has_resume_state:
                self._warn_on_other_provenance(run)
                return run, True
            # killed before its step-0 resume state: nothing was trained yet, start again
            later = [s for s in self._manifest_steps(run) if s > 0]
            if later:
                raise CheckpointError(f"{run.path / 'resume.safetensors'} is missing but the run has checkpoints "
                                      f"up to step {later[-1]}: it cannot be resumed exactly")
            run.restart()
        else:
            run = Run.create(out, cfg)
        run.save_provenance(provenance.collect(self.device))
        return run, False

    @staticmethod
    def _manifest_steps(run: Run) -> list[int]:
        try:
            return run.steps
        except CheckpointError:  # manifest not yet written
            return []

    def _warn_on_other_provenance(self, run: Run) -> None:
        saved, current = run.provenance, provenance.collect(self.device)
        if saved is None:
            changed = "the run has no provenance.json to compare with"
        else:
            diff = provenance.differences(saved, current)
            if not diff:
                return
            changed = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        print(f"mechlrmc: warning: resuming {run.path} on another machine type or software ({changed}): "
              f"the result will not be bitwise equal to an uninterrupted run", file=sys.stderr)

    def _check_resumable(self, cfg: RunConfig) -> None:
        diff = self.run.config.differences(cfg, ignore=resume_file.MAY_CHANGE)
        if diff:
            raise ConfigError(f"--resume with a config that differs from the run's (saved, asked): {diff}; "
                              f"allowed: the run's own config, except {', '.join(resume_file.MAY_CHANGE)}")
        if self.run.config.differences(cfg):
            self.run.save_config(cfg)

    def _load_resume_state(self) -> None:
        tensors, meta = self.run.load_resume_state()
        self.step = self._load_state(tensors, meta)
        self.run.truncate_metrics(self.step)
        self.below = self._evaluations_below()

    def _evaluations_below(self) -> int:
        """The evaluations in a row, up to the current step, at or below `train.stop_below`."""
        if not self.cfg.train.stop_below:
            return 0
        values = self.run.evals[f"eval_{self.task.phase_metric}"].dropna().to_numpy()[::-1]
        return next((i for i, v in enumerate(values) if v > self.cfg.train.stop_below), len(values))

    def _save_resume_state(self) -> None:
        adam = {name: st for name, p in self.model.named_parameters() if (st := self.optimizer.state.get(p))}
        if self.step > 0 and not adam:
            raise CheckpointError("optimizer state is empty after training steps")
        tensors = resume_file.pack(self.model.state_dict(), adam, self.generator.get_state())
        self.run.save_resume_state(self.step, tensors, resume_file.meta(self.wall_time))
        if self.step in self.cfg.train.keep_states:
            self.run.keep_state(self.step)

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], generator: bool = True) -> int:
        """Weights, Adam state (and the data generator's state) of a resume or kept state; its step."""
        model_state, adam, generator_state = resume_file.unpack(tensors)
        self.model.load_state_dict(model_state)
        state = {}
        for name, p in self.model.named_parameters():
            if name not in adam:  # no Adam state: the step-0 state, or a frozen parameter
                continue
            state[p] = {
                "step": adam[name]["step"],
                "exp_avg": adam[name]["exp_avg"].to(self.device),
                "exp_avg_sq": adam[name]["exp_avg_sq"].to(self.device),
            }
        self.optimizer.state.clear()
        self.optimizer.state.update(state)
        if self.cfg.train.adam == "fused":  # the fused kernel keeps its step counts on the device
            for st in self.optimizer.state.values():
                st["step"] = st["step"].to(self.device)
        step, self.wall_time = resume_file.read_meta(meta)
        if step > 0 and not state:
            raise CheckpointError(f"the training state of step {step} has no optimizer state: it cannot be "
                                  f"continued exactly")
        if generator:
            self.generator.set_state(generator_state)
        return step

    @staticmethod
    def _branch_parent(cfg: RunConfig) -> Run:
        """The run a branch starts from, checked before anything is written: it exists, keeps a
        training state at `train.branch_step`, and has the branch's data and model config."""
        tc = cfg.train
        parent = Run(tc.branch_from)
        if tc.branch_step not in parent.kept_states:
            parent.load_state(tc.branch_step)  # the one-line error naming the kept steps
        diff = {k: v for k, v in parent.config.differences(cfg).items() if not k.startswith("train.")}
        if diff:
            raise ConfigError(f"train.branch_from={tc.branch_from!r}: the branch's data or model config differs "
                              f"from its parent's (parent, branch): {diff}; allowed: the parent's own")
        return parent

    def _start_branch(self) -> None:
        """A branch's start: its parent's weights and Adam state at `train.branch_step`, the parent's
        metrics up to that step, and a checkpoint there (`mechlrmc train --from RUN --from-step S`)."""
        tc = self.cfg.train
        parent = self._branch_parent(self.cfg)
        tensors, meta = parent.load_state(tc.branch_step)
        same_stream = parent.config.train.data_stream_seed == tc.data_stream_seed
        self.step = self._load_state(tensors, meta, generator=same_stream)
        rows = parent.metrics
        self.run.append_metrics(rows[rows.step <= self.step].to_dict("records"))
        self.below = self._evaluations_below()
        self._checkpoint()

    # ----- the loop -----
    def _autocast(self):
        if self.cfg.train.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _checkpoint(self) -> None:
        self.run.save_checkpoint(self.step, self.model.state_dict())
        self._save_resume_state()
        self._fire("on_checkpoint")

    def _eval_row(self) -> dict[str, float]:
        self.model.eval()
        with self._autocast():
            ev = self.task.evaluate(self.model, self.eval_data)
        self.model.train()
        return {f"eval_{k}": v for k, v in ev.items()}

    def _should_stop(self, row: dict[str, float]) -> bool:
        """Whether the run has stayed at or below `train.stop_below` on its phase metric for
        `train.stop_patience` evaluations (never where `stop_below` is 0)."""
        tc = self.cfg.train
        value = row.get(f"eval_{self.task.phase_metric}")
        if not tc.stop_below or value is None:
            return False
        self.below = self.below + 1 if value <= tc.stop_below else 0
        return self.below >= tc.stop_patience

    def train_step(self, batch) -> dict[str, float]:
        hooks = []
        if self.intervention is not None and self.step >= self.cfg.train.attn_intervention_start:
            self.intervention.set_map(self.task.optimal_attention_map(batch))
            hooks += self.intervention.fwd_hooks()
        with self._autocast(), self.model.hooks(fwd_hooks=hooks):
            pred = self.forward(batch.tokens)
            losses = self.task.loss(pred, batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        return {k: v.item() for k, v in losses.items()}

    def train(self) -> Run:
        """Train to `cfg.train.steps`, then release the writer lock (also when training fails)."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> Run:
        tc = self.cfg.train
        if self.run.stopped is not None:  # stopped at its drop: finished
            return self.run
        if self.step == 0 and not self.resumed and tc.branch_from:
            self._start_branch()
        elif self.step == 0 and not self.resumed:
            self.last_metrics = {"step": 0, **self._eval_row()}
            self._fire("on_eval")
            self.run.append_metrics([{**self.last_metrics, "wall_time": 0.0}])
            self._checkpoint()
        bar = progress_bar(total=tc.steps, initial=self.step, disable=not self.progress, unit="step",
                           desc=self.run.path.name, dynamic_ncols=True)
        self.model.train()
        while self.step < tc.steps:
            start = time.perf_counter()
            batch = self.task.sample(self.cfg.data, tc.batch_size, self.generator).to(self.device)
            losses = self.train_step(batch)
            self.step += 1
            self.wall_time += time.perf_counter() - start
            row = None
            if self.step % tc.log_every == 0 or self.step % tc.eval_every == 0 or self.step == tc.steps:
                row = {"step": self.step, **losses}
            if self.step % tc.eval_every == 0 or self.step == tc.steps:
                row.update(self._eval_row())
                self.last_metrics = row
                self._fire("on_eval")
            if row is not None:
                row["wall_time"] = self.wall_time
                self.run.append_metrics([row])
                bar.set_postfix({k: f"{losses[m]:.4f}" for k, m in self.task.progress.items()}, refresh=False)
            stop = row is not None and self._should_stop(row)
            if tc.is_checkpoint_step(self.step) or stop:
                self._checkpoint()
            self._fire("on_step_end")
            bar.update(1)
            if stop:
                self.run.save_stopped(self.step, f"eval_{self.task.phase_metric} <= train.stop_below="
                                                 f"{tc.stop_below} at {tc.stop_patience} evaluations in a row")
                break
        bar.close()
        self._fire("on_train_end")
        return self.run


def _trainable_parameters(model: torch.nn.Module, trainable: Iterable[str] | None) -> list[torch.nn.Parameter]:
    """The parameters named in `trainable` (all where None), the others frozen (`requires_grad=False`)."""
    names = dict(model.named_parameters())
    chosen = set(names) if trainable is None else set(trainable)
    unknown = chosen - set(names)
    if unknown or not chosen:
        raise OptionError(f"trainable parameters {sorted(unknown) or '(none)'} are not in the model: "
                          f"allowed {sorted(names)}")
    for name, p in names.items():
        p.requires_grad_(name in chosen)
    return [p for name, p in names.items() if name in chosen]


def train(cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Run:
    """Train `cfg` into the run directory `out` (or continue it with `resume=True`)."""
    return Trainer(cfg, out, resume=resume, progress=progress).train()
