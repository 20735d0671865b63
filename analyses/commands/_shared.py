"""Helpers shared by the analysis commands (this module registers no command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mechlrmc.errors import OptionError


def parse_steps(values: list[str]):
    """CLI step selection: "all", "around_drop" or step numbers."""
    if len(values) == 1 and values[0] in ("all", "around_drop"):
        return values[0]
    try:
        return [int(v) for v in values]
    except ValueError:
        raise OptionError(f"--steps {' '.join(values)} is invalid: allowed all, around_drop or step numbers") from None


def parse_init(value: str) -> str | int:
    """--init: "init" (the step-0 values) or a checkpoint step."""
    if value == "init":
        return value
    try:
        return int(value)
    except ValueError:
        raise OptionError(f"--init {value} is invalid: allowed init or a checkpoint step") from None


def check_counts(args: argparse.Namespace) -> None:
    """--batch-size >= 1 and --threads >= 0 where a command has them."""
    if getattr(args, "batch_size", 1) < 1:
        raise OptionError(f"--batch-size {args.batch_size} is invalid: allowed an integer >= 1")
    if (getattr(args, "threads", 0) or 0) < 0:
        raise OptionError(f"--threads {args.threads} is invalid: allowed an integer >= 0 (0: torch's default)")


def output_dir(args: argparse.Namespace, run) -> Path:
    """--out, else out/<run name>; created if missing."""
    out = Path(args.out) if args.out else Path("out") / run.path.name
    out.mkdir(parents=True, exist_ok=True)
    return out


def setup(args: argparse.Namespace):
    import torch

    from analyses.walk import analysis_batch
    from mechlrmc.runs import Run

    check_counts(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args.run)
    return run, output_dir(args, run), analysis_batch(run, args.batch_size)
