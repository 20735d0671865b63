"""`mechlrmc analyze probes|embeddings|patching|swaps|freeze RUN` and `mechlrmc freeze-train RUN`.

    mechlrmc analyze probes RUN [--steps ...]      probes.csv, probes_summary.csv, probes.html
    mechlrmc analyze embeddings RUN               embeddings.csv/.html, token_embeddings.html,
                                                  position_tsne.html (last step)
    mechlrmc analyze patching RUN [--corruption negate|resample|shuffle_rows]
                                                  patching.csv, patching_heads.html,
                                                  patching_positions.html, patching_layers.html
    mechlrmc analyze swaps RUN --pre S --post S   swaps.csv, swaps.html
    mechlrmc analyze freeze RUN [--steps N]       the paper's component-wise set: freeze/<set>/
                                                  runs, freeze.csv, freeze.html
    mechlrmc freeze-train RUN --components attn --out DIR [--init init|S] [--reference S]
OUT defaults to out/<run name>.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analyses.commands._shared import check_counts, parse_init, parse_steps, setup

FREEZE_STEPS = 1500  # cpu preset: ~2-3 min per run on one thread (analyses.freeze.DEFAULT_STEPS)


def _save(fig, path: Path) -> None:
    fig.write_html(path, include_plotlyjs=True)
    print(f"wrote {path}")


def _probes(args: argparse.Namespace) -> int:
    import pandas as pd

    from analyses.probes import first_step_encoded, plot_probes, probe, probe_summary
    from analyses.walk import across_checkpoints

    run, out, batch = setup(args)
    targets = args.targets.split(",")
    frame = across_checkpoints(run, probe, steps=parse_steps(args.steps), batch=batch, targets=targets)
    frame.to_csv(out / "probes.csv", index=False)
    summary = pd.concat({p: probe_summary(frame, "r2", p) for p in ("masked", "observed")}, names=["positions"])
    summary.to_csv(out / "probes_summary.csv")
    _save(plot_probes(frame, "r2", "masked"), out / "probes.html")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print("test R^2 at masked positions (layer 0: embeddings, l: after block l):")
        print(probe_summary(frame, "r2", "masked").to_string())
        print("first step with R^2 >= 0.5 at masked positions:")
        print(first_step_encoded(frame).to_string())
    return 0


def _embeddings(args: argparse.Namespace) -> int:
    from analyses.embeddings import embedding_geometry, plot_embedding_geometry, plot_position_tsne, plot_token_embeddings
    from analyses.walk import across_checkpoints

    run, out, batch = setup(args)
    data = run.config.data
    frame = across_checkpoints(run, embedding_geometry, steps=parse_steps(args.steps), batch=batch,
                               precision=data.precision, value_max=data.value_max)
    frame.to_csv(out / "embeddings.csv", index=False)
    _save(plot_embedding_geometry(frame), out / "embeddings.html")
    model = run.load_model(int(frame.step.max()))
    _save(plot_token_embeddings(model, batch, data.precision, data.value_max), out / "token_embeddings.html")
    _save(plot_position_tsne(model, data.m, data.n), out / "position_tsne.html")
    print(frame.round(3).to_string(index=False))
    return 0


def _patching(args: argparse.Namespace) -> int:
    from analyses.patching import patching, plot_patching, plot_patching_steps
    from analyses.walk import across_checkpoints

    run, out, batch = setup(args)
    frame = across_checkpoints(run, patching, steps=parse_steps(args.steps), batch=batch,
                               data_cfg=run.config.data, corruption=args.corruption)
    frame.to_csv(out / "patching.csv", index=False)
    _save(plot_patching(frame, "z", "layer_head"), out / "patching_heads.html")
    _save(plot_patching(frame, "resid_pre", "layer_pos"), out / "patching_positions.html")
    _save(plot_patching_steps(frame, "attn_out"), out / "patching_layers.html")
    layers = frame[frame.granularity == "layer"].pivot_table(index=["site", "layer"], columns="step",
                                                              values="recovery_mask")
    print("recovery at masked positions, whole site of one layer patched:")
    print(layers.round(2).to_string())
    heads = frame[(frame.granularity == "layer_head") & (frame.step == frame.step.max())]
    print(f"top heads at step {frame.step.max()} (z of all positions patched):")
    print(heads.nlargest(8, "recovery_mask")[["layer", "head", "recovery_mask", "recovery_obs"]].round(3).to_string(index=False))
    return 0


def _swaps(args: argparse.Namespace) -> int:
    from analyses.components import SWAP_SET
    from analyses.swaps import plot_swaps, swap_grid

    run, out, batch = setup(args)
    components = args.components.split(";") if args.components else SWAP_SET
    frame = swap_grid(run, args.pre, args.post, components, batch=batch)
    frame.to_csv(out / "swaps.csv", index=False)
    _save(plot_swaps(frame), out / "swaps.html")
    print(frame.drop(columns=["n_params_swapped"]).round(4).to_string(index=False))
    return 0


def _freeze(args: argparse.Namespace) -> int:
    from analyses.components import FREEZE_SET
    from analyses.freeze import freeze_sweep, plot_freeze

    run, out, _ = setup(args)
    init = parse_init(args.init)
    sets = args.sets.split(";") if args.sets else FREEZE_SET
    frame = freeze_sweep(run, out / "freeze", sets, args.steps, init, args.reference)
    frame.to_csv(out / "freeze.csv", index=False)
    _save(plot_freeze(frame, run.config.data.plateau_mask_loss), out / "freeze.html")
    summary = frame.groupby("components", sort=False).agg(
        drop_step=("drop_step", "first"), final_loss_mask=("eval_loss_mask", "last"),
        wall_time_s=("wall_time", "last"))
    print(summary.round(4).to_string())
    return 0


def _freeze_train(args: argparse.Namespace) -> int:
    import torch

    from analyses.freeze import freeze_train
    from mechlrmc.runs import Run

    check_counts(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    init = parse_init(args.init)
    sub = freeze_train(Run(args.run), args.components, args.out, init, args.reference, args.steps, args.set,
                       progress=not args.quiet)
    last = sub.metrics.dropna(subset=["eval_loss"]).iloc[-1]
    print(f"run saved to {sub.path}: step {int(last.step)} eval L={last.eval_loss:.4g} "
          f"L_obs={last.eval_loss_obs:.4g} L_mask={last.eval_loss_mask:.4g}")
    return 0


def _common(p: argparse.ArgumentParser, steps: str = "all") -> None:
    p.add_argument("run")
    p.add_argument("-o", "--out", help="output directory (default out/<run name>)")
    p.add_argument("--batch-size", type=int, default=512, help="matrices in the analysis batch")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    if steps:
        p.add_argument("--steps", nargs="+", default=[steps], help="all, around_drop or step numbers")


def _freeze_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", default="init", help="start the trained components from 'init' (step 0) or a step")
    p.add_argument("--reference", type=int, help="checkpoint the frozen components come from (default: last)")
    p.add_argument("--steps", type=int, default=FREEZE_STEPS, help="training steps of each run")


def register(top: argparse._SubParsersAction, analyze: argparse._SubParsersAction) -> None:
    p = analyze.add_parser("probes", help="linear probes per layer across checkpoints (finding 7)")
    _common(p)
    p.add_argument("--targets", default="value,row,col,u,v,sigma", help="comma-separated probe targets")
    p.set_defaults(func=_probes)

    p = analyze.add_parser("embeddings", help="token / position embedding geometry (finding 8)")
    _common(p)
    p.set_defaults(func=_embeddings)

    p = analyze.add_parser("patching", help="activation patching sweeps, clean X vs corrupted (finding 6)")
    _common(p, steps="around_drop")
    p.set_defaults(batch_size=64)
    p.add_argument("--corruption", default="negate", choices=["negate", "resample", "shuffle_rows"])
    p.set_defaults(func=_patching)

    p = analyze.add_parser("swaps", help="swap components between two checkpoints (finding 9)")
    _common(p, steps="")
    p.add_argument("--pre", type=int, required=True, help="pre-drop step")
    p.add_argument("--post", type=int, required=True, help="post-drop step")
    p.add_argument("--components", help="';'-separated component sets, e.g. 'attn;qkv;~attn' (default: paper set)")
    p.set_defaults(func=_swaps)

    p = analyze.add_parser("freeze", help="the paper's component-wise training set (finding 10)")
    _common(p, steps="")
    _freeze_options(p)
    p.add_argument("--sets", help="';'-separated component sets (default: embed;pos_embed;attn;mlp;all)")
    p.set_defaults(func=_freeze)

    p = top.add_parser("freeze-train", help="train only some components, the rest fixed at a checkpoint")
    p.add_argument("run")
    p.add_argument("--components", required=True, help="component spec, e.g. 'pos_embed' or 'attn.0,mlp'")
    p.add_argument("--out", required=True, help="new run directory")
    _freeze_options(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_freeze_train)
