"""The report's LLC section (the registry's "llc" entry): calibrated once per run, cached, flagged.

`run_calibration` chooses the run's SGLD settings at its final checkpoint (`analyses.llc_calibrate`)
and keeps them in the run directory with its other cached measurements (`analyses.store`), so a
report samples only the checkpoints' chains, themselves cached; `llc_tables` / `llc_figures` are the
section (finding 1, docs/FINDINGS.md: does the drop show as a change in effective complexity?).
"""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
from tqdm.auto import tqdm

from analyses.llc import _COLOURS, llc_from_traces, llc_per_step, plot_llc, plot_sgld_traces, sgld_traces

# calibration budgets (`analyses.llc_calibrate.calibrate` options) of the report and of quick runs
REPORT = {"batch_size": 64, "max_steps": 300, "rounds": 2, "num_chains": 3}
QUICK = {"batch_size": 16, "max_steps": 60, "rounds": 1, "num_chains": 2}


def run_calibration(ctx, options: dict):
    """The run's SGLD settings: calibrated once, at its final checkpoint (after the drop the
    curvature is largest, so the step is safe at every checkpoint), and cached in the run directory
    with its other measurements (`analyses.store`)."""
    from analyses.llc_calibrate import Calibration, calibrate
    from analyses.store import cached

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
    run's calibrated settings, each cached in the run directory (`analyses.store`) under its
    checkpoint hash and the settings; the per-step LLC with its diagnostics; the calibration sweep."""
    from analyses.store import cached

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
            f"(<code>analyses.llc_calibrate</code>: n&beta; = n / log n = {config.inverse_temperature:.3g}, "
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


def llc_across_drop(table: pd.DataFrame, drop_step: float | None) -> dict:
    """Does the drop show in one run's LLC? `table` is `llc_per_step` (`step, llc_mean, llc_std, ok`):
    the last checkpoint before the drop against the first at or after it. `rises` when the LLC goes
    up by more than twice the chains' summed standard deviations; `ok` when both checkpoints pass
    their diagnostics (a verdict on flagged estimates is not a finding)."""
    dropped = drop_step is not None and not pd.isna(drop_step)
    before, after = (table[table.step < drop_step], table[table.step >= drop_step]) if dropped else (table[:0],) * 2
    if before.empty or after.empty:
        return {"before": None, "after": None, "ratio": float("nan"), "rises": False, "ok": False}
    b, a = before.iloc[-1], after.iloc[0]
    noise = 2 * sum(0.0 if pd.isna(row.llc_std) else float(row.llc_std) for row in (b, a))
    return {"before": int(b.step), "after": int(a.step), "ratio": float(a.llc_mean / b.llc_mean),
            "rises": bool(a.llc_mean - b.llc_mean > noise), "ok": bool(b.ok and a.ok)}


def family_llc(tables: dict[str, pd.DataFrame], drops: dict[str, float]) -> pd.DataFrame:
    """One row per run (`llc_across_drop`), from each run's `llc_per_step` table and drop step; the
    verdict a README can quote is "rises in k of N runs whose estimates pass"."""
    return pd.DataFrame([{"run": name, "drop_step": drops.get(name), **llc_across_drop(table, drops.get(name))}
                         for name, table in tables.items()])


def plot_family_llc(tables: dict[str, pd.DataFrame], drops: dict[str, float]):
    """Every run's LLC against the steps from its drop (mean +- std over chains); a checkpoint whose
    diagnostics fail is a hollow marker."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, table) in enumerate(tables.items()):
        x = table.step - (drops.get(name) or 0)
        fig.add_scatter(x=x, y=table.llc_mean, error_y=dict(type="data", array=table.llc_std.fillna(0), width=2),
                        mode="lines+markers", name=str(name), line=dict(color=_COLOURS[i % len(_COLOURS)]),
                        marker=dict(size=8, symbol=["circle" if ok else "circle-open" for ok in table.ok],
                                    line_width=2))
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    return fig.update_layout(title="LLC of each run, aligned at its drop (hollow: diagnostics fail)",
                             xaxis_title="steps from the drop", yaxis_title="LLC (calibrated)",
                             template="plotly_white", height=420)
