"""The registry's adapters of the llc lens: `NAME_tables(ctx)` and `NAME_figures(ctx, tables)` read what they need from the run context and call the lens's plain functions."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
from tqdm.auto import tqdm

from analyses.llc.components import component_llc, model_components
from analyses.llc.estimator import llc_per_step
from analyses.llc.figures import plot_llc, plot_sgld_traces
from analyses.llc.sampler import llc_from_traces


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


# the budgets of the report and of quick runs: chains of at most `max_steps` steps (burn-in and as
# many draws) on minibatches of `batch_size` examples, `num_chains` per checkpoint; the curvature
# scales from `curvature` = (Hutchinson probes, power iterations, examples) Hessian-vector products.
# The report's minibatch is 16: on the shipped run's plateau, drop and end, 8 chains each gave the
# same LLC and the same spread across chains at minibatch 16 as at 64 (7.16, 4.33, 3.00 against 7.20,
# 4.31, 3.02; std 1.11, 0.62, 0.52 against 1.05, 0.72, 0.47) at 43 % of the CPU (the paired L(w*) and
# the noise's control variate take the minibatch's noise out), so 5 chains cost less than 3 did at 64
# and the standard error is smaller (benchmarks/RESULTS.md, 2026-12-07)
REPORT = {"batch_size": 16, "max_steps": 300, "num_chains": 5, "curvature": (8, 20, 128)}


QUICK = {"batch_size": 16, "max_steps": 60, "num_chains": 2, "curvature": (4, 8, 32)}


WORKERS = 2  # processes for the report's chains (a context's option "workers" overrides it)


def _own_model(ctx, step: int):
    """The model at `step` for the sampler: a copy of its own where the report computes this section
    in a thread beside others (whose hooks on the context's shared models must not reach the chains),
    else the context's (loaded once)."""
    return ctx.run.load_model(step, device=ctx.device) if _lanes(ctx) > 1 else ctx.model(step)


def _lanes(ctx) -> int:
    """The report's lanes: above one, this section runs in a thread beside the others (quick or not)."""
    return int(ctx.option("workers", WORKERS))


def _workers(ctx) -> int:
    """The processes a run's chains use: none of their own in quick mode (their start-up would cost
    more than the short chains), else the report's lanes."""
    return 1 if ctx.quick else _lanes(ctx)


def run_calibration(ctx, options: dict, steps: list[int] | None = None):
    """The run's SGLD settings, checked once at its final checkpoint (after the drop the curvature
    is largest, so the step is safe at every checkpoint) and cached in the run directory with its
    other measurements (`analyses.base.store`): per-tensor scales and the first point of
    `analyses.llc.calibrate` with its checks. Its chains and those of `steps` (checkpoints whose
    chains are wanted too) run together over `WORKERS` processes; the calibration's `traces` holds
    them by step when they were sampled here (the final checkpoint's are the check's own)."""
    from analyses.base.store import cached
    from analyses.llc.calibrate import Calibration

    settings = {**options, "batch": len(ctx.batch), "data": asdict(ctx.run.config.data), "sampler": "chains"}
    memo = {}

    def compute():
        if not memo:
            memo["calibration"] = checked_point(_own_model(ctx, ctx.final), ctx.batch, options, progress=ctx.progress,
                                                others={s: _own_model(ctx, s) for s in steps or [] if s != ctx.final},
                                                workers=_workers(ctx))
        return memo["calibration"]

    scales = cached(ctx.run, "llc_calibration", ctx.final, settings, lambda: compute().scales_frame())
    sweep = cached(ctx.run, "llc_sweep", ctx.final, settings, lambda: compute().sweep)
    calibration = Calibration.from_frames(scales, sweep)
    calibration.traces = memo["calibration"].traces if memo else {}
    return calibration


def checked_point(model, data, options: dict, others: dict | None = None, progress: bool = False,
                  workers: int = WORKERS, tol: float = 0.1):
    """`analyses.llc.calibrate.calibrate` in one pass: per-tensor scales and its first point
    (step 0.2, localization 0.02 in curvature units, chains of burn-in and as many draws), checked
    as it checks a point (no divergence, flat traces, stable under half the step and under half the
    localization), without walking to another: a point that fails is flagged, not moved. Unlike
    `calibrate` it keeps the report's chain length when that is shorter than the relaxation time at
    half the localization (the section's note says so: `checks_note`). The chains of `others` (step ->
    model, at the same settings) run in the same pool
    (`analyses.llc.chains.sample_many`); the returned `Calibration` carries every step's traces in
    `traces` (the model's own under key None)."""
    from dataclasses import replace

    from analyses.llc.calibrate import (CHAINS, START_LOCALIZATION, START_LR, Calibration, agree, chain_length,
        curvature_scales, default_nbeta, effective_sample_size, flat_after_burnin)
    from analyses.llc.chains import sample_many
    from analyses.llc.data import SGLDConfig, sampled_dimension
    from analyses.llc.sampler import diverged_chains

    nbeta = default_nbeta(effective_sample_size(data))
    probes, iterations, examples = options["curvature"]
    scales = curvature_scales(model, data, nbeta, probes=probes, iterations=iterations, examples=examples)
    steps = chain_length(START_LR, START_LOCALIZATION, options["max_steps"])
    config = SGLDConfig(num_chains=options["num_chains"], num_burnin=steps, num_draws=steps, lr=START_LR,
                        localization=START_LOCALIZATION, batch_size=options["batch_size"], nbeta=nbeta, paired=True)
    points = {"chosen": config, "half_lr": replace(config, num_chains=CHAINS, lr=START_LR / 2),
              "half_localization": replace(config, num_chains=CHAINS, localization=START_LOCALIZATION / 2)}
    others = others or {}
    specs = [{"model": model, "data": data, "config": c, "scales": scales} for c in points.values()]
    specs += [{"model": m, "data": data, "config": config, "scales": scales} for m in others.values()]
    frames = sample_many(specs, workers=workers, progress=progress)
    dimension = sampled_dimension(model)
    results = {}
    for (name, point), frame in zip(points.items(), frames):
        chains = llc_from_traces(frame)
        diverged = bool(diverged_chains(frame)) or bool((chains.llc.abs() > dimension).any())
        results[name] = (point, chains, diverged, not diverged and flat_after_burnin(frame, tol))
    _, chosen, diverged, flat = results["chosen"]
    stable = not results["half_lr"][2] and agree(chosen, results["half_lr"][1], tol / 2)
    localization_ok = not results["half_localization"][2] and agree(chosen, results["half_localization"][1], tol / 2)
    flat = flat and results["half_lr"][3] and results["half_localization"][3]
    sweep = pd.DataFrame([{"lr": p.lr, "localization": p.localization, "steps": steps, "floor": None,
                           "llc": c.llc.mean(), "llc_std": c.llc.std(ddof=1), "diverged": d, "flat": f,
                           "chosen": name == "chosen"} for name, (p, c, d, f) in results.items()])
    calibration = Calibration(config, scales, dimension, diverged, flat, stable, localization_ok, sweep)
    calibration.traces = {None: frames[0], **dict(zip(others, frames[len(points):]))}
    return calibration


def chain_settings(ctx, calibration) -> dict:
    """What decides a checkpoint's cached chains under the run's `calibration`: its config, its
    scales (rounded as the cache reads them back), the analysis batch and the task's data."""
    scales = {name: float(f"{k:.6g}") for name, k in calibration.scales.items()}
    return {**asdict(calibration.config), "scales": scales, "batch": len(ctx.batch),
            "data": asdict(ctx.run.config.data), "sampler": "chains"}


def llc_tables(ctx) -> dict[str, pd.DataFrame]:
    """SGLD traces at the key checkpoints (plateau, drop, end; or the asked steps) with the
    run's calibrated settings, each cached in the run directory (`analyses.base.store`) under its
    checkpoint hash and the settings; the per-step LLC with its diagnostics; the calibration sweep.
    A first report samples the calibration's checks and every checkpoint together, on both cores."""
    from analyses.base.store import cached
    from analyses.llc.chains import sample_many

    options = QUICK if ctx.quick else REPORT
    # the key checkpoints (plateau, drop, end) unless steps are asked for: calibrated chains are long
    steps = ctx.steps if ctx.steps_asked is not None else sorted(set(ctx.key.values()))
    calibration = run_calibration(ctx, options, steps)
    settings = chain_settings(ctx, calibration)
    fresh = {ctx.final if step is None else step: frame for step, frame in calibration.traces.items()}

    def sample(step):
        if step not in fresh:  # a step the calibration's pass did not cover (its cache was already there)
            spec = {"model": _own_model(ctx, step), "data": ctx.batch, "config": calibration.config,
                    "scales": calibration.scales}
            fresh[step] = sample_many([spec], workers=_workers(ctx))[0]
        return fresh[step]

    frames = []
    for step in tqdm(steps, desc="llc", unit="ckpt", disable=not ctx.progress):
        traces = cached(ctx.run, "llc_traces", step, settings, lambda: sample(step))
        frames.append(traces.assign(step=step))
    traces = pd.concat(frames, ignore_index=True)
    sweep = calibration.sweep.assign(calibrated_at=ctx.final)
    return {"llc_traces": traces[["step", *[c for c in traces if c != "step"]]],
            "llc": llc_per_step(traces, calibration.diagnostics()), "llc_calibration": sweep}


def checks_note(sweep: pd.DataFrame) -> str:
    """What the calibration's check measured, in one sentence: the estimate at the chosen point, at
    half the step and at half the localization, and which check fails (the evidence for a flag)."""
    rows = {("chosen" if r.chosen else "half the step" if r.lr < sweep.lr.max() else "half the localization"): r
            for r in sweep.itertuples()}
    if "chosen" not in rows:
        return ""
    chosen = rows["chosen"]
    parts = [f"{name} {r.llc:.2f} &plusmn; {r.llc_std:.2f}" + ("" if r.flat else " (not flat)")
             for name, r in rows.items()]
    verdicts = [f"{name} moves it by {abs(r.llc / chosen.llc - 1):.0%}" for name, r in rows.items()
                if name != "chosen" and abs(r.llc / chosen.llc - 1) > 0.05]
    from analyses.llc.calibrate import relaxation_time

    half_step, half_loc = rows.get("half the step"), rows.get("half the localization")
    unrelaxed = (half_step is not None and half_loc is not None and verdicts
                 and half_step.llc < chosen.llc < half_loc.llc)
    why = (" Lower at half the step and higher at half the localization is the mark of chains that have "
           "not relaxed: a direction held only by the localization relaxes in about 2 / (step x localization) "
           f"= {relaxation_time(chosen.lr, chosen.localization):.0f} steps against a {int(chosen.steps)}-step burn-in, so "
           "these estimates measure a transient (see the traces); settling it takes chains of thousands of "
           "steps per checkpoint (<code>analyses.llc.chains.fast_traces</code> with a target error; docs/llc.md)."
           if unrelaxed else "")
    settle = None if half_loc is None else relaxation_time(half_loc.lr, half_loc.localization)
    if not why and settle is not None and settle > half_loc.steps:
        why = (f" The chains at half the localization ran {int(half_loc.steps)} burn-in steps against the "
               f"{settle:.0f} a direction held only by the localization takes to "
               "relax there: this check sees only the directions that relax sooner (a curved one relaxes in "
               "about 2 / (step x (curvature + localization)) steps), so its pass is no proof for flatter ones "
               "(<code>analyses.llc.calibrate</code> fails the check in that case; the report keeps its budget).")
    return (f"<p>The check at step {int(sweep.calibrated_at.iloc[0])}: " + ", ".join(parts)
            + (f"; {', '.join(verdicts)}." if verdicts else ".") + why + "</p>")


def llc_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    traces, table = tables["llc_traces"], tables["llc"].set_index("step")
    config = run_calibration(ctx, QUICK if ctx.quick else REPORT).config
    chains = pd.concat([llc_from_traces(t).assign(step=s) for s, t in traces.groupby("step")], ignore_index=True)
    chains = chains.assign(ok=chains.step.map(table.ok))
    moments = {m: s for m, s in ctx.key.items() if s in table.index}
    failing = [int(s) for s in table.index[~table.ok.astype(bool)]]
    note = (f"<p>SGLD on the {len(ctx.batch)}-example analysis batch at {len(table)} checkpoints "
            f"(the others: <code>mechlrmc analyze llc RUN --steps all</code>; every estimate is cached in "
            f"the run directory), with settings checked once at step {ctx.final} "
            f"(<code>analyses.llc.calibrate</code>: n&beta; = n / log n = {config.inverse_temperature:.3g}, "
            "each tensor preconditioned by its curvature, the estimate compared with half the step and half "
            f"the localization): {config.num_chains} chains x ({config.num_burnin} burn-in + {config.num_draws} "
            f"draws), step {config.lr:g} and localization {config.localization:g} in curvature units, batch "
            f"{config.batch_size}, the draws corrected by the noise's control variate "
            "(<code>analyses.llc.chains</code>). A checkpoint is ok when no chain diverges, its traces are flat "
            "after the shaded burn-in, and the check found the estimate stable under half the step and half the "
            "localization; "
            + (f"<b>diagnostics fail at steps {failing}</b> (hollow markers)" if failing else "all checkpoints pass")
            + ". Mean LLC across chains &plusmn; its standard error (the std across chains / &radic;chains): "
            + ", ".join(f"{m} (step {s}) {table.llc_mean[s]:.2f} &plusmn; {table.llc_se[s]:.2f}"
                        + ("" if table.ok[s] else " (fails)") for m, s in moments.items()) + ".</p>"
            + checks_note(tables["llc_calibration"]))
    return {"note": note, "llc": plot_llc(chains, ctx.run.metrics, ctx.phases.drop_step),
            "sgld_traces": plot_sgld_traces(traces[traces.step.isin(list(moments.values()))]),
            "llc_table": table.reset_index(), "llc_calibration": tables["llc_calibration"]}
