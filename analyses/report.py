"""One standalone HTML report of a run: every analysis of the toolkit, one section per finding.

`write_report(run, "report.html")` computes each section's tables and figures and writes ONE file
that opens offline: plotly's JS is inlined once in the head, the attention views are circuitsvis
pages (their JS inlined) in `srcdoc` iframes. Each section carries one line saying what it shows
and the PAPER.md finding it reproduces. A section whose analysis fails shows the error in place
(`data-status="error"`) and the others are still written; `Report.errors` lists the failures.

`quick=True` shrinks batches, step counts and solver work for tests and smoke checks.
"""

from __future__ import annotations

import html
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from analyses.walk import across_checkpoints, analysis_batch
from mechlrmc.runs import Run, atomic_write

Part = go.Figure | pd.DataFrame | str


@dataclass
class Budget:
    """How much work each section does."""

    n_steps: int  # checkpoints walked, spread around the drop
    batch_size: int  # matrices per analysis batch
    n_matrices: int  # matrices per nuclear-norm comparison (per p_mask / OOD variant)
    patch_batch: int  # matrices in the patching sweeps


FULL = Budget(n_steps=7, batch_size=512, n_matrices=128, patch_batch=64)
QUICK = Budget(n_steps=4, batch_size=128, n_matrices=24, patch_batch=16)


@dataclass
class Context:
    """The run and everything sections share, computed once on first use."""

    run: Run
    budget: Budget
    device: str = "cpu"
    progress: bool = True
    interventions: Path | None = None
    family: Path | None = None  # a shipped family summary this run's recipe belongs to

    @cached_property
    def phases(self) -> pd.Series:
        from analyses.phases import detect_phases

        return detect_phases(self.run).iloc[0]

    @cached_property
    def steps(self) -> list[int]:
        from analyses.phases import steps_around_drop

        return steps_around_drop(self.run, self.budget.n_steps)

    @cached_property
    def batch(self):
        return analysis_batch(self.run, self.budget.batch_size)

    @property
    def final(self) -> int:
        return self.run.steps[-1]

    @cached_property
    def moments(self) -> dict[str, int]:
        """Checkpoints before (mid-plateau), at and after (last) the drop."""
        p, steps = self.phases, self.run.steps
        if not p.dropped:
            return {"start": steps[0], "middle": self.run.nearest_step(steps[-1] // 2), "end": steps[-1]}
        start = steps[1] if len(steps) > 1 else steps[0]
        before = self.run.nearest_step((start + p.drop_step) / 2)
        return {"plateau": before, "drop": self.run.nearest_step(p.drop_step), "after": steps[-1]}

    @property
    def quick(self) -> bool:
        return self.budget is QUICK

    def model(self, step: int):
        return self.run.load_model(step, device=self.device)

    def walk(self, fn: Callable, **kwargs) -> pd.DataFrame:
        return across_checkpoints(self.run, fn, steps=self.steps, batch=self.batch, device=self.device,
                                  progress=self.progress, **kwargs)

    @cached_property
    def taxonomy(self) -> pd.DataFrame:
        from analyses.heads import head_taxonomy

        steps = sorted({*self.steps, *self.moments.values()})
        return across_checkpoints(self.run, head_taxonomy, steps=steps, batch=self.batch, device=self.device,
                                  progress=self.progress)


# ----- sections: each returns the parts to show -----------------------------------------------

def _overview(ctx: Context) -> list[Part]:
    cfg = ctx.run.config
    p = ctx.phases
    facts = pd.DataFrame([
        ("task", f"{cfg.data.m} x {cfg.data.n} rank-{cfg.data.rank} matrices, {cfg.data.distribution} factors, "
                 f"p_mask {cfg.data.p_mask}"),
        ("model", f"post-LN BERT, {cfg.model.n_layers} layers x {cfg.model.n_heads} heads, d_model "
                  f"{cfg.model.d_model}, d_mlp {cfg.model.d_mlp}" if cfg.model.norm == "post" else
         f"pre-LN encoder, {cfg.model.n_layers} layers x {cfg.model.n_heads} heads, d_model {cfg.model.d_model}"),
        ("training", f"{cfg.train.steps} steps, batch {cfg.train.batch_size}, Adam lr {cfg.train.lr:g}"),
        ("checkpoints", f"{len(ctx.run.steps)}: {ctx.run.steps}"),
        ("walked in this report", f"{ctx.steps}"),
        ("plateau", f"L_mask {p.plateau_loss_mask:.4g} = {p.plateau_over_analytic:.2f} x the copy-and-zero "
                    f"level {p.analytic_loss_mask:.4g}, from step {p.plateau_start} to {p.plateau_end}"),
        ("drop", f"at step {p.drop_step}; L_mask after it {p.post_drop_loss_mask:.4g}" if p.dropped
         else "no drop detected"),
    ], columns=["", "value"])
    return [facts]


def _machines(ctx: Context) -> str:
    """Whether the family was measured on this run's machine type (a seed's numbers match only there)."""
    from mechlrmc.provenance import MACHINE_FIELDS, same_machine
    from mechlrmc.runs import read_provenance

    family, mine = read_provenance(ctx.family), ctx.run.provenance

    def name(p: dict) -> str:
        return f"{p.get('device', '?')}, {', '.join(str(p.get(k, '?')) for k in MACHINE_FIELDS)}"

    if family is None:
        return "The family's machine type is not recorded."
    if same_machine(family, mine):
        return f"It was measured on this run's machine type ({name(family)}), so each seed's numbers apply as they are."
    return (f"It was measured on {name(family)}, this run on {name(mine) if mine else 'an unrecorded machine'}: "
            "the same seed rounds differently there, so compare the distributions, not a seed's numbers.")


def _family(ctx: Context) -> list[Part]:
    from analyses.family import family_summary, plot_run_in_family

    family = pd.read_csv(ctx.family / "family_summary.csv")
    this = family_summary([ctx.run]).iloc[0].to_dict()
    dropped = family.drop_step.dropna()
    n = len(family)
    lines = [f"The family <code>{html.escape(str(ctx.family))}</code>: {n} seeds of the same recipe, "
             f"{len(dropped)} of which dropped (steps {', '.join(f'{d:.0f}' for d in sorted(dropped))}; "
             f"median {dropped.median():.0f}). {html.escape(_machines(ctx))}"]
    if this.get("dropped"):
        earlier, later = int((dropped < this["drop_step"]).sum()), int((dropped > this["drop_step"]).sum())
        lines.append(f"This run (seed {this['seed']}) dropped at step {this['drop_step']:.0f}: {earlier} of the "
                     f"family's runs dropped earlier, {later} later.")
    else:
        lines.append(f"This run (seed {this['seed']}) has not dropped by step {this.get('final_step', 0):.0f}.")
    final = this["final_loss_mask"]
    lower, higher = int((family.final_loss_mask < final).sum()), int((family.final_loss_mask > final).sum())
    lines.append(f"Its final eval L_mask is {final:.4f} (the family's median {family.final_loss_mask.median():.4f}): "
                 f"{lower} of the family's runs ended lower, {higher} higher.")
    cols = ["run", "seed", "drop_step", "drop_sharpness", "final_step", "final_loss_mask"]
    return ["<p>" + " ".join(lines) + "</p>", plot_run_in_family(family, this), family[[c for c in cols if c in family]]]


def _phases(ctx: Context) -> list[Part]:
    from analyses.phases import plot_phases

    return [plot_phases(ctx.run, ctx.phases.to_frame().T).update_layout(width=None)]


def _llc(ctx: Context) -> list[Part]:
    from analyses.llc import DEFAULTS, llc_from_traces, plot_llc, plot_sgld_traces, sgld_traces

    steps = ctx.run.steps if not ctx.quick else ctx.steps
    draws = DEFAULTS if not ctx.quick else replace(DEFAULTS, num_chains=2, num_burnin=5, num_draws=10)
    start = time.perf_counter()
    traces = across_checkpoints(ctx.run, sgld_traces, steps=steps, batch=ctx.batch, device=ctx.device,
                                progress=ctx.progress, config=draws)
    per_checkpoint = (time.perf_counter() - start) / len(steps)
    llc = traces.groupby("step", group_keys=False)[list(traces.columns)].apply(
        lambda t: llc_from_traces(t).assign(step=int(t.step.iloc[0])))
    moments = [s for s in ctx.moments.values() if s in set(steps)]
    table = llc.groupby("step").agg(llc_mean=("llc", "mean"), llc_std=("llc", "std"), init_loss=("init_loss", "first"))
    note = (f"<p>SGLD (devinterp) on the {len(ctx.batch)}-matrix analysis batch: {draws.num_chains} chains x "
            f"({draws.num_burnin} burn-in + {draws.num_draws} draws), step size {draws.lr:g}, localization "
            f"{draws.localization:g}, n&beta; {draws.inverse_temperature:.3g} (batch {draws.batch_size}); "
            f"{per_checkpoint:.1f} s per checkpoint here. The traces below (checkpoints before, at and after "
            f"the drop) should be flat after the shaded burn-in; the LLC is n&beta; x (mean drawn loss - "
            f"L(w*)).</p>")
    trend = ", ".join(f"{m} (step {s}) {table.llc_mean[s]:.2f} &plusmn; {table.llc_std[s]:.2f}"
                      for m, s in ctx.moments.items() if s in table.index)
    note += f"<p>Mean LLC across chains: {trend}.</p>"
    return [note, plot_llc(llc, ctx.run.metrics, ctx.phases.drop_step),
            plot_sgld_traces(traces[traces.step.isin(moments)]), table]


def _copy(ctx: Context) -> list[Part]:
    from analyses.copying import copy_check, plot_copy, summarize_copy

    copies = ctx.walk(copy_check, data_cfg=ctx.run.config.data)
    return [plot_copy(copies).update_layout(width=None), summarize_copy(copies)]


def _baselines(ctx: Context) -> list[Part]:
    from analyses.baselines import compare_baselines, plot_baselines

    frame = compare_baselines(ctx.model(ctx.final), ctx.run.config.data, n_matrices=ctx.budget.n_matrices,
                              progress=ctx.progress)
    table = frame.pivot(index="p_mask", columns="predictor", values=["mse_mask", "nuclear_norm"])
    table[("mse_mask_to_nuclear", "model")] = frame[frame.predictor == "model"].set_index("p_mask").mse_mask_to_nuclear
    return [f"<p>Model at step {ctx.final}; {ctx.budget.n_matrices} matrices per p_mask (trained at "
            f"p_mask {ctx.run.config.data.p_mask}).</p>", plot_baselines(frame), table.drop(columns=[("mse_mask", "truth")])]


def _ood(ctx: Context) -> list[Part]:
    from analyses.baselines import evaluate_ood, plot_ood

    frame = evaluate_ood(ctx.model(ctx.final), ctx.run.config.data, n_matrices=ctx.budget.n_matrices,
                         progress=ctx.progress)
    table = frame.pivot(index="variant", columns="predictor", values="mse_mask").loc[frame.variant.unique()]
    table["model_to_nuclear"] = frame[frame.predictor == "model"].set_index("variant").mse_mask_to_nuclear
    return ["<p>Smaller matrices sit in the top-left block of the trained position grid, the rest "
            "masked; larger ones have no learned positions and are refused.</p>", plot_ood(frame),
            table.drop(columns="truth")]


def _taxonomy(ctx: Context) -> list[Part]:
    from analyses.heads import plot_taxonomy

    fig = plot_taxonomy(ctx.taxonomy, drop_step=ctx.phases.drop_step).update_layout(width=None)
    last = ctx.taxonomy[(ctx.taxonomy.step == ctx.final) & (ctx.taxonomy.queries == "all")]
    counts = last.label.value_counts().rename_axis("label").reset_index(name=f"heads at step {ctx.final}")
    return [fig, counts]


def _attention_views(ctx: Context) -> list[Part]:
    from analyses.views import attention_page

    parts = []
    for moment, step in ctx.moments.items():
        at = ctx.taxonomy[(ctx.taxonomy.step == step) & (ctx.taxonomy.queries == "all")]
        labels = {(r.layer, r.head): r.label for r in at.itertuples()}
        page = attention_page(ctx.model(step), ctx.batch, examples=(0,), head_labels=labels,
                              title=f"{moment}: step {step}")
        parts.append(f'<iframe class="views" title="attention at step {step}" '
                     f'srcdoc="{html.escape(page, quote=True)}"></iframe>')
    return parts


def _attention_scrubber(ctx: Context) -> list[Part]:
    from analyses.scrubber import plot_attention_scrubber, scrub_data

    data = ctx.run.config.data
    patterns, taxonomy = scrub_data(ctx.run, steps="all", batch=ctx.batch[:256], progress=ctx.progress)
    return [f"<p>Every checkpoint ({len(ctx.run.steps)}), patterns averaged over {min(256, len(ctx.batch))} random "
            "masks. Drag the slider: titles give each head's label at that step (row heads blue, column heads "
            "red).</p>", plot_attention_scrubber(patterns, taxonomy, data.m, data.n, ctx.phases.drop_step)]


def _ablation(ctx: Context) -> list[Part]:
    from analyses.ablation import head_ablation_sweep, plot_ablation

    sweep = head_ablation_sweep(ctx.model(ctx.final), ctx.batch, kinds=("zero", "mean"))
    worst = sweep.sort_values("delta_loss_mask", ascending=False).head(8)
    return [plot_ablation(sweep, "zero"), worst[["layer", "head", "kind", "loss_mask", "delta_loss_mask"]]]


def _patching(ctx: Context) -> list[Part]:
    from analyses.patching import patching, plot_patching

    batch = ctx.batch[: ctx.budget.patch_batch]
    sites = {"z": ("layer_head",), "attn_out": ("layer", "layer_pos"), "mlp_out": ("layer", "layer_pos")}
    frame = patching(ctx.model(ctx.final), batch, ctx.run.config.data, sites=sites)
    per_layer = frame[frame.granularity == "layer"].pivot(index="layer", columns="site",
                                                          values=["recovery_mask", "recovery_obs"])
    return [f"<p>Clean X, corrupted -X (same mask), step {ctx.final}, {len(batch)} matrices.</p>",
            plot_patching(frame, "z", "layer_head"), plot_patching(frame, "attn_out", "layer_pos"), per_layer]


def _attribution(ctx: Context) -> list[Part]:
    from analyses.attribution import attribution_agreement, compare_with_patching, plot_attribution_vs_patching

    batch = ctx.batch[: ctx.budget.patch_batch]
    frames = [compare_with_patching(ctx.model(step), batch, ctx.run.config.data).assign(step=step, moment=moment)
              for moment, step in ctx.moments.items()]
    frame = pd.concat(frames, ignore_index=True)
    agreement = attribution_agreement(frame[frame.metric == "recovery_mask"])
    table = agreement.pivot(index=["site", "granularity"], columns="step", values=["pearson", "spearman", "slope"])
    return [f"<p>Clean X against -X, {len(batch)} matrices, recovery at masked positions; checkpoints "
            f"{', '.join(f'{m} {s}' for m, s in ctx.moments.items())}. Dotted line: attribution = exact.</p>",
            _attribution_verdict(agreement, ctx.moments),
            plot_attribution_vs_patching(frame, step=ctx.moments[list(ctx.moments)[0]]).update_layout(
                title=f"Attribution against exact patching at step {ctx.moments[list(ctx.moments)[0]]}"),
            plot_attribution_vs_patching(frame, step=ctx.final).update_layout(
                title=f"Attribution against exact patching at step {ctx.final}"),
            table]


def _attribution_verdict(agreement: pd.DataFrame, moments: dict[str, int]) -> str:
    """Where the linear estimate holds (Pearson >= 0.9) and where it fails (< 0.5), per checkpoint."""
    lines = []
    for moment, step in moments.items():
        at = agreement[agreement.step == step].dropna(subset=["pearson"])
        good = [f"{r.site}/{r.granularity} ({r.pearson:.2f})" for r in at.itertuples() if r.pearson >= 0.9]
        bad = [f"{r.site}/{r.granularity} ({r.pearson:.2f})" for r in at.itertuples() if r.pearson < 0.5]
        lines.append(f"<li><b>{moment} (step {step})</b>: holds for {', '.join(good) or 'no site'}; "
                     f"fails for {', '.join(bad) or 'no site'}.</li>")
    return ("<p>Pearson correlation of attribution with exact patching. -X is not a small perturbation: where "
            "the path from -X to X crosses LayerNorm, GELU and softmax curvature the first-order estimate "
            "misses, most where whole layers or residual streams are patched (exact recovery near 1, the "
            "estimate far from it).</p><ul>" + "".join(lines) + "</ul>")


def _probes(ctx: Context) -> list[Part]:
    from analyses.probes import plot_probes, probe, probe_summary

    frame = ctx.walk(probe)
    return [plot_probes(frame, "r2", "masked"), probe_summary(frame, "r2", "masked")]


def _embeddings(ctx: Context) -> list[Part]:
    from analyses.embeddings import embedding_geometry, plot_embedding_geometry, plot_position_tsne, \
        plot_token_embeddings

    data = ctx.run.config.data
    frame = across_checkpoints(ctx.run, embedding_geometry, steps=ctx.steps, batch=ctx.batch, device=ctx.device,
                               progress=ctx.progress, precision=data.precision, value_max=data.value_max)
    model = ctx.model(ctx.final)
    return [plot_embedding_geometry(frame), plot_token_embeddings(model, ctx.batch, data.precision, data.value_max),
            plot_position_tsne(model, data.m, data.n)]


def _swaps(ctx: Context) -> list[Part]:
    from analyses.swaps import plot_swaps, swap_grid

    pre, post = ctx.moments.get("plateau", ctx.run.steps[0]), ctx.final
    frame = swap_grid(ctx.run, pre, post, batch=ctx.batch, device=ctx.device, progress=ctx.progress)
    return [f"<p>Pre-drop checkpoint {pre}, post-drop checkpoint {post}.</p>", plot_swaps(frame),
            frame[["direction", "components", "loss", "loss_obs", "loss_mask", "corr_mask"]]]


def _dynamics(ctx: Context) -> list[Part]:
    from analyses.dynamics import plot_dynamics, track_dynamics

    frames = track_dynamics(ctx.run, steps=ctx.steps, batch=ctx.batch[:256], progress=ctx.progress)
    deep = frames["collapse"].query("layer == layer.max()").set_index("step")
    table = frames["repetition"].set_index("step")
    table["cos_masked_last_layer"] = deep.cos_masked
    table["best_head_share_on_map"] = frames["attention_progress"].groupby("step").share_on_map.max()
    return [plot_dynamics(frames, ctx.run.metrics), table]


def _interventions(ctx: Context) -> list[Part]:
    from analyses.dynamics import load_interventions, plot_interventions

    frame = load_interventions(ctx.interventions)
    return [plot_interventions(frame), frame.drop(columns="run")]


SECTIONS: list[tuple[str, str, str, str, Callable[[Context], list[Part]]]] = [
    # (id, title, finding, one line: what it shows, builder)
    ("overview", "Run", "PAPER.md section 1", "The task, model and training recipe, and the detected phases.",
     _overview),
    ("family", "In its family", "run families",
     "Where this run's drop step and final L_mask sit among the seeds of its recipe (a shipped family summary).",
     _family),
    ("phases", "Loss curves and phases", "finding 1",
     "L, L_obs and L_mask with the plateau at the copy-and-zero level E[X^2] and the detected drop.", _phases),
    ("llc", "Local learning coefficient", "finding 1",
     "The LLC (SGLD estimate of the effective dimension, halved) at every checkpoint under the loss curves: "
     "does the drop show as a change in the model's effective complexity?", _llc),
    ("copy", "Copy check", "finding 2",
     "MASK replaced by a value token: before the drop the output is the inserted value (copying); after "
     "it the model still mostly copies (the token looks observed) but pulls the entry toward the value "
     "the rest of the matrix implies, so the error against the inserted value grows.", _copy),
    ("baselines", "Nuclear norm and copy-and-zero across p_mask", "finding 3",
     "The final model against nuclear-norm minimisation and copy-and-zero for p_mask 0.1-0.6: MSE on masked "
     "entries and nuclear norm of the completed matrices.", _baselines),
    ("ood", "Out of distribution", "finding 3",
     "Other rank, fewer rows or columns, Gaussian and Laplace factors: masked MSE relative to copy-and-zero.",
     _ood),
    ("taxonomy", "Head taxonomy over time", "finding 4",
     "Share of each head's attention on the query's row, column, itself or observed keys, per checkpoint; "
     "letters: R row, C column, S self, O observed-only.", _taxonomy),
    ("views", "Attention before, at and after the drop", "finding 4",
     "circuitsvis patterns of every head averaged over random masks and for one example, at three checkpoints.",
     _attention_views),
    ("scrubber", "Attention across training", "finding 4",
     "Every head's average attention pattern at every checkpoint behind one slider, titled with its "
     "taxonomy label: the row and column heads forming.", _attention_scrubber),
    ("ablation", "Head ablation", "finding 5",
     "Change in L_mask when one head of the final model is zeroed: which heads the completion needs.", _ablation),
    ("patching", "Activation patching", "finding 6",
     "Recovery of the clean output when clean activations of one head / layer / position are patched into "
     "the run on -X.", _patching),
    ("attribution", "Attribution patching", "finding 6",
     "The first-order estimate of patching, (clean - corrupted activation) x gradient, against exact "
     "patching for every site before, at and after the drop: where the linear estimate holds and fails.",
     _attribution),
    ("probes", "Linear probes", "finding 7",
     "Test R^2 of linear probes at masked positions, per layer and checkpoint: which layer stores the entry, "
     "its row and column and the singular vectors, and from when.", _probes),
    ("embeddings", "Embeddings", "finding 8",
     "Token-embedding symmetry and sign/magnitude PCs, position clustering by column, and the loss with "
     "permuted position embeddings.", _embeddings),
    ("swaps", "Component swaps", "finding 9",
     "Losses of the post-drop model with components from the pre-drop checkpoint, and the reverse.", _swaps),
    ("dynamics", "Plateau dynamics", "PAPER.md section 2, finding 11",
     "Repetition of masked predictions, collapse of hidden states and attention share on the optimal "
     "row/column map across checkpoints.", _dynamics),
    ("interventions", "Attention intervention", "PAPER.md section 2, finding 11",
     "Runs trained with attention scaled toward the optimal map by c: plateau length against c.", _interventions),
]


# ----- assembly -------------------------------------------------------------------------------

@dataclass
class Report:
    html: str
    errors: dict[str, str] = field(default_factory=dict)  # section id -> error message
    seconds: dict[str, float] = field(default_factory=dict)
    context: object = None  # the sections' shared context (its cached tables)

    def write(self, path: str | Path) -> Path:
        """The HTML written to `path` (parents created), atomically: a reader sees the old file or
        the whole new one, never half a report."""
        path = Path(path)
        atomic_write(path, self.html.encode("utf-8"))
        return path


def _render(part: Part, index: int) -> str:
    if isinstance(part, go.Figure):
        return part.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{index}",
                            config={"displaylogo": False, "responsive": True})
    if isinstance(part, pd.DataFrame):
        plain_index = part.index.name is None and part.index.equals(pd.RangeIndex(len(part)))
        return part.to_html(classes="table", float_format=lambda v: f"{v:.4g}", na_rep="-", border=0,
                            index=not plain_index)
    return part


Section = tuple[str, str, str, str, Callable]  # (id, title, finding, caption, builder(ctx) -> parts)


def assemble(title: str, intro: str, sections: list[Section], ctx, progress: bool = True) -> Report:
    """Compute each section's parts with `builder(ctx)` and lay them out as one offline HTML page:
    a table of contents, then one `<section>` per entry with its caption, finding tag and time."""
    import plotly.offline

    report = Report(html="", context=ctx)
    bodies, figure_index = [], 0
    for key, heading, finding, caption, builder in tqdm(sections, desc="report", unit="section", disable=not progress):
        start = time.perf_counter()
        try:
            with torch.no_grad():
                parts = builder(ctx)
            rendered = []
            for part in parts:
                rendered.append(_render(part, figure_index))
                figure_index += isinstance(part, go.Figure)
            content, status = "\n".join(rendered), "ok"
        except Exception as e:  # one failing analysis must not take the whole report down
            report.errors[key] = f"{type(e).__name__}: {e}"
            content = (f'<div class="error"><b>This section failed:</b> {html.escape(report.errors[key])}'
                       f"<pre>{html.escape(traceback.format_exc(limit=-3))}</pre></div>")
            status = "error"
        report.seconds[key] = time.perf_counter() - start
        bodies.append(f'<section id="{key}" data-status="{status}"><h2>{html.escape(heading)}</h2>'
                      f'<p class="caption">{html.escape(caption)} <span class="finding">{html.escape(finding)}'
                      f'</span> <span class="time">{report.seconds[key]:.1f} s</span></p>{content}</section>')
    toc = "".join(f'<li><a href="#{k}">{html.escape(t)}</a> <span class="finding">{html.escape(f)}</span>'
                  f'{" (failed)" if k in report.errors else ""}</li>' for k, t, f, _, _ in sections)
    report.html = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style><script>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{intro}</p>"
        f"<nav><ol>{toc}</ol></nav>{''.join(bodies)}</body></html>"
    )
    return report


def build_report(
    run: Run, quick: bool = False, device: str = "cpu", interventions: str | Path | None = None,
    progress: bool = True, family: str | Path | None = None,
) -> Report:
    """Compute every section and assemble the HTML (see module docstring). `family`: a folder with
    a `family_summary.csv` to place the run in (default: the shipped family of its recipe, if any)."""
    from analyses.family import find_family

    family = Path(family) if family is not None else find_family(run)
    ctx = Context(run, QUICK if quick else FULL, device, progress, Path(interventions) if interventions else None,
                  family)
    optional = {"interventions": ctx.interventions, "family": ctx.family}
    sections = [s for s in SECTIONS if s[0] not in optional or optional[s[0]] is not None]
    intro = (f"Run directory <code>{html.escape(str(run.path))}</code>{' (quick mode)' if quick else ''}. "
             "Sections follow PAPER.md's findings.")
    return assemble(f"mechlrmc report: {run.path.name}", intro, sections, ctx, progress)


def write_report(run: Run, path: str | Path, **kwargs) -> Report:
    """`build_report(run, **kwargs)` written to `path` (parents created)."""
    report = build_report(run, **kwargs)
    report.write(path)
    return report


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1280px;color:#222;padding:0 16px}
h1{font-size:1.6em} h2{margin-top:2.2em;border-bottom:1px solid #ddd;padding-bottom:4px}
.caption{color:#444} .finding{background:#eef3fb;color:#1f4e8c;border-radius:4px;padding:1px 6px;
font-size:.85em;white-space:nowrap} .time{color:#999;font-size:.8em}
table.table{border-collapse:collapse;font-size:.85em;margin:10px 0;display:block;overflow-x:auto;max-width:100%}
.table td,.table th{border:1px solid #ddd;padding:3px 8px;text-align:right}
.error{background:#fdecea;border:1px solid #e0a0a0;padding:8px 12px;border-radius:4px}
.error pre{white-space:pre-wrap;font-size:.8em}
iframe.views{width:100%;height:900px;border:1px solid #ddd;margin:8px 0}
nav ol{columns:2}
"""
