"""Run families on Ray Tune: each trial of a sweep spec (`mechlrmc.trials`) trained as an ordinary run.

`sweep(spec, DIR)` validates the spec in full, saves it as `DIR/sweep.yaml` and `launch`es its
trials: each is trained by the ordinary `Trainer` into `DIR/<name>/`, so `info`, `report` and
every analysis work on it (the spec format, trial names and configs: `mechlrmc.trials`).

Re-running the same command skips finished trials and resumes unfinished ones through the run
directory's own exact resume, whatever was killed. A trial that fails is recorded with its error
(one line in the summary, its traceback in `DIR/errors/<name>.txt`) and the others go on.
`DIR/summary.csv` is one row per trial. A local Ray instance by default, `address` (or
$RAY_ADDRESS) for a cluster. A core module: it uses config, train, runs and trials, never the
analysis layer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from mechlrmc.config import RunConfig
from mechlrmc.errors import UsageError
from mechlrmc.runs import Run, atomic_write
from mechlrmc.trials import SweepError, SweepSpec, Trial, summarize, trial_status

LOCK_WAIT = 60.0  # seconds a trial waits for its run's lock before failing


class ClusterError(UsageError, ConnectionError):
    """The Ray cluster named by --address or $RAY_ADDRESS cannot be reached."""

    exit_code = 1


# ----- running trials --------------------------------------------------------------------------

def default_trainer(config: RunConfig, out: Path, resume: bool):
    """The ordinary `Trainer` (a `trainer_factory` for `launch`)."""
    from mechlrmc.train import Trainer

    return Trainer(config, out, resume=resume, progress=False)


def _trainable(space: dict) -> None:
    """Ray Tune function trainable: train (or resume) one trial, reporting its step and L_mask."""
    from ray import tune

    from mechlrmc.runs import RunLockedError

    params = space["trial"]
    config = RunConfig.from_dict(params["config"])
    out = Path(params["out"])
    deadline = time.monotonic() + LOCK_WAIT
    while True:  # a writer of a killed sweep may take a moment to die and free the run's lock
        try:
            trainer = params["factory"](config, out, (out / "config.yaml").is_file())
            break
        except RunLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    every = config.train.log_every

    def report(t) -> None:
        if t.step % every == 0 or t.step == config.train.steps:
            tune.report({"step": t.step, "eval_loss_mask": t.last_metrics.get("eval_loss_mask", math.nan)})

    trainer.add_callback("on_step_end", report)
    trainer.train()


class _Status:
    """The live status line: trials done / running / failed and each running trial's step and L_mask."""

    def __init__(self, total: int, done: int, progress: bool):
        from ray import tune
        from tqdm.auto import tqdm

        class Callback(tune.Callback):
            """Feeds the status line. Tune pickles its callbacks with the experiment; the status
            (a tqdm bar, a notebook widget in Jupyter) stays with the driver and is left out."""

            def __init__(self, status: _Status | None):
                self.status = status

            def __getstate__(self) -> dict:
                return {"status": None}

            def on_trial_start(self, iteration, trials, trial, **info):
                if self.status:
                    self.status.start(trial.config["trial"]["name"])

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if self.status:
                    self.status.update(trial.config["trial"]["name"], result)

            def on_trial_complete(self, iteration, trials, trial, **info):
                if self.status:
                    self.status.finish(trial.config["trial"]["name"], failed=False)

            def on_trial_error(self, iteration, trials, trial, **info):
                if self.status:
                    self.status.finish(trial.config["trial"]["name"], failed=True)

        self.callback = Callback(self)
        self.running: dict[str, tuple[int, float]] = {}
        self.failed = 0
        self.shown = 0.0
        self.bar = tqdm(total=total, initial=done, unit="trial", desc="sweep", disable=not progress,
                        dynamic_ncols=True, bar_format="{desc} {n_fmt}/{total_fmt} done{postfix} [{elapsed}]")
        self.refresh()

    def start(self, name: str) -> None:
        self.running[name] = (0, math.nan)
        self.refresh(force=True)

    def update(self, name: str, result: dict) -> None:
        self.running[name] = (result.get("step", 0), result.get("eval_loss_mask", math.nan))
        self.refresh()

    def finish(self, name: str, failed: bool) -> None:
        self.running.pop(name, None)
        self.failed += failed
        self.bar.update(0 if failed else 1)
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Redraw at most every 2 s (and at once when a trial starts or ends)."""
        if not force and time.monotonic() - self.shown < 2.0:
            return
        self.shown = time.monotonic()
        running = " | ".join(f"{name}: step {step}" + (f" L_mask {loss:.4f}" if loss == loss else "")
                             for name, (step, loss) in self.running.items())
        self.bar.set_postfix_str(f"running {len(self.running)}, failed {self.failed}" +
                                 (f" | {running}" if running else ""))

    def close(self) -> None:
        self.bar.close()


def _init_ray(address: str | None, progress: bool) -> bool:
    """Connect to `address` (or $RAY_ADDRESS), else start a quiet local instance sized to this
    machine. Returns whether this call started Ray (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # a failed trial is one line, its traceback a file
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default 15 starves trials on a busy machine
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as e:
            raise ClusterError(f"could not connect to the Ray cluster at {address}: {_one_line(e)}; allowed the "
                               "address of a running head node (`ray start --head` prints it)") from None
    else:
        ray.init(num_cpus=os.cpu_count(), **quiet)
    return True


def launch(
    trials: list[Trial],
    out: str | Path,
    cpus_per_trial: int = 1,
    gpus_per_trial: float = 0.0,
    address: str | None = None,
    trainer_factory: Callable = default_trainer,
    progress: bool = True,
) -> pd.DataFrame:
    """Train every unfinished trial into `out/<name>` on Ray Tune; returns the summary (also
    written to `out/summary.csv`). `trainer_factory(config, path, resume) -> Trainer` builds each
    trial's trainer unless the trial has its own `factory` (a top-level function or a
    `functools.partial` of one, so Ray can ship it); the freeze sweep uses that for its component-wise `Trainer`s."""
    out = Path(out).resolve()
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise SweepError(f"trial names are not unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
    pending = [t for t in trials if trial_status(out / t.name, t.config) != "finished"]
    errors: dict[str, str] = {}
    if pending:
        from ray import tune

        started = _init_ray(address, progress)
        status = _Status(len(trials), len(trials) - len(pending), progress)
        try:
            space = [{"name": t.name, "config": t.config.to_dict(), "out": str(out / t.name),
                      "factory": t.factory or trainer_factory} for t in pending]
            experiment = time.strftime("launch-%Y%m%d-%H%M%S")
            tuner = tune.Tuner(
                tune.with_resources(_trainable, {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
                param_space={"trial": tune.grid_search(space)},
                tune_config=tune.TuneConfig(reuse_actors=True),  # one worker process (and import) per slot
                run_config=tune.RunConfig(
                    storage_path=str(out / ".tune"), name=experiment, verbose=0,
                    callbacks=[status.callback], failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
            results = tuner.fit()
        finally:
            status.close()
        for result in results:
            name = result.config["trial"]["name"]
            log = out / "errors" / f"{name}.txt"
            if result.error is not None:
                errors[name] = f"{_one_line(result.error)} (traceback: {log.relative_to(out)})"
                atomic_write(log, re.sub(r"\x1b\[[0-9;]*m", "", str(result.error)).encode())
            else:
                log.unlink(missing_ok=True)
        if started:
            import ray

            ray.shutdown()
        # Tune's own records duplicate the run directories (which hold everything): drop them
        shutil.rmtree(out / ".tune" / experiment, ignore_errors=True)
        with contextlib.suppress(OSError):
            (out / ".tune").rmdir()
    summary = summarize(out, trials, errors)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "summary.csv", summary.to_csv(index=False).encode())
    return summary


def launch_runs(trials: list[Trial], out: str | Path, **kwargs) -> dict[str, Run]:
    """`launch` for drivers that need every run: the finished runs by trial name, or a
    RuntimeError naming each trial that did not finish and its error."""
    summary = launch(trials, out, **kwargs)
    failed = summary[summary.status != "finished"]
    if len(failed):
        raise RuntimeError(f"runs did not finish: {dict(zip(failed.run, failed.error))}")
    return {trial.name: Run(Path(out) / trial.name) for trial in trials}


def _one_line(error: BaseException) -> str:
    """The innermost message of a (Ray-wrapped) exception, on one line."""
    cause = getattr(error, "cause", None) or error.__cause__ or error
    text = f"{type(cause).__name__}: {cause}"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def sweep(spec: str | Path | SweepSpec, out: str | Path, address: str | None = None,
          progress: bool = True) -> pd.DataFrame:
    """Validate `spec` in full, save it as `out/sweep.yaml` and `launch` its trials."""
    spec = spec if isinstance(spec, SweepSpec) else SweepSpec.from_yaml(spec)
    trials = spec.trials()
    out = Path(out)
    for trial in trials:  # a directory of another configuration is an error before anything starts
        trial_status(out / trial.name, trial.config)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "sweep.yaml", yaml.safe_dump(spec.raw, sort_keys=False).encode())
    return launch(trials, out, spec.cpus_per_trial, spec.gpus_per_trial, address, progress=progress)
