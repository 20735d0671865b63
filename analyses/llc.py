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

`DEFAULTS` are calibrated on the shipped `cpu` run (512-matrix analysis batch; the report and
`notebooks/04_attribution_and_llc.ipynb` draw the traces). Step sizes 1e-4 to 2e-3, localization
100 to 300 and nbeta 15 to 100 were tried at steps 1000, 4000-5000 and 8000: nbeta 100 with step
1e-3 diverges; with localization 100 and step 3e-4 the traces still climb after 80 steps; with
localization 300, nbeta 50 and step 3e-4 the minibatch loss reaches its level within ~15 steps
and stays there within minibatch noise (at plateau checkpoints a slow rise of ~10-20 % remains
over the 30 draws). On the shipped run the LLC falls through the plateau (6.5 at step 1000, 3.8 at
3000, 2.7 at 4500, 2.2 at 5000, with a chain spread of 0.6-0.9) and then settles (2.4 at 5500,
2.1 at 8000, 1.7 at 14000, spread 0.1-0.3): the drop shows no jump. The values are small (1-9) against
~300k parameters: with a strong localization the LLC compares checkpoints, it is not a count.
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


def _size(data) -> int:
    return len(data) if _is_batch(data) else len(data[0])


def _minibatches(data: Data, batch_size: int, generator: torch.Generator) -> Iterable:
    """Endless minibatches: random rows of a Batch / tensor pair, or the items of an iterable in a cycle."""
    if _is_batch(data) or (isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0])):
        n = _size(data)
        if n < batch_size:
            raise ValueError(f"batch_size={batch_size} is invalid for {n} examples: allowed <= {n}")
        while True:
            rows = torch.randperm(n, generator=generator)[:batch_size]
            yield data[rows] if _is_batch(data) else (data[0][rows], data[1][rows])
    else:
        yield from itertools.cycle(data)


def _full_loss(model: torch.nn.Module, data: Data, loss_fn: Callable, chunk: int = 1024) -> float:
    """L(w*) over all of the data (an iterable: one pass)."""
    with torch.no_grad():
        if _is_batch(data) or (isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0])):
            n = _size(data)
            parts = [(min(chunk, n - s), data[s:s + chunk] if _is_batch(data) else
                      (data[0][s:s + chunk], data[1][s:s + chunk])) for s in range(0, n, chunk)]
        else:
            parts = [(_size(item), item) for item in data]
        return sum(size * float(loss_fn(model, part)) for size, part in parts) / sum(size for size, _ in parts)


def sgld_traces(model: torch.nn.Module, batch_or_loader: Data, config: SGLDConfig = DEFAULTS,
                loss_fn: Callable = mse_loss, progress: bool = False, **overrides) -> pd.DataFrame:
    """The minibatch loss of every SGLD step of every chain, `(chain, sgld_step, loss, burnin,
    init_loss)` with init_loss = L(w*); maps over a run with `across_checkpoints` (calibration).
    The model is not changed (each chain samples a copy)."""
    from devinterp.optim import SGMCMC

    config = replace(config, **overrides).validate()
    nbeta = config.inverse_temperature
    init_loss = _full_loss(model, batch_or_loader, loss_fn)
    rows = []
    steps = config.num_burnin + config.num_draws
    for chain in tqdm(range(config.num_chains), desc="SGLD chains", disable=not progress):
        sampler = copy.deepcopy(model).train()
        for p in sampler.parameters():
            p.requires_grad_(True)
        optimizer = SGMCMC.sgld(sampler.parameters(), lr=config.lr, localization=config.localization, nbeta=nbeta)
        generator = torch.Generator().manual_seed(config.seed * 1000 + chain)
        noise = torch.Generator(device=next(sampler.parameters()).device).manual_seed(config.seed * 1000 + chain + 1)
        for step, data in zip(range(steps), _minibatches(batch_or_loader, config.batch_size, generator)):
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(sampler, data)
                loss.backward()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"SGLD chain {chain} diverged at step {step} (loss {loss.item()}): "
                                         f"lower lr={config.lr:g} or raise localization={config.localization:g}")
            optimizer.step(noise_generator=noise)
            rows.append((chain, step, loss.item(), step < config.num_burnin))
    frame = pd.DataFrame(rows, columns=["chain", "sgld_step", "loss", "burnin"])
    return frame.assign(init_loss=init_loss, nbeta=nbeta)


def llc_from_traces(traces: pd.DataFrame) -> pd.DataFrame:
    """One row per chain: nbeta (mean loss over the draws - L(w*)), with the mean and std across chains."""
    init_loss, nbeta = float(traces.init_loss.iloc[0]), float(traces.nbeta.iloc[0])
    drawn = traces[~traces.burnin].groupby("chain").loss.mean()
    frame = pd.DataFrame({"chain": drawn.index, "llc": nbeta * (drawn.to_numpy() - init_loss),
                          "sampled_loss": drawn.to_numpy(), "init_loss": init_loss})
    return frame.assign(llc_mean=frame.llc.mean(), llc_std=frame.llc.std(ddof=1) if len(frame) > 1 else 0.0)


def llc_per_step(traces: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint of `across_checkpoints(run, sgld_traces)`: `step`, the mean and the
    std across chains of `llc_from_traces` (`llc_mean`, `llc_std`; NaN for one chain) and
    `init_loss` = L(w*) (finding 1: does the LLC jump at the drop?)."""
    chains = pd.concat([llc_from_traces(part).assign(step=int(step)) for step, part in traces.groupby("step")],
                       ignore_index=True)
    return chains.groupby("step").agg(llc_mean=("llc", "mean"), llc_std=("llc", "std"),
                                      init_loss=("init_loss", "first")).reset_index()


def local_learning_coefficient(model: torch.nn.Module, batch_or_loader: Data, config: SGLDConfig = DEFAULTS,
                               loss_fn: Callable = mse_loss, progress: bool = False, **overrides) -> pd.DataFrame:
    """The LLC of `model` at its current weights on `batch_or_loader`, one row per SGLD chain:
    `chain, llc, sampled_loss, init_loss, llc_mean, llc_std, nbeta, seconds` plus the settings.
    Keyword overrides replace fields of `config` (e.g. `num_chains=8`). Works with
    `across_checkpoints(run, local_learning_coefficient)` (finding 1, docs/FINDINGS.md: is the drop a jump
    in effective complexity?)."""
    config = replace(config, **overrides).validate()
    start = time.perf_counter()
    frame = llc_from_traces(sgld_traces(model, batch_or_loader, config, loss_fn, progress))
    settings = {k: v for k, v in asdict(config).items() if k != "nbeta"}
    return frame.assign(nbeta=config.inverse_temperature, seconds=time.perf_counter() - start, **settings)


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
    `metrics` the run's metrics table."""
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
    fig.add_scatter(x=summary.step, y=summary["mean"], mode="lines+markers", name="LLC (mean)",
                    line=dict(color="rgb(99,110,250)"), row=2, col=1)
    if drop_step is not None and not pd.isna(drop_step):
        fig.add_vline(x=float(drop_step), line_dash="dash", line_color="red")
    fig.update_yaxes(title_text="eval loss", type="log", row=1, col=1)
    fig.update_yaxes(title_text="LLC estimate", row=2, col=1)
    fig.update_xaxes(title_text="training step", row=2, col=1)
    return fig.update_layout(title="Local learning coefficient under the loss curve (finding 1)",
                             template="plotly_white", height=620)


# ----- registry entry (analyses.registry) -------------------------------------------------------

QUICK = SGLDConfig(num_chains=2, num_burnin=5, num_draws=10)


def llc_tables(ctx) -> dict[str, pd.DataFrame]:
    """SGLD traces at the walked checkpoints (around the drop unless steps are asked for), each
    cached in the run directory (`analyses.store`) under its checkpoint hash and the settings."""
    from analyses.store import cached

    config = QUICK if ctx.quick else DEFAULTS
    settings = {**asdict(config), "batch": len(ctx.batch), "data": asdict(ctx.run.config.data)}
    frames = []
    # LRMC's small encoders: the checkpoints around the drop; other tasks' (wider) models: the key ones
    steps = ctx.steps if ctx.steps_asked is not None or ctx.run.config.data.task == "lrmc" else sorted(set(ctx.key.values()))
    for step in tqdm(steps, desc="llc", unit="ckpt", disable=not ctx.progress):
        traces = cached(ctx.run, "llc_traces", step, settings, lambda: sgld_traces(ctx.model(step), ctx.batch, config))
        frames.append(traces.assign(step=step))
    traces = pd.concat(frames, ignore_index=True)
    return {"llc_traces": traces[["step", *[c for c in traces if c != "step"]]], "llc": llc_per_step(traces)}


def llc_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    traces, table = tables["llc_traces"], tables["llc"].set_index("step")
    config = QUICK if ctx.quick else DEFAULTS
    chains = pd.concat([llc_from_traces(t).assign(step=s) for s, t in traces.groupby("step")], ignore_index=True)
    moments = {m: s for m, s in ctx.key.items() if s in table.index}
    note = (f"<p>SGLD (devinterp) on the {len(ctx.batch)}-example analysis batch at {len(table)} checkpoints around "
            f"the drop (the others: <code>mechlrmc analyze llc RUN --steps all</code>; every estimate is cached in "
            f"the run directory): {config.num_chains} chains x ({config.num_burnin} burn-in + {config.num_draws} "
            f"draws), step size {config.lr:g}, localization {config.localization:g}, n&beta; "
            f"{config.inverse_temperature:.3g} (batch {config.batch_size}). The traces (key checkpoints) should be "
            f"flat after the shaded burn-in; the LLC is n&beta; x (mean drawn loss - L(w*)). Mean LLC across "
            "chains: " + ", ".join(f"{m} (step {s}) {table.llc_mean[s]:.2f} &plusmn; {table.llc_std[s]:.2f}"
                                   for m, s in moments.items()) + ".</p>")
    return {"note": note, "llc": plot_llc(chains, ctx.run.metrics, ctx.phases.drop_step),
            "sgld_traces": plot_sgld_traces(traces[traces.step.isin(list(moments.values()))]),
            "llc_table": table.reset_index()}
