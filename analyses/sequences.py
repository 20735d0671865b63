"""The plateau paper's measurements in their own definitions, on its sequence tasks (docs/FINDINGS.md,
P1-P4): any task of `mechlrmc.tasks.tokens` (mws, prefix_sum, reverse, or a user's own), i.e. one
whose batch holds whole sequences (`prompt`, `outputs`, `scored`) and that has an optimal
attention map.

- `repetition_native(model, batch)`: the 16 outputs generated greedily from the prompt; the
  fraction of consecutive equal outputs, beside the same for the true outputs (P1);
- `collapse_native(model, batch)`: the mean pairwise cosine of the hidden states across the
  scored positions, after every layer and after the final LayerNorm (P2);
- `attention_progress_native(model, batch)`: per head, the share of |attention| on the task's
  optimal map over the query rows that have one (P3);
- `partial_solution(model, batch)`: the accuracy of each output position, greedy and
  teacher-forced (P4).
Each is a view of `native_measures`, which computes all four from one greedy generation and one
cached forward (what the report walks over the checkpoints).
`sequence_phases(run)` finds the plateau and the drop on the outputs' cross-entropy. The LRMC
analogues of these measures are in `analyses.dynamics`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analyses.lm_checkpoints import mean_pairwise_cosine
from mechlrmc.errors import OptionError
from mechlrmc.runs import Run
from mechlrmc.tasks import get_task
from mechlrmc.tasks.tokens import generate


def _task(batch):
    return get_task(batch.cfg.task)


def repetition_native(model, batch) -> pd.DataFrame:
    """One row: `rep` of the greedy outputs, `rep_true` of the truth, and the greedy accuracy."""
    return native_measures(model, batch)["repetition"]


def collapse_native(model, batch) -> pd.DataFrame:
    """Per layer (`layer` l: after block l; `final`: after the final LayerNorm): `cos_scored`,
    the mean pairwise cosine of hidden states across the scored positions."""
    return native_measures(model, batch)["collapse"]


def attention_progress_native(model, batch) -> pd.DataFrame:
    """Per (layer, head): `share_on_map`, the share of |attention| on the optimal map, averaged
    over the query rows that have optimal cells and over the batch."""
    return native_measures(model, batch)["attention_progress"]


def partial_solution(model, batch) -> pd.DataFrame:
    """Per output position (1-based): the accuracy of the greedy outputs and the teacher-forced one."""
    return native_measures(model, batch)["partial_solution"]


# ----- the plateau and the drop ------------------------------------------------------------------

def sequence_phases(run: Run, window: int = 3, tol: float = 0.1) -> pd.DataFrame:
    """One row, as `detect_phases` gives for LRMC: plateau start/end and level of the outputs'
    cross-entropy (`eval_loss_out`), the drop step (the steepest descent of its smoothed log,
    after the first evaluation), whether the run dropped (post-drop level below 1 - 2 tol of the
    plateau), the task's analytic plateau levels (`analytic_*`, `Task.plateau`), and the greedy
    accuracy and repetition on the plateau and at the end."""
    evals = run.evals.sort_values("step").reset_index(drop=True)
    if "eval_loss_out" not in evals or len(evals) < 3:
        raise OptionError(f"{run.path}: sequence phases need at least 3 evaluations of eval_loss_out")
    from analyses.phases import steepest_drop  # phases imports this module for token runs

    steps = evals.step.to_numpy()
    log_loss = np.log(evals.eval_loss_out.to_numpy())
    smooth, drop_index, plateau, post, dropped = steepest_drop(steps, log_loss, window, tol)
    band = np.flatnonzero(np.abs(np.exp(smooth[:drop_index]) / plateau - 1) <= tol)
    band = band[band >= 1]
    before = evals.iloc[band[0]:band[-1] + 1] if len(band) else evals.iloc[1:drop_index]
    return pd.DataFrame([{
        "plateau_start": int(steps[band[0]]) if len(band) else math.nan,
        "plateau_end": int(steps[band[-1]]) if len(band) else math.nan,
        "drop_step": int(steps[drop_index]) if dropped else math.nan,
        "dropped": dropped,
        "plateau_loss_out": plateau,
        **{f"analytic_{k}": v for k, v in get_task(run.config.data.task).plateau(run.config.data).items()},
        "post_drop_loss_out": post,
        "plateau_greedy_acc": float(before.eval_greedy_acc.median()),
        "plateau_max_rep": float(before.eval_rep.max()),
        "rep_true": float(evals.eval_rep_true.median()),
        "final_greedy_acc": float(evals.eval_greedy_acc.iloc[-1]),
        "final_step": int(steps[-1]),
    }])


def plot_sequence_phases(run: Run, phases: pd.DataFrame) -> go.Figure:
    """Output cross-entropy (log), greedy accuracy, repetition (model and truth), attention on the
    optimal map and collapse from the run's evaluations, with the plateau and the drop marked."""
    p, evals = phases.iloc[0], run.evals
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.45, 0.55])
    fig.add_scatter(x=evals.step, y=evals.eval_loss_out, name="output cross-entropy", row=1, col=1,
                    line=dict(color="#d62728", width=2.5))
    fig.add_scatter(x=evals.step, y=evals.eval_loss, name="cross-entropy, all positions", row=1, col=1,
                    line=dict(color="#1f77b4", width=1.5))
    for column, name, color, dash in (("eval_greedy_acc", "greedy output accuracy", "#2ca02c", "solid"),
                                      ("eval_rep", "repetition of greedy outputs", "#ff7f0e", "solid"),
                                      ("eval_rep_true", "repetition of the truth", "#ff7f0e", "dot"),
                                      ("eval_attn_on_map", "attention on the optimal map", "#9467bd", "solid"),
                                      ("eval_collapse", "collapse (mean cosine)", "#8c564b", "solid")):
        if column in evals:
            fig.add_scatter(x=evals.step, y=evals[column], name=name, row=2, col=1, line=dict(color=color, dash=dash))
    for column, text, where in (("analytic_loss_out", "no information", "top right"),
                                ("analytic_loss_out_first_solved", "output 1 solved, the rest marginal", "bottom right")):
        if column in p and not pd.isna(p[column]):
            fig.add_hline(y=p[column], line_dash="dash", line_color="gray", line_width=1, row=1, col=1,
                          annotation_text=f"{text} {p[column]:.3f}", annotation_position=where)
    for name in ("plateau_start", "plateau_end", "drop_step"):
        if not pd.isna(p[name]):
            fig.add_vline(x=p[name], line_dash="dot", line_color="gray", annotation_text=name.replace("_", " "))
    fig.update_yaxes(type="log", title_text="cross-entropy", row=1, col=1)
    fig.update_yaxes(title_text="share / accuracy", range=[-0.02, 1.02], row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    drop = f"drop at step {int(p.drop_step)}" if p.dropped else "no drop"
    return fig.update_layout(template="plotly_white", height=650, title=f"{run.path.name}: {drop}; plateau greedy "
                             f"accuracy {p.plateau_greedy_acc:.2f}, repetition up to {p.plateau_max_rep:.2f} "
                             f"(truth {p.rep_true:.2f})")


def plot_native_dynamics(tables: dict[str, pd.DataFrame], drop_step: float | None = None) -> go.Figure:
    """Four panels across checkpoints: repetition (model and truth), collapse per layer, attention
    on the optimal map per head, and the accuracy of each output position (greedy)."""
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.14, horizontal_spacing=0.08,
                        subplot_titles=("repetition of greedy outputs (P1)", "collapse: mean cosine of hidden states (P2)",
                                        "attention on the optimal map (P3)", "greedy accuracy per output position (P4)"))
    rep = tables["repetition"]
    fig.add_scatter(x=rep.step, y=rep.rep, name="model", row=1, col=1, line=dict(color="#ff7f0e"))
    fig.add_scatter(x=rep.step, y=rep.rep_true, name="truth", row=1, col=1, line=dict(color="#ff7f0e", dash="dot"))
    for layer, part in tables["collapse"].groupby("layer", sort=False):
        fig.add_scatter(x=part.step, y=part.cos_scored, name=f"layer {layer}", row=1, col=2)
    for (layer, head), part in tables["attention_progress"].groupby(["layer", "head"]):
        fig.add_scatter(x=part.step, y=part.share_on_map, name=f"L{layer}H{head}", row=2, col=1)
    grid = tables["partial_solution"].pivot(index="position", columns="step", values="greedy_acc")
    fig.add_heatmap(z=grid.to_numpy(), x=[str(s) for s in grid.columns], y=grid.index, colorscale="Viridis",
                    zmin=0, zmax=1, colorbar=dict(title="accuracy", x=1.02, y=0.22, len=0.45), row=2, col=2)
    if drop_step is not None and not pd.isna(drop_step):
        for row, col in ((1, 1), (1, 2), (2, 1)):
            fig.add_vline(x=drop_step, line_dash="dot", line_color="red", row=row, col=col)
    fig.update_yaxes(title_text="output position", row=2, col=2)
    return fig.update_layout(template="plotly_white", height=750, title="The plateau paper's measurements across "
                             "checkpoints (dotted red: the drop)")


# ----- registry entries (analyses.registry) ---------------------------------------------------------

DYNAMICS_BATCH = 128  # sequences per checkpoint (the paper measured on 64)


@torch.no_grad()
def native_measures(model, batch) -> dict[str, pd.DataFrame]:
    """The four measures above at one checkpoint from ONE greedy generation and ONE cached forward."""
    generated = generate(model, batch.prompt, batch.length)
    truth = batch.outputs
    names = {f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)}
    names |= {f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)}
    logits, cache = model.run_with_cache(batch.tokens, names_filter=lambda name: name in names)
    scored = batch.scored
    repetition = pd.DataFrame([{"rep": float((generated[:, 1:] == generated[:, :-1]).float().mean()),
                                "rep_true": float((truth[:, 1:] == truth[:, :-1]).float().mean()),
                                "greedy_acc": float((generated == truth).float().mean())}])
    collapse = [{"layer": str(l), "cos_scored": mean_pairwise_cosine(cache[f"blocks.{l}.hook_resid_post"][:, scored])}
                for l in range(model.cfg.n_layers)]
    if getattr(model, "ln_final", None) is not None:
        final = model.ln_final(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])
        collapse.append({"layer": "final", "cos_scored": mean_pairwise_cosine(final[:, scored])})
    progress = _map_shares(cache, batch, model.cfg.n_layers)
    forced = (logits[:, scored].argmax(-1) == batch.targets[:, scored]).float().mean(0)
    partial = pd.DataFrame({"position": np.arange(1, batch.length + 1),
                            "greedy_acc": (generated == truth).float().mean(0).cpu().numpy(),
                            "forced_acc": forced.cpu().numpy()})
    return {"repetition": repetition, "collapse": pd.DataFrame(collapse),
            "attention_progress": progress, "partial_solution": partial}


def _map_shares(cache, batch, n_layers: int) -> pd.DataFrame:
    """Per (layer, head): the share of |attention| on the optimal map (P3), from cached patterns."""
    on_map = _task(batch).optimal_attention_map(batch).to(batch.tokens.device)
    rows = on_map.any(-1).any(0)
    progress = []
    for layer in range(n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].abs()[:, :, rows]
        share = (pattern * on_map[:, None, rows]).sum(-1) / pattern.sum(-1).clamp_min(1e-12)
        progress += [{"layer": layer, "head": h, "share_on_map": float(share[:, h].mean())} for h in range(share.shape[1])]
    return pd.DataFrame(progress)


@torch.no_grad()
def head_map_share(model, batch) -> pd.DataFrame:
    """Per (layer, head): `share_on_map` (as `attention_progress_native`, from one forward, no
    generation) and a `label` "map 0.72" for attention views and the scrubber."""
    names = {f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(batch.tokens, names_filter=lambda name: name in names)
    shares = _map_shares(cache, batch, model.cfg.n_layers)
    return shares.assign(label=[f"map {s:.2f}" for s in shares.share_on_map])


def plateau_dynamics_tables(ctx) -> dict[str, pd.DataFrame]:
    """Every measure at every checkpoint (or the asked ones), on `DYNAMICS_BATCH` sequences."""
    from tqdm.auto import tqdm

    batch, parts = ctx.batch[:DYNAMICS_BATCH], {}
    for step in tqdm(ctx.every_step, desc="plateau dynamics", unit="ckpt", disable=not ctx.progress):
        for name, frame in native_measures(ctx.model(step), batch).items():
            parts.setdefault(name, []).append(frame.assign(step=step))
    tables = {name: pd.concat(frames, ignore_index=True) for name, frames in parts.items()}
    return {name: t[["step", *[c for c in t if c != "step"]]] for name, t in tables.items()}


def plateau_dynamics_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    rep = tables["repetition"].set_index("step")
    plateau = rep.loc[[s for s in rep.index if s in _plateau_steps(ctx)]]
    note = (f"<p>{min(len(ctx.batch), DYNAMICS_BATCH)} sequences generated greedily from the prompt at each of {len(rep)} checkpoints. "
            f"On the plateau the greedy outputs repeat at up to {plateau.rep.max():.2f} against the truth's "
            f"{rep.rep_true.median():.2f}; at the end {rep.rep.iloc[-1]:.2f}.</p>" if len(plateau) else "")
    return {"note": note, "plateau_dynamics": plot_native_dynamics(tables, ctx.phases.drop_step),
            "repetition_table": tables["repetition"]}


def _plateau_steps(ctx) -> list[int]:
    p = ctx.phases
    if pd.isna(p.plateau_start):
        return []
    end = p.drop_step if p.dropped else p.final_step
    return [s for s in ctx.run.steps if p.plateau_start <= s < end]
