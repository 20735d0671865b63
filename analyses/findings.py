"""Findings across seeds: each finding with a numeric criterion (docs/FINDINGS.md), measured per run
of a family and counted as "reproduced in k of N".

- `family_findings(runs)`: each finding's value and verdict per run (criteria in `CRITERIA`, thresholds
  in the constants below; docs/FINDINGS.md quotes them).
- `findings_table(findings)`: one row per finding, a column per run, and "k of N" over the family
  and within each setting.
- `key_steps(run)`: the plateau and final checkpoints the findings are measured at.
"""

from __future__ import annotations

import math

import pandas as pd
from tqdm.auto import tqdm

from analyses.family import RunsLike, _identity, _setting, family_runs, varied_keys
from analyses.phases import detect_phases
from analyses.walk import analysis_batch
from mechlrmc.runs import Run

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
    from mechlrmc.tasks.lrmc import split_losses

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

    from analyses.family import family_summary
    from analyses.sequence_findings import SEQUENCE_CRITERIA, intervention_findings, sequence_run_findings

    runs = family_runs(source)
    keys = varied_keys(runs)
    criteria = {**CRITERIA, **SEQUENCE_CRITERIA}
    rows = []
    for run in tqdm(runs, desc="findings", unit="run", disable=not progress):
        with torch.no_grad():
            token_task = "eval_loss_mask" not in run.metrics
            for row in sequence_run_findings(run) if token_task else _run_findings(run, batch_size, n_matrices):
                title, criterion = criteria[row["finding"]]
                rows.append({**_identity(run, keys), **row, "title": title, "criterion": criterion})
    by_seed = intervention_findings(family_summary(runs)) if keys else pd.DataFrame()
    for row in by_seed.to_dict("records"):  # one row per seed: the pair of runs it compares
        title, criterion = criteria[row["finding"]]
        rows.append({**{k: "" for k in ["run", *keys]}, **row, "title": title, "criterion": criterion})
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
