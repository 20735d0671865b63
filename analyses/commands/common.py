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
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise OptionError(f"--batch-size {args.batch_size} is invalid: allowed an integer >= 1")
    if (getattr(args, "threads", None) or 0) < 0:
        raise OptionError(f"--threads {args.threads} is invalid: allowed an integer >= 0 (0: torch's default)")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="torch threads (default: the run's train.threads; 0: torch's default)")


def set_threads(args: argparse.Namespace, config=None) -> None:
    """The one threads policy of every command: --threads, else the run's (or config's)
    `train.threads`, else torch's default."""
    check_counts(args)
    threads = args.threads if args.threads is not None else (config.train.threads if config is not None else 0)
    if threads:
        import torch

        torch.set_num_threads(threads)


def output_dir(args: argparse.Namespace, run) -> Path:
    """--out, else out/<run name>; created if missing."""
    out = Path(args.out) if args.out else Path("out") / run.path.name
    out.mkdir(parents=True, exist_ok=True)
    return out
