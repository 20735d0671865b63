"""Run families without Ray: the sweep spec, its trials and their state on disk.

    preset: cpu               # or config: path/to/config.yaml (relative to the working directory)
    steps: 8000               # optional
    set: {train.lr: 0.002}    # optional base overrides, dotted keys as in --set
    grid: {train.batch_size: [64, 128]}   # optional: cartesian product
    seeds: [0, 1, 2, 3, 4]    # a list, or an integer N meaning 0..N-1
    resources: {cpus_per_trial: 1, gpus_per_trial: 0}   # optional

`SweepSpec.from_yaml(path).trials()` expands a spec into named `Trial`s, every config validated
(an error names the trial and the field). Each trial is named from its varied values
(`train.batch_size=64,seed=3`, `trial_name`) and is an ordinary run directory `DIR/<name>/`. Its
`config.yaml` records everything that determines its numbers: `train.threads` is
`cpus_per_trial`, and `train.device` is `cpu` (or `cuda` when `gpus_per_trial > 0`) unless the
spec sets it. `trial_status` reads a trial's state from its directory (`new`, `unfinished`,
`finished`) and `summarize` makes the family's `summary.csv` (`SUMMARY_COLUMNS`).

`mechlrmc.sweep` launches trials on Ray Tune; this module never imports Ray, so reading a spec or
a sweep directory needs none. A core module: it uses config and runs, never the analysis layer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from mechlrmc.config import ConfigError, RunConfig, preset
from mechlrmc.resume import MAY_CHANGE
from mechlrmc.runs import Run

SPEC_KEYS = ("preset", "config", "steps", "set", "grid", "seeds", "resources")
RESOURCE_KEYS = ("cpus_per_trial", "gpus_per_trial")
SUMMARY_COLUMNS = ("run", "status", "step", "eval_loss", "eval_loss_mask", "eval_corr_mask", "wall_time", "error")


class SweepError(ConfigError):
    """A sweep spec or one of its trials is invalid."""


@dataclass
class Trial:
    """One run of a family: its directory name, its full config and the values that vary."""

    name: str
    config: RunConfig
    varied: dict[str, Any]  # grid keys and "seed"
    factory: Callable | None = None  # trainer_factory of this trial (default: launch's)


@dataclass
class SweepSpec:
    raw: dict[str, Any]  # the spec as written (saved as sweep.yaml)
    base: RunConfig
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0

    @classmethod
    def from_dict(cls, raw: Any) -> SweepSpec:
        if not isinstance(raw, dict):
            raise SweepError(f"a sweep spec must be a mapping, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SPEC_KEYS))
        if unknown:
            raise SweepError(f"unknown sweep key(s) {unknown}: allowed {list(SPEC_KEYS)}")
        if ("preset" in raw) == ("config" in raw):
            raise SweepError("a sweep spec needs exactly one of 'preset' or 'config'")
        base = preset(raw["preset"]) if "preset" in raw else _load_config(raw["config"])
        overrides = dict(_mapping(raw, "set"))
        if "steps" in raw:
            overrides["train.steps"] = raw["steps"]
        grid = _mapping(raw, "grid")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"grid.{key}={values!r} is invalid: allowed a non-empty list of values")
            if key == "train.seed":
                raise SweepError("grid.train.seed is not allowed: list seeds under 'seeds'")
        seeds = raw.get("seeds", 1)
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                raise SweepError(f"seeds={seeds} is invalid: allowed an integer N >= 1 (seeds 0..N-1) or a list")
            seeds = list(range(seeds))
        if (not isinstance(seeds, list) or not seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
                or len(set(seeds)) != len(seeds)):
            raise SweepError(f"seeds={raw.get('seeds')!r} is invalid: allowed an integer N >= 1 or a list of "
                             "distinct integers >= 0")
        resources = _mapping(raw, "resources")
        bad = sorted(set(resources) - set(RESOURCE_KEYS))
        if bad:
            raise SweepError(f"unknown resources key(s) {bad}: allowed {list(RESOURCE_KEYS)}")
        cpus, gpus = resources.get("cpus_per_trial", 1), resources.get("gpus_per_trial", 0)
        if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
            raise SweepError(f"resources.cpus_per_trial={cpus!r} is invalid: allowed an integer >= 1")
        if not isinstance(gpus, (int, float)) or isinstance(gpus, bool) or not 0 <= gpus:
            raise SweepError(f"resources.gpus_per_trial={gpus!r} is invalid: allowed a number >= 0 (may be fractional)")
        return cls(raw=raw, base=base, overrides=overrides, grid=grid, seeds=seeds,
                   cpus_per_trial=cpus, gpus_per_trial=float(gpus))

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpec:
        path = Path(path)
        if not path.is_file():
            raise SweepError(f"sweep spec {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SweepError(f"sweep spec {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        return cls.from_dict(raw)

    def trials(self) -> list[Trial]:
        """Every trial of the spec, each config validated; an error names the trial and the field."""
        keys = list(self.grid)
        trials = []
        for values in itertools.product(*self.grid.values()):
            for seed in self.seeds:
                varied = {**dict(zip(keys, values)), "seed": seed}
                name = trial_name(varied)
                assignments = {**self.overrides, **dict(zip(keys, values)), "train.seed": seed,
                               "train.threads": self.cpus_per_trial}
                if "train.device" not in assignments:
                    assignments["train.device"] = "cuda" if self.gpus_per_trial > 0 else "cpu"
                try:
                    config = self.base.override(assignments)
                except ConfigError as e:
                    raise SweepError(f"trial {name!r}: {e}") from None
                trials.append(Trial(name, config, varied))
        return trials


def _mapping(raw: dict, key: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise SweepError(f"{key}={value!r} is invalid: allowed a mapping of dotted keys, e.g. {{train.lr: 0.002}}")
    return value


def _load_config(path: Any) -> RunConfig:
    if not isinstance(path, str) or not Path(path).is_file():
        raise SweepError(f"config={path!r} is invalid: allowed the path of an existing config.yaml")
    return RunConfig.from_yaml(path)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "-".join(_format_value(v) for v in value)
    return str(value).replace("/", "_")


def trial_name(varied: dict[str, Any]) -> str:
    """`train.lr=0.002,seed=3`: the varied values in spec order, seed last."""
    return ",".join(f"{k}={_format_value(v)}" for k, v in varied.items())


# ----- the state of a trial on disk ------------------------------------------------------------

def trial_status(path: Path, config: RunConfig) -> str:
    """`new` (no run yet), `finished` (checkpoint at the last step, or stopped at its drop) or `unfinished`.

    Raises SweepError when the directory holds a run of another configuration (steps aside: a
    longer `steps` continues a finished run)."""
    if not (path / "config.yaml").is_file():
        return "new"
    run = Run(path)
    if run.config.differences(config, ignore=MAY_CHANGE):
        raise SweepError(f"trial {path.name!r}: {path} holds a run with another config; "
                         "use another --out or remove it")
    return "finished" if run.finished else "unfinished"


def summarize(out: Path, trials: list[Trial], errors: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per trial, read from its run directory: status, last step and last evaluation."""
    errors = errors or {}
    rows = []
    for trial in trials:
        path = out / trial.name
        row: dict[str, Any] = {"run": trial.name, **trial.varied}
        status = trial_status(path, trial.config)
        row["status"] = "failed" if trial.name in errors and status != "finished" else status
        if status != "new":
            evals = Run(path).evals
            if len(evals):
                last = evals.iloc[-1]
                row.update(step=int(last.step), wall_time=last.wall_time,
                           **{c: last[c] for c in trial.config.task.summary_metrics})
        row["error"] = errors.get(trial.name, "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    metrics = list(trials[0].config.task.summary_metrics)  # LRMC's: SUMMARY_COLUMNS
    columns = ["run", *[k for k in trials[0].varied], "status", "step", *metrics, "wall_time", "error"]
    return frame.reindex(columns=columns)
