"""Families of runs (seeds x settings) as one object: abrupt learning is a stochastic event, so a
claim about it is a statement about a family, made per seed and counted as "k of N".

- `family_summary(path_or_runs)`: one row per run with its varied settings, seed, status, the
  `detect_phases` figures, the drop sharpness and the final losses (PAPER.md finding 1).
- `across_runs(runs, fn, steps=...)`: any checkpoint analysis over every run, one tidy table.
- `family_findings(runs)`: each finding's value and verdict per run; `findings_table` counts them.
- `plot_family_curves` and `plot_drop_steps`: the family figures.

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
from analyses.walk import Steps, across_checkpoints, analysis_batch
from mechlrmc.provenance import same_machine
from mechlrmc.runs import CheckpointError, Run, read_provenance

RunsLike = str | Path | Iterable[str | Path | Run]

# Criteria of `family_findings`, stated once: the report and the docstring quote these.
PLATEAU_TOL = 0.1  # finding 1: plateau L_mask within 10% of the copy-and-zero level r/9
COPY_RATIO = 0.1  # finding 2: on the plateau, MSE to an inserted value < 10% of MSE to the truth
NUCLEAR_RATIO = 1.5  # finding 3: final masked MSE at most 1.5x nuclear-norm minimisation's
ABLATION_FLOOR = 0.1  # finding 5: largest head effect after the drop >= 10% of r/9 ...
ABLATION_GAIN = 5.0  # ... and >= 5x the largest effect on the plateau
PERMUTE_BREAKS = 2.0  # finding 8: permuting positions multiplies the final L_mask by >= 2 ...
PERMUTE_HARMLESS = 1.1  # ... and the plateau model's by <= 1.1

CRITERIA = {
    "1a": ("plateau at the copy-and-zero level",
           f"plateau L_mask within {PLATEAU_TOL:.0%} of r/9 (E[X^2])"),
    "1b": ("sudden drop within the run", "a drop is detected (analyses.phases.detect_phases)"),
    "2": ("copying on the plateau",
          f"plateau checkpoint, MASK replaced by a value: MSE to that value < {COPY_RATIO:g} x MSE to the truth"),
    "3": ("completion vs nuclear norm (p_mask 0.3)",
          f"final masked MSE <= {NUCLEAR_RATIO:g} x nuclear-norm minimisation's on the same matrices"),
    "4": ("row and column heads at the end", "final checkpoint has >= 1 row head and >= 1 column head"),
    "5": ("a critical head appears after the drop",
          f"largest single-head zero-ablation increase of L_mask at the end >= {ABLATION_FLOOR:g} x r/9 "
          f"and >= {ABLATION_GAIN:g} x the largest on the plateau"),
    "8": ("position embeddings matter only after the drop",
          f"permuting position embeddings: final L_mask x >= {PERMUTE_BREAKS:g}, plateau L_mask x <= "
          f"{PERMUTE_HARMLESS:g}"),
}


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


def drop_sharpness(run: Run, plateau: float, start: float = 0) -> float:
    """Steps that eval L_mask takes to fall from 90% to 50% of the plateau level, searched after
    `start` (the plateau start); NaN when it never reaches 50%."""
    evals = run.metrics.dropna(subset=["eval_loss_mask"])
    evals = evals[evals.step >= (0 if math.isnan(start) else start)]
    steps, values = evals.step.to_numpy(float), evals.eval_loss_mask.to_numpy(float)
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
        evals = run.metrics.dropna(subset=["eval_loss_mask"])
        if len(evals) >= 3:
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


# ----- findings across seeds -------------------------------------------------------------------

def key_steps(run: Run) -> tuple[int, int]:
    """(plateau checkpoint, final checkpoint): the plateau one lies midway between the plateau
    start and end (the drop, or the last evaluation for a run that never dropped)."""
    phases = detect_phases(run).iloc[0]
    start = phases.plateau_start if not math.isnan(phases.plateau_start) else run.steps[0]
    end = phases.plateau_end if not math.isnan(phases.plateau_end) else run.steps[-1]
    return run.nearest_step((start + end) / 2), run.steps[-1]


def _run_findings(run: Run, batch_size: int, n_matrices: int) -> list[dict]:
    from analyses.ablation import head_ablation_sweep
    from analyses.baselines import compare_baselines
    from analyses.copying import copy_check
    from analyses.embeddings import permuted_position_losses
    from analyses.heads import head_taxonomy
    from mechlrmc.metrics import split_losses

    cfg = run.config.data
    phases = detect_phases(run).iloc[0]
    plateau_step, final_step = key_steps(run)
    batch = analysis_batch(run, batch_size)
    plateau_model, final_model = run.load_model(plateau_step), run.load_model(final_step)
    out = []

    def add(finding, value, reproduced, step):
        out.append({"finding": finding, "value": value, "reproduced": bool(reproduced), "step": step})

    ratio = phases.plateau_over_analytic
    add("1a", f"{phases.plateau_loss_mask:.4f} = {ratio:.2f} x r/9", abs(ratio - 1) <= PLATEAU_TOL, math.nan)
    add("1b", f"drop at {phases.drop_step:.0f}" if phases.dropped else f"no drop by {phases.final_step:.0f}",
        phases.dropped, math.nan)

    copies = copy_check(plateau_model, batch, cfg).dropna(subset=["inserted"])
    copy_ratio = copies.mse_vs_inserted.mean() / copies.mse_vs_truth.mean()
    add("2", f"{copy_ratio:.3g}", copy_ratio < COPY_RATIO, plateau_step)

    base = compare_baselines(final_model, cfg, p_masks=(0.3,), n_matrices=n_matrices, progress=False)
    mse = base.set_index("predictor").mse_mask
    nn_ratio = mse["model"] / mse["nuclear_norm"]
    add("3", f"{mse['model']:.4f} vs {mse['nuclear_norm']:.4f} ({nn_ratio:.2f}x)", nn_ratio <= NUCLEAR_RATIO,
        final_step)

    labels = head_taxonomy(final_model, batch, queries="all")
    heads = {kind: [f"L{r.layer}H{r.head}" for r in labels.itertuples() if r.label == kind] for kind in ("row", "column")}
    add("4", f"row {','.join(heads['row']) or '-'}; column {','.join(heads['column']) or '-'}",
        heads["row"] and heads["column"], final_step)

    def worst(model):
        sweep = head_ablation_sweep(model, batch, kinds=("zero",)).sort_values("delta_loss_mask")
        top = sweep.iloc[-1]
        return float(top.delta_loss_mask), f"L{int(top['layer'])}H{int(top['head'])}"

    (before, head_before), (after, head_after) = worst(plateau_model), worst(final_model)
    add("5", f"plateau {before:.4f} ({head_before}); end {after:.4f} ({head_after})",
        after >= ABLATION_FLOOR * cfg.plateau_mask_loss and after >= ABLATION_GAIN * max(before, 0.0), final_step)

    def permute_ratio(model):
        intact = float(split_losses(model(batch.tokens), batch.values, batch.observed)["loss_mask"])
        return permuted_position_losses(model, batch)["loss_mask_permuted_pos"] / intact

    plateau_x, final_x = permute_ratio(plateau_model), permute_ratio(final_model)
    add("8", f"plateau x{plateau_x:.2f}; end x{final_x:.2f}",
        final_x >= PERMUTE_BREAKS and plateau_x <= PERMUTE_HARMLESS, final_step)
    return out


def family_findings(source: RunsLike, batch_size: int = 512, n_matrices: int = 64,
                    progress: bool = True) -> pd.DataFrame:
    """Each finding's value and verdict per run: one row per (run, finding) with `finding`,
    `title`, `criterion`, `value`, `reproduced` and the checkpoint used (see `CRITERIA`).

    The plateau checkpoint is `key_steps`' (mid-plateau); "end" is the last checkpoint. A run that
    never dropped is measured the same way, and the after-drop findings then fail for it.
    """
    import torch

    runs = family_runs(source)
    keys = varied_keys(runs)
    rows = []
    for run in tqdm(runs, desc="findings", unit="run", disable=not progress):
        with torch.no_grad():
            for row in _run_findings(run, batch_size, n_matrices):
                title, criterion = CRITERIA[row["finding"]]
                rows.append({**_identity(run, keys), **row, "title": title, "criterion": criterion})
    return pd.DataFrame(rows)


def findings_table(findings: pd.DataFrame) -> pd.DataFrame:
    """One row per finding: title, criterion, each run's value (a column per run, a check mark
    when reproduced) and "reproduced in k of N"; when settings vary (the columns between `run` and
    `seed`), also "k of N" within each setting, as `reproduced (train.lr=0.002)`."""
    keys = list(findings.columns[1:findings.columns.get_loc("seed")])
    rows = []
    for finding, part in findings.groupby("finding", sort=False):
        row = {"finding": finding, "title": part.title.iloc[0], "criterion": part.criterion.iloc[0]}
        for r in part.itertuples():
            row[r.run] = f"{'✓' if r.reproduced else '✗'} {r.value}"
        if keys:
            for values, group in part.groupby(keys, sort=False):
                row[f"reproduced ({_setting(dict(zip(keys, values)), keys)})"] = _k_of_n(group)
        row["reproduced"] = _k_of_n(part)
        rows.append(row)
    return pd.DataFrame(rows)


def _k_of_n(findings: pd.DataFrame) -> str:
    return f"{int(findings.reproduced.sum())} of {len(findings)}"


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
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("eval L_mask against step", "aligned at each run's drop"))
    for i, (run, (_, row)) in enumerate(zip(runs, summary.iterrows())):
        setting = _setting(row, keys)
        color = qualitative.D3[(settings.index(setting) if len(settings) > 1 else i) % len(qualitative.D3)]
        evals = run.metrics.dropna(subset=["eval_loss_mask"])
        label = f"{row.run}" + ("" if pd.notna(row.get("drop_step")) else " (no drop)")
        fig.add_scatter(x=evals.step, y=evals.eval_loss_mask, mode="lines", name=label, legendgroup=row.run,
                        line=dict(color=color, width=1.5, dash="solid" if pd.notna(row.get("drop_step")) else "dot"),
                        row=1, col=1)
        if pd.notna(row.get("drop_step")):
            trained = evals[evals.step > 0]  # the untrained model's loss would clutter the aligned axis
            fig.add_scatter(x=trained.step - row.drop_step, y=trained.eval_loss_mask, mode="lines", name=label,
                            legendgroup=row.run, showlegend=False, line=dict(color=color, width=1.5), row=1, col=2)
    plateau = runs[0].config.data.plateau_mask_loss
    for col in (1, 2):
        fig.add_hline(y=plateau, line=dict(color="gray", dash="dash"), row=1, col=col)
    fig.add_vline(x=0, line=dict(color="gray", dash="dot"), row=1, col=2)
    fig.update_yaxes(type="log", title_text="eval L_mask", row=1, col=1)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="steps from the drop", row=1, col=2)
    return fig.update_layout(template="plotly_white", height=450, margin=dict(t=90, b=40),
                             title=f"{len(runs)} runs; dashed: copy-and-zero level r/9, dotted lines: no drop")


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

SHIPPED_FAMILIES = Path(__file__).resolve().parents[1] / "checkpoints"
_MACHINE_KEYS = ("train.seed", "train.device", "train.threads", "train.dtype", "train.compile")


def _recipe(config) -> dict:
    return {k: v for k, v in _flat_config(config).items() if k not in _MACHINE_KEYS}


def find_family(run: Run, root: str | Path = SHIPPED_FAMILIES) -> Path | None:
    """A shipped family summary (`<root>/*/family_summary.csv` beside the `sweep.yaml` it came from)
    whose trials have `run`'s recipe (its config, seed and machine settings aside); None if none.
    Of several, the one measured on `run`'s machine type comes first (`provenance.same_machine`): the same
    recipe and seed round differently on another CPU, so that family is the one the run belongs to."""
    from mechlrmc.sweep import SweepSpec

    matches = []
    for folder in sorted(Path(root).glob("*/")) if Path(root).is_dir() else []:
        if not ((folder / "family_summary.csv").is_file() and (folder / "sweep.yaml").is_file()):
            continue
        trials = SweepSpec.from_yaml(folder / "sweep.yaml").trials()
        if trials and _recipe(trials[0].config) == _recipe(run.config):
            matches.append(folder)
    mine = run.provenance
    return next((f for f in matches if same_machine(read_provenance(f), mine)), matches[0] if matches else None)


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
