"""The registry's adapters of the llc lens: `NAME_tables(ctx)` and `NAME_figures(ctx, tables)` read what they need from the run context and call the lens's plain functions."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
from tqdm.auto import tqdm

from analyses.llc.components import component_llc, model_components
from analyses.llc.estimator import llc_per_step
from analyses.llc.figures import plot_llc, plot_sgld_traces
from analyses.llc.sampler import llc_from_traces, sgld_traces


def run_component_llc(ctx, components: list[str] | None = None, heads: bool = False,
                      num_chains: int | None = None) -> pd.DataFrame:
    """The refined LLC of every component at a run's key checkpoints (plateau, drop, end), one row
    per (moment, component): `component_llc` with the run's one calibration (the report's,
    `analyses.llc.adapters.run_calibration`, cached; `num_chains` may lower its chain count to save
    time), each checkpoint's rows cached in the run directory. `ctx` an `analyses.base.context.Context`;
    `components` default `model_components` (with every head when `heads`)."""
    from dataclasses import replace

    from analyses.base.store import cached
    from analyses.llc.adapters import QUICK, REPORT, chain_settings, run_calibration

    calibration = run_calibration(ctx, QUICK if ctx.quick else REPORT)
    if num_chains is not None:
        calibration = replace(calibration, config=replace(calibration.config, num_chains=num_chains))
    own = ctx.anatomy.source == "mechlrmc"
    names = list(components or (model_components(ctx.model(ctx.final), heads=heads) if own
                                else ctx.anatomy.component_names()))
    if not own:  # named by the run's anatomy: the masks of its groups
        names = {name: {p: None for p in ctx.anatomy.params(name, dict(ctx.model(ctx.final).named_parameters()))}
                 for name in names}
    settings = {**chain_settings(ctx, calibration), "components": list(names)}
    frames = []
    for moment, step in tqdm(ctx.key.items(), desc="component LLC", unit="ckpt", disable=not ctx.progress):
        rows = cached(ctx.run, "llc_components", step, settings,
                      lambda: component_llc(ctx.model(step), ctx.batch, names, calibration))
        frames.append(rows.assign(moment=moment, step=step))
    return pd.concat(frames, ignore_index=True)


# calibration budgets (`analyses.llc.calibrate.calibrate` options) of the report and of quick runs
REPORT = {"batch_size": 64, "max_steps": 300, "rounds": 2, "num_chains": 3}


QUICK = {"batch_size": 16, "max_steps": 60, "rounds": 1, "num_chains": 2}


def run_calibration(ctx, options: dict):
    """The run's SGLD settings: calibrated once, at its final checkpoint (after the drop the
    curvature is largest, so the step is safe at every checkpoint), and cached in the run directory
    with its other measurements (`analyses.base.store`)."""
    from analyses.base.store import cached
    from analyses.llc.calibrate import Calibration, calibrate

    settings = {**options, "batch": len(ctx.batch), "data": asdict(ctx.run.config.data)}
    memo = {}

    def compute():
        if not memo:
            # per-tensor preconditioning (full_limit 0): the cache keeps scales, not a whole-model Hessian
            memo["calibration"] = calibrate(ctx.model(ctx.final), ctx.batch, progress=ctx.progress, full_limit=0,
                                            **options)
        return memo["calibration"]

    scales = cached(ctx.run, "llc_calibration", ctx.final, settings, lambda: compute().scales_frame())
    sweep = cached(ctx.run, "llc_sweep", ctx.final, settings, lambda: compute().sweep)
    return Calibration.from_frames(scales, sweep)


def chain_settings(ctx, calibration) -> dict:
    """What decides a checkpoint's cached chains under the run's `calibration`: its config, its
    scales (rounded as the cache reads them back), the analysis batch and the task's data."""
    scales = {name: float(f"{k:.6g}") for name, k in calibration.scales.items()}
    return {**asdict(calibration.config), "scales": scales, "batch": len(ctx.batch),
            "data": asdict(ctx.run.config.data)}


def llc_tables(ctx) -> dict[str, pd.DataFrame]:
    """SGLD traces at the key checkpoints (plateau, drop, end; or the asked steps) with the
    run's calibrated settings, each cached in the run directory (`analyses.base.store`) under its
    checkpoint hash and the settings; the per-step LLC with its diagnostics; the calibration sweep."""
    from analyses.base.store import cached

    options = QUICK if ctx.quick else REPORT
    calibration = run_calibration(ctx, options)
    settings = chain_settings(ctx, calibration)
    frames = []
    # the key checkpoints (plateau, drop, end) unless steps are asked for: calibrated chains are long
    steps = ctx.steps if ctx.steps_asked is not None else sorted(set(ctx.key.values()))
    for step in tqdm(steps, desc="llc", unit="ckpt", disable=not ctx.progress):
        traces = cached(ctx.run, "llc_traces", step, settings,
                        lambda: sgld_traces(ctx.model(step), ctx.batch, calibration.config, scales=calibration.scales))
        frames.append(traces.assign(step=step))
    traces = pd.concat(frames, ignore_index=True)
    sweep = calibration.sweep.assign(calibrated_at=ctx.final)
    return {"llc_traces": traces[["step", *[c for c in traces if c != "step"]]],
            "llc": llc_per_step(traces, calibration.diagnostics()), "llc_calibration": sweep}


def llc_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    traces, table = tables["llc_traces"], tables["llc"].set_index("step")
    config = run_calibration(ctx, QUICK if ctx.quick else REPORT).config
    chains = pd.concat([llc_from_traces(t).assign(step=s) for s, t in traces.groupby("step")], ignore_index=True)
    chains = chains.assign(ok=chains.step.map(table.ok))
    moments = {m: s for m, s in ctx.key.items() if s in table.index}
    failing = [int(s) for s in table.index[~table.ok.astype(bool)]]
    note = (f"<p>SGLD (devinterp) on the {len(ctx.batch)}-example analysis batch at {len(table)} checkpoints "
            f"(the others: <code>mechlrmc analyze llc RUN --steps all</code>; every estimate is cached in "
            f"the run directory), with settings calibrated once at step {ctx.final} "
            f"(<code>analyses.llc.calibrate</code>: n&beta; = n / log n = {config.inverse_temperature:.3g}, "
            "each tensor preconditioned by its curvature, a walked sweep of step size and localization): "
            f"{config.num_chains} chains x ({config.num_burnin} burn-in + {config.num_draws} draws), step "
            f"{config.lr:g} and localization {config.localization:g} in curvature units, batch {config.batch_size}. "
            "A checkpoint is ok when no chain diverges, its traces are flat after the shaded burn-in, and the "
            "calibration found the estimate stable under half the step and half the localization; "
            + (f"<b>diagnostics fail at steps {failing}</b> (hollow markers)" if failing else "all checkpoints pass")
            + ". Mean LLC across chains: "
            + ", ".join(f"{m} (step {s}) {table.llc_mean[s]:.2f} &plusmn; {table.llc_std[s]:.2f}"
                        + ("" if table.ok[s] else " (fails)") for m, s in moments.items()) + ".</p>")
    return {"note": note, "llc": plot_llc(chains, ctx.run.metrics, ctx.phases.drop_step),
            "sgld_traces": plot_sgld_traces(traces[traces.step.isin(list(moments.values()))]),
            "llc_table": table.reset_index(), "llc_calibration": tables["llc_calibration"]}
