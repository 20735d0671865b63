"""CLI subcommands of the analysis layer.

Each module in this package defines `register(subparsers)`, which adds its commands to the
`mechlrmc` parser (top level, e.g. `report`, or under `analyze`) with `set_defaults(func=...)`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil


def register(subparsers: argparse._SubParsersAction) -> None:
    analyze = subparsers.add_parser("analyze", help="run an analysis over a run's checkpoints")
    analyze_sub = analyze.add_subparsers(dest="analysis", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(top=subparsers, analyze=analyze_sub)
