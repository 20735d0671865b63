"""`mechlrmc analyze NAME RUN`: one registered analysis (analyses.base.registry), or a group of them.

    mechlrmc analyze NAME RUN [-o OUT] [--steps all|around_drop|S ...] [--batch-size N] [--threads N]
        writes the entry's tables as OUT/<table>.csv and its figures as OUT/<figure>.html
        (OUT defaults to out/<run name>), and prints its summary tables
    mechlrmc analyze attention RUN    phases, taxonomy, views and scrubber together
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analyses.base import registry
from analyses.base.registry import GROUPS, Analysis, get
from analyses.commands.common import add_threads, output_dir, parse_steps, set_threads


def _write(out, name: str, part) -> str | None:
    """Save one table or figure under OUT; the file's name (None for a note)."""
    import pandas as pd
    import plotly.graph_objects as go

    from analyses.report.page import Page
    from mechlrmc.runs import atomic_write

    if isinstance(part, pd.DataFrame):
        plain = part.index.name is None and part.index.equals(pd.RangeIndex(len(part)))
        file = out / f"{name}.csv"
        atomic_write(file, part.to_csv(index=not plain).encode())
    elif isinstance(part, go.Figure):
        file = out / f"{name}.html"
        atomic_write(file, part.to_html(include_plotlyjs=True, full_html=True).encode())
    elif isinstance(part, Page):
        file = out / f"{name}.html"
        atomic_write(file, part.html.encode())
    else:
        return None
    return str(file.relative_to(out))


def _run(args: argparse.Namespace) -> int:
    import pandas as pd

    from analyses.base.context import FULL, Context
    from analyses.family.summary import find_family
    from mechlrmc.errors import OptionError
    from mechlrmc.runs import Run

    group = args.analysis in GROUPS
    entries = [get(n) for n in GROUPS.get(args.analysis, (args.analysis,))]
    run = Run(args.run)
    set_threads(args, run.config)
    steps = parse_steps(args.steps) if args.steps else entries[0].steps
    options = {o.dest: getattr(args, o.dest) for a in entries for o in a.options}
    options["batch_size"] = args.batch_size
    ctx = Context(run, FULL, progress=not args.quiet, steps_asked=steps, options=options)
    if any(a.needs == "family" for a in entries):
        ctx.family = find_family(run)
    if getattr(args, "interventions", None):
        ctx.interventions = Path(args.interventions)
    out = output_dir(args, run)
    written = []
    for analysis in entries:
        if not analysis.applies(ctx) and group:  # a group runs the members that apply
            print(f"{analysis.name}: skipped, it does not apply to {run.config.data.task} runs")
            continue
        if not analysis.applies(ctx):
            raise OptionError(f"analysis {analysis.name!r} does not apply to {run.path}: it needs "
                              f"{analysis.needs or 'a task in ' + str(list(analysis.tasks))}")
        tables = analysis.compute(ctx)
        written += [_write(out, name, frame) for name, frame in tables.items()]
        for name, part in analysis.draw(ctx, tables).items():
            if not (isinstance(part, pd.DataFrame) and name in tables):  # a table shown is written once
                written.append(_write(out, name, part))
            if isinstance(part, pd.DataFrame):
                with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_rows", 40):
                    print(f"{analysis.name}: {name}\n{part.to_string()}\n")
    files = sorted(f for f in set(written) if f)
    print(f"wrote {out}: {', '.join(files)}")
    return 0


def _parser(sub: argparse._SubParsersAction, name: str, entries: list[Analysis], help: str) -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument("run", help="run directory, e.g. checkpoints/cpu")
    p.add_argument("-o", "--out", help="output folder (default out/<run name>)")
    p.add_argument("--steps", nargs="+", help=f"all, around_drop or step numbers (default {entries[0].steps})")
    p.add_argument("--batch-size", type=int, help="matrices in the analysis batch (fixed seed; default 512)")
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    seen = set()
    for option in (o for a in entries for o in a.options):
        if option.flag not in seen:
            seen.add(option.flag)
            p.add_argument(option.flag, type=option.type, nargs=option.nargs, choices=option.choices, help=option.help)
    p.set_defaults(func=_run)


def register(analyze: argparse._SubParsersAction) -> None:
    for analysis in registry.ANALYSES:
        _parser(analyze, analysis.name, [analysis], f"{analysis.title} ({analysis.finding})")
    names = {a.name for a in registry.ANALYSES}
    for name, members in GROUPS.items():
        if set(members) <= names:
            _parser(analyze, name, [get(m) for m in members], f"{', '.join(members)} together")

