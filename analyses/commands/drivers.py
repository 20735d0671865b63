"""Analyses that train runs (drivers), not read them:

    mechlrmc analyze freeze RUN [--steps N] [--sets 'embed;attn'] [--init init|S] [--reference S]
        the component-wise training sweep (finding 10): OUT/freeze/<set>/ runs, freeze.csv, freeze.html
    mechlrmc analyze intervention --scales 0.5 1 2 4 [--preset cpu] [--train-steps N] [-o OUT]
        one run per attention scale c (P5): intervention.csv/.html (plateau length against c)
    mechlrmc analyze commitment RUN [RUN ...] --at 0 10 25 50 [--branches 8] [--between-sd X | --family F] [-o OUT]
        branches of each run from its kept states (`analyses.family.commitment`), trained as a sweep
        in OUT/<run name>/; OUT/commitment.csv (per run and branching step, with the run's verdict:
        sealed between steps a and b / by a (upper bound) / not by b), commitment_branches.csv,
        commitment.html; `--branches-csv FILE` redoes the tables from a commitment_branches.csv
    mechlrmc analyze scaling FAMILY --by data.length [model.d_model ...] [--power-reps N] [-o OUT]
        the plateau's scaling law over numeric grid variables of a family (`analyses.family.survival`),
        their exponents fitted jointly: family_summary.csv, survival.csv, median_drop.csv, logrank.csv,
        scaling.csv (Weibull and log-normal AFT exponents), power_law.csv (does a power law fit),
        power_law_power.csv (what that check could have seen: `analyses.family.scaling_power`),
        scaling.html/.png, survival.html/.png
    mechlrmc analyze variance FAMILY --factors train.seed train.data_seed [--reps N] [-o OUT]
        init or data: the variance of the log drop step of a crossed family split between the factors
        and their residual (`analyses.family.variance`, statsmodels MixedLM): variance.csv,
        family_summary.csv, variance.html/.png (the drop steps in the grid, the shares)
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


def _save_with_png(fig, path: Path, width: int, height: int) -> None:
    """The figure as HTML at `path` and, where kaleido (a headless browser) works, as a PNG beside it."""
    _save(fig, path)
    try:
        fig.write_image(path.with_suffix(".png"), width=width, height=height, scale=1.5)
    except Exception as e:  # kaleido missing or failing: the HTML is written
        print(f"{path.with_suffix('.png').name} not written ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


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
    from mechlrmc.errors import OptionError, UsageError

    if bool(args.branches_csv) == bool(args.runs) or bool(args.runs) != bool(args.at):
        raise UsageError("analyze commitment: allowed RUN [RUN ...] --at S1 S2 ... (train the branches) "
                         "or --branches-csv FILE (re-analyse a commitment_branches.csv)")
    for flag, value in (("--between-sd", args.between_sd), ("--tol", args.tol)):
        if value is not None and not 0 < value < float("inf"):
            raise OptionError(f"{flag} {value} is invalid: allowed a number of steps > 0")
    between_sd = args.between_sd
    if args.family:
        between_sd = cm.between_seed_sd(_family_summary(Path(args.family)))
    out = Path(args.out or "out/commitment")
    if args.branches_csv:
        if between_sd is None and args.tol is None:
            raise UsageError("--branches-csv without --between-sd or --family needs --tol T (the absolute criterion)")
        branches, tol = pd.read_csv(args.branches_csv), args.tol
    else:
        branches, tol = _train_branches(args, out)
    table = cm.commitment_tables(branches, between_sd, tol)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "commitment.csv", index=False)
    if not args.branches_csv:
        branches.to_csv(out / "commitment_branches.csv", index=False)
    _save(plot_commitment(branches, table), out / "commitment.html")
    print(table.drop(columns=["criterion", "verdict"]).to_string(index=False))
    print(f"criterion: {table.criterion.iloc[0]}")
    for name, part in table.groupby("run", sort=False):
        print(f"{name}: {part.verdict.iloc[0]}")
    return 0


def _family_summary(path: Path):
    """--family: a family_summary.csv, a folder holding one, or a sweep directory (summarised)."""
    import pandas as pd

    from analyses.family.summary import summary_table

    return summary_table(path) if path.is_dir() else pd.read_csv(path)


def _train_branches(args: argparse.Namespace, out: Path):
    """Each run's branches (`--at`, `--branches`) trained as a sweep in OUT/<run name>/: one row per
    branch with its parent's name, seed and drop step; and each parent's absolute tolerance."""
    import pandas as pd

    from analyses.family import commitment as cm
    from analyses.plateau.phases import detect_phases
    from mechlrmc.runs import Run
    from mechlrmc.sweep import sweep
    from mechlrmc.trials import SweepSpec

    runs = [Run(r) for r in args.runs]
    count = cm.BRANCHES if args.branches is None else args.branches
    specs = [SweepSpec.from_dict(cm.branch_spec(r, args.at, count, args.limit, args.stop_below))
             for r in runs]  # every bad option before anything trains
    branches, tols = [], {}
    for run, spec in zip(runs, specs):
        folder = out / run.path.name
        sweep(spec, folder, address=args.address, progress=not args.quiet)
        phases = detect_phases(run).iloc[0]
        branches.append(cm.branch_summary(folder).assign(
            parent=run.path.name, parent_seed=run.config.train.seed,
            parent_drop_step=phases.drop_step if phases.dropped else float("nan")))
        tols[run.path.name] = args.tol or cm.default_tolerance(run)
    return pd.concat(branches, ignore_index=True), tols


def _scaling(args: argparse.Namespace) -> int:
    import pandas as pd

    from analyses.family import survival
    from analyses.family.figures import plot_scaling, plot_survival
    from analyses.family.scaling_power import power_law_power_table
    from mechlrmc.errors import OptionError

    family = Path(args.family)
    summary = _family_summary(family)  # a shipped family table without its runs is re-analysable
    missing = [v for v in args.by if v not in summary]
    if missing:
        raise OptionError(f"--by {missing} not varied keys of {args.family}: allowed "
                          f"{[c for c in summary.columns if '.' in c]}")
    if args.power_reps < 1:
        raise OptionError(f"--power-reps {args.power_reps} is invalid: allowed an integer >= 1")
    out = Path(args.out or f"out/{family.name}")
    out.mkdir(parents=True, exist_ok=True)
    fits, checks = [], []
    for model in survival.MODELS:  # a model that does not converge on these drop times is named and left out
        try:
            fits.append(survival.scaling_exponents(summary, args.by, model))
        except ValueError as e:
            print(f"{model}: {e}")
            continue
        checks.append(survival.power_law_checks(summary, args.by, model))
    if not fits:
        raise OptionError(f"no AFT model converges on the drop times of {args.family}")
    fits, checks = pd.concat(fits, ignore_index=True), pd.concat(checks, ignore_index=True)
    tables = {"family_summary": summary, "survival": survival.drop_survival(summary, args.by),
              "median_drop": survival.median_drop(summary, args.by), "logrank": survival.logrank(summary, args.by),
              "scaling": fits, "power_law": checks,
              "power_law_power": power_law_power_table(summary, args.by, fits, reps=args.power_reps)}
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    best = fits[fits.model == fits.sort_values("aic").model.iloc[0]]
    figures = {"scaling": plot_scaling(summary, args.by, best), "survival": plot_survival(tables["survival"])}
    for name, fig in figures.items():
        _save_with_png(fig, out / f"{name}.html", width=900, height=520)
    print(survival.k_of_n(summary))
    medians = tables["median_drop"]
    print(medians.drop(columns="setting").to_string(index=False))
    for setting in medians.setting[medians.none_dropped]:
        print(f"no run dropped at {setting}: its runs enter the fits censored at their last step")
    print(fits.to_string(index=False))
    for note in dict.fromkeys(checks.note[checks.note != ""]):
        print(note)
    for table in (checks.dropna(subset=["p_value"]).drop(columns="note"), tables["power_law_power"]):
        if len(table):
            print(table.to_string(index=False))
    return 0


def _variance(args: argparse.Namespace) -> int:
    from analyses.family.figures import plot_drop_variance
    from analyses.family.variance import drop_variance, variance_verdict
    from mechlrmc.errors import OptionError

    if args.reps < 20:
        raise OptionError(f"--reps {args.reps} is invalid: allowed an integer >= 20 (bootstrap families per interval)")
    summary = _family_summary(Path(args.family))
    out = Path(args.out or f"out/{Path(args.family).name}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"fitting {len(summary)} runs, then {args.reps} bootstrap families ...")
    table = drop_variance(summary, args.factors, reps=args.reps)
    summary.to_csv(out / "family_summary.csv", index=False)
    table.to_csv(out / "variance.csv", index=False)
    if len(args.factors) == 2:
        _save_with_png(plot_drop_variance(summary, args.factors, table), out / "variance.html", width=1000, height=460)
    print(table.drop(columns=["model"]).to_string(index=False))
    print(variance_verdict(table))
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
    p.add_argument("runs", nargs="*", metavar="RUN", help="runs trained with train.keep_states")
    p.add_argument("--at", nargs="+", type=int, help="branching steps (kept states of each run; 0 too)")
    p.add_argument("--branches", type=int, help="branches per step (data seeds 1..K; default 8)")
    p.add_argument("--limit", type=int, help="last step of a branch that has not dropped (default: the run's steps)")
    p.add_argument("--stop-below", type=float, help="phase metric at which a branch has dropped and stops "
                                                    "(default: half-way between plateau and end, log scale)")
    p.add_argument("--branches-csv", metavar="FILE", help="re-analyse a commitment_branches.csv instead of training "
                                                          "(no RUN, no --at)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--between-sd", type=float, metavar="STEPS",
                       help="sd of the drop step between init seeds: sealed where the branches' sd is at most "
                            "a quarter of it (upper end of its bootstrap interval)")
    scale.add_argument("--family", metavar="PATH", help="family_summary.csv (or its folder) of init seeds x data "
                                                        "seeds: between-sd = sd of the init seeds' mean drop steps")
    p.add_argument("--tol", type=float, help="without --between-sd/--family: the absolute criterion, spread "
                                             "(sd of drop steps) <= T (default: 2 eval intervals of the run)")
    p.add_argument("-o", "--out", help="output folder (default out/commitment)")
    p.add_argument("--address", help="Ray cluster address for the branches (default: $RAY_ADDRESS, else a private "
                                     "local instance)")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    p.set_defaults(func=_commitment)

    p = analyze.add_parser("scaling", help="the plateau's scaling law over a grid variable of a family (survival)")
    p.add_argument("family", help="a sweep directory, a folder of runs, or a folder with only a family_summary.csv")
    p.add_argument("--by", nargs="+", required=True, help="the numeric grid key(s), e.g. data.length model.d_model "
                                                          "(two or more: their exponents fitted jointly)")
    p.add_argument("-o", "--out", help="output folder (default out/<family name>)")
    p.add_argument("--power-reps", type=int, default=1000, help="planted families per case of power_law_power.csv "
                                                                  "(default 1000)")
    p.set_defaults(func=_scaling)

    p = analyze.add_parser("variance", help="init or data: the drop step's variance split between the factors "
                                            "of a crossed family")
    p.add_argument("family", help="a sweep directory, or a folder with its family_summary.csv")
    p.add_argument("--factors", nargs="+", required=True, help="varied keys, e.g. train.seed train.data_seed")
    p.add_argument("--reps", type=int, default=300, help="bootstrap families behind each interval (default 300)")
    p.add_argument("-o", "--out", help="output folder (default out/<family name>)")
    p.set_defaults(func=_variance)

    p = top.add_parser("freeze-train", help="train only some components, the rest fixed at a checkpoint")
    p.add_argument("run")
    p.add_argument("--components", required=True, help="component spec, e.g. 'pos_embed' or 'attn.0,mlp'")
    p.add_argument("--out", required=True, help="new run directory")
    _freeze_options(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_freeze_train)
