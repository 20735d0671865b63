"""`mechlrmc report RUN|SWEEP -o report.html [--quick] [--interventions DIR] [--workers N]`:
one standalone offline HTML file with every analysis of the registry (analyses.report.run_report), or the
family report of a sweep directory (analyses.report.family_report) with its tables as CSV beside it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analyses.commands.common import add_threads, set_threads


def _report(args: argparse.Namespace) -> int:
    from analyses.report.run_report import write_report
    from mechlrmc.runs import Run

    if not Path(args.run, "config.yaml").is_file() and Path(args.run).is_dir():
        return _family_report(args)
    run = Run(args.run)
    set_threads(args, run.config)
    report = write_report(run, args.output, quick=args.quick, device=args.device, interventions=args.interventions,
                          progress=not args.quiet, workers=args.workers)
    return _done(args.output, report)


def _family_report(args: argparse.Namespace) -> int:
    """A sweep directory: the family report, plus its tables as CSV beside the HTML."""
    from analyses.family.summary import family_runs
    from analyses.report.family_report import FamilyContext, write_family_report

    runs = family_runs(args.run)
    set_threads(args, runs[0].config)
    output = Path(args.output)
    report = write_family_report(args.run, output, quick=args.quick, progress=not args.quiet)
    ctx: FamilyContext = report.context
    tables = {"family_summary": ctx.summary}
    if not runs[0].config.recorded:  # the findings read mechlrmc's own model
        tables["findings"] = ctx.findings
    for name, frame in tables.items():
        frame.to_csv(output.with_name(f"{output.stem}_{name}.csv"), index=False)
    print("tables: " + ", ".join(f"{output.stem}_{name}.csv" for name in tables))
    return _done(output, report)


def _done(output, report) -> int:
    size = Path(output).stat().st_size / 2**20
    print(f"wrote {output} ({size:.1f} MiB, {sum(report.seconds.values()):.0f} s of analyses)")
    for key, error in report.errors.items():
        print(f"mechlrmc: section {key!r} failed: {error}", file=sys.stderr)
    return 1 if report.errors else 0


def register(top: argparse._SubParsersAction) -> None:
    p = top.add_parser("report", help="write one offline HTML report of a run (every analysis) or of a sweep")
    p.add_argument("run", help="run directory (e.g. checkpoints/cpu) or sweep directory (a family report)")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--quick", action="store_true", help="small batches and few checkpoints (smoke test)")
    p.add_argument("--interventions", help="a `mechlrmc analyze intervention` folder to add as a section")
    p.add_argument("--device", default="cpu", help="torch device for the analyses (default cpu)")
    p.add_argument("--workers", type=int, help="processes computing sections (default 2 where 2 cores are free)")
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_report)
