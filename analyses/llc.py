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
localization from the model and the data and reports its diagnostics (`analyses.llc_calibrate`;
restricted to some weights: `analyses.llc_components`). `DEFAULTS` (localization 300, nbeta 50)
are the earlier hand-picked settings, kept for `calibrate=False` and the notebooks' trace plots:
they measure mostly the localization (1.37 for a linear regression whose LLC is 6), so their
estimates are never `ok`. The report calibrates once per run and caches it (`analyses.llc_report`).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from mechlrmc.tasks import get_task
from mechlrmc.tasks.lrmc import Batch
from mechlrmc.tasks.lrmc import split_losses

Data = Batch | tuple[torch.Tensor, torch.Tensor] | Iterable
Masks = dict[str, torch.Tensor | None]  # parameter name -> boolean mask of its sampled entries (None: all)
_COLOURS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3")


@dataclass(frozen=True)
class SGLDConfig:
    """SGLD hyperparameters of one LLC estimate."""

    num_chains: int = 3
    num_burnin: int = 15  # steps dropped from every chain before the draws
    num_draws: int = 30  # steps whose loss is averaged
    lr: float = 3e-4  # SGLD step size epsilon
    localization: float = 300.0  # gamma: pull toward w*
    batch_size: int = 64  # examples per SGLD step
    nbeta: float | None = 50.0  # inverse temperature; None: devinterp's default m / log m (m = batch_size)
    seed: int = 0
    paired: bool = False  # also record L(w*) on each minibatch and estimate from the paired difference

    def validate(self) -> SGLDConfig:
        checks = [("num_chains", self.num_chains >= 1, ">= 1"), ("num_burnin", self.num_burnin >= 0, ">= 0"),
                  ("num_draws", self.num_draws >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                  ("localization", self.localization >= 0, ">= 0"), ("batch_size", self.batch_size >= 2, ">= 2"),
                  ("nbeta", self.nbeta is None or self.nbeta > 0, "> 0 or None")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed {allowed}")
        return self

    @property
    def inverse_temperature(self) -> float:
        return self.nbeta if self.nbeta is not None else self.batch_size / math.log(self.batch_size)


DEFAULTS = SGLDConfig()


def _is_batch(data) -> bool:
    """A task's batch (LRMC's `Batch`, a token task's batch...): indexable, with `tokens`."""
    return hasattr(data, "tokens") and hasattr(data, "__getitem__")


def mse_loss(model: torch.nn.Module, data) -> torch.Tensor:
    """The training objective of `model` on a task's batch (LRMC: MSE over all entries; any other
    task: its own `loss`), or the MSE on a tensor pair (inputs, targets)."""
    if isinstance(data, Batch):
        return split_losses(model(data.tokens), data.values, data.observed)["loss"]
    if _is_batch(data):
        return get_task(data.cfg.task).loss(model(data.tokens), data)["loss"]
    inputs, targets = data
    return F.mse_loss(model(inputs).reshape(targets.shape), targets)


def _indexable(data) -> bool:
    """A task's batch or a tensor pair (rows can be drawn), rather than an iterable of them."""
    return _is_batch(data) or (isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]))


def _size(data) -> int:
    return len(data) if _is_batch(data) else len(data[0])


def _minibatches(data: Data, batch_size: int, generator: torch.Generator) -> Iterable:
    """Endless minibatches: random rows of a Batch / tensor pair, or the items of an iterable in a cycle."""
    if _indexable(data):
        n = _size(data)
        if n < batch_size:
            raise ValueError(f"batch_size={batch_size} is invalid for {n} examples: allowed <= {n}")
        if n == batch_size:  # all of the data at every step
            yield from itertools.repeat(data)
        while True:
            rows = torch.randperm(n, generator=generator)[:batch_size]
            yield data[rows] if _is_batch(data) else (data[0][rows], data[1][rows])
    else:
        yield from itertools.cycle(data)


def _full_loss(model: torch.nn.Module, data: Data, loss_fn: Callable, chunk: int = 1024) -> float:
    """L(w*) over all of the data (an iterable: one pass)."""
    with torch.no_grad():
        if _indexable(data):
            n = _size(data)
            parts = [(min(chunk, n - s), data[s:s + chunk] if _is_batch(data) else
                      (data[0][s:s + chunk], data[1][s:s + chunk])) for s in range(0, n, chunk)]
        else:
            parts = [(_size(item), item) for item in data]
        return sum(size * float(loss_fn(model, part)) for size, part in parts) / sum(size for size, _ in parts)


def sampled_parameters(model: torch.nn.Module,
                       masks: Masks | None = None) -> list[tuple[str, torch.nn.Parameter, torch.Tensor | None]]:
    """`(name, parameter, mask)` of the weights SGLD moves: every parameter, or those `masks` names
    (a mask None: the whole tensor; a boolean tensor of the parameter's shape: its True entries)."""
    params = dict(model.named_parameters())
    if masks is None:
        return [(name, p, None) for name, p in params.items()]
    unknown = sorted(set(masks) - set(params))
    if unknown or not masks:
        raise ValueError(f"masks={unknown or '{}'} is invalid: allowed a non-empty dict of the model's parameter names")
    return [(name, params[name], None if mask is None else mask.to(params[name].device).bool())
            for name, mask in masks.items()]


def sampled_dimension(model: torch.nn.Module, masks: Masks | None = None) -> int:
    """The number of weights SGLD moves (an upper bound on twice the LLC)."""
    return sum(p.numel() if m is None else int(m.sum()) for _, p, m in sampled_parameters(model, masks))


def sgld_traces(model: torch.nn.Module, batch_or_loader: Data, config: SGLDConfig = DEFAULTS,
                loss_fn: Callable = mse_loss, progress: bool = False, masks: Masks | None = None,
                scales: dict[str, float] | None = None, transform: torch.Tensor | None = None,
                **overrides) -> pd.DataFrame:
    """The minibatch loss of every SGLD step of every chain, `(chain, sgld_step, loss, burnin,
    init_loss)` with init_loss = L(w*), and with `config.paired` a column `reference_loss`: L(w*) on
    the same minibatch (a control variate: the difference has the same mean and far less minibatch
    noise than nbeta times the loss itself); maps over a run with `across_checkpoints` (calibration).
    The model is not changed (each chain samples a copy).

    `masks` restricts the sampling to some weights (the rest stay at w*: the weight-restricted LLC).
    `scales` (parameter name -> k) is a fixed diagonal preconditioner: that tensor moves with step
    lr / k and localization localization * k, i.e. plain SGLD in coordinates u = sqrt(k) w
    (`analyses.llc_calibrate`). `transform` (a matrix T over the sampled weights, in
    `flat_positions` order) is a full preconditioner instead: SGLD moves u with w = w* + T u
    (`analyses.llc_coordinates.Reparametrized`), and `scales` is ignored. A chain whose loss stops being finite ends there;
    its last row has loss inf (`diverged_chains`)."""
    from devinterp.optim import SGMCMC
    from devinterp.optim.prior import GaussianPrior

    from analyses.llc_coordinates import Reparametrized

    config = replace(config, **overrides).validate()
    nbeta = config.inverse_temperature
    init_loss = _full_loss(model, batch_or_loader, loss_fn)
    rows = []
    steps = config.num_burnin + config.num_draws
    whole = _indexable(batch_or_loader) and _size(batch_or_loader) == config.batch_size  # then L(w*) itself
    reference = copy.deepcopy(model).train() if config.paired and not whole else None
    for chain in tqdm(range(config.num_chains), desc="SGLD chains", disable=not progress):
        sampler = copy.deepcopy(model).train()
        for p in sampler.parameters():
            p.requires_grad_(False)
        groups = []
        if transform is not None:
            sampler = Reparametrized(sampler, masks, transform)
            groups.append({"params": [sampler.u], "lr": config.lr,
                           "prior": GaussianPrior(config.localization, "initial") if config.localization else None})
        for name, p, mask in sampled_parameters(sampler, masks) if transform is None else []:
            k = 1.0 if scales is None else float(scales[name])
            p.requires_grad_(True)
            groups.append({"params": [p], "lr": config.lr / k, "mask": mask,
                           "prior": GaussianPrior(config.localization * k, "initial") if config.localization else None})
        optimizer = SGMCMC.sgld(groups, lr=config.lr, localization=config.localization, nbeta=nbeta)
        generator = torch.Generator().manual_seed(config.seed * 1000 + chain)
        noise = torch.Generator(device=next(sampler.parameters()).device).manual_seed(config.seed * 1000 + chain + 1)
        for step, data in zip(range(steps), _minibatches(batch_or_loader, config.batch_size, generator)):
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(sampler, data)
                loss.backward()
            if not math.isfinite(loss.item()):
                rows.append((chain, step, math.inf, step < config.num_burnin, init_loss))
                break
            optimizer.step(noise_generator=noise)
            with torch.no_grad():
                at_reference = float(loss_fn(reference, data)) if reference is not None else init_loss
            rows.append((chain, step, loss.item(), step < config.num_burnin, at_reference))
    frame = pd.DataFrame(rows, columns=["chain", "sgld_step", "loss", "burnin", "reference_loss"])
    frame = frame.assign(init_loss=init_loss, nbeta=nbeta)
    return frame if config.paired else frame.drop(columns="reference_loss")


def diverged_chains(traces: pd.DataFrame) -> list[int]:
    """The chains of `traces` whose loss stopped being finite."""
    return sorted(int(c) for c in traces[~traces.loss.map(math.isfinite)].chain.unique())


def excess_loss(traces: pd.DataFrame) -> pd.Series:
    """L(w) - L(w*) per SGLD step: against the same minibatch where recorded, else against L(w*)."""
    return traces.loss - (traces.reference_loss if "reference_loss" in traces else traces.init_loss)


def llc_from_traces(traces: pd.DataFrame) -> pd.DataFrame:
    """One row per chain: nbeta (mean loss over the draws - L(w*)), with the mean and std across
    chains (paired traces: the mean of loss - reference_loss over the draws)."""
    init_loss, nbeta = float(traces.init_loss.iloc[0]), float(traces.nbeta.iloc[0])
    drawn = traces[~traces.burnin].assign(excess=excess_loss(traces[~traces.burnin])).groupby("chain")
    chains = pd.Index(sorted(traces.chain.unique()), name="chain")  # one that diverged in its burn-in: inf
    excess, loss = (drawn[c].mean().reindex(chains, fill_value=math.inf) for c in ("excess", "loss"))
    frame = pd.DataFrame({"chain": chains, "llc": nbeta * excess.to_numpy(), "sampled_loss": loss.to_numpy(),
                          "init_loss": init_loss})
    return frame.assign(llc_mean=frame.llc.mean(), llc_std=frame.llc.std(ddof=1) if len(frame) > 1 else 0.0)


def llc_per_step(traces: pd.DataFrame, calibration: dict | None = None) -> pd.DataFrame:
    """One row per checkpoint of `across_checkpoints(run, sgld_traces)`: `step`, the mean and the
    std across chains of `llc_from_traces` (`llc_mean`, `llc_std`; NaN for one chain), `init_loss`
    = L(w*) (finding 1: does the LLC jump at the drop?) and the diagnostics: `diverged` and `flat`
    measured on each checkpoint's traces, `stable` and `localization_ok` from `calibration` (the
    calibration's `diagnostics()`; NaN without one) and `ok` (all four True: uncalibrated settings
    are never ok)."""
    from analyses.llc_calibrate import flat_after_burnin

    chains = pd.concat([llc_from_traces(part).assign(step=int(step)) for step, part in traces.groupby("step")],
                       ignore_index=True)
    table = chains.groupby("step").agg(llc_mean=("llc", "mean"), llc_std=("llc", "std"),
                                       init_loss=("init_loss", "first")).reset_index()
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
    data (`analyses.llc_calibrate.calibrate`: nbeta = n / log n, per-tensor preconditioning, a walked
    sweep of step size and localization) and `lr`, `localization` are the dimensionless chosen
    values; keyword overrides go to `calibrate` (e.g. `max_steps=1000`). With an explicit `config`
    (and `calibrate` False) it samples with those settings, keyword overrides replacing its fields
    (e.g. `num_chains=8`); only `diverged` and `flat` are then measured, `stable` and
    `localization_ok` are NaN. `masks` restricts the sampling to some weights (the refined LLC,
    `analyses.llc_components`). Works with `across_checkpoints(run, local_learning_coefficient)`
    (finding 1, docs/FINDINGS.md: is the drop a jump in effective complexity?)."""
    from analyses.llc_calibrate import calibrate as calibrate_settings

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
    from analyses.llc_calibrate import flat_after_burnin

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


def plot_sgld_traces(traces: pd.DataFrame) -> go.Figure:
    """SGLD loss traces per chain (one panel per `step` if present), burn-in shaded: calibrated
    settings give traces that rise from L(w*) and are flat after the burn-in."""
    steps = sorted(traces.step.unique()) if "step" in traces else [None]
    fig = make_subplots(rows=1, cols=len(steps), shared_yaxes=False,
                        subplot_titles=[f"checkpoint {s}" for s in steps] if steps[0] is not None else None)
    for col, step in enumerate(steps, start=1):
        part = traces if step is None else traces[traces.step == step]
        for chain, rows in part.groupby("chain"):
            colour = _COLOURS[int(chain) % len(_COLOURS)]
            fig.add_scatter(x=rows.sgld_step, y=rows.loss, mode="lines", name=f"chain {chain}", row=1, col=col,
                            line=dict(width=1, color=colour), legendgroup=str(chain), showlegend=col == 1)
        burnin = part[part.burnin].sgld_step.max()
        if not pd.isna(burnin):
            fig.add_vrect(x0=0, x1=burnin, fillcolor="grey", opacity=0.12, line_width=0, row=1, col=col)
        fig.add_hline(y=float(part.init_loss.iloc[0]), line_dash="dot", line_color="black", row=1, col=col)
    fig.update_xaxes(title_text="SGLD step")
    fig.update_yaxes(type="log").update_yaxes(title_text="minibatch loss (log)", col=1)
    return fig.update_layout(title="SGLD loss traces (burn-in shaded, L(w*) dotted)", template="plotly_white",
                             height=380)


def plot_llc(llc: pd.DataFrame, metrics: pd.DataFrame, drop_step: float | None = None) -> go.Figure:
    """The training loss curves (top) and the LLC with its spread across chains (bottom, mean +- std
    and every chain) on a shared step axis. `llc` from `across_checkpoints(run, local_learning_coefficient)`,
    `metrics` the run's metrics table. A checkpoint whose diagnostics fail (`ok` False, or no `ok`
    column: not checked) is drawn as a hollow marker, labelled in the legend."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.5, 0.5])
    evals = metrics.dropna(subset=["eval_loss"])
    for column, name in (("eval_loss", "L"), ("eval_loss_obs", "L_obs"), ("eval_loss_mask", "L_mask"),
                         ("eval_loss_out", "L on the outputs")):
        if column in evals:
            fig.add_scatter(x=evals.step, y=evals[column], name=name, mode="lines", row=1, col=1)
    summary = llc.groupby("step").llc.agg(["mean", "std", "min", "max"]).reset_index()
    fig.add_scatter(x=summary.step, y=summary["mean"] + summary["std"].fillna(0), mode="lines", line_width=0,
                    showlegend=False, hoverinfo="skip", row=2, col=1)
    fig.add_scatter(x=summary.step, y=summary["mean"] - summary["std"].fillna(0), mode="lines", line_width=0,
                    fill="tonexty", fillcolor="rgba(99,110,250,0.2)", name="LLC +- std", row=2, col=1)
    fig.add_scatter(x=llc.step, y=llc.llc, mode="markers", marker=dict(size=4, color="grey"), name="chains",
                    row=2, col=1)
    ok = (llc.groupby("step").ok.all() if "ok" in llc else pd.Series(False, index=summary.step)).to_numpy()
    fig.add_scatter(x=summary.step, y=summary["mean"], mode="lines", name="LLC (mean)",
                    line=dict(color="rgb(99,110,250)"), row=2, col=1)
    for good, name, symbol in ((True, "diagnostics pass", "circle"),
                               (False, "diagnostics fail (hollow)", "circle-open")):
        part = summary[ok == good]
        if len(part):
            fig.add_scatter(x=part.step, y=part["mean"], mode="markers", name=name, row=2, col=1,
                            marker=dict(size=9, symbol=symbol, color="rgb(99,110,250)", line_width=2))
    if drop_step is not None and not pd.isna(drop_step):
        fig.add_vline(x=float(drop_step), line_dash="dash", line_color="red")
    fig.update_yaxes(title_text="eval loss", type="log", row=1, col=1)
    fig.update_yaxes(title_text="LLC estimate", row=2, col=1)
    fig.update_xaxes(title_text="training step", row=2, col=1)
    return fig.update_layout(title="Local learning coefficient under the loss curve (finding 1)",
                             template="plotly_white", height=620)
