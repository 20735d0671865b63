"""`mechlrmc report` and `mechlrmc analyze baselines|dynamics|intervention`.

    mechlrmc report RUN -o report.html [--quick] [--interventions DIR]
        one standalone offline HTML file with every analysis (analyses.report)
    mechlrmc analyze baselines RUN [-o OUT] [--step S] [--n-matrices N] [--layout pad|gather]
        baselines.csv/.html (model vs nuclear norm vs copy-and-zero across p_mask), ood.csv/.html
    mechlrmc analyze dynamics RUN [-o OUT] [--steps ...]
        repetition.csv, collapse.csv, attention_progress.csv, dynamics.html (plateau dynamics)
    mechlrmc analyze intervention --scales 0.5 1 2 4 [--preset cpu] [--train-steps N] [-o OUT]
        one training run per attention scale c, intervention.csv/.html (plateau length against c)
OUT defaults to out/<run name> (out/intervention for the intervention driver).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analyses.commands._shared import output_dir


def _threads(args: argparse.Namespace, run=None) -> None:
    """--threads, else the run's `train.threads` (the cpu preset's 1: its models are too small to
    gain from more), else torch's default."""
    threads = args.threads if args.threads is not None else (run.config.train.threads if run else 0)
    if threads:
        import torch

        torch.set_num_threads(threads)


def _report(args: argparse.Namespace) -> int:
    from analyses.report import write_report
    from mechlrmc.runs import Run

    if not Path(args.run, "config.yaml").is_file() and Path(args.run).is_dir():
        return _family_report(args)
    run = Run(args.run)
    _threads(args, run)
    report = write_report(run, args.output, quick=args.quick, device=args.device,
                          interventions=args.interventions, progress=not args.quiet)
    size = Path(args.output).stat().st_size / 2**20
    print(f"wrote {args.output} ({size:.1f} MiB, {sum(report.seconds.values()):.0f} s)")
    for key, error in report.errors.items():
        print(f"mechlrmc: section {key!r} failed: {error}", file=sys.stderr)
    return 1 if report.errors else 0


def _family_report(args: argparse.Namespace) -> int:
    """A sweep directory: the family report, plus its tables as CSV beside the HTML."""
    from analyses.family_report import FamilyContext, write_family_report

    _threads(args)
    if args.threads is None:
        import torch

        torch.set_num_threads(1)
    output = Path(args.output)
    report = write_family_report(args.run, output, quick=args.quick, progress=not args.quiet)
    ctx: FamilyContext = report.context
    for name, frame in (("family_summary", ctx.summary), ("findings", ctx.findings)):
        frame.to_csv(output.with_name(f"{output.stem}_{name}.csv"), index=False)
    size = output.stat().st_size / 2**20
    print(f"wrote {output} ({size:.1f} MiB, {sum(report.seconds.values()):.0f} s) and its tables "
          f"{output.stem}_family_summary.csv, {output.stem}_findings.csv")
    for key, error in report.errors.items():
        print(f"mechlrmc: section {key!r} failed: {error}", file=sys.stderr)
    return 1 if report.errors else 0


def _baselines(args: argparse.Namespace) -> int:
    from analyses.baselines import compare_baselines, evaluate_ood, plot_baselines, plot_ood
    from mechlrmc.runs import Run

    run = Run(args.run)
    _threads(args, run)
    out = output_dir(args, run)
    step = run.nearest_step(args.step) if args.step is not None else run.steps[-1]
    model = run.load_model(step)
    frame = compare_baselines(model, run.config.data, tuple(args.p_masks), args.n_matrices)
    frame.to_csv(out / "baselines.csv", index=False)
    plot_baselines(frame).write_html(out / "baselines.html", include_plotlyjs=True)
    ood = evaluate_ood(model, run.config.data, n_matrices=args.n_matrices, layout=args.layout)
    ood.to_csv(out / "ood.csv", index=False)
    plot_ood(ood).write_html(out / "ood.html", include_plotlyjs=True)
    print(f"step {step}: masked-entry MSE (mse_mask) and mean nuclear norm")
    print(frame.pivot(index="p_mask", columns="predictor", values=["mse_mask", "nuclear_norm"]).round(4).to_string())
    print(ood.pivot(index="variant", columns="predictor", values="mse_mask").loc[ood.variant.unique()].round(4).to_string())
    print(f"wrote {out}")
    return 0


def _dynamics(args: argparse.Namespace) -> int:
    from analyses.commands._shared import parse_steps
    from analyses.dynamics import plot_dynamics, track_dynamics
    from analyses.walk import analysis_batch
    from mechlrmc.runs import Run

    run = Run(args.run)
    _threads(args, run)
    out = output_dir(args, run)
    frames = track_dynamics(run, steps=parse_steps(args.steps), batch=analysis_batch(run, args.batch_size))
    for name, frame in frames.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    plot_dynamics(frames, run.metrics).write_html(out / "dynamics.html", include_plotlyjs=True)
    table = frames["repetition"].set_index("step")
    table["cos_masked_last_layer"] = frames["collapse"].query("layer == layer.max()").set_index("step").cos_masked
    table["best_head_share_on_map"] = frames["attention_progress"].groupby("step").share_on_map.max()
    print(table.round(4).to_string())
    print(f"wrote {out}")
    return 0


def _intervention(args: argparse.Namespace) -> int:
    from analyses.dynamics import compare_interventions, plot_interventions
    from mechlrmc.config import RunConfig, preset

    cfg = (RunConfig.from_yaml(args.config) if args.config else preset(args.preset)).override(args.set)
    if args.threads:
        cfg = cfg.override({"train.threads": args.threads})
    steps = args.train_steps or cfg.train.steps
    out = Path(args.out or "out/intervention")
    frame = compare_interventions(cfg, args.scales, steps, out, start=args.start, progress=not args.quiet)
    frame.to_csv(out / "intervention.csv", index=False)
    plot_interventions(frame).write_html(out / "intervention.html", include_plotlyjs=True)
    print(frame.drop(columns="run").to_string(index=False))
    print(f"wrote {out}")
    return 0


def register(top: argparse._SubParsersAction, analyze: argparse._SubParsersAction) -> None:
    p = top.add_parser("report", help="write one offline HTML report of a run (every analysis) or of a sweep")
    p.add_argument("run", help="run directory (e.g. checkpoints/cpu) or sweep directory (a family report)")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--quick", action="store_true", help="small batches and few checkpoints (smoke test)")
    p.add_argument("--interventions", help="a `mechlrmc analyze intervention` folder to add as a section")
    p.add_argument("--device", default="cpu", help="torch device for the analyses (default cpu)")
    p.add_argument("--threads", type=int, help="torch threads (default: the run's train.threads)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_report)

    p = analyze.add_parser("baselines", help="model vs nuclear norm vs copy-and-zero, and OOD (finding 3)")
    p.add_argument("run", help="run directory, e.g. checkpoints/cpu")
    p.add_argument("-o", "--out", help="output folder (default out/<run name>)")
    p.add_argument("--step", type=int, help="checkpoint to evaluate (default the last)")
    p.add_argument("--n-matrices", type=int, default=128, help="matrices per p_mask / OOD variant")
    p.add_argument("--p-masks", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    p.add_argument("--layout", default="pad", choices=["pad", "gather"],
                   help="how smaller matrices meet the trained position grid (analyses.baselines)")
    p.add_argument("--threads", type=int, help="torch threads (default: the run's train.threads)")
    p.set_defaults(func=_baselines)

    p = analyze.add_parser("dynamics", help="repetition, collapse, attention progress (PAPER.md section 2)")
    p.add_argument("run", help="run directory, e.g. checkpoints/cpu")
    p.add_argument("-o", "--out", help="output folder (default out/<run name>)")
    p.add_argument("--steps", nargs="+", default=["all"], help="all, around_drop or step numbers (default all)")
    p.add_argument("--batch-size", type=int, default=256, help="matrices per checkpoint (fixed seed)")
    p.add_argument("--threads", type=int, help="torch threads (default: the run's train.threads)")
    p.set_defaults(func=_dynamics)

    p = analyze.add_parser("intervention", help="train with attention scaled toward the optimal map by c")
    p.add_argument("--scales", nargs="+", type=float, required=True, help="values of c (1: no intervention)")
    p.add_argument("--preset", default="cpu", help="preset to train (default cpu)")
    p.add_argument("--config", help="a config.yaml instead of a preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--train-steps", type=int, help="training steps per run (default: the config's)")
    p.add_argument("--start", type=int, default=0, help="step from which the intervention acts")
    p.add_argument("-o", "--out", help="folder of the runs (default out/intervention)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: the config's train.threads)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_intervention)
