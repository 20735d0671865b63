"""Run families on Ray Tune: each trial of a sweep spec (`mechlrmc.trials`) trained as an ordinary run.

`sweep(spec, DIR)` validates the spec in full, saves it as `DIR/sweep.yaml` and `launch`es its
trials: each is trained by the ordinary `Trainer` into `DIR/<name>/`, so `info`, `report` and
every analysis work on it (the spec format, trial names and configs: `mechlrmc.trials`).

Re-running the same command skips finished trials and resumes unfinished ones through the run
directory's own exact resume, whatever was killed. A trial that fails is recorded with its error
(one line in the summary, its traceback in `DIR/errors/<name>.txt`) and the others go on.
`DIR/summary.csv` is one row per trial. A private local Ray instance by default, `address` (or
$RAY_ADDRESS) for a cluster (`mechlrmc.cluster`: the connection timeout, token auth, a trial too big
for every node refused before launch); Ray's own output goes to `DIR/ray.log`, and each trial's
`provenance.json` names the node and host that trained it. A core module: it uses config, train,
runs and trials, never the analysis layer.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import time
from pathlib import Path
from typing import Callable, TextIO

import pandas as pd
import yaml

from mechlrmc import cluster, provenance
from mechlrmc.cluster import CONNECT_TIMEOUT, one_line
from mechlrmc.config import RunConfig
from mechlrmc.errors import UsageError
from mechlrmc.runs import Run, atomic_write
from mechlrmc.tasks import get_task
from mechlrmc.trials import SweepError, SweepSpec, Trial, summarize, trial_status

LOCK_WAIT = 60.0  # seconds a trial waits for its run's lock before failing

# ----- running trials --------------------------------------------------------------------------

def default_trainer(config: RunConfig, out: Path, resume: bool):
    """The ordinary `Trainer` (a `trainer_factory` for `launch`)."""
    from mechlrmc.train import Trainer

    return Trainer(config, out, resume=resume, progress=False)


def _trainable(space: dict) -> None:
    """Ray Tune function trainable: train (or resume) one trial, reporting its step and the last
    metric of its task's progress bar at evaluation (LRMC: L_mask; a sequence task: acc)."""
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
    if trainer.resumed:  # provenance.json names the node that started the run; add where it went on
        saved = trainer.run.provenance or {}
        resumed_on = [*saved.get("resumed_on", []), {"step": trainer.step, **provenance.node()}]
        trainer.run.save_provenance({**saved, "resumed_on": resumed_on})
    every = config.train.log_every
    label, metric = list(get_task(config.data.task).progress.items())[-1]

    def report(t) -> None:
        if t.step % every == 0 or t.step == config.train.steps:
            tune.report({"step": t.step, "label": label, "value": t.last_metrics.get(f"eval_{metric}", math.nan)})

    trainer.add_callback("on_step_end", report)
    trainer.train()


class _Status:
    """The live status line: trials done / running / failed and each running trial's step and L_mask."""

    def __init__(self, total: int, done: int, progress: bool, terminal: TextIO):
        from ray import tune

        from mechlrmc.progress import interactive, log_interval, progress_bar

        class Callback(tune.Callback):
            """Feeds the status line. Tune pickles its callbacks with the experiment; the status
            (a tqdm bar, a notebook widget in Jupyter) stays with the driver and is left out."""

            def __init__(self, status: _Status | None):
                self.status = status

            def __getstate__(self) -> dict:
                return {"status": None}

            def on_step_begin(self, iteration, trials, **info):
                if self.status:
                    self.status.watch()

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
                    self.status.watch(now=True)  # did its node die?
                    self.status.finish(trial.config["trial"]["name"], failed=True)

        self.callback = Callback(self)
        self.nodes = cluster.NodeWatch()
        self.running: dict[str, tuple[int, float]] = {}
        self.failed = 0
        self.shown = 0.0
        self.terminal = terminal
        with contextlib.redirect_stderr(terminal):  # stderr itself goes to ray.log while Ray runs
            self.every = log_interval() if progress and not interactive() else 2.0  # seconds between redraws
            self.bar = progress_bar(total=total, initial=done, unit="trial", desc="sweep", disable=not progress,
                                    dynamic_ncols=True,
                                    bar_format="{desc} {n_fmt}/{total_fmt} done{postfix} [{elapsed}]")
        self.refresh()

    def watch(self, now: bool = False) -> None:
        """One line, above the status line, for each node that died (Ray's own account is in ray.log)."""
        for line in self.nodes.died(now):
            self.bar.write(f"mechlrmc: {line}", file=self.terminal)

    def start(self, name: str) -> None:
        self.running[name] = (0, "", math.nan)
        self.refresh(force=True)

    def update(self, name: str, result: dict) -> None:
        self.running[name] = (result.get("step", 0), result.get("label", ""), result.get("value", math.nan))
        self.refresh()

    def finish(self, name: str, failed: bool) -> None:
        self.running.pop(name, None)
        self.failed += failed
        self.bar.update(0 if failed else 1)
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Redraw at most every 2 s, in a log every `log_interval()` s (and at once when a trial starts or ends)."""
        if not force and time.monotonic() - self.shown < self.every:
            return
        self.shown = time.monotonic()
        running = " | ".join(f"{name}: step {step}" + (f" {label} {value:.4f}" if value == value else "")
                             for name, (step, label, value) in self.running.items())
        self.bar.set_postfix_str(f"running {len(self.running)}, failed {self.failed}" +
                                 (f" | {running}" if running else ""))

    def close(self) -> None:
        self.bar.close()


def launch(
    trials: list[Trial],
    out: str | Path,
    cpus_per_trial: int = 1,
    gpus_per_trial: float = 0.0,
    address: str | None = None,
    trainer_factory: Callable = default_trainer,
    progress: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> pd.DataFrame:
    """Train every unfinished trial into `out/<name>` on Ray Tune; returns the summary (also
    written to `out/summary.csv`). `trainer_factory(config, path, resume) -> Trainer` builds each
    trial's trainer unless the trial has its own `factory` (a top-level function or a
    `functools.partial` of one, so Ray can ship it); the freeze sweep uses that for its component-wise `Trainer`s.
    A cluster that cannot be joined within `connect_timeout` seconds, or a trial no node can hold,
    is an error before anything is launched (and a directory made for it is removed)."""
    out = Path(out).resolve()
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise SweepError(f"trial names are not unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
    pending = [t for t in trials if trial_status(out / t.name, t.config) != "finished"]
    errors: dict[str, str] = {}
    if pending:
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            results, experiment = _fit(pending, out, len(trials), cpus_per_trial, gpus_per_trial, address,
                                       trainer_factory, progress, connect_timeout)
        except UsageError:  # refused before launch
            _discard_new(out, created)
            raise
        for result in results:
            name = result.config["trial"]["name"]
            log = out / "errors" / f"{name}.txt"
            if result.error is not None:
                errors[name] = f"{one_line(result.error)} (traceback: {log.relative_to(out)})"
                atomic_write(log, re.sub(r"\x1b\[[0-9;]*m", "", str(result.error)).encode())
            else:
                log.unlink(missing_ok=True)
    summary = summarize(out, trials, errors)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "summary.csv", summary.to_csv(index=False).encode())
    if pending:  # Tune's own records duplicate the run directories (which hold everything): drop them,
        # and once every trial is finished those of killed drivers too
        shutil.rmtree(out / ".tune" / experiment, ignore_errors=True)
        if (summary.status == "finished").all():
            shutil.rmtree(out / ".tune", ignore_errors=True)
        with contextlib.suppress(OSError):
            (out / ".tune").rmdir()
    return summary


def _fit(pending: list[Trial], out: Path, total: int, cpus_per_trial: int, gpus_per_trial: float,
         address: str | None, trainer_factory: Callable, progress: bool, connect_timeout: float) -> tuple:
    """Run the pending trials on Ray Tune with Ray's own output in `out/ray.log`; returns Tune's
    results and the experiment's name (its records are in `out/.tune/<name>`)."""
    from ray import tune

    with cluster.output_to(out / "ray.log") as terminal:
        started = cluster.connect(address, connect_timeout, say=terminal)
        try:
            cluster.check_fits(pending[0].name, cpus_per_trial, gpus_per_trial)
            status = _Status(total, total - len(pending), progress, terminal)
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
            try:
                return tuner.fit(), experiment
            finally:
                status.close()
        finally:
            if started:
                import ray

                ray.shutdown()


def _discard_new(out: Path, created: bool) -> None:
    """Remove what a sweep that failed before launch wrote into a directory it created."""
    if created:
        for name in ("sweep.yaml", "ray.log"):
            (out / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            out.rmdir()


def launch_runs(trials: list[Trial], out: str | Path, **kwargs) -> dict[str, Run]:
    """`launch` for drivers that need every run: the finished runs by trial name, or a
    RuntimeError naming each trial that did not finish and its error."""
    summary = launch(trials, out, **kwargs)
    failed = summary[summary.status != "finished"]
    if len(failed):
        raise RuntimeError(f"runs did not finish: {dict(zip(failed.run, failed.error))}")
    return {trial.name: Run(Path(out) / trial.name) for trial in trials}


def sweep(spec: str | Path | SweepSpec, out: str | Path, address: str | None = None,
          progress: bool = True, connect_timeout: float = CONNECT_TIMEOUT) -> pd.DataFrame:
    """Validate `spec` in full, save it as `out/sweep.yaml` and `launch` its trials."""
    spec = spec if isinstance(spec, SweepSpec) else SweepSpec.from_yaml(spec)
    trials = spec.trials()
    out = Path(out)
    for trial in trials:  # a directory of another configuration is an error before anything starts
        trial_status(out / trial.name, trial.config)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "sweep.yaml", yaml.safe_dump(spec.raw, sort_keys=False).encode())
    try:
        return launch(trials, out, spec.cpus_per_trial, spec.gpus_per_trial, address, progress=progress,
                      connect_timeout=connect_timeout)
    except UsageError:  # refused before launch
        _discard_new(out, created)
        raise
