"""The registry's adapters of the report lens: `NAME_tables(ctx)` and `NAME_figures(ctx, tables)` read what they need from the run context and call the lens's plain functions."""

from __future__ import annotations

import pandas as pd

from analyses.report.overview import run_facts


def _anatomy_line(ctx) -> str:
    """The recorded model's anatomy in one line, or why it has none (then only the loss lenses apply)."""
    from mechlrmc.errors import UsageError

    try:
        return ctx.anatomy.describe()
    except UsageError as e:
        return f"not derived ({e}): only the lenses of the losses apply"


def overview_tables(ctx) -> dict[str, pd.DataFrame]:
    facts = run_facts(ctx.run, ctx.phases, ctx.steps, _anatomy_line(ctx) if ctx.run.config.recorded else None)
    key = pd.DataFrame([(f"key checkpoint: {k}", str(v)) for k, v in ctx.key.items()], columns=["", "value"])
    return {"overview": pd.concat([facts, key], ignore_index=True)}


def overview_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    return {"overview": tables["overview"]}


def family_tables(ctx) -> dict[str, pd.DataFrame]:
    """Where the run sits in its shipped family (`ctx.family`: `find_family`'s pick)."""
    from analyses.family.summary import place_in_family

    return {"placement": place_in_family(ctx.run, ctx.family),
            "family_summary": pd.read_csv(ctx.family / "family_summary.csv")}


def family_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    import html

    from analyses.family.figures import plot_run_in_family
    from analyses.family.summary import family_summary

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
