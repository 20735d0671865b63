"""The commitment point: from which step on is a run's fate, its drop step, sealed?

From chosen steps S of a run (its kept training states, `train.keep_states`), K branches continue
training with the same weights and Adam state but each its own data stream (`train.data_seed`
1..K), until they drop (`train.stop_below`) or reach a step limit. Early on the plateau the data a
run sees still decides when it drops, and the branches' drop steps spread; once the fate is sealed
they agree. Branches are ordinary run directories trained by `mechlrmc sweep` (resumable, one
sweep directory per run: `branch_spec`), so `mechlrmc report` and every analysis read them too.

- `branch_spec(run, at, branches, limit)`: the sweep spec of a run's branches.
- `commitment_table(summary, run_drop, tol)`: per branching step, the branches' drop steps
  (censored where they did not drop), their spread, and `sealed`: whether the spread stays within
  `tol` steps from this branching step on; `commitment_point(table)` is the first such step.

The spread is the standard deviation of the branches' drop steps. A branch that did not drop by
the limit makes the spread at least (limit - the earliest drop) and the step unsealed: its fate is
not known to agree. The default tolerance is two evaluation intervals of the run, the resolution
of a drop step (`analyses.plateau.phases.detect_phases` places the drop at an evaluation).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from mechlrmc.errors import OptionError
from mechlrmc.runs import Run

BRANCHES = 6
STOP_PATIENCE = 3


def default_tolerance(run: Run) -> float:
    """Two evaluation intervals of `run`: the resolution of a drop step."""
    return 2.0 * run.config.train.eval_every


def branch_spec(run: Run, at: list[int], branches: int = BRANCHES, limit: int | None = None,
                stop_below: float | None = None) -> dict:
    """The sweep spec (a dict, as `mechlrmc.trials.SweepSpec.from_dict` reads it) of `branches`
    branches of `run` from each step in `at` (kept states of the run) with data seeds
    1..`branches` (none of them the run's own stream, `train.seed`, unless that is one of 1..K:
    then that branch repeats the run), each until its phase metric has stayed at or below
    `stop_below` for `STOP_PATIENCE` evaluations (default: the run's own `train.stop_below`, else
    `default_stop`) or `limit` steps (default the run's `train.steps`)."""
    kept = run.kept_states
    missing = sorted(set(at) - set(kept))
    if not at or missing:
        raise OptionError(f"--at {missing or at}: {run.path} keeps no training state there: allowed steps "
                          f"{kept or 'none (train it with train.keep_states)'}")
    if branches < 2:
        raise OptionError(f"--branches {branches} is invalid: allowed an integer >= 2")
    tc = run.config.train
    limit = limit or tc.steps
    if limit <= max(at):
        raise OptionError(f"--limit {limit} is invalid: allowed a step after the last branching step {max(at)}")
    stop = stop_below or tc.stop_below or default_stop(run)
    return {
        "config": str((run.path / "config.yaml").resolve()),
        "steps": int(limit),
        "set": {"train.branch_from": str(run.path.resolve()), "train.keep_states": [],
                "train.stop_below": float(stop), "train.stop_patience": STOP_PATIENCE},
        "grid": {"train.branch_step": [int(s) for s in at], "train.data_seed": list(range(1, branches + 1))},
        "seeds": [tc.seed],
        "resources": {"cpus_per_trial": max(1, tc.threads)},
    }


def default_stop(run: Run) -> float:
    """Where a branch counts as dropped and stops: the phase metric at the geometric mean of the run's
    plateau level and its final level (half-way on a log scale), so far below the plateau."""
    from analyses.plateau.phases import detect_phases

    phases = detect_phases(run).iloc[0]
    metric = run.config.task.phase_metric
    if not phases.dropped:
        raise OptionError(f"{run.path} did not drop: pass --stop-below, the {metric} at which a branch has dropped")
    return float(math.sqrt(phases[f"plateau_{metric}"] * phases[f"post_drop_{metric}"]))


def commitment_table(summary: pd.DataFrame, run_drop: float = math.nan, tol: float = 10.0) -> pd.DataFrame:
    """One row per branching step of a branch family's `family_summary` (its column
    `train.branch_step`; `drop_step` NaN where a branch did not drop, `final_step` its last step):
    `branch_step, branches, dropped, censored, drop_steps` (the sorted drop steps, '>' before a
    censored branch's last step), `median_drop, spread` (standard deviation of the drop steps; a
    lower bound where some are censored), `drop_range` (max - min), `run_drop_step` (the parent's
    own), `within_tol` (spread <= tol and nothing censored) and `sealed` (within tolerance at this
    and every later branching step)."""
    if "train.branch_step" not in summary:
        raise OptionError("the summary has no column train.branch_step: allowed the family_summary of a "
                          "folder of branches (`mechlrmc analyze commitment`)")
    if tol <= 0:
        raise OptionError(f"tol={tol} is invalid: allowed a number of steps > 0")
    if summary.empty:
        raise OptionError("the summary has no branches: allowed the family_summary of at least one branch")
    rows = []
    for step, group in summary.groupby("train.branch_step", sort=True):
        dropped = group.drop_step.notna()
        durations = group.drop_step.where(dropped, group.final_step).astype(float).to_numpy()
        order = np.argsort(durations)
        text = [f"{int(d)}" if ok else f">{int(d)}" for d, ok in zip(durations[order], dropped.to_numpy()[order])]
        spread = float(np.std(durations, ddof=1)) if len(durations) > 1 else math.nan
        rows.append({
            "branch_step": int(step), "branches": len(group), "dropped": int(dropped.sum()),
            "censored": int((~dropped).sum()), "drop_steps": " ".join(text),
            "median_drop": float(np.median(durations)) if dropped.all() else math.nan,
            "spread": spread, "drop_range": float(np.ptp(durations)), "run_drop_step": run_drop,
            "within_tol": bool(dropped.all() and spread <= tol),
        })
    table = pd.DataFrame(rows)
    within = table.within_tol.to_numpy()
    table["sealed"] = [bool(within[i:].all()) for i in range(len(within))]
    table["tolerance"] = tol
    return table


def commitment_point(table: pd.DataFrame) -> float:
    """The first branching step from which every later one is within tolerance (NaN: never sealed)."""
    sealed = table[table.sealed]
    return float(sealed.branch_step.iloc[0]) if len(sealed) else math.nan


def branch_summary(folder: str | Path) -> pd.DataFrame:
    """The `family_summary` of a folder of branches, with `train.branch_step` and `train.data_seed`
    (the keys it varies) as columns even where only one value of them was run."""
    from analyses.family.summary import family_runs, family_summary

    runs = family_runs(folder)
    summary = family_summary(runs)
    for key in ("branch_step", "data_seed"):
        summary[f"train.{key}"] = [getattr(r.config.train, key) for r in runs]
    return summary
