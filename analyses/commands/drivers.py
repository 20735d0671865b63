"""Analyses that train runs (drivers), not read them:

    mechlrmc analyze freeze RUN [--steps N] [--sets 'embed;attn'] [--init init|S] [--reference S]
        the component-wise training sweep (finding 10): OUT/freeze/<set>/ runs, freeze.csv, freeze.html
    mechlrmc analyze intervention --scales 0.5 1 2 4 [--preset cpu] [--train-steps N] [-o OUT]
        one run per attention scale c (P5): intervention.csv/.html (plateau length against c)
    mechlrmc freeze-train RUN --components attn --out DIR [--init init|S] [--reference S]
OUT defaults to out/<run name> (out/intervention for the intervention driver).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analyses.commands.common import add_threads, output_dir, parse_init, set_threads


def _save(fig, path: Path) -> None:
    fig.write_html(path, include_plotlyjs=True)
    print(f"wrote {path}")


def _freeze(args: argparse.Namespace) -> int:
    from analyses.weights.figures import plot_freeze
    from analyses.weights.freeze import DEFAULT_STEPS, freeze_sweep
    from mechlrmc.components import FREEZE_SET
    from mechlrmc.runs import Run

    run = Run(args.run)
    set_threads(args, run.config)
    out = output_dir(args, run)
    sets = args.sets.split(";") if args.sets else FREEZE_SET
    frame = freeze_sweep(run, out / "freeze", sets, args.steps or DEFAULT_STEPS, parse_init(args.init), args.reference)
    frame.to_csv(out / "freeze.csv", index=False)
    _save(plot_freeze(frame, run.config.data.plateau_mask_loss), out / "freeze.html")
    summary = frame.groupby("components", sort=False).agg(
        half_plateau_step=("half_plateau_step", "first"), final_loss_mask=("eval_loss_mask", "last"),
        wall_time_s=("wall_time", "last"))
    print(summary.round(4).to_string())
    return 0


def _freeze_train(args: argparse.Namespace) -> int:
    from analyses.weights.freeze import DEFAULT_STEPS, freeze_train
    from mechlrmc.runs import Run

    run = Run(args.run)
    set_threads(args, run.config)
    sub = freeze_train(run, args.components, args.out, parse_init(args.init), args.reference,
                       args.steps or DEFAULT_STEPS, args.set, progress=not args.quiet)
    last = sub.evals.iloc[-1]
    print(f"run saved to {sub.path}: step {int(last.step)} eval L={last.eval_loss:.4g} "
          f"L_obs={last.eval_loss_obs:.4g} L_mask={last.eval_loss_mask:.4g}")
    return 0


def _intervention(args: argparse.Namespace) -> int:
    from analyses.plateau.dynamics import compare_interventions
    from analyses.plateau.figures import plot_interventions
    from mechlrmc.config import RunConfig, preset

    cfg = (RunConfig.from_yaml(args.config) if args.config else preset(args.preset)).override(args.set)
    if args.threads:
        cfg = cfg.override({"train.threads": args.threads})
    set_threads(args, cfg)
    steps = args.train_steps or cfg.train.steps
    out = Path(args.out or "out/intervention")
    frame = compare_interventions(cfg, args.scales, steps, out, start=args.start, progress=not args.quiet)
    frame.to_csv(out / "intervention.csv", index=False)
    plot_interventions(frame).write_html(out / "intervention.html", include_plotlyjs=True)
    print(frame.drop(columns="run").to_string(index=False))
    print(f"wrote {out}")
    return 0


def _freeze_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", default="init", help="start the trained components from 'init' (step 0) or a step")
    p.add_argument("--reference", type=int, help="checkpoint the frozen components come from (default: last)")
    p.add_argument("--steps", type=int, help="training steps of each run (default analyses.weights.freeze.DEFAULT_STEPS)")
    add_threads(p)


def register(top: argparse._SubParsersAction, analyze: argparse._SubParsersAction) -> None:
    p = analyze.add_parser("freeze", help="the paper's component-wise training set (finding 10)")
    p.add_argument("run")
    p.add_argument("-o", "--out", help="output directory (default out/<run name>)")
    _freeze_options(p)
    p.add_argument("--sets", help="';'-separated component sets (default: embed;pos_embed;attn;mlp;all)")
    p.set_defaults(func=_freeze)

    p = analyze.add_parser("intervention", help="train with attention scaled toward the optimal map by c (P5)")
    p.add_argument("--scales", nargs="+", type=float, required=True, help="values of c (1: no intervention)")
    p.add_argument("--preset", default="cpu", help="preset to train (default cpu)")
    p.add_argument("--config", help="a config.yaml instead of a preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--train-steps", type=int, help="training steps per run (default: the config's)")
    p.add_argument("--start", type=int, default=0, help="step from which the intervention acts")
    p.add_argument("-o", "--out", help="folder of the runs (default out/intervention)")
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_intervention)

    p = top.add_parser("freeze-train", help="train only some components, the rest fixed at a checkpoint")
    p.add_argument("run")
    p.add_argument("--components", required=True, help="component spec, e.g. 'pos_embed' or 'attn.0,mlp'")
    p.add_argument("--out", required=True, help="new run directory")
    _freeze_options(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_freeze_train)
