"""Families of runs (seeds x settings) as one object: abrupt learning is a stochastic event, so a
claim about it is a statement about a family, made per seed and counted as "k of N".

- `family_summary(path_or_runs)`: one row per run with its varied settings, seed, status, the
  `detect_phases` figures, the drop sharpness and the final losses (finding 1, docs/FINDINGS.md).
- `across_runs(runs, fn, steps=...)`: any checkpoint analysis over every run, one tidy table.
- `plot_family_curves` and `plot_drop_steps`: the family figures.
- `find_family(run)`: the shipped family of a run's recipe (`analyses/families/`), closest machine
  first; `place_in_family(run, family)`: where the run's drop and final loss sit in it.

The findings counted across seeds ("k of N") are in `analyses.findings`.

A family is a sweep directory (`mechlrmc sweep`: one run directory per trial) or any list of run
directories. The varied keys are the config fields whose values differ between runs, seed aside.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from analyses.phases import detect_phases
from analyses.walk import Steps, across_checkpoints
from mechlrmc.provenance import MATCH_LEVELS, machine_match, machine_name, match_sentence
from mechlrmc.runs import CheckpointError, Run, read_provenance

RunsLike = str | Path | Iterable[str | Path | Run]


# ----- the runs of a family -------------------------------------------------------------------

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


def _flat_config(config) -> dict:
    """A RunConfig as one dict of dotted keys (`train.lr`)."""
    return {f"{s}.{k}": v for s, d in config.to_dict().items() for k, v in d.items()}


def _flat(run: Run) -> dict:
    return _flat_config(run.config)


def varied_keys(runs: list[Run]) -> list[str]:
    """Dotted config keys whose values differ between the runs, seed aside, in config order."""
    flats = [_flat(r) for r in runs]
    return [k for k in flats[0] if k != "train.seed" and any(str(f[k]) != str(flats[0][k]) for f in flats[1:])]


def _identity(run: Run, keys: list[str]) -> dict:
    flat = _flat(run)
    return {"run": run.path.name, **{k: flat[k] for k in keys}, "seed": run.config.train.seed}


def _status(run: Run) -> str:
    steps = run.steps
    if steps and steps[-1] >= run.config.train.steps:
        return "finished"
    summary = run.path.parent / "summary.csv"
    if summary.is_file():
        rows = pd.read_csv(summary)
        rows = rows[rows.run == run.path.name]
        if len(rows) and rows.status.iloc[0] == "failed":
            return "failed"
    return "unfinished"


# ----- the summary -----------------------------------------------------------------------------

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
    plateau L_mask), the final evaluation L, L_mask and correlation, and the wall time."""
    runs = family_runs(source)
    keys = varied_keys(runs)
    rows = []
    for run in runs:
        row = {**_identity(run, keys), "status": _status(run)}
        evals = run.evals
        if "eval_loss_mask" not in evals:  # a token task
            rows.append({**row, **_sequence_summary(run)})
            continue
        if evals.eval_loss_mask.notna().sum() >= 3:  # an imported reference run's evaluations lack L_mask
            phases = detect_phases(run).iloc[0].to_dict()
            row.update(phases)
            row["drop_step"] = phases["drop_step"] if phases["dropped"] else math.nan
            row["drop_sharpness"] = (drop_sharpness(run, phases["plateau_loss_mask"], phases["plateau_start"])
                                     if phases["dropped"] else math.nan)
        if len(evals):
            last = evals.iloc[-1]
            row.update(final_step=int(last.step), final_loss=last.eval_loss, final_loss_mask=last.eval_loss_mask,
                       final_corr_mask=last.eval_corr_mask, wall_time=last.wall_time)
        rows.append(row)
    return pd.DataFrame(rows)


def _sequence_summary(run: Run) -> dict:
    """A token-task run's summary figures: its `sequence_phases`, the drop sharpness on the outputs'
    cross-entropy, and its final greedy accuracy and repetition."""
    evals = run.evals
    row = {}
    if len(evals) >= 3:
        phases = detect_phases(run).iloc[0].to_dict()
        row.update(phases)
        row["drop_step"] = phases["drop_step"] if phases["dropped"] else math.nan
        row["drop_sharpness"] = (drop_sharpness(run, phases["plateau_loss_out"], phases["plateau_start"],
                                                "eval_loss_out") if phases["dropped"] else math.nan)
    if len(evals):
        last = evals.iloc[-1]
        row.update(final_step=int(last.step), final_loss=last.eval_loss, final_loss_out=last.eval_loss_out,
                   final_greedy_acc=last.eval_greedy_acc, final_rep=last.eval_rep, wall_time=last.wall_time)
    return row


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
        ident = _identity(run, keys)
        frames.append(frame.assign(**ident)[[*ident, *frame.columns]])
    return pd.concat(frames, ignore_index=True)


# ----- figures -------------------------------------------------------------------------------

def _setting(row: pd.Series | dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys) or "all runs"


def plot_family_curves(source: RunsLike, summary: pd.DataFrame | None = None) -> go.Figure:
    """Every run's eval L_mask (log scale): against the step (left) and aligned at its own drop
    step (right, from the first trained step; runs that never dropped are left out there). One
    colour per setting, or per run when all runs share one setting."""
    runs = family_runs(source)
    summary = family_summary(runs) if summary is None else summary
    keys = varied_keys(runs)
    settings = list(dict.fromkeys(_setting(r, keys) for _, r in summary.iterrows()))
    lrmc = "eval_loss_mask" in runs[0].metrics
    column, name = ("eval_loss_mask", "eval L_mask") if lrmc else ("eval_loss_out", "eval cross-entropy on the outputs")
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=(f"{name} against step", "aligned at each run's drop"))
    for i, (run, (_, row)) in enumerate(zip(runs, summary.iterrows())):
        setting = _setting(row, keys)
        color = qualitative.D3[(settings.index(setting) if len(settings) > 1 else i) % len(qualitative.D3)]
        evals = run.evals
        label = f"{row.run}" + ("" if pd.notna(row.get("drop_step")) else " (no drop)")
        fig.add_scatter(x=evals.step, y=evals[column], mode="lines", name=label, legendgroup=row.run,
                        line=dict(color=color, width=1.5, dash="solid" if pd.notna(row.get("drop_step")) else "dot"),
                        row=1, col=1)
        if pd.notna(row.get("drop_step")):
            trained = evals[evals.step > 0]  # the untrained model's loss would clutter the aligned axis
            fig.add_scatter(x=trained.step - row.drop_step, y=trained[column], mode="lines", name=label,
                            legendgroup=row.run, showlegend=False, line=dict(color=color, width=1.5), row=1, col=2)
    if lrmc:
        for col in (1, 2):
            fig.add_hline(y=runs[0].config.data.plateau_mask_loss, line=dict(color="gray", dash="dash"), row=1, col=col)
    fig.add_vline(x=0, line=dict(color="gray", dash="dot"), row=1, col=2)
    fig.update_yaxes(type="log", title_text=name, row=1, col=1)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="steps from the drop", row=1, col=2)
    return fig.update_layout(template="plotly_white", height=450, margin=dict(t=90, b=40),
                             title=f"{len(runs)} runs; " + ("dashed: copy-and-zero level r/9, " if lrmc else "")
                             + "dotted lines: no drop")


def plot_drop_steps(summary: pd.DataFrame) -> go.Figure:
    """Drop step of every run, one column per setting (seed aside); a run that never dropped is an
    open marker at its last evaluated step."""
    keys = [c for c in summary.columns if "." in c]
    fig = go.Figure()
    labels = summary.apply(lambda r: _setting(r, keys), axis=1)
    for setting in dict.fromkeys(labels):
        part = summary[labels == setting]
        dropped = part[part.drop_step.notna()]
        never = part[part.drop_step.isna()]
        fig.add_box(x=[setting] * len(dropped), y=dropped.drop_step, name=setting, boxpoints="all", jitter=0.3,
                    pointpos=0, marker=dict(size=9), text=[f"seed {s}" for s in dropped.seed], showlegend=False,
                    line_color=qualitative.D3[0])
        if len(never):
            fig.add_scatter(x=[setting] * len(never), y=never.final_step, mode="markers", showlegend=False,
                            marker=dict(symbol="circle-open", size=11, color="#d62728"),
                            text=[f"seed {s}: no drop by {int(v)}" for s, v in zip(never.seed, never.final_step)],
                            hoverinfo="text")
    n_drop = int(summary.drop_step.notna().sum())
    return fig.update_layout(
        template="plotly_white", height=380, yaxis_title="drop step", margin=dict(t=40, b=40),
        title=f"Drop step per setting: {n_drop} of {len(summary)} runs dropped (open red: no drop by that step)")


# ----- a run within its family ---------------------------------------------------------------

SHIPPED_FAMILIES = Path(__file__).resolve().parent / "families"  # package data: installed with the package
# settings that do not change a run's recipe: its seed, where and how it ran, and how long (a
# shorter run of the recipe, e.g. a quick demo, still belongs to the recipe's family)
_NOT_RECIPE = ("train.seed", "train.device", "train.threads", "train.dtype", "train.compile", "train.steps")


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


def plot_run_in_family(family: pd.DataFrame, run_row: dict) -> go.Figure:
    """Drop step and final L_mask of every run of a family (dots; open marker: no drop) with one
    run marked by a star: where that run sits in the family's distribution."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("drop step", "final eval L_mask"))
    for col, key in ((1, "drop_step"), (2, "final_loss_mask")):
        dropped = family[family.drop_step.notna()]
        fig.add_scatter(x=dropped[key], y=[0] * len(dropped), mode="markers", name="family seeds",
                        marker=dict(size=11, color="#1f77b4", opacity=0.7), showlegend=col == 1,
                        text=[f"seed {s}" for s in dropped.seed], hoverinfo="text+x", row=1, col=col)
        never = family[family.drop_step.isna()]
        if len(never):
            x = never.final_step if key == "drop_step" else never[key]
            fig.add_scatter(x=x, y=[0] * len(never), mode="markers", name="no drop (at last step)",
                            marker=dict(size=11, symbol="circle-open", color="#d62728"), showlegend=col == 1,
                            text=[f"seed {s}" for s in never.seed], hoverinfo="text+x", row=1, col=col)
        value = run_row.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            fig.add_scatter(x=[value], y=[0], mode="markers", name="this run", showlegend=col == 1,
                            marker=dict(size=20, symbol="star", color="#ff7f0e", line=dict(width=1, color="black")),
                            row=1, col=col)
    fig.update_yaxes(visible=False, range=[-1, 1])
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="L_mask", type="log", row=1, col=2)
    return fig.update_layout(template="plotly_white", height=260, margin=dict(t=40, b=50))
