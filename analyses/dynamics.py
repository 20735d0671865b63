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
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from analyses.baselines import copy_zero_predict
from analyses.walk import Steps, across_checkpoints, analysis_batch
from mechlrmc.config import RunConfig
from mechlrmc.tasks.lrmc import Batch
from mechlrmc.errors import OptionError
from mechlrmc.tasks.lrmc import optimal_attention_map
from mechlrmc.model import HookedEncoder
from mechlrmc.runs import Run


def _masked_var(x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Variance of x over the masked entries of each row [batch] (rows with < 2 masked: NaN)."""
    count = masked.sum(-1).float()
    mean = (x * masked).sum(-1) / count
    var = (((x - mean[:, None]) ** 2) * masked).sum(-1) / (count - 1)
    return torch.where(count >= 2, var, torch.nan)


@torch.no_grad()
def repetition(model: HookedEncoder, batch: Batch) -> pd.DataFrame:
    """One row: how degenerate the masked predictions are.

    - `spread_ratio`: mean over matrices of the variance of the predictions across a matrix's
      masked entries, divided by the same for the true values (0: one value repeated; 1: as
      varied as the truth);
    - `dist_constant`: mean squared distance of masked predictions to their batch mean (the best
      constant predictor);
    - `dist_copy_zero`: MSE between the model and the copy-and-zero predictor over all entries
      (0 on the plateau, finding 2)."""
    device = next(model.parameters()).device
    pred = model(batch.tokens.to(device)).float().cpu()  # [b, pos]
    masked = batch.masked.cpu()
    values = batch.values.float().cpu()
    spread_pred, spread_true = _masked_var(pred, masked), _masked_var(values, masked)
    keep = ~spread_true.isnan()
    masked_pred = pred[masked]
    return pd.DataFrame([{
        "spread_ratio": float(spread_pred[keep].mean() / spread_true[keep].mean()),
        "dist_constant": float(((masked_pred - masked_pred.mean()) ** 2).mean()),
        "dist_copy_zero": float(((pred - copy_zero_predict(batch.to("cpu"))) ** 2).mean()),
    }])


def hidden_state_names(model: HookedEncoder) -> list[str]:
    """Hook names of the hidden states: the input of every block, then the final output
    (layer 0 = embeddings, layer l = output of block l)."""
    final = "ln_final.hook_normalized" if model.cfg.norm == "pre" else \
        f"blocks.{model.cfg.n_layers - 1}.hook_normalized_resid_post"
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)] + [final]


def _mean_pairwise_cosine(h: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean cosine similarity over pairs of distinct kept positions of the same matrix.
    h [b, pos, d], keep [b, pos] bool."""
    unit = torch.nn.functional.normalize(h.float(), dim=-1)
    cos = unit @ unit.transpose(1, 2)  # [b, pos, pos]
    pairs = keep[:, :, None] & keep[:, None, :]
    pairs &= ~torch.eye(h.shape[1], dtype=torch.bool, device=h.device)
    return float(cos[pairs].mean()) if pairs.any() else float("nan")


@torch.no_grad()
def collapse(model: HookedEncoder, batch: Batch) -> pd.DataFrame:
    """Per layer (0 = embeddings, l = output of block l): mean pairwise cosine similarity of
    hidden states across the positions of a matrix, over all positions (`cos_all`) and over
    masked positions only (`cos_masked`). Near 1 = representation collapse (docs/FINDINGS.md, P2)."""
    device = next(model.parameters()).device
    names = hidden_state_names(model)
    _, cache = model.run_with_cache(batch.tokens.to(device), names_filter=lambda n: n in names)
    masked = batch.masked.to(device)
    every = torch.ones_like(masked)
    return pd.DataFrame([
        {"layer": layer, "cos_all": _mean_pairwise_cosine(cache[name], every),
         "cos_masked": _mean_pairwise_cosine(cache[name], masked)}
        for layer, name in enumerate(names)
    ])


@torch.no_grad()
def attention_progress(model: HookedEncoder, batch: Batch) -> pd.DataFrame:
    """Per (layer, head): share of attention on the optimal LRMC map (observed keys in the query's
    row or column), averaged over all queries (`share_on_map`) and over masked queries
    (`share_on_map_masked`); `uniform_share` is what uniform attention would give."""
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(batch.tokens.to(device), names_filter=lambda n: n.endswith("hook_pattern"))
    on_map = optimal_attention_map(batch.observed.to(device), batch.m, batch.n).float()  # [b, q, k]
    masked = batch.masked.to(device).float()  # [b, q]
    uniform = float(on_map.mean(-1).mean())
    rows = []
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float()  # [b, head, q, k]
        share = (pattern * on_map[:, None]).sum(-1)  # [b, head, q]
        on_masked = (share * masked[:, None]).sum((0, 2)) / masked.sum().clamp(min=1)  # [head]
        for head in range(model.cfg.n_heads):
            rows.append({"layer": layer, "head": head, "share_on_map": float(share[:, head].mean()),
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


def plot_dynamics(frames: dict[str, pd.DataFrame], metrics: pd.DataFrame | None = None) -> go.Figure:
    """Three panels against training step: repetition (with the masked-entry correlation when
    `metrics` is given), collapse of masked positions per layer (all positions dotted), and the
    attention share on the optimal map of the best head of every block."""
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.06, subplot_titles=(
        "repetition: masked spread / true spread", "collapse: mean pairwise cosine",
        "attention share on the optimal map"))
    rep = frames["repetition"]
    fig.add_scatter(x=rep.step, y=rep.spread_ratio, name="spread ratio", legendgroup="rep",
                    legendgrouptitle_text="repetition", mode="lines+markers", line_color="#1f77b4", row=1, col=1)
    if metrics is not None:
        ev = metrics.dropna(subset=["eval_corr_mask"])
        ev = ev[ev.step <= rep.step.max()]
        fig.add_scatter(x=ev.step, y=ev.eval_corr_mask, name="corr (masked)", legendgroup="rep",
                        mode="lines", line_dash="dot", line_color="black", row=1, col=1)
    col = frames["collapse"]
    depth = sample_colorscale("Viridis", [i / max(col.layer.max(), 1) * 0.85 for i in range(col.layer.max() + 1)])
    for layer, part in col.groupby("layer"):
        name = "embeddings" if layer == 0 else f"after block {layer - 1}"
        fig.add_scatter(x=part.step, y=part.cos_masked, name=name, legendgroup="collapse",
                        legendgrouptitle_text="collapse (masked; dotted: all)", mode="lines+markers",
                        line_color=depth[layer], row=1, col=2)
        fig.add_scatter(x=part.step, y=part.cos_all, name=name, legendgroup="collapse", showlegend=False,
                        mode="lines", line=dict(color=depth[layer], dash="dot"), row=1, col=2)
    att = frames["attention_progress"]
    best = att.groupby(["step", "layer"]).share_on_map.max().reset_index()
    for layer, part in best.groupby("layer"):
        fig.add_scatter(x=part.step, y=part.share_on_map, name=f"block {layer}", legendgroup="attn",
                        legendgrouptitle_text="best head of", mode="lines+markers",
                        line_color=qualitative.Set2[layer % len(qualitative.Set2)], row=1, col=3)
    chance = att.groupby("step").uniform_share.first()
    fig.add_scatter(x=chance.index, y=chance.values, name="uniform attention", legendgroup="attn",
                    mode="lines", line_dash="dash", line_color="gray", row=1, col=3)
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=420, margin=dict(t=40, b=40), legend=dict(groupclick="toggleitem"))
    return fig


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
    (`analyses.phases.detect_phases`: plateau end, drop step, whether it dropped) and its final
    evaluation losses, sorted by c."""
    from analyses.phases import detect_phases

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


def plot_interventions(frame: pd.DataFrame) -> go.Figure:
    """Evaluation L_mask of every intervention run (log scale), drop steps marked."""
    fig = go.Figure()
    for row in frame.itertuples():
        ev = Run(row.run).evals
        label = f"c = {row.scale:g}" + (f" (drop at {row.drop_step:g})" if row.dropped else " (no drop)")
        fig.add_scatter(x=ev.step, y=ev.eval_loss_mask, name=label, mode="lines+markers")
    fig.update_layout(height=380, margin=dict(t=30, b=40), xaxis_title="step",
                      yaxis_title="eval L_mask", yaxis_type="log")
    return fig


# ----- registry entries (analyses.registry) -----------------------------------------------------

DYNAMICS_BATCH = 256


def dynamics_tables(ctx) -> dict[str, pd.DataFrame]:
    batch = ctx.batch[:DYNAMICS_BATCH]
    return {fn.__name__: ctx.walk(fn, batch=batch) for fn in (repetition, collapse, attention_progress)}


def dynamics_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    return {"dynamics": plot_dynamics(tables, ctx.run.metrics), "dynamics_summary": dynamics_summary(tables)}


def interventions_tables(ctx) -> dict[str, pd.DataFrame]:
    return {"interventions": load_interventions(ctx.interventions)}


def interventions_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    frame = tables["interventions"]
    return {"interventions": plot_interventions(frame), "interventions_table": frame.drop(columns="run")}
