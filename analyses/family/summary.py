"""Families of runs (seeds x settings) as one object: abrupt learning is a stochastic event, so a
claim about it is a statement about a family, made per seed and counted as "k of N".

- `family_summary(path_or_runs)`: one row per run with its varied settings, seed, status, the
  `detect_phases` figures, the drop sharpness and the final losses (finding 1, docs/FINDINGS.md).
- `across_runs(runs, fn, steps=...)`: any checkpoint analysis over every run, one tidy table.
- `plot_family_curves` and `plot_drop_steps`: the family figures.
- `find_family(run)`: the shipped family of a run's recipe (`analyses/families/`), closest machine
  first; `place_in_family(run, family)`: where the run's drop and final loss sit in it.

The findings counted across seeds ("k of N") are in `analyses.family.findings`.

A family is a sweep directory (`mechlrmc sweep`: one run directory per trial) or any list of run
directories. The varied keys are the config fields whose values differ between runs, seed aside.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from analyses.base.walk import Steps, across_checkpoints
from analyses.plateau.phases import detect_phases
from mechlrmc.provenance import MATCH_LEVELS, machine_match, machine_name, match_sentence
from mechlrmc.runs import CheckpointError, Run, read_provenance

RunsLike = str | Path | Iterable[str | Path | Run]


def family_runs(source: RunsLike) -> list[Run]:
    """The runs of a sweep directory (its sub-directories holding a run), or of a list of runs/paths."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if (path / "config.yaml").is_file():
            return [Run(path)]
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory: allowed a run directory or a sweep directory of runs")
        runs = [Run(p) for p in sorted(path.iterdir()) if (p / "config.yaml").is_file()]
        if not runs:
            raise CheckpointError(f"{path} is neither a run nor a sweep directory: it holds no run directory "
                                  f"(one with config.yaml)")
        return runs
    return [r if isinstance(r, Run) else Run(r) for r in source]


def summary_table(folder: str | Path) -> pd.DataFrame:
    """The `family_summary` of a sweep directory; of a folder that keeps only its `family_summary.csv`
    (a shipped family under analyses/families/, whose runs are not in the repository), that table.
    `train.seed` is a column either way (a copy of `seed`)."""
    path = Path(folder)
    has_runs = path.is_dir() and any((p / "config.yaml").is_file() for p in path.iterdir())
    if not has_runs and (path / "family_summary.csv").is_file():
        summary = pd.read_csv(path / "family_summary.csv")
    else:
        summary = family_summary(path)
    if "seed" in summary and "train.seed" not in summary:
        summary["train.seed"] = summary["seed"]
    return summary


def _flat_config(config) -> dict:
    """A RunConfig as one dict of dotted keys (`train.lr`)."""
    return {f"{s}.{k}": v for s, d in config.to_dict().items() for k, v in d.items()}


def _flat(run: Run) -> dict:
    return _flat_config(run.config)


def varied_keys(runs: list[Run]) -> list[str]:
    """Dotted config keys whose values differ between the runs, seed aside, in config order."""
    flats = [_flat(r) for r in runs]
    return [k for k in flats[0] if k != "train.seed" and any(str(f[k]) != str(flats[0][k]) for f in flats[1:])]


def run_identity(run: Run, keys: list[str]) -> dict:
    flat = _flat(run)
    return {"run": run.path.name, **{k: flat[k] for k in keys}, "seed": run.config.train.seed}


def _status(run: Run) -> str:
    if run.finished:
        return "finished"
    summary = run.path.parent / "summary.csv"
    if summary.is_file():
        rows = pd.read_csv(summary)
        rows = rows[rows.run == run.path.name]
        if len(rows) and rows.status.iloc[0] == "failed":
            return "failed"
    return "unfinished"


def _crossing(steps: np.ndarray, values: np.ndarray, level: float) -> float:
    """First step at which `values` falls below `level`, interpolated in log space between
    evaluations (NaN if it never does)."""
    below = np.flatnonzero(values < level)
    if not len(below):
        return math.nan
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    y0, y1 = math.log(values[i - 1]), math.log(values[i])
    return float(steps[i - 1] + (math.log(level) - y0) / (y1 - y0) * (steps[i] - steps[i - 1]))


def drop_sharpness(run: Run, plateau: float, start: float = 0, column: str = "eval_loss_mask") -> float:
    """Steps that the phase loss (eval L_mask; a token task's `eval_loss_out`) takes to fall from 90%
    to 50% of the plateau level, searched after `start` (the plateau start); NaN when it never
    reaches 50%."""
    evals = run.evals
    evals = evals[evals.step >= (0 if math.isnan(start) else start)]
    steps, values = evals.step.to_numpy(float), evals[column].to_numpy(float)
    return _crossing(steps, values, 0.5 * plateau) - _crossing(steps, values, 0.9 * plateau)


def family_summary(source: RunsLike) -> pd.DataFrame:
    """One row per run: `run`, the varied keys, `seed`, `status`, the `detect_phases` figures
    (`drop_step` NaN when the run did not drop), `drop_sharpness` (steps from 90% to 50% of the
    plateau level of the task's phase metric), the final evaluations the task names
    (`Task.final_metrics`: LRMC's L, L_mask and correlation; a token task's loss, output loss, greedy
    accuracy and repetition) and the wall time."""
    runs = family_runs(source)
    keys = varied_keys(runs)
    rows = []
    for run in runs:
        task = run.config.task
        metric = f"eval_{task.phase_metric}"
        row = {**run_identity(run, keys), "status": _status(run)}
        evals = run.evals
        if metric in evals and evals[metric].notna().sum() >= 3:  # an imported reference run's evaluations lack L_mask
            phases = detect_phases(run).iloc[0].to_dict()
            row.update(phases)
            row["drop_step"] = phases["drop_step"] if phases["dropped"] else math.nan
            row["drop_sharpness"] = (drop_sharpness(run, phases[f"plateau_{task.phase_metric}"], phases["plateau_start"],
                                                    metric) if phases["dropped"] else math.nan)
        if len(evals):
            last = evals.iloc[-1]
            row.update(final_step=int(last.step), **{f"final_{m}": last[f"eval_{m}"] for m in task.final_metrics},
                       wall_time=last.wall_time)
        rows.append(row)
    return pd.DataFrame(rows)


def across_runs(runs: RunsLike, fn: Callable[..., pd.DataFrame], steps: Steps = None, progress: bool = True,
                **kwargs) -> pd.DataFrame:
    """`across_checkpoints(run, fn, steps, **kwargs)` for every run, concatenated with `run`, the
    varied keys and `seed` first. `steps` may also be a function `run -> steps`."""
    runs = family_runs(runs)
    keys = varied_keys(runs)
    frames = []
    for run in tqdm(runs, desc=getattr(fn, "__name__", "analysis"), unit="run", disable=not progress):
        chosen = steps(run) if callable(steps) else steps
        frame = across_checkpoints(run, fn, steps=chosen, progress=False, **kwargs)
        ident = run_identity(run, keys)
        frames.append(frame.assign(**ident)[[*ident, *frame.columns]])
    return pd.concat(frames, ignore_index=True)


SHIPPED_FAMILIES = Path(__file__).resolve().parents[1] / "families"  # package data (analyses/families): installed with the package


# settings that do not change a run's recipe: its seed, where and how it ran, and how long (a
# shorter run of the recipe, e.g. a quick demo, still belongs to the recipe's family)
# what does not make another recipe: the seeds, the machine, the length, where a run stops at its drop,
# the states it keeps for branching, and its live telemetry
_NOT_RECIPE = ("train.seed", "train.device", "train.threads", "train.dtype", "train.compile", "train.steps",
               "train.data_seed", "train.stop_below", "train.stop_patience", "train.keep_states", "train.log",
               "train.log_images_every")


def _recipe(config) -> dict:
    return {k: v for k, v in _flat_config(config).items() if k not in _NOT_RECIPE}


def find_family(run: Run, root: str | Path = SHIPPED_FAMILIES) -> Path | None:
    """A shipped family summary (`<root>/*/family_summary.csv` beside the `sweep.yaml` it came from)
    whose trials have `run`'s recipe (its config aside from seed, machine settings and step count);
    None if none. Of several, the closest machine comes first (`provenance.machine_match`: same
    vector ISA and software, then the CPU id; a family with no record ranks above one of another
    ISA), then the folder name: the same recipe and seed round differently on another machine type."""
    from mechlrmc.trials import SweepSpec

    matches = []
    for folder in sorted(Path(root).glob("*/")) if Path(root).is_dir() else []:
        if not ((folder / "family_summary.csv").is_file() and (folder / "sweep.yaml").is_file()):
            continue
        trials = SweepSpec.from_yaml(folder / "sweep.yaml").trials()
        if trials and _recipe(trials[0].config) == _recipe(run.config):
            matches.append(folder)
    mine = run.provenance
    ranked = sorted(matches, key=lambda f: (MATCH_LEVELS.index(machine_match(read_provenance(f), mine)), f.name))
    return ranked[0] if ranked else None


def _count(mask) -> int:
    return int(np.sum(mask))


def place_in_family(run: Run, family_dir: str | Path) -> pd.DataFrame:
    """Where `run` sits in a family (a folder with `family_summary.csv`, e.g. `find_family(run)`): one
    row with the family's path and machine, the machine match (`provenance.machine_match`) and its
    sentence, the family's size and drops, this run's seed, drop and final steps, how many of the
    family's runs dropped earlier / at the same step / later, its final eval L_mask and how many
    ended lower / higher, the family's medians, and `drop_text`, a sentence saying all that.

    A drop is compared only as far as both ran: a family run that dropped after this run's last
    step is not "later" unless this run dropped, and one that never dropped by its own last step is
    "later" only if that step is past this run's drop; the rest count as `drop_undecided`. The
    final L_mask is compared as it is, at each run's own final step (both steps are in the row)."""
    family_dir = Path(family_dir)
    family = pd.read_csv(family_dir / "family_summary.csv")
    this = family_summary([run]).iloc[0].to_dict()
    theirs, mine = read_provenance(family_dir), run.provenance
    drops = family.drop_step.to_numpy(float)
    ends = family.final_step.to_numpy(float) if "final_step" in family else np.full(len(family), np.nan)
    seen = ~np.isnan(drops)
    run_final = float(this.get("final_step", math.nan))
    drop = float(this["drop_step"]) if this.get("dropped") else math.nan
    if math.isnan(drop):  # this run has not dropped by run_final: earlier = the family's drops before then
        earlier, same, later = seen & (drops <= run_final), np.zeros(len(family), bool), np.zeros(len(family), bool)
    else:
        earlier, same = seen & (drops < drop), seen & (drops == drop)
        later = (seen & (drops > drop)) | (~seen & (ends >= drop))
    final = float(this.get("final_loss_mask", math.nan))
    finals = family.final_loss_mask.to_numpy(float)
    fam_final = float(np.nanmax(ends)) if np.isfinite(ends).any() else math.nan
    row = {
        "family": str(family_dir), "family_machine": machine_name(theirs), "run_machine": machine_name(mine),
        "match": machine_match(theirs, mine), "match_sentence": match_sentence(theirs, mine),
        "n_seeds": len(family), "n_dropped": _count(seen), "family_drop_steps": sorted(drops[seen].tolist()),
        "family_final_step": fam_final, "seed": this["seed"], "run_final_step": run_final,
        "dropped": bool(this.get("dropped", False)), "drop_step": drop,
        "dropped_earlier": _count(earlier), "dropped_same_step": _count(same), "dropped_later": _count(later),
        "drop_undecided": len(family) - _count(earlier | same | later),
        "final_loss_mask": final, "ended_lower": _count(finals < final), "ended_higher": _count(finals > final),
        "family_median_drop_step": float(np.median(drops[seen])) if seen.any() else math.nan,
        "family_median_final_loss_mask": float(np.nanmedian(finals)) if len(finals) else math.nan,
    }
    row["drop_text"] = _drop_text(row)
    return pd.DataFrame([row])


def _drop_text(r: dict) -> str:
    steps = f"trained to step {r['run_final_step']:.0f}, the family to {r['family_final_step']:.0f}"
    undecided = (f"; for {r['drop_undecided']} it is not known, as the runs did not train long enough to tell"
                 if r["drop_undecided"] else "")
    if r["dropped"]:
        return (f"This run (seed {r['seed']}, {steps}) dropped at step {r['drop_step']:.0f}: {r['dropped_earlier']} "
                f"of the family's {r['n_seeds']} runs dropped earlier, {r['dropped_same_step']} at the same step, "
                f"{r['dropped_later']} later{undecided}.")
    return (f"This run (seed {r['seed']}, {steps}) has not dropped: {r['dropped_earlier']} of the family's "
            f"{r['n_seeds']} runs dropped before its last step{undecided}.")


def setting_label(row: pd.Series | dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys) or "all runs"
