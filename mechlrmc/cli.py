"""The `mechlrmc` command.

    mechlrmc train --preset cpu --out runs/cpu [--steps N] [--seed S] [--set key=value ...] [--resume]
    mechlrmc train --from RUN --from-step S --out DIR [--set train.data_seed=K ...]   (a branch)
    mechlrmc info RUN
    mechlrmc export RUN --out DIR [--dtype float16] [--until STEP]
    mechlrmc sweep SPEC.yaml --out DIR [--address ADDR] [--connect-timeout SECONDS]
    mechlrmc import SRC DEST [--task NAME] [--factory module:callable] [--factory-kwargs JSON] [--prefix model.]
                    [--sites JSON]   (a transformers.Trainer output folder or Lightning checkpoints)
    mechlrmc import FILES... --out RUN (--preset NAME | --config FILE) [--set key=value ...]   (reference files)

Bad input is one line on stderr and exit code 2 (a failed write: exit code 1); `--debug` or
MECHLRMC_DEBUG=1 shows the traceback instead.

Analysis commands (`mechlrmc analyze ...`, `mechlrmc report ...`) come from the `mechlrmc.commands`
entry point of the installed packages (the analysis layer declares one); the core itself never
imports the analysis layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mechlrmc.cluster import CONNECT_TIMEOUT
from mechlrmc.config import PRESETS, RunConfig, preset
from mechlrmc.errors import UsageError


def _train(args: argparse.Namespace) -> int:
    from mechlrmc.runs import Run
    from mechlrmc.train import train

    overrides = list(args.set)
    if args.resume and Path(args.out, "config.yaml").is_file():
        cfg = Run(args.out).config
    elif args.from_run:  # a branch: the parent's config, continued from its kept state
        if args.from_step is None:
            raise UsageError("--from RUN needs --from-step S: allowed one of the run's kept states "
                             f"{Run(args.from_run).kept_states}")
        cfg = Run(args.from_run).config
        overrides = [f"train.branch_from={Path(args.from_run).resolve()}", f"train.branch_step={args.from_step}",
                     "train.keep_states=[]", *overrides]
        args.resume = False
    else:
        cfg = RunConfig.from_yaml(args.config) if args.config else preset(args.preset)
        args.resume = False
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    cfg = cfg.override(overrides)
    run = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    last = run.evals.iloc[-1]
    print(f"run saved to {run.path} ({len(run.steps)} checkpoints, step {int(last.step)}: "
          f"{run.config.task.summary(last)})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from mechlrmc.provenance import describe
    from mechlrmc.runs import Run

    run = Run(args.run)
    print(run.config.to_yaml(), end="")
    if run.config.recorded:
        print(f"model: {run.config.record.model_line()}")
    print(describe(run.provenance))
    print(f"checkpoints ({len(run.steps)}): {run.steps}")
    evals = run.evals
    columns = [c for c in run.metric_columns if c == "step" or c.startswith("eval_")][:6]
    print(evals[[*columns, "wall_time"]]
          .to_string(index=False, max_rows=30))
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from mechlrmc.export import export_run
    from mechlrmc.runs import Run

    out = export_run(Run(args.run), args.out, dtype=getattr(torch, args.dtype), atol=args.atol, until=args.until)
    size = sum(p.stat().st_size for p in out.path.rglob("*") if p.is_file())
    kept = [s for s in out.steps if out.state_dict(s)["W_E"].dtype != getattr(torch, args.dtype)]
    print(f"exported {len(out.steps)} checkpoints in {args.dtype} to {out.path} ({size / 2**20:.1f} MiB)"
          + (f"; kept the original precision at steps {kept} (outputs moved more than {args.atol})" if kept else ""))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from mechlrmc.sweep import sweep

    summary = sweep(args.spec, args.out, address=args.address, progress=not args.quiet,
                    connect_timeout=args.connect_timeout)
    shown = summary.drop(columns=["error"] if not summary.error.any() else [])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    failed = summary[summary.status != "finished"]
    for row in failed.itertuples():
        print(f"trial {row.run!r} {row.status}" + (f": {row.error}" if row.error else ""), file=sys.stderr)
    print(f"{len(summary) - len(failed)} of {len(summary)} trials finished; summary in {Path(args.out) / 'summary.csv'}")
    return 0 if failed.empty else 1


def _json_option(name: str, text: str | None) -> dict | None:
    try:
        value = None if text is None else json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{name} {text!r} is not JSON ({e}): allowed a JSON mapping") from None
    if value is not None and not isinstance(value, dict):
        raise UsageError(f"{name} {text!r} is a {type(value).__name__}: allowed a JSON mapping")
    return value


def _import(args: argparse.Namespace) -> int:
    run_options = [f"--{n.replace('_', '-')}" for n in ("task", "factory", "factory_kwargs", "prefix", "sites")
                   if getattr(args, n) is not None]
    if not (args.preset or args.config):
        return _import_run(args)
    if run_options:
        raise UsageError(f"{run_options[0]} is for `mechlrmc import SRC DEST`: the reference implementation's files "
                         f"take --out, --preset or --config, and --set")
    if not args.out:
        raise UsageError("the reference implementation's files need --out RUN: allowed a new run directory")
    from mechlrmc.reference import import_reference

    cfg = RunConfig.from_yaml(args.config) if args.config else preset(args.preset)
    run, resumable = import_reference(args.paths, args.out, cfg.override(list(args.set)))
    print(f"imported {len(run.steps)} checkpoints (steps {run.steps[0]}..{run.steps[-1]}) into {run.path}; "
          + ("`mechlrmc train --resume --out RUN` continues from the last one with its Adam state" if resumable
             else "no resume state: the files' optimizer state could not be mapped"))
    return 0


def _import_run(args: argparse.Namespace) -> int:
    paths = [*args.paths, *([args.out] if args.out else [])]
    if len(paths) != 2 or args.set:
        raise UsageError(f"mechlrmc import got {paths}{' and --set' if args.set else ''}: allowed SRC DEST (a "
                         f"transformers.Trainer output folder or Lightning checkpoints, and a new run directory), or "
                         f"FILES... --out RUN with --preset or --config (the reference implementation's files)")
    from mechlrmc.importer import import_run

    run = import_run(paths[0], paths[1], task=args.task, factory=args.factory,
                     factory_kwargs=_json_option("--factory-kwargs", args.factory_kwargs), prefix=args.prefix,
                     sites=_json_option("--sites", args.sites), progress=not args.quiet)
    metrics = run.metrics
    losses = [f"{c} at {int(metrics[c].notna().sum())} steps" for c in metrics.columns
              if "loss" in c and metrics[c].notna().any()]
    print(f"imported {len(run.steps)} checkpoints (steps {run.steps[0]}..{run.steps[-1]}) from {paths[0]} into "
          f"{run.path}; " + (", ".join(losses) if losses else "no losses found (no log_history in trainer_state.json, no "
                             "metrics.csv of Lightning's CSVLogger): the run has its checkpoints only"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechlrmc", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also MECHLRMC_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run (or continue one with --resume)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--config", help="a config.yaml to start from instead of a preset")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--from", dest="from_run", metavar="RUN",
                   help="a branch: continue RUN's config, weights and Adam state from --from-step (one of its "
                        "train.keep_states) in a new run; --set train.data_seed=K gives it its own data")
    p.add_argument("--from-step", type=int, metavar="S", help="the step of --from RUN a branch starts from")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("info", help="print a run's config, checkpoints and evaluation metrics")
    p.add_argument("run")
    p.set_defaults(func=_info)

    p = sub.add_parser("export", help="copy a run with its checkpoints in another dtype (e.g. to ship it)")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--atol", type=float, default=1e-3, help="largest change of any output in the new dtype; checkpoints beyond it keep their precision")
    p.add_argument("--until", type=int, help="keep only checkpoints and metrics up to this step")
    p.set_defaults(func=_export)

    p = sub.add_parser("sweep", help="train a family of runs (seeds x settings) on Ray Tune")
    p.add_argument("spec", help="sweep spec (YAML): preset|config, steps, set, grid, seeds, resources")
    p.add_argument("--out", required=True, help="sweep directory: one run directory per trial, summary.csv")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a private local instance)")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT, metavar="SECONDS",
                   help=f"give up on a cluster that does not answer within this time (default {CONNECT_TIMEOUT:g})")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    p.set_defaults(func=_sweep)
    p = sub.add_parser("import", help="a run that exists (a transformers.Trainer output folder, Lightning "
                                      "checkpoints) or the reference implementation's files as a new run directory")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="SRC DEST: a Trainer output folder or a folder of *.ckpt, and the new run directory; or the "
                        "reference implementation's torch.save'd files (e.g. 7x7_p03_r2_l4_h8_grok3999.tar) with --out")
    p.add_argument("--out", help="new run directory (reference files)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="reference files: their model and task")
    source.add_argument("--config", help="reference files: a config.yaml describing their model and task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--task", help="SRC DEST: the task whose data the run was trained on, e.g. mws (default: loop, "
                                  "the losses only)")
    p.add_argument("--factory", metavar="MODULE:CALLABLE",
                   help="SRC DEST: the model factory ('module:callable' or 'path/to/file.py:callable'); needed for "
                        "Lightning checkpoints, default for a Trainer folder: its config.json")
    p.add_argument("--factory-kwargs", metavar="JSON", help="SRC DEST: the factory's keyword arguments")
    p.add_argument("--prefix", help="SRC DEST: the LightningModule's attribute holding the model (default: the "
                                    "first name component every state_dict key shares, e.g. model.; '' for none)")
    p.add_argument("--sites", metavar="JSON", help='SRC DEST: the sites, e.g. \'{"final": "transformer.ln_f"}\'')
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_import)

    for command in _command_entry_points():
        command(sub)
    return parser


def _command_entry_points() -> list:
    """The `register(subparsers)` functions of the installed packages that add subcommands (the
    `mechlrmc.commands` entry-point group: the analysis layer declares one in pyproject.toml).
    Where none is installed, only the core's commands exist."""
    from importlib.metadata import entry_points

    found = []
    for point in sorted(entry_points(group="mechlrmc.commands"), key=lambda p: p.name):
        try:
            found.append(point.load())
        except ModuleNotFoundError as e:  # declared by a distribution whose package is not importable
            if not point.value.startswith(f"{e.name}"):
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("MECHLRMC_DEBUG", "") not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return args.func(args)
    except UsageError as e:
        if debug:
            raise
        print(f"mechlrmc: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # the reader went away (`mechlrmc info RUN | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
