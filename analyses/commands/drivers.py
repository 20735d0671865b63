"""Analyses that train runs (drivers), not read them:

    mechlrmc analyze freeze RUN [--steps N] [--sets 'embed;attn'] [--init init|S] [--reference S]
        the component-wise training sweep (finding 10): OUT/freeze/<set>/ runs, freeze.csv, freeze.html
    mechlrmc analyze intervention --scales 0.5 1 2 4 [--preset cpu] [--train-steps N] [-o OUT]
        one run per attention scale c (P5): intervention.csv/.html (plateau length against c)
    mechlrmc analyze commitment RUN [RUN ...] --at 50 100 150 [--branches 6] [--limit N] [--tol T] [-o OUT]
        branches of each run from its kept states (`analyses.family.commitment`), trained as a sweep
        in OUT/<run name>/; OUT/commitment.csv (per run and branching step), commitment_branches.csv,
        commitment.html
    mechlrmc analyze scaling FAMILY --by data.length [-o OUT]
        the plateau's scaling law over a numeric grid variable of a family (`analyses.family.survival`):
        family_summary.csv, survival.csv, median_drop.csv, logrank.csv, scaling.csv (Weibull and
        log-normal AFT exponents), power_law.csv (does a power law fit), scaling.html/.png, survival.html/.png
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


def _commitment(args: argparse.Namespace) -> int:
    import pandas as pd

    from analyses.family import commitment as cm
    from analyses.family.figures import plot_commitment
    from analyses.plateau.phases import detect_phases
    from mechlrmc.runs import Run
    from mechlrmc.sweep import sweep
    from mechlrmc.trials import SweepSpec

    runs = [Run(r) for r in args.runs]
    specs = [SweepSpec.from_dict(cm.branch_spec(r, args.at, args.branches, args.limit, args.stop_below))
             for r in runs]  # every bad option before anything trains
    out = Path(args.out or "out/commitment")
    tables, branches = [], []
    for run, spec in zip(runs, specs):
        folder = out / run.path.name
        sweep(spec, folder, address=args.address, progress=not args.quiet)
        summary = cm.branch_summary(folder)
        phases = detect_phases(run).iloc[0]
        tol = args.tol or cm.default_tolerance(run)
        table = cm.commitment_table(summary, phases.drop_step if phases.dropped else float("nan"), tol)
        ident = {"run": run.path.name, "seed": run.config.train.seed}
        tables.append(table.assign(**ident)[[*ident, *table.columns]])
        branches.append(summary.assign(parent=run.path.name))
    table, branch_rows = pd.concat(tables, ignore_index=True), pd.concat(branches, ignore_index=True)
    table.to_csv(out / "commitment.csv", index=False)
    branch_rows.to_csv(out / "commitment_branches.csv", index=False)
    _save(plot_commitment(branch_rows, table), out / "commitment.html")
    print(table.drop(columns=["tolerance"]).to_string(index=False))
    for name, part in table.groupby("run", sort=False):
        point = cm.commitment_point(part)
        print(f"{name}: fate sealed from step {point:g}" if point == point else f"{name}: never sealed")
    return 0


def _scaling(args: argparse.Namespace) -> int:
    import pandas as pd

    from analyses.family import survival
    from analyses.family.figures import plot_scaling, plot_survival
    from analyses.family.summary import family_summary
    from mechlrmc.errors import OptionError

    summary = family_summary(args.family)
    if args.by not in summary:
        raise OptionError(f"--by {args.by!r} is not a varied key of {args.family}: allowed "
                          f"{[c for c in summary.columns if '.' in c]}")
    out = Path(args.out or f"out/{Path(args.family).name}")
    out.mkdir(parents=True, exist_ok=True)
    fits, checks = [], []
    for model in survival.MODELS:  # a model that does not converge on these drop times is named and left out
        try:
            fits.append(survival.scaling_exponent(summary, args.by, model))
            checks.append(survival.power_law_check(summary, args.by, model))
        except ValueError as e:
            print(f"{model}: {e}")
    if not fits:
        raise OptionError(f"no AFT model converges on the drop times of {args.family}")
    fits = pd.concat(fits, ignore_index=True)
    tables = {"family_summary": summary, "survival": survival.drop_survival(summary, args.by),
              "median_drop": survival.median_drop(summary, args.by), "logrank": survival.logrank(summary, args.by),
              "scaling": fits, "power_law": pd.concat(checks, ignore_index=True)}
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    best = fits.sort_values("aic").iloc[0]
    figures = {"scaling": plot_scaling(summary, args.by, best), "survival": plot_survival(tables["survival"])}
    for name, fig in figures.items():
        _save(fig, out / f"{name}.html")
        try:
            fig.write_image(out / f"{name}.png", width=900, height=520, scale=1.5)
        except Exception as e:  # kaleido (a headless browser) missing or failing: the HTML is written
            print(f"{name}.png not written ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    print(survival.k_of_n(summary))
    print(tables["median_drop"].drop(columns="setting").to_string(index=False))
    print(fits.to_string(index=False))
    print(tables["power_law"].to_string(index=False))
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

    p = analyze.add_parser("commitment", help="when is a run's drop step sealed? branches that differ only in data")
    p.add_argument("runs", nargs="+", metavar="RUN", help="runs trained with train.keep_states")
    p.add_argument("--at", nargs="+", type=int, required=True, help="branching steps (kept states of each run)")
    p.add_argument("--branches", type=int, default=6, help="branches per step (data seeds 1..K; default 6)")
    p.add_argument("--limit", type=int, help="last step of a branch that has not dropped (default: the run's steps)")
    p.add_argument("--stop-below", type=float, help="phase metric at which a branch has dropped and stops "
                                                    "(default: half-way between plateau and end, log scale)")
    p.add_argument("--tol", type=float, help="spread (sd of drop steps) of a sealed fate (default: 2 eval intervals)")
    p.add_argument("-o", "--out", help="output folder (default out/commitment)")
    p.add_argument("--address", help="Ray cluster address for the branches (default: $RAY_ADDRESS, else a private "
                                     "local instance)")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    p.set_defaults(func=_commitment)

    p = analyze.add_parser("scaling", help="the plateau's scaling law over a grid variable of a family (survival)")
    p.add_argument("family", help="a sweep directory (or a folder of runs)")
    p.add_argument("--by", required=True, help="the numeric grid key, e.g. data.length")
    p.add_argument("-o", "--out", help="output folder (default out/<family name>)")
    p.set_defaults(func=_scaling)

    p = top.add_parser("freeze-train", help="train only some components, the rest fixed at a checkpoint")
    p.add_argument("run")
    p.add_argument("--components", required=True, help="component spec, e.g. 'pos_embed' or 'attn.0,mlp'")
    p.add_argument("--out", required=True, help="new run directory")
    _freeze_options(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_freeze_train)
