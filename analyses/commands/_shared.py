"""Helpers shared by the analysis commands (this module registers no command)."""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_steps(values: list[str]):
    """CLI step selection: "all", "around_drop" or step numbers."""
    if len(values) == 1 and values[0] in ("all", "around_drop"):
        return values[0]
    try:
        return [int(v) for v in values]
    except ValueError:
        raise SystemExit(f"mechlrmc: error: --steps {values} is invalid: allowed all, around_drop or step numbers")


def output_dir(args: argparse.Namespace, run) -> Path:
    """--out, else out/<run name>; created if missing."""
    out = Path(args.out) if args.out else Path("out") / run.path.name
    out.mkdir(parents=True, exist_ok=True)
    return out


def setup(args: argparse.Namespace):
    import torch

    from analyses.walk import analysis_batch
    from mechlrmc.runs import Run

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args.run)
    return run, output_dir(args, run), analysis_batch(run, args.batch_size)
