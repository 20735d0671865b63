"""The local learning coefficient (LLC) across checkpoints, sampled with devinterp's SGLD.

Developmental interpretability reads phase transitions off the LLC, the effective number of
parameters (halved) that the loss near the current weights w* depends on. Its estimate (Lau et al.)
samples w from the tempered posterior localised at w*,
    p(w) ~ exp(-nbeta L(w) - localization / 2 |w - w*|^2),
with stochastic-gradient Langevin dynamics (`devinterp.optim.SGMCMC.sgld`) and reads
    LLC = nbeta (E[L(w)] - L(w*))
from the minibatch losses drawn after burn-in. For a regular model with d parameters it is d / 2.
Here it is asked whether the drop (finding 1, docs/FINDINGS.md) shows as a jump in the model's effective
complexity, as phase transitions do in developmental interpretability.

devinterp's `sample` / `llc` entry points take a Hugging Face dataset of `input_ids` with a
next-token loss and write zarr files; this module drives its SGLD sampler directly instead, on any
`nn.Module` with an MSE loss: a `Batch` of masked matrices (the training objective: MSE over all
entries), a tuple `(inputs, targets)` of tensors, or an iterable of either (a DataLoader).

The default `local_learning_coefficient(model, data)` calibrates: it chooses nbeta, step size and
localization from the model and the data and reports its diagnostics (`analyses.llc.calibrate`;
restricted to some weights: `analyses.llc.components`). `DEFAULTS` (localization 300, nbeta 50)
are the earlier hand-picked settings, kept for `calibrate=False` and the notebooks' trace plots:
they measure mostly the localization (1.37 for a linear regression whose LLC is 6), so their
estimates are never `ok`. The report calibrates once per run and caches it (`analyses.llc.runs`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from typing import Callable

import pandas as pd
import torch

from analyses.llc.data import DEFAULTS, Data, Masks, SGLDConfig, mse_loss, sampled_dimension
from analyses.llc.sampler import diverged_chains, llc_from_traces, sgld_traces


def llc_per_step(traces: pd.DataFrame, calibration: dict | None = None) -> pd.DataFrame:
    """One row per checkpoint of `across_checkpoints(run, sgld_traces)`: `step`, the mean and the
    std across chains of `llc_from_traces` (`llc_mean`, `llc_std`; NaN for one chain), the mean's
    standard error `llc_se` = llc_std / sqrt(chains), `init_loss`
    = L(w*) (finding 1: does the LLC jump at the drop?) and the diagnostics: `diverged` and `flat`
    measured on each checkpoint's traces, `stable` and `localization_ok` from `calibration` (the
    calibration's `diagnostics()`; NaN without one) and `ok` (all four True: uncalibrated settings
    are never ok)."""
    from analyses.llc.calibrate import flat_after_burnin

    chains = pd.concat([llc_from_traces(part).assign(step=int(step)) for step, part in traces.groupby("step")],
                       ignore_index=True)
    table = chains.groupby("step").agg(llc_mean=("llc", "mean"), llc_std=("llc", "std"), chains=("llc", "size"),
                                       init_loss=("init_loss", "first")).reset_index()
    table.insert(3, "llc_se", table.llc_std / table.pop("chains") ** 0.5)
    checks = {"stable": math.nan, "localization_ok": math.nan} | {k: v for k, v in (calibration or {}).items()
                                                                    if k in ("stable", "localization_ok")}
    parts = dict(list(traces.groupby("step")))
    diverged = [bool(diverged_chains(parts[step])) for step in table.step]
    flat = [not d and flat_after_burnin(parts[step]) for d, step in zip(diverged, table.step)]
    good = all(v is True for v in checks.values())
    return table.assign(diverged=diverged, flat=flat, **checks,
                        ok=[good and not d and f for d, f in zip(diverged, flat)])


def local_learning_coefficient(model: torch.nn.Module, batch_or_loader: Data, config: SGLDConfig | None = None,
                               loss_fn: Callable = mse_loss, progress: bool = False, calibrate: bool | None = None,
                               masks: Masks | None = None, **overrides) -> pd.DataFrame:
    """The LLC of `model` at its current weights on `batch_or_loader`, one row per SGLD chain:
    `chain, llc, sampled_loss, init_loss, llc_mean, llc_std, nbeta, seconds`, the settings, and the
    diagnostics `diverged, flat, stable, localization_ok, ok`.

    By default (`calibrate` True, no `config`) the SGLD settings are chosen from the model and the
    data (`analyses.llc.calibrate.calibrate`: nbeta = n / log n, per-tensor preconditioning, a walked
    sweep of step size and localization) and `lr`, `localization` are the dimensionless chosen
    values; keyword overrides go to `calibrate` (e.g. `max_steps=1000`). With an explicit `config`
    (and `calibrate` False) it samples with those settings, keyword overrides replacing its fields
    (e.g. `num_chains=8`); only `diverged` and `flat` are then measured, `stable` and
    `localization_ok` are NaN. `masks` restricts the sampling to some weights (the refined LLC,
    `analyses.llc.components`). Works with `across_checkpoints(run, local_learning_coefficient)`
    (finding 1, docs/FINDINGS.md: is the drop a jump in effective complexity?)."""
    from analyses.llc.calibrate import calibrate as calibrate_settings

    calibrate = config is None if calibrate is None else calibrate
    start = time.perf_counter()
    if calibrate:
        if config is not None:
            raise ValueError("config is invalid with calibrate=True: allowed None (pass config with calibrate=False)")
        calibration = calibrate_settings(model, batch_or_loader, loss_fn, masks, progress=progress, **overrides)
        return estimate_with(model, batch_or_loader, calibration.config, calibration.scales, loss_fn, masks,
                             calibration.diagnostics(), start, progress, calibration.transform())
    config = replace(DEFAULTS if config is None else config, **overrides).validate()
    return estimate_with(model, batch_or_loader, config, None, loss_fn, masks, {}, start, progress)


def estimate_with(model: torch.nn.Module, data: Data, config: SGLDConfig, scales: dict[str, float] | None,
                  loss_fn: Callable = mse_loss, masks: Masks | None = None, calibration: dict | None = None,
                  start: float | None = None, progress: bool = False,
                  transform: torch.Tensor | None = None) -> pd.DataFrame:
    """The LLC rows of `local_learning_coefficient` with given settings and preconditioner (`scales`
    per tensor, or a full `transform`: `sgld_traces`); `calibration` holds the calibration's
    `stable` and `localization_ok` (NaN when absent); `diverged` and `flat` are measured on these
    chains and `ok` needs all four."""
    from analyses.llc.calibrate import flat_after_burnin

    start = time.perf_counter() if start is None else start
    traces = sgld_traces(model, data, config, loss_fn, progress, masks=masks, scales=scales, transform=transform)
    frame = llc_from_traces(traces)
    diverged = bool(diverged_chains(traces)) or bool((frame.llc.abs() > sampled_dimension(model, masks)).any())
    flat = not diverged and flat_after_burnin(traces)
    checks = {"stable": math.nan, "localization_ok": math.nan} | {k: v for k, v in (calibration or {}).items()
                                                                    if k in ("stable", "localization_ok")}
    ok = not diverged and flat and all(v is True for v in checks.values())
    settings = {k: v for k, v in asdict(config).items() if k != "nbeta"}
    return frame.assign(nbeta=config.inverse_temperature, seconds=time.perf_counter() - start, **settings,
                        preconditioned=scales is not None or transform is not None,
                        preconditioner="full" if transform is not None else "per-tensor" if scales else "none",
                        diverged=diverged, flat=flat, **checks, ok=ok)
