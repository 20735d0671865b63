"""Integrated-gradients patching (finding 6, docs/FINDINGS.md): attribution past first order.

Exact patching of one entry i of a site at layer l measures f(a_corrupt + e_i * delta_i) - f(a_corrupt)
(delta = a_clean - a_corrupt, f the recovery metric, everything downstream recomputed). After the
drop f is far from linear along that path (on the shipped run's final checkpoint the largest head
patches rise like a step between alpha 0.3 and 0.7, through downstream GELUs), so the gradient at the
corrupted run (first-order attribution, `analyses.causal.attribution`) sees little of it. Integrating the
gradient along the path does:

    estimate_i = delta_i * mean over alpha in {0, 1/steps, ..., (steps-1)/steps} of df/da_i (path(alpha)),

a left Riemann sum, so that `steps=1` is first-order attribution exactly. Only layer l's activation
moves along the path (the corrupted run is restarted at layer l; every later layer is recomputed).

One path per entry would cost one forward per entry, as much as exact patching. Instead a *group* of
entries moves together and one backward gives the gradient of all of them; what is lost is the
interaction between entries of a group. Heads at one position barely interact, but positions do:
LRMC's row and column heads mix entries of the same row or column. The default groups of a
single-position patch are therefore the matrix's wrapped diagonals (entry (i, j) in group
(j - i) mod max(m, n)): no two entries of a group share a row or a column. Patches that span every
position (granularity "layer" or "layer_head") move all positions together: a whole layer's own path
(for "layer_head" the other heads of the layer move with the patched one).
Cost: 1 + (`steps` - 1) x groups forwards (from layer l on; alpha = 0 is the corrupted run for every
group) and one backward per recovery metric asked for, per layer, stacked along the batch dimension,
one stack per layer: about the cost of the batched exact sweep on the shipped 4-layer model, several
times cheaper than the stock one (benchmarks/RESULTS.md).

`joint_integrated_gradients_sweep` puts every layer of a site on one path (an additive shift of each
layer's activation, so downstream layers are still recomputed) with the same left Riemann points:
for single-position patches one stack of full forwards per site instead of one per layer, and the
alpha = 0 point shared by all groups (whole-layer patches keep their own layer's path). It also
misses the interaction between the layers; asked for one metric, it runs one backward. On the
shipped final checkpoint it is the estimator that meets the attribution target (masked Pearson
>= 0.9 at >= 20x the stock sweep, benchmarks/attribution_sweep.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import pandas as pd
import torch

from analyses.causal.attribution import SiteReader, metric_weights, patch_estimates
from analyses.causal.patching import DEFAULT_SITES
from mechlrmc.anatomy import Anatomy
from mechlrmc.errors import OptionError
from mechlrmc.tasks.lrmc import Batch

DEFAULT_STEPS = 4  # on the shipped final checkpoint: masked Pearson 0.91 (2 steps: 0.89)


METRICS = ("recovery_mask", "recovery_obs")


def _wanted(metrics: tuple[str, ...] | None) -> list[int]:
    """The indices into `METRICS` of `metrics` (None: all), after checking them."""
    metrics = METRICS if metrics is None else metrics
    if not metrics or any(m not in METRICS for m in metrics):
        raise OptionError(f"metrics={metrics!r} is invalid: allowed a non-empty subset of {METRICS}")
    return sorted({METRICS.index(m) for m in metrics})


def diagonal_groups(m: int, n: int) -> torch.Tensor:
    """The wrapped diagonals of an m x n matrix as position groups [max(m, n), m * n] (row-major)."""
    size = max(m, n)
    pos = torch.arange(m * n)
    diagonal = (pos % n - pos // n) % size  # (j - i) mod size
    return diagonal[None, :] == torch.arange(size)[:, None]


@contextmanager
def _frozen(model: torch.nn.Module):
    """The model's parameters out of the autograd graph (only activation gradients are wanted; about
    10% faster on the shipped run), their `requires_grad` restored after."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _checked_groups(clean: Batch, groups: torch.Tensor | None, pos: int) -> torch.Tensor:
    """`groups` (default `diagonal_groups`) after checking it is a bool [G, pos] partition of the positions."""
    split = diagonal_groups(clean.m, clean.n) if groups is None else groups
    if split.dim() != 2 or split.shape[1] != pos or split.dtype != torch.bool or not (split.sum(0) == 1).all():
        raise OptionError(f"groups of shape {tuple(split.shape)} are invalid: allowed a bool [G, {pos}] partition "
                          "of the positions")
    return split


def _path_gradients(reader: SiteReader, tokens: torch.Tensor, name: str, layer: int, start: torch.Tensor | None,
                    clean: torch.Tensor, corrupt: torch.Tensor, groups: torch.Tensor, steps: int, weights: torch.Tensor,
                    wanted: list[int]) -> torch.Tensor:
    """Integrated gradient x delta of every entry of `name` [2, pos, (head)]: each group of positions
    (`groups` [G, pos]) moves from corrupted to clean alone, `steps` points each, in one stack (mechlrmc's
    model restarted at `layer` from `start`; any other model from the corrupted `tokens`). The point
    alpha = 0 is the corrupted run for every group and is computed once: 1 + (steps - 1) G rows of the
    batch. Only the metrics `wanted` (indices into `weights`) get a backward; the others are NaN."""
    model = reader.model
    k, (g, b, pos) = steps, (groups.shape[0], *clean.shape[:2])
    delta = clean - corrupt  # [b, pos, ...]
    feature = (1,) * (delta.dim() - 2)
    group = groups.to(delta)
    alpha = torch.arange(1, k, dtype=delta.dtype, device=delta.device) / k
    moving = torch.cat([torch.zeros(1, pos).to(group),
                        (alpha[:, None, None] * group).flatten(0, 1)])  # [R = 1 + (k - 1) G, pos]
    point = (corrupt + moving.view(-1, 1, pos, *feature) * delta).flatten(0, 1).requires_grad_()  # [R * b, pos, ...]
    out = torch.full((len(weights), *delta.shape[1:-1]), float("nan"), dtype=delta.dtype, device=delta.device)
    with torch.enable_grad(), _frozen(model):
        pred = reader.forward_edited(tokens, len(moving), {name: lambda act: point}, layer, start)
        pred = pred.view(len(moving), b, pos)
        for i in wanted:
            grad = torch.autograd.grad((pred * weights[i]).sum(), point, retain_graph=i != wanted[-1])[0]
            per_row = (grad.view(len(moving), *delta.shape) * delta).sum(-1).sum(1)  # [R, pos, (head)]
            per_group = per_row[0] + per_row[1:].view(k - 1, g, *per_row.shape[1:]).sum(0)  # [G, pos, (head)]
            out[i] = (per_group * group.view(g, pos, *feature[1:])).sum(0) / k
    return out


def _prepare(reader: SiteReader, clean: Batch, corrupted: Batch, sites, steps: int, groups):
    """What both sweeps start from: (device, corrupted tokens, positions, position groups, patch
    grids, clean prediction, clean and corrupted caches of the patched sites (and, on mechlrmc's model,
    each block's input on the corrupted run), metric weights)."""
    if not isinstance(steps, int) or steps < 1:
        raise OptionError(f"steps={steps!r} is invalid: allowed an integer >= 1")
    sites = sites or DEFAULT_SITES
    device = next(reader.model.parameters()).device
    clean_tokens, corrupt_tokens = clean.tokens.to(device), corrupted.tokens.to(device)
    pos = clean_tokens.shape[1]
    split = _checked_groups(clean, groups, pos).to(device)
    grids = {(s, g): reader.grid(s, g, pos) for s, grans in sites.items() for g in grans}
    names = sorted({reader.name(s, l) for (s, _), grid in grids.items() for l, _, _ in grid})
    starts = {f"blocks.{l}.hook_resid_pre" for l in range(reader.n_layers)} if reader.anatomy is None else set()
    clean_pred, clean_cache = reader.run(clean_tokens, names)
    corrupt_pred, corrupt_cache = reader.run(corrupt_tokens, names, starts)
    weights = metric_weights(clean_pred, corrupt_pred, clean.observed.to(device))
    return device, corrupt_tokens, pos, split, grids, clean_pred, clean_cache, corrupt_cache, weights


def _start(reader: SiteReader, corrupt_cache, layer: int) -> torch.Tensor | None:
    """Block `layer`'s input on the corrupted run, where the forward may restart there (mechlrmc's model)."""
    return corrupt_cache[f"blocks.{layer}.hook_resid_pre"] if reader.anatomy is None else None


def integrated_gradients_sweep(model: torch.nn.Module, clean: Batch, corrupted: Batch,
                               sites: dict[str, tuple[str, ...]] | None = None, steps: int = DEFAULT_STEPS,
                               groups: torch.Tensor | None = None, anatomy: Anatomy | None = None,
                               metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Integrated-gradients recovery of every patch of every (site, granularity) in `sites`
    (default `DEFAULT_SITES`): the table of `attribution_sweep`. `groups` [G, pos] (bool) are the
    positions that move together for single-position patches (default `diagonal_groups`). `metrics`
    (default both of `METRICS`): the ones computed, one backward each; a metric left out is NaN."""
    wanted = _wanted(metrics)
    reader = SiteReader(model, anatomy)
    device, corrupt_tokens, pos, split, grids, clean_pred, clean_cache, corrupt_cache, weights = _prepare(
        reader, clean, corrupted, sites, steps, groups)
    whole = torch.ones(1, pos, dtype=torch.bool, device=device)
    per_entry: dict[tuple[str, bool], torch.Tensor] = {}  # (hook, single position?) -> [2, pos, (head)]
    for (site, granularity), grid in grids.items():
        single = "pos" in granularity
        for layer in sorted({l for l, _, _ in grid}):
            name = reader.name(site, layer)
            if (name, single) not in per_entry:
                per_entry[name, single] = _path_gradients(
                    reader, corrupt_tokens, name, layer, _start(reader, corrupt_cache, layer), clean_cache[name],
                    corrupt_cache[name], split if single else whole, steps, weights, wanted)
    entries = {(s, g): {l: per_entry[reader.name(s, l), "pos" in g] for l, _, _ in grid}
               for (s, g), grid in grids.items()}
    return patch_estimates(grids, entries, reader.n_heads, pos)


def joint_integrated_gradients_sweep(model: torch.nn.Module, clean: Batch, corrupted: Batch,
                                     sites: dict[str, tuple[str, ...]] | None = None, steps: int = DEFAULT_STEPS,
                                     groups: torch.Tensor | None = None,
                                     metrics: tuple[str, ...] | None = None, max_rows: int = 4096,
                                     anatomy: Anatomy | None = None) -> pd.DataFrame:
    """Integrated gradients with every layer of a site on one path: the table of `attribution_sweep`.

    Each layer's activation of the site is shifted by s_l (everything downstream recomputed), so that
    exact patching of an entry is the recovery at s = delta on that entry alone. The shifts of all
    layers move together along s = alpha * delta on one position group, and the gradient with respect
    to s is integrated over alpha by the left Riemann sum of `integrated_gradients_sweep` (`steps=1`
    is first-order attribution). The point alpha = 0 is the same for every group and is computed
    once. Cost per site: 1 + (steps - 1) x groups full forwards stacked along the batch and one
    backward per metric in `metrics` (a metric left out is NaN), against steps x groups forwards per
    layer for `integrated_gradients_sweep`; what is lost besides is the interaction between the
    layers. Whole-layer patches (granularity "layer", "layer_head") keep each layer's own path of
    `integrated_gradients_sweep`: with one group it is cheap, and shifting every layer by a whole
    layer's delta at once is where the layers interact most (on the shipped run's step 8000, `z`
    per layer and head: Pearson -0.45 on one path, 0.79 on each layer's own)."""
    wanted = _wanted(metrics)
    reader = SiteReader(model, anatomy)
    device, corrupt_tokens, pos, split, grids, clean_pred, clean_cache, corrupt_cache, weights = _prepare(
        reader, clean, corrupted, sites, steps, groups)
    b = corrupt_tokens.shape[0]
    whole = torch.ones(1, pos, dtype=torch.bool, device=device)
    per_entry: dict[tuple[str, bool], torch.Tensor] = {}  # (hook, single position?) -> [2, pos, (head)]
    for (site, granularity), grid in grids.items():
        single = "pos" in granularity
        layer_names = [reader.name(site, l) for l in sorted({l for l, _, _ in grid})]
        if (layer_names[0], single) in per_entry:
            continue
        if not single:  # each layer on its own path
            for layer, name in zip(sorted({l for l, _, _ in grid}), layer_names):
                per_entry[name, False] = _path_gradients(
                    reader, corrupt_tokens, name, layer, _start(reader, corrupt_cache, layer), clean_cache[name],
                    corrupt_cache[name], whole, steps, weights, wanted)
            continue
        group = split.to(clean_pred.dtype)
        alpha = torch.arange(1, steps, dtype=group.dtype, device=device).repeat_interleave(len(group)) / steps
        credit = torch.cat([torch.ones(1, pos).to(group), group.repeat(steps - 1, 1)])  # [R, pos]: whose sum
        move = torch.cat([torch.zeros(1, pos).to(group), alpha[:, None] * group.repeat(steps - 1, 1)])  # [R, pos]
        deltas = {n: clean_cache[n] - corrupt_cache[n] for n in layer_names}  # [b, pos, ...]
        feature = (1,) * (deltas[layer_names[0]].dim() - 2)
        out = torch.full((2, len(layer_names), *deltas[layer_names[0]].shape[1:-1]), float("nan"),
                         dtype=group.dtype, device=device)
        out[wanted] = 0.0
        for rows in torch.arange(len(move), device=device).split(max(1, max_rows // b)):
            r = len(rows)
            shifts = {n: (move[rows].view(r, 1, pos, *feature) * d).flatten(0, 1).requires_grad_()
                      for n, d in deltas.items()}  # [r * b, pos, ...]
            edits = {n: (lambda act, n=n: act + shifts[n]) for n in layer_names}
            with torch.enable_grad(), _frozen(model):
                pred = reader.forward_edited(corrupt_tokens, r, edits).view(r, b, pos)
                for i in wanted:
                    grads = torch.autograd.grad((pred * weights[i]).sum(), list(shifts.values()),
                                                retain_graph=i != wanted[-1])
                    for k, (grad, d) in enumerate(zip(grads, deltas.values())):
                        per_row = (grad.view(r, *d.shape) * d).sum(-1).sum(1)  # [r, pos, (head)]
                        out[i, k] += (per_row * credit[rows].view(r, pos, *feature[1:])).sum(0) / steps
        per_entry.update({(n, single): out[:, k] for k, n in enumerate(layer_names)})
    entries = {(s, g): {l: per_entry[reader.name(s, l), "pos" in g] for l, _, _ in grid} for (s, g), grid in grids.items()}
    return patch_estimates(grids, entries, reader.n_heads, pos)
