"""The SGLD sampler behind the LLC (devinterp): loss traces per chain, diverged chains, and the LLC estimate from the traces (n beta times the mean excess loss after burn-in)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from analyses.llc.data import (DEFAULTS, Data, Masks, SGLDConfig, data_size, full_loss, is_indexable, minibatches,
    mse_loss, sampled_parameters)


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
    (`analyses.llc.calibrate`). `transform` (a matrix T over the sampled weights, in
    `flat_positions` order) is a full preconditioner instead: SGLD moves u with w = w* + T u
    (`analyses.llc.coordinates.Reparametrized`), and `scales` is ignored. A chain whose loss stops being finite ends there;
    its last row has loss inf (`diverged_chains`)."""
    from devinterp.optim import SGMCMC
    from devinterp.optim.prior import GaussianPrior

    from analyses.llc.coordinates import Reparametrized

    config = replace(config, **overrides).validate()
    nbeta = config.inverse_temperature
    init_loss = full_loss(model, batch_or_loader, loss_fn)
    rows = []
    steps = config.num_burnin + config.num_draws
    whole = is_indexable(batch_or_loader) and data_size(batch_or_loader) == config.batch_size  # then L(w*) itself
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
        for step, data in zip(range(steps), minibatches(batch_or_loader, config.batch_size, generator)):
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
    chains (paired traces: the mean of loss - reference_loss over the draws; traces with a
    `noise_term`, `analyses.llc.chains`: minus b times its mean, the noise's control variate)."""
    from analyses.llc.chains import control_coefficient

    init_loss, nbeta = float(traces.init_loss.iloc[0]), float(traces.nbeta.iloc[0])
    b = control_coefficient(traces)
    drawn = traces[~traces.burnin]
    drawn = drawn.assign(excess=excess_loss(drawn) - (b / nbeta * drawn.noise_term if b else 0.0)).groupby("chain")
    chains = pd.Index(sorted(traces.chain.unique()), name="chain")  # one that diverged in its burn-in: inf
    excess, loss = (drawn[c].mean().reindex(chains, fill_value=math.inf) for c in ("excess", "loss"))
    frame = pd.DataFrame({"chain": chains, "llc": nbeta * excess.to_numpy(), "sampled_loss": loss.to_numpy(),
                          "init_loss": init_loss})
    return frame.assign(llc_mean=frame.llc.mean(), llc_std=frame.llc.std(ddof=1) if len(frame) > 1 else 0.0)
