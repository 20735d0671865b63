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
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from analyses.base.walk import analysis_batch
from analyses.family.summary import RunsLike, family_runs, run_identity, setting_label, varied_keys
from analyses.plateau.phases import detect_phases
from mechlrmc.runs import Run

# Criteria of `family_findings`, stated once: the report and the docstring quote these.
PLATEAU_TOL = 0.1  # finding 1: plateau L_mask within 10% of the copy-and-zero level r/9


COPY_RATIO = 0.1  # finding 2: on the plateau, MSE to an inserted value < 10% of MSE to the truth


NUCLEAR_RATIO = 1.5  # finding 3: final masked MSE at most 1.5x nuclear-norm minimisation's


ABLATION_FLOOR = 0.1  # finding 5: largest head effect after the drop >= 10% of r/9 ...


ABLATION_GAIN = 5.0  # ... and >= 5x the largest effect on the plateau


PATCH_BATCH = 64  # finding 6: matrices behind the patching sweep


PERMUTE_BREAKS = 2.0  # finding 8: permuting positions multiplies the final L_mask by >= 2 ...


PERMUTE_HARMLESS = 1.1  # ... and the plateau model's by <= 1.1


PATCH_RECOVERS = 0.5  # finding 6: one layer's attention or MLP output recovers >= half the masked move at the end ...


PATCH_NOTHING = 0.1  # ... while on the plateau clean and corrupted masked outputs differ by < 10% of the end's


PROBE_VALUE = 0.5  # finding 7a: the entry's value decodable (test R^2 >= 0.5) after the last block at the end ...


PROBE_GAIN = 0.1  # ... and >= 0.1 above the embeddings; 7b: the row / singular-vector probe's later layers >= earlier + 0.1


SWAP_LOSS = 0.5  # finding 9: the end model with the plateau's attention loses >= half its gain over the plateau


CRITERIA = {
    "1a": ("plateau at the copy-and-zero level",
           f"plateau L_mask within {PLATEAU_TOL:.0%} of r/9 (E[X^2])"),
    "1b": ("sudden drop within the run", "a drop is detected (analyses.plateau.phases.detect_phases)"),
    "2": ("copying on the plateau",
          f"plateau checkpoint, MASK replaced by a value: MSE to that value < {COPY_RATIO:g} x MSE to the truth"),
    "3": ("completion vs nuclear norm (p_mask 0.3)",
          f"final masked MSE <= {NUCLEAR_RATIO:g} x nuclear-norm minimisation's on the same matrices"),
    "4": ("row and column heads at the end", "final checkpoint has >= 1 row head and >= 1 column head"),
    "5": ("a critical head appears after the drop",
          f"largest single-head zero-ablation increase of L_mask at the end >= {ABLATION_FLOOR:g} x r/9 "
          f"and >= {ABLATION_GAIN:g} x the largest on the plateau"),
    "6": ("patching a layer recovers the answer after the drop",
          f"-X corruption: at the end one layer's attn_out or mlp_out patched from clean recovers >= "
          f"{PATCH_RECOVERS:g} of the masked outputs' move; on the plateau ||clean - corrupted|| at masked "
          f"entries < {PATCH_NOTHING:g} x the end's"),
    "7a": ("the entry's value is read out in later layers",
           f"end: masked-position probe of the value after the last block has test R^2 >= {PROBE_VALUE:g} and >= "
           f"{PROBE_GAIN:g} above the embeddings'"),
    "7b": ("row and singular-vector probes: later layers above earlier",
           f"end: the best R^2 of the row probe and of the u probe in the later half of the layers >= the earlier "
           f"half's + {PROBE_GAIN:g} (both)"),
    "9": ("attention carries the drop (swap)",
          f"the end model with the plateau checkpoint's attention (Q, K, V, O) loses >= {SWAP_LOSS:.0%} of its L_mask "
          "gain over the plateau"),
    "10": ("attention trained alone drops early",
           "attention trained from init with every other component fixed at the end checkpoint reaches half the "
           "plateau L_mask before the full run's drop step (analyses.weights.freeze.half_plateau_step)"),
    "11": ("the intervention moves the drop", "per seed: the run with attention scaled by c > 1 toward the optimal "
           "map drops earlier than the run with c < 1 (a run that never dropped counts as dropping after its end)"),
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
    from analyses.attention.heads import head_taxonomy
    from analyses.causal.ablation import head_ablation_sweep
    from analyses.completion.baselines import compare_baselines
    from analyses.completion.copying import copy_check
    from analyses.representations.embeddings import permuted_position_losses
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
    out += _mechanism_findings(run, batch, plateau_step, final_step, plateau_model, final_model)
    return out


def _mechanism_findings(run: Run, batch, plateau_step: int, final_step: int, plateau_model, final_model) -> list[dict]:
    """Findings 6, 7a, 7b and 9 (patching, probes, swaps) at the plateau and final checkpoints."""
    from analyses.causal.patching import corrupt, patching
    from analyses.representations.probes import probe
    from analyses.weights.swaps import swap_grid

    cfg, out = run.config.data, []
    small = batch[:PATCH_BATCH]
    sites = {"attn_out": ("layer",), "mlp_out": ("layer",)}
    end = patching(final_model, small, cfg, sites=sites)
    best = end.loc[end.recovery_mask.idxmax()]
    masked = small.masked

    def gap(model):
        corrupted = corrupt(small, "negate", cfg)
        return float((model(small.tokens) - model(corrupted.tokens))[masked].norm())

    ratio = gap(plateau_model) / max(gap(final_model), 1e-12)
    out.append(_row("6", f"end {best.site} L{int(best.layer)} recovers {best.recovery_mask:.2f}; plateau move "
                         f"{ratio:.2f} x the end's", best.recovery_mask >= PATCH_RECOVERS and ratio < PATCH_NOTHING,
                    final_step))

    r2 = probe(final_model, batch, targets=("value", "row", "u"))
    r2 = r2[r2.positions == "masked"].pivot_table(index="layer", columns="target", values="r2")
    layers = r2.index.to_numpy()
    late, early = r2[layers > layers.max() / 2], r2[layers <= layers.max() / 2]
    value_last, value_embed = r2.value.iloc[-1], r2.value.iloc[0]
    out.append(_row("7a", f"R^2 {value_last:.2f} after the last block, {value_embed:.2f} at the embeddings",
                    value_last >= PROBE_VALUE and value_last >= value_embed + PROBE_GAIN, final_step))
    gains = {t: late[t].max() - early[t].max() for t in ("row", "u")}
    out.append(_row("7b", f"best R^2 later vs earlier: row {late.row.max():.2f} vs {early.row.max():.2f}; "
                          f"u {late.u.max():.2f} vs {early.u.max():.2f}",
                    all(g >= PROBE_GAIN for g in gains.values()), final_step))

    swaps = swap_grid(run, plateau_step, final_step, components=("attn",), batch=batch, progress=False)
    loss = swaps.set_index(["direction", "components"]).loss_mask
    gain = loss["post->pre", "none"] - loss["pre->post", "none"]
    lost = (loss["pre->post", "attn"] - loss["pre->post", "none"]) / gain if gain > 0 else math.nan
    out.append(_row("9", f"plateau attention in the end model: {lost:.0%} of the gain lost (L_mask "
                         f"{loss['pre->post', 'attn']:.4f} vs {loss['pre->post', 'none']:.4f})",
                    not math.isnan(lost) and lost >= SWAP_LOSS, final_step))
    return out


def _row(finding: str, value: str, reproduced, step) -> dict:
    return {"finding": finding, "value": value, "reproduced": bool(reproduced), "step": step}


def component_training_finding(run: Run, freeze_dir: str | Path) -> dict | None:
    """Finding 10 for one run from its component-wise runs in `freeze_dir/<components>` (as
    `mechlrmc freeze-train RUN --components attn --out freeze_dir/attn` writes them); None without
    an `attn` run there."""
    from analyses.weights.freeze import half_plateau_step

    folder = Path(freeze_dir)
    if not (folder / "attn" / "metrics.csv").is_file():
        return None
    plateau, phases = run.config.data.plateau_mask_loss, detect_phases(run).iloc[0]
    half = {c.name: half_plateau_step(Run(c).evals, plateau) for c in sorted(folder.iterdir())
            if (c / "metrics.csv").is_file()}
    drop = phases.drop_step if phases.dropped else math.inf
    text = "; ".join(f"{c} alone: " + (f"half the plateau at {h}" if h is not None else
                                        f"not below half the plateau by {Run(folder / c).evals.step.max()}")
                     for c, h in half.items())
    return _row("10", f"{text} (full run's drop {drop:.0f})", half["attn"] is not None and half["attn"] < drop,
                math.nan)


def family_findings(source: RunsLike, batch_size: int = 512, n_matrices: int = 64,
                    progress: bool = True, interventions: RunsLike | None = None,
                    freeze: str | Path | None = None) -> pd.DataFrame:
    """Each finding's value and verdict per run: one row per (run, finding) with `finding`,
    `title`, `criterion`, `value`, `reproduced` and the checkpoint used (see `CRITERIA`).

    The plateau checkpoint is `key_steps`' (mid-plateau); "end" is the last checkpoint. A run that
    never dropped is measured the same way, and the after-drop findings then fail for it.
    Findings that need runs of their own are counted where those runs are given: 11 (P5 on a
    token task) from a family varying `train.attn_intervention_scale` (the source itself, or
    `interventions`), and 10 from component-wise runs in `freeze/<run name>/<components>`.
    """
    import torch

    from analyses.family.sequence_findings import SEQUENCE_CRITERIA, intervention_findings, sequence_run_findings
    from analyses.family.summary import family_summary

    runs = family_runs(source)
    keys = varied_keys(runs)
    criteria = {**CRITERIA, **SEQUENCE_CRITERIA}
    rows = []
    for run in tqdm(runs, desc="findings", unit="run", disable=not progress):
        with torch.no_grad():
            matrix_task = "matrix" in run.config.task.supports
            for row in _run_findings(run, batch_size, n_matrices) if matrix_task else sequence_run_findings(run):
                title, criterion = criteria[row["finding"]]
                rows.append({**run_identity(run, keys), **row, "title": title, "criterion": criterion})
        row = component_training_finding(run, Path(freeze) / run.path.name) if freeze is not None else None
        if row is not None:
            rows.append({**run_identity(run, keys), **row, "title": criteria["10"][0], "criterion": criteria["10"][1]})
    name = "11" if "matrix" in runs[0].config.task.supports else "P5"
    compared = family_runs(interventions) if interventions is not None else runs if keys else []
    by_seed = intervention_findings(family_summary(compared), name) if compared else pd.DataFrame()
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
                row[f"reproduced ({setting_label(dict(zip(keys, values)), keys)})"] = _k_of_n(group)
        row["reproduced"] = _k_of_n(part)
        rows.append(row)
    return pd.DataFrame(rows)


def _k_of_n(findings: pd.DataFrame) -> str:
    return f"{int(findings.reproduced.sum())} of {len(findings)}"
