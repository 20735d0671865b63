"""A run at a glance: its task, model and recipe, its checkpoints and the detected phases."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd

from mechlrmc.runs import Run


def run_facts(run: Run, phases: pd.Series, walked: list[int] | None = None) -> pd.DataFrame:
    """Two columns ("", value): task, model, training, checkpoints, plateau and drop of `run`
    (`phases`: a row of `detect_phases`; `walked`: the checkpoints an analysis walks)."""
    cfg, p = run.config, phases
    m = cfg.model
    model = (f"{'post-LN' if m.norm == 'post' else 'pre-LN'} {'causal' if m.causal else 'bidirectional'} "
             f"transformer, {m.attention} attention, {m.n_layers} layers x {m.n_heads} heads, d_model {m.d_model}, "
             f"d_mlp {m.d_mlp}")
    if cfg.data.task == "lrmc":
        task = (f"LRMC: {cfg.data.m} x {cfg.data.n} rank-{cfg.data.rank} matrices, {cfg.data.distribution} factors, "
                f"p_mask {cfg.data.p_mask}")
    else:
        task = f"{cfg.data.task}: " + ", ".join(f"{k} {v}" for k, v in asdict(cfg.data).items())
    rows = [
        ("task", task),
        ("model", model),
        ("training", f"{cfg.train.steps} steps, batch {cfg.train.batch_size}, Adam lr {cfg.train.lr:g}, seed "
                     f"{cfg.train.seed}"),
        ("checkpoints", f"{len(run.steps)}: {run.steps}"),
        *([("walked by the analyses", f"{walked}")] if walked is not None else []),
        _plateau(p),
        ("drop", (f"at step {p.drop_step}; L_mask after it {p.post_drop_loss_mask:.4g}" if "post_drop_loss_mask" in p
                  else f"at step {p.drop_step}; output cross-entropy after it {p.post_drop_loss_out:.4g}, final "
                       f"greedy accuracy {p.final_greedy_acc:.3f}") if p.dropped else "no drop detected"),
    ]
    return pd.DataFrame(rows, columns=["", "value"])


def _plateau(p: pd.Series) -> tuple[str, str]:
    if "plateau_loss_mask" in p:
        return ("plateau", f"L_mask {p.plateau_loss_mask:.4g} = {p.plateau_over_analytic:.2f} x the copy-and-zero "
                           f"level {p.analytic_loss_mask:.4g}, from step {p.plateau_start} to {p.plateau_end}")
    return ("plateau", f"output cross-entropy {p.plateau_loss_out:.4g} from step {p.plateau_start} to "
                       f"{p.plateau_end}: greedy accuracy {p.plateau_greedy_acc:.3f}, repetition up to "
                       f"{p.plateau_max_rep:.2f} (truth {p.rep_true:.2f})")


# ----- registry entry (analyses.registry) -------------------------------------------------------

def overview_tables(ctx) -> dict[str, pd.DataFrame]:
    facts = run_facts(ctx.run, ctx.phases, ctx.steps)
    key = pd.DataFrame([(f"key checkpoint: {k}", str(v)) for k, v in ctx.key.items()], columns=["", "value"])
    return {"overview": pd.concat([facts, key], ignore_index=True)}


def overview_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    return {"overview": tables["overview"]}


def family_tables(ctx) -> dict[str, pd.DataFrame]:
    """Where the run sits in its shipped family (`ctx.family`: `find_family`'s pick)."""
    from analyses.family import place_in_family

    return {"placement": place_in_family(ctx.run, ctx.family),
            "family_summary": pd.read_csv(ctx.family / "family_summary.csv")}


def family_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    import html

    from analyses.family import family_summary, plot_run_in_family

    p = tables["placement"].iloc[0]
    family = tables["family_summary"]
    drops = ", ".join(f"{d:.0f}" for d in p.family_drop_steps)
    text = (f"The family <code>{html.escape(ctx.family.name)}</code>: {p.n_seeds} seeds of this recipe, {p.n_dropped} "
            f"of which dropped (steps {drops}; median {p.family_median_drop_step:.0f}). Machine match: <b>{p.match}</b>. "
            f"{html.escape(p.match_sentence)} {html.escape(p.drop_text)} Its final eval L_mask is "
            f"{p.final_loss_mask:.4f} at step {p.run_final_step:.0f} (the family's median {p.family_median_final_loss_mask:.4f}"
            f" at step {p.family_final_step:.0f}): {p.ended_lower} of the family's runs ended lower, {p.ended_higher} higher.")
    cols = ["run", "seed", "drop_step", "drop_sharpness", "final_step", "final_loss_mask"]
    return {"note": f"<p>{text}</p>", "in_family": plot_run_in_family(family, family_summary([ctx.run]).iloc[0].to_dict()),
            "family_table": family[[c for c in cols if c in family]]}
