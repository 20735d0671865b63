"""When is a run's fate, its drop step, sealed? A bracket of branching steps (docs/FINDINGS.md, T3).

From chosen steps S of a run (its kept training states, `train.keep_states`; step 0 included: a
branch from 0 has the run's initialisation and its own data from the first batch), K branches
continue training with the same weights and Adam state but each its own data stream
(`train.data_seed` 1..K), until they drop (`train.stop_below`) or reach a step limit. Early on the
plateau the data a run still sees decides when it drops, and the branches' drop steps spread; once
the fate is sealed they agree. Branches are ordinary run directories trained by `mechlrmc sweep`
(resumable, one sweep directory per run: `branch_spec`), so `mechlrmc report` and every analysis
read them too.

- `branch_spec(run, at, branches, limit)`: the sweep spec of a run's branches.
- `commitment_table(summary, run_drop, tol, between_sd)`: per branching step, the branches' drop
  steps (censored where they did not drop), their spread, the criterion met (`within`) and
  `sealed`: met at this and every later branching step.
- `commitment_tables(branches, between_sd, tol)`: the table of each parent of a
  `commitment_branches.csv`, redone from that table alone.
- `commitment_bracket(table)`: where the fate is sealed, as the branching steps bracket it:
  "sealed between steps a and b", "sealed by step a (upper bound)" or "not sealed by step b".
- `between_seed_sd(summary)`: the standard deviation of the drop step between init seeds of a family.

The spread is the standard deviation of the branches' drop steps. The criterion is relative: a
branching step meets it when the spread is at most `SEALED_RATIO` (a quarter) of the standard
deviation between init seeds (`between_sd`: what the data still moves, against what the
initialisation moves), judged on the upper end of a 95% percentile bootstrap interval of the ratio
spread / between_sd (the branches resampled, `RESAMPLES` times, seed 0; `between_sd` taken as
known): a step is within only when the data's effect is small with confidence, not merely on its
point estimate. Without `between_sd` it falls back to an absolute tolerance `tol` on the spread's
point estimate (default two evaluation intervals of the run, the resolution of a drop step:
`analyses.plateau.phases.detect_phases` places the drop at an evaluation), a tolerance that grows
easier to meet as less time is left before the drop; the table's `criterion` says which was used.
A branch that did not drop by the limit makes a step unsealed: its fate is not known to agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from mechlrmc.errors import OptionError
from mechlrmc.runs import Run

BRANCHES = 8
STOP_PATIENCE = 3
SEALED_RATIO = 0.25  # a sealed step's spread, at most this share of the between-seed sd
RESAMPLES = 2000  # bootstrap resamples of the branches


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


def commitment_table(summary: pd.DataFrame, run_drop: float = math.nan, tol: float | None = None,
                     between_sd: float | None = None, resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """One row per branching step of a branch family's `family_summary` (its column
    `train.branch_step`; `drop_step` NaN where a branch did not drop, `final_step` its last step):
    `branch_step, branches, dropped, censored, drop_steps` (the sorted drop steps, '>' before a
    censored branch's last step), `median_drop, spread` (standard deviation of the drop steps; a
    lower bound where some are censored), `drop_range` (max - min), `run_drop_step` (the parent's
    own), `between_sd`, `ratio, ratio_low, ratio_high` (spread / between_sd and its 95% bootstrap
    interval; NaN under the absolute criterion), `within` (nothing censored, and ratio_high <=
    `SEALED_RATIO`, or without `between_sd` spread <= `tol`), `sealed` (within at this and every later
    branching step), `criterion` (which rule, in words) and `verdict` (`commitment_bracket`'s text,
    the same on every row)."""
    if "train.branch_step" not in summary:
        raise OptionError("the summary has no column train.branch_step: allowed the family_summary of a "
                          "folder of branches (`mechlrmc analyze commitment`)")
    if summary.empty:
        raise OptionError("the summary has no branches: allowed the family_summary of at least one branch")
    criterion = _criterion(tol, between_sd)
    rows = []
    for step, group in summary.groupby("train.branch_step", sort=True):
        dropped = group.drop_step.notna()
        durations = group.drop_step.where(dropped, group.final_step).astype(float).to_numpy()
        order = np.argsort(durations)
        text = [f"{int(d)}" if ok else f">{int(d)}" for d, ok in zip(durations[order], dropped.to_numpy()[order])]
        spread = float(np.std(durations, ddof=1)) if len(durations) > 1 else math.nan
        ratio = low = high = math.nan
        if between_sd is not None and len(durations) > 1:
            ratio = spread / between_sd
            low, high = _bootstrap_sd(durations, resamples, np.random.default_rng(seed)) / between_sd
        within = dropped.all() and (high <= SEALED_RATIO if between_sd is not None else spread <= tol)
        rows.append({
            "branch_step": int(step), "branches": len(group), "dropped": int(dropped.sum()),
            "censored": int((~dropped).sum()), "drop_steps": " ".join(text),
            "median_drop": float(np.median(durations)) if dropped.all() else math.nan,
            "spread": spread, "drop_range": float(np.ptp(durations)), "run_drop_step": run_drop,
            "between_sd": math.nan if between_sd is None else float(between_sd),
            "ratio": ratio, "ratio_low": low, "ratio_high": high, "within": bool(within),
        })
    table = pd.DataFrame(rows)
    within = table.within.to_numpy()
    table["sealed"] = [bool(within[i:].all()) for i in range(len(within))]
    table["criterion"] = criterion
    table["verdict"] = commitment_bracket(table)["text"]
    return table


def _criterion(tol: float | None, between_sd: float | None) -> str:
    """The rule a branching step is judged by, in words (checked: a positive scale)."""
    if between_sd is not None:
        if not (between_sd > 0 and math.isfinite(between_sd)):
            raise OptionError(f"between_sd={between_sd} is invalid: allowed a number of steps > 0")
        return (f"relative: upper end of the 95% bootstrap interval of spread / between-seed sd "
                f"({between_sd:.3g} steps) <= {SEALED_RATIO:g}")
    if tol is None:
        raise OptionError("no criterion: allowed between_sd (relative, the between-seed sd of the drop step) "
                          "or tol (absolute, in steps)")
    if not tol > 0:
        raise OptionError(f"tol={tol} is invalid: allowed a number of steps > 0")
    return f"absolute: spread <= {tol:g} steps (no between-seed sd given)"


def _bootstrap_sd(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The 95% percentile bootstrap interval [low, high] of the standard deviation of `values`."""
    draws = values[rng.integers(0, len(values), size=(resamples, len(values)))]
    return np.percentile(draws.std(axis=1, ddof=1), [2.5, 97.5])


def commitment_bracket(table: pd.DataFrame) -> dict:
    """Where `commitment_table`'s branching steps place the sealing of the fate: `low, high, kind,
    text`. kind "between": sealed between a (the last branching step not sealed) and b (the first
    from which every later one is sealed); "upper bound": the first branching step is already
    sealed, so the fate is sealed by then, how much earlier unknown (low NaN); "not sealed": no
    branching step is, so not by the last one, b (high NaN)."""
    table = table.sort_values("branch_step")
    steps, sealed = table.branch_step.to_numpy(), table.sealed.to_numpy(bool)
    if sealed.all():
        return {"low": math.nan, "high": int(steps[0]), "kind": "upper bound",
                "text": f"sealed by step {steps[0]} (upper bound)"}
    if not sealed.any():
        return {"low": int(steps[-1]), "high": math.nan, "kind": "not sealed",
                "text": f"not sealed by step {steps[-1]}"}
    first = int(np.argmax(sealed))
    low, high = int(steps[first - 1]), int(steps[first])
    return {"low": low, "high": high, "kind": "between", "text": f"sealed between steps {low} and {high}"}


def commitment_tables(branches: pd.DataFrame, between_sd: float | None = None,
                      tol: float | Mapping[str, float] | None = None) -> pd.DataFrame:
    """`commitment_table` of each parent run of a `commitment_branches.csv` (one row per branch:
    `parent`, `train.branch_step`, `drop_step`, `final_step`, and where known `parent_seed` and
    `parent_drop_step`), stacked with `run` and `seed` first; `tol` one tolerance or one per parent.
    Redoes a commitment analysis from the branches' table alone, e.g. once `between_sd` is known."""
    if "parent" not in branches:
        raise OptionError("the branches' table has no column parent: allowed a commitment_branches.csv "
                          "(`mechlrmc analyze commitment`)")
    tables = []
    for parent, part in branches.groupby("parent", sort=False):
        run_drop = float(part.parent_drop_step.iloc[0]) if "parent_drop_step" in part else math.nan
        table = commitment_table(part, run_drop, tol.get(parent) if isinstance(tol, Mapping) else tol, between_sd)
        ident = {"run": parent, "seed": part.parent_seed.iloc[0] if "parent_seed" in part else math.nan}
        tables.append(table.assign(**ident)[[*ident, *table.columns]])
    return pd.concat(tables, ignore_index=True)


def between_seed_sd(summary: pd.DataFrame) -> float:
    """The standard deviation of the drop step between init seeds of a family's `family_summary`
    (column `seed`, the init seed `train.seed`): the sd over init seeds of each seed's mean drop
    step over its runs. In the crossed init x data family (`analyses/families/mws_init_data`: data
    seeds in `train.data_seed`) that is the mean over its data seeds, so the data's share mostly
    averages out; in a family of one run per seed it is the sd of the runs' drop steps, which then
    holds the data's share too. Every run must have dropped (a censored drop step has no mean)."""
    seeds = ("train.seed", "train.data_seed")
    others = [c for c in summary.columns if "." in c and c not in seeds and summary[c].nunique() > 1]
    if others:
        raise OptionError(f"the family varies {others} besides the seeds: allowed a family of init seeds "
                          "(and data seeds) of one setting")
    censored = summary[summary.drop_step.isna()]
    if len(censored):
        raise OptionError(f"{len(censored)} of the family's {len(summary)} runs did not drop "
                          f"({', '.join(censored.run.astype(str))}): the between-seed sd needs every drop step")
    means = summary.groupby("seed").drop_step.mean()
    if len(means) < 2:
        raise OptionError(f"the family has {len(means)} init seed: allowed a family of at least 2")
    return float(means.std(ddof=1))


def branch_summary(folder: str | Path) -> pd.DataFrame:
    """The `family_summary` of a folder of branches, with `train.branch_step` and `train.data_seed`
    (the keys it varies) as columns even where only one value of them was run."""
    from analyses.family.summary import family_runs, family_summary

    runs = family_runs(folder)
    summary = family_summary(runs)
    for key in ("branch_step", "data_seed"):
        summary[f"train.{key}"] = [getattr(r.config.train, key) for r in runs]
    return summary
