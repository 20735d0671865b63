"""`mechlrmc analyze attention|phases|copy|ablation RUN`: the analysis-I tables and figures.

    mechlrmc analyze attention RUN [-o OUT] [--steps all|around_drop|S ...] [--views S ...]
        phases.csv/.html, taxonomy.csv (random masks), taxonomy_structured.csv (PAPER.md
        finding 4's fixed mask), taxonomy.html (heatmap over steps), views/attention_step_S.html,
        scrubber.html (every head's average pattern and label, a slider over the steps)
    mechlrmc analyze phases RUN      phases.csv, phases.html
    mechlrmc analyze copy RUN        copy.csv, copy_summary.csv, copy.html
    mechlrmc analyze ablation RUN    ablation.csv, ablation.html (default steps: around the drop)
OUT defaults to out/<run name>.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analyses.commands._shared import parse_steps, setup


def _phases(run, out: Path):
    from analyses.phases import detect_phases, plot_phases

    phases = detect_phases(run)
    phases.to_csv(out / "phases.csv", index=False)
    plot_phases(run, phases).write_html(out / "phases.html", include_plotlyjs=True)
    print(phases.T.to_string(header=False))
    return phases.iloc[0]


def _becomes(taxonomy, label: str, drop_step: float) -> list[str]:
    """Heads carrying `label` at the last step, with the first step from which they keep it
    (and its distance to the drop)."""
    import pandas as pd

    frame = taxonomy[taxonomy.queries == "all"].sort_values("step")
    lines = []
    for (layer, head), rows in frame.groupby(["layer", "head"]):
        if rows.label.iloc[-1] != label:
            continue
        other = rows[rows.label != label]
        since = int(rows[rows.step > other.step.max()].step.min() if len(other) else rows.step.min())
        relative = "" if pd.isna(drop_step) else f" = drop {since - int(drop_step):+d}"
        lines.append(f"L{layer}H{head} {label} head since step {since}{relative} (last step: row share "
                     f"{rows['row'].iloc[-1]:.2f}, column share {rows['column'].iloc[-1]:.2f})")
    return lines


def _attention(args: argparse.Namespace) -> int:
    import pandas as pd

    from analyses.heads import head_taxonomy, plot_taxonomy, structured_taxonomy
    from analyses.scrubber import pattern_frame, plot_attention_scrubber
    from analyses.views import save_attention_views
    from analyses.walk import across_checkpoints, select_steps

    run, out, batch = setup(args)
    phases = _phases(run, out)
    steps = select_steps(run, parse_steps(args.steps))
    taxonomy = across_checkpoints(run, head_taxonomy, steps=steps, batch=batch)
    taxonomy.to_csv(out / "taxonomy.csv", index=False)
    structured = across_checkpoints(run, structured_taxonomy, steps=steps, batch=batch, data_cfg=run.config.data)
    structured.to_csv(out / "taxonomy_structured.csv", index=False)
    plot_taxonomy(taxonomy, drop_step=phases.drop_step).write_html(out / "taxonomy.html", include_plotlyjs=True)
    patterns = across_checkpoints(run, pattern_frame, steps=steps, batch=batch)
    plot_attention_scrubber(patterns, taxonomy, run.config.data.m, run.config.data.n, phases.drop_step).write_html(
        out / "scrubber.html", include_plotlyjs=True)
    plateau_end = run.steps[0] if pd.isna(phases.plateau_end) else phases.plateau_end
    view_steps = [int(s) for s in args.views] if args.views else sorted({run.nearest_step(plateau_end), run.steps[-1]})
    for step in view_steps:
        step = run.nearest_step(step)
        at_step = taxonomy[(taxonomy.step == step) & (taxonomy.queries == "all")]
        labels = {(r.layer, r.head): r.label for r in at_step.itertuples()} or None
        save_attention_views(run.load_model(step), batch, out / "views" / f"attention_step_{step:06d}.html",
                             head_labels=labels, title=f"{run.path.name}: attention at step {step}")
    found = _becomes(taxonomy, "row", phases.drop_step) + _becomes(taxonomy, "column", phases.drop_step)
    print("\n".join(found) or "no row or column heads at the last step")
    print(f"wrote {out}")
    return 0


def _phases_cmd(args: argparse.Namespace) -> int:
    run, out, _ = setup(args)
    _phases(run, out)
    return 0


def _copy(args: argparse.Namespace) -> int:
    from analyses.copying import DEFAULT_VALUES, copy_check, plot_copy, summarize_copy
    from analyses.walk import across_checkpoints

    run, out, batch = setup(args)
    copies = across_checkpoints(run, copy_check, steps=parse_steps(args.steps), batch=batch,
                                data_cfg=run.config.data, values=tuple(args.values or DEFAULT_VALUES))
    copies.to_csv(out / "copy.csv", index=False)
    summary = summarize_copy(copies)
    summary.to_csv(out / "copy_summary.csv", index=False)
    plot_copy(copies).write_html(out / "copy.html", include_plotlyjs=True)
    print(summary.to_string(index=False))
    return 0


def _ablation(args: argparse.Namespace) -> int:
    from analyses.ablation import head_ablation_sweep, plot_ablation
    from analyses.walk import across_checkpoints

    run, out, batch = setup(args)
    sweep = across_checkpoints(run, head_ablation_sweep, steps=parse_steps(args.steps), batch=batch,
                               kinds=tuple(args.kinds))
    sweep.to_csv(out / "ablation.csv", index=False)
    plot_ablation(sweep, kind=args.kinds[0]).write_html(out / "ablation.html", include_plotlyjs=True)
    top = sweep.sort_values("delta_loss_mask", ascending=False).groupby("step").head(3)
    print(top[["step", "kind", "layer", "head", "delta_loss", "delta_loss_obs", "delta_loss_mask"]]
          .sort_values(["step", "delta_loss_mask"], ascending=[True, False]).to_string(index=False))
    return 0


def _common(p: argparse.ArgumentParser, steps: str = "all") -> None:
    p.add_argument("run", help="run directory, e.g. checkpoints/cpu")
    p.add_argument("-o", "--out", help="output folder (default out/<run name>)")
    p.add_argument("--steps", nargs="+", default=[steps], help=f"all, around_drop or step numbers (default {steps})")
    p.add_argument("--batch-size", type=int, default=512, help="examples per checkpoint (fixed seed)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the models are small; 0: torch's default)")


def register(top: argparse._SubParsersAction, analyze: argparse._SubParsersAction) -> None:
    p = analyze.add_parser("attention", help="drop detection, head taxonomy over steps, attention views, attention scrubber")
    _common(p)
    p.add_argument("--views", nargs="+", help="steps to draw attention views of (default: plateau end, last)")
    p.set_defaults(func=_attention)

    p = analyze.add_parser("phases", help="plateau level, drop step and post-drop level from the metrics")
    _common(p)
    p.set_defaults(func=_phases_cmd)

    p = analyze.add_parser("copy", help="copy check: MASK replaced by value tokens (PAPER.md finding 2)")
    _common(p)
    p.add_argument("--values", nargs="+", type=float, help="inserted values (default -0.8 -0.24 0 0.44 0.8)")
    p.set_defaults(func=_copy)

    p = analyze.add_parser("ablation", help="ablate each head alone: delta L, L_obs, L_mask (finding 5)")
    _common(p, steps="around_drop")
    p.add_argument("--kinds", nargs="+", default=["zero", "mean", "uniform"], choices=["zero", "mean", "uniform"])
    p.set_defaults(func=_ablation)
