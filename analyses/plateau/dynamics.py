"""What happens during the plateau (docs/FINDINGS.md, P1-P3 and P5, for LRMC), tracked across checkpoints.

- **Repetition**: on the plateau the model writes (nearly) the same value at every masked entry.
  `repetition` measures the spread of its masked predictions within a matrix relative to the true
  spread, and its distance to the constant and copy-and-zero predictors.
- **Representation collapse**: `collapse` is the mean pairwise cosine similarity of the hidden
  states of different positions of one matrix, per layer, over all positions and over masked
  positions only (near 1 = collapsed).
- **Attention progress**: `attention_progress` is, per head, the share of attention that lands on
  the "optimal map" of LRMC: the observed keys in the query's own row or column
  (`mechlrmc.tasks.lrmc.optimal_attention_map`).
- **Intervention**: `compare_interventions` trains runs whose attention is scaled toward that map
  by a factor c (`train.attn_intervention_scale`) and compares their plateau lengths (finding 11:
  learning structure through attention causes the drop).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from analyses.base.walk import Steps, across_checkpoints, analysis_batch
from analyses.completion.baselines import copy_zero_predict
from mechlrmc import measures
from mechlrmc.anatomy import Anatomy, subject_of
from mechlrmc.config import RunConfig
from mechlrmc.errors import OptionError
from mechlrmc.runs import Run
from mechlrmc.tasks.lrmc import Batch, optimal_attention_map


@torch.no_grad()
def repetition(model: torch.nn.Module, batch: Batch) -> pd.DataFrame:
    """One row: how degenerate the masked predictions are.

    - `spread_ratio`: mean over matrices of the variance of the predictions across a matrix's
      masked entries, divided by the same for the true values (0: one value repeated; 1: as
      varied as the truth);
    - `dist_constant`: mean squared distance of masked predictions to their batch mean (the best
      constant predictor);
    - `dist_copy_zero`: MSE between the model and the copy-and-zero predictor over all entries
      (0 on the plateau, finding 2)."""
    device = next(model.parameters()).device
    pred = measures.logits_of(model)(batch.tokens.to(device)).float().cpu()  # [b, pos]
    masked = batch.masked.cpu()
    values = batch.values.float().cpu()
    masked_pred = pred[masked]
    return pd.DataFrame([{
        "spread_ratio": measures.prediction_spread_ratio(pred, values, masked),
        "dist_constant": float(((masked_pred - masked_pred.mean()) ** 2).mean()),
        "dist_copy_zero": float(((pred - copy_zero_predict(batch.to("cpu"))) ** 2).mean()),
    }])


def hidden_state_parts(anatomy: Anatomy) -> list[str]:
    """The anatomy parts of the hidden states: the input of every block, then the final output
    (layer 0 = embeddings, layer l = output of block l)."""
    return ["embed", *[f"resid.{layer}" for layer in range(anatomy.n_layers - 1)], "final"]


@torch.no_grad()
def collapse(model: torch.nn.Module, batch: Batch, anatomy: Anatomy | None = None) -> pd.DataFrame:
    """Per layer (0 = embeddings, l = output of block l): mean pairwise cosine similarity of
    hidden states across the positions of a matrix, over all positions (`cos_all`) and over
    masked positions only (`cos_masked`). Near 1 = representation collapse (docs/FINDINGS.md, P2).
    Any model, through its anatomy."""
    model, anatomy = subject_of(model, anatomy)
    device = next(model.parameters()).device
    keys = hidden_state_parts(anatomy)
    _, acts = anatomy.run(model, batch.tokens.to(device), read=keys)
    masked = batch.masked.to(device)
    return pd.DataFrame([
        {"layer": layer, "cos_all": measures.mean_pairwise_cosine(acts[key]),
         "cos_masked": measures.mean_pairwise_cosine(acts[key], masked)}
        for layer, key in enumerate(keys)
    ])


@torch.no_grad()
def attention_progress(model: torch.nn.Module, batch: Batch, anatomy: Anatomy | None = None) -> pd.DataFrame:
    """Per (layer, head): share of attention on the optimal LRMC map (observed keys in the query's
    row or column), averaged over all queries (`share_on_map`) and over masked queries
    (`share_on_map_masked`); `uniform_share` is what uniform attention would give."""
    model, anatomy = subject_of(model, anatomy)
    device = next(model.parameters()).device
    _, acts = anatomy.run(model, batch.tokens.to(device), read=[f"pattern.{l}" for l in range(anatomy.n_layers)])
    on_map = optimal_attention_map(batch.observed.to(device), batch.m, batch.n).float()  # [b, q, k]
    masked = batch.masked.to(device)  # [b, q]
    uniform = float(on_map.mean(-1).mean())
    rows = []
    for layer, pattern in enumerate(anatomy.patterns(acts)):  # [b, head, q, k]
        every = measures.attention_share(pattern, on_map, queries=torch.ones_like(masked))  # [head]
        on_masked = measures.attention_share(pattern, on_map, queries=masked)
        for head in range(pattern.shape[1]):
            rows.append({"layer": layer, "head": head, "share_on_map": float(every[head]),
                         "share_on_map_masked": float(on_masked[head]), "uniform_share": uniform})
    return pd.DataFrame(rows)


def track_dynamics(
    run: Run, steps: Steps = None, batch: Batch | None = None, batch_size: int = 256, progress: bool = True
) -> dict[str, pd.DataFrame]:
    """`repetition`, `collapse` and `attention_progress` at the selected checkpoints, each with a
    `step` column, keyed by name."""
    batch = analysis_batch(run, batch_size) if batch is None else batch
    return {fn.__name__: across_checkpoints(run, fn, steps=steps, batch=batch, progress=progress)
            for fn in (repetition, collapse, attention_progress)}


def dynamics_summary(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per step of `track_dynamics` frames: the `repetition` columns, the masked-position
    collapse of the last hidden state (`cos_masked_last_layer`) and the largest share any head puts
    on the optimal map (`best_head_share_on_map`): the plateau's three signatures side by side."""
    collapsed = frames["collapse"]
    last = collapsed[collapsed.layer == collapsed.layer.max()].set_index("step")
    table = frames["repetition"].set_index("step")
    table["cos_masked_last_layer"] = last.cos_masked
    table["best_head_share_on_map"] = frames["attention_progress"].groupby("step").share_on_map.max()
    return table.reset_index()


def intervention_runs(
    cfg: RunConfig, scales: list[float], steps: int, out_dir: str | Path, start: int = 0, progress: bool = True
) -> dict[float, Run]:
    """Train `cfg` for `steps` steps once per attention scale c (`train.attn_intervention_scale`,
    from step `start`) into `out_dir/c{c}`, as one family on Ray Tune (`mechlrmc.sweep.launch`):
    runs already finished are reused, interrupted ones resumed, and the runs train side by side."""
    from mechlrmc.sweep import launch_runs
    from mechlrmc.trials import Trial

    threads = cfg.train.threads or 1
    trials = [Trial(f"c{scale:g}", cfg.override({
        "train.steps": steps, "train.attn_intervention_scale": float(scale), "train.attn_intervention_start": start,
        "train.threads": threads}), {"scale": float(scale)}) for scale in scales]
    runs = launch_runs(trials, out_dir, cpus_per_trial=threads, progress=progress)
    return {float(scale): runs[trial.name] for scale, trial in zip(scales, trials)}


def intervention_summary(runs: list[Run]) -> pd.DataFrame:
    """One row per run: its attention scale c and start step, its phases
    (`analyses.plateau.phases.detect_phases`: plateau end, drop step, whether it dropped) and its final
    evaluation losses, sorted by c."""
    from analyses.plateau.phases import detect_phases

    rows = []
    for run in runs:
        last = run.evals.iloc[-1]
        phases = detect_phases(run).iloc[0]
        tc = run.config.train
        rows.append({"scale": tc.attn_intervention_scale, "start": tc.attn_intervention_start,
                     "plateau_end": phases.plateau_end, "drop_step": phases.drop_step, "dropped": phases.dropped,
                     "plateau_loss_mask": phases.plateau_loss_mask, "final_step": int(last.step),
                     "final_loss_mask": last.eval_loss_mask, "final_corr_mask": last.eval_corr_mask,
                     "run": str(run.path)})
    return pd.DataFrame(rows).sort_values("scale", ignore_index=True)


def compare_interventions(
    cfg: RunConfig, scales: list[float], steps: int, out_dir: str | Path, start: int = 0, progress: bool = True
) -> pd.DataFrame:
    """Plateau length against the attention scale c (docs/FINDINGS.md, P5, and finding 11): trains
    (or reuses) one run per c (`intervention_runs`) and summarises them (`intervention_summary`).
    c > 1 pulls every head toward the optimal map, c < 1 pushes it away."""
    return intervention_summary(list(intervention_runs(cfg, scales, steps, out_dir, start, progress).values()))


def load_interventions(out_dir: str | Path) -> pd.DataFrame:
    """`intervention_summary` of every run directory under `out_dir` (e.g. a finished
    `compare_interventions` directory, plus any plain run copied beside it as c = 1)."""
    paths = sorted(p for p in Path(out_dir).iterdir() if (p / "config.yaml").is_file())
    if not paths:
        raise OptionError(f"{out_dir} holds no run directories: allowed a folder of runs, e.g. from `mechlrmc analyze intervention`")
    return intervention_summary([Run(p) for p in paths])
