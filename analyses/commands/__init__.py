"""The analysis layer's subcommands of `mechlrmc`, found by the core through the `mechlrmc.commands`
entry point (pyproject.toml), so the core never imports this package.

    mechlrmc analyze NAME RUN     any registered analysis (analyses.base.registry): tables as CSV, figures as HTML
    mechlrmc analyze freeze RUN   the component-wise training sweep;  mechlrmc analyze intervention ...
    mechlrmc report RUN|SWEEP     the registry assembled into one offline HTML file
    mechlrmc freeze-train RUN     train chosen components with the rest fixed
"""

from __future__ import annotations

import argparse

from analyses.commands import analyze, drivers, report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="run an analysis over a run's checkpoints")
    analyses = parser.add_subparsers(dest="analysis", required=True, metavar="NAME")
    analyze.register(analyses)
    drivers.register(top=subparsers, analyze=analyses)
    report.register(subparsers)
