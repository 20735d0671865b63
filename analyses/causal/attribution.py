"""Attribution patching (finding 6, docs/FINDINGS.md, first order): activation patching by one gradient.

Patching the clean activation a_clean of a site into the corrupted run moves the recovery metric
of `analyses.causal.patching` by approximately

    attribution = sum over the patched entries of (a_clean - a_corrupt) * d recovery / d a,

the gradient taken at the corrupted run. One forward and one backward of the corrupted batch give
the gradient at every site at once; one cached clean forward gives the differences. Every patch
of every site and granularity of `analyses.causal.patching` is then a sum over its entries. The two
recovery metrics (masked and observed positions) are handled in the same pass: the corrupted
batch is stacked twice and each copy is back-propagated from one metric.

The estimate is exact when the output is linear in the patched activation (e.g. the last MLP's
output with no final LayerNorm). Where LayerNorm, GELU or softmax bend the path it can miss
badly; `compare_with_patching` and `attribution_agreement` measure by how much, for this estimate
and for the two of `analyses.causal.integrated_gradients`, which integrate the gradient along the path
instead (each layer on its own path, or all layers of a site on one).
"""

from __future__ import annotations

import pandas as pd
import torch

from analyses.causal.patching import (DEFAULT_SITES, anatomy_part, corrupt, forward_from, hook_name, patch_frame,
                                      patch_grid, patch_masks)
from mechlrmc.anatomy import Anatomy
from mechlrmc.config import DataConfig
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import Batch


def metric_weights(clean: torch.Tensor, corrupted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """d recovery / d prediction for the masked and observed metrics [2, batch, pos].

    Recovery is linear in the prediction: <pred - corrupted, w> with w = (clean - corrupted) on the
    chosen positions divided by its squared norm there. When clean and corrupted outputs coincide
    there is nothing to recover and w is zero (exact patching would divide 0 by 0)."""
    direction = clean - corrupted  # [b, pos]
    weights = []
    for where in ((~observed).float(), observed.float()):
        den = (direction.pow(2) * where).sum()
        weights.append(torch.where(den > 0, direction * where / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0))
    return torch.stack(weights)


def _gradients(model: HookedEncoder, tokens: torch.Tensor, names: list[str], weights: torch.Tensor):
    """Activations of `names` on `tokens` and the gradients of both metrics there:
    ({name: [b, ...]}, {name: [2, b, ...]}), from one forward and one backward of 2b rows."""
    b = tokens.shape[0]
    acts: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook) -> torch.Tensor:
        acts[hook.name] = act
        return act

    def track(act: torch.Tensor, hook) -> torch.Tensor:  # gradients even for a frozen model
        return act if act.requires_grad else act.requires_grad_()

    with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", track), *[(n, keep) for n in names]]):
        pred = model(torch.cat([tokens, tokens]))  # [2b, pos]: copy 0 masked metric, copy 1 observed
        total = (pred.view(2, b, -1) * weights).sum()
        grads = torch.autograd.grad(total, [acts[n] for n in names])
    values = {n: acts[n][:b].detach() for n in names}
    return values, {n: g.view(2, b, *g.shape[1:]) for n, g in zip(names, grads)}


class SiteReader:
    """How the attribution estimators read and edit a model's sites: mechlrmc's model by its hook names
    (a forward may restart inside its blocks), any other model through its anatomy (`mechlrmc.anatomy`;
    sites `anatomy_part`, every forward from the tokens)."""

    def __init__(self, model: torch.nn.Module, anatomy: Anatomy | None = None):
        self.model = model
        self.anatomy = anatomy if anatomy is not None and anatomy.source != "mechlrmc" else None
        self.n_layers, self.n_heads = (model.cfg.n_layers, model.cfg.n_heads) if self.anatomy is None else \
            (self.anatomy.n_layers, self.anatomy.n_heads)

    def name(self, site: str, layer: int) -> str:
        return hook_name(site, layer) if self.anatomy is None else anatomy_part(site, layer)

    def grid(self, site: str, granularity: str, pos: int) -> list[tuple[int, int, int]]:
        return patch_grid(self.model if self.anatomy is None else self.anatomy, site, granularity, pos)

    def run(self, tokens: torch.Tensor, names, starts: set[str] = frozenset()) -> tuple[torch.Tensor, dict]:
        """(prediction [b, pos], {name: activation}) with no gradient; `starts`: the block inputs a
        restarted forward needs (mechlrmc's model only)."""
        with torch.no_grad():
            if self.anatomy is None:
                wanted = set(names) | set(starts)
                return self.model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
            pred, acts = self.anatomy.run(self.model, tokens, read=list(names))
            return pred.reshape(tokens.shape), acts

    def forward_edited(self, tokens: torch.Tensor, repeat: int, edits: dict, layer: int | None = None,
                       start: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction [repeat * b, pos] of `tokens` repeated with `edits` ({name: act -> act}) applied:
        mechlrmc's model from block `layer`'s cached input `start` where given, any other from the tokens."""
        if self.anatomy is None:
            with self.model.hooks(fwd_hooks=[(n, lambda act, hook, fn=fn: fn(act)) for n, fn in edits.items()]):
                if start is None:
                    return self.model(tokens.repeat(repeat, 1))
                return forward_from(self.model, start.repeat(repeat, 1, 1), layer)
        pred, _ = self.anatomy.run(self.model, tokens.repeat(repeat, 1), edit=edits)
        return pred.reshape(repeat * tokens.shape[0], -1)


def patch_estimates(grids: dict[tuple[str, str], list[tuple[int, int, int]]],
                    entries: dict[tuple[str, str], dict[int, torch.Tensor]], n_heads: int, pos: int) -> pd.DataFrame:
    """The table of patch estimates from per-entry ones: each patch of `grids` ((site, granularity)
    -> patches) is the sum of `entries[site, granularity][layer]` ([2, pos, (head)], the masked and
    observed metrics) over the entries it replaces."""
    frames = []
    for (site, granularity), grid in grids.items():
        per_layer = entries[site, granularity]
        masks = patch_masks(grid, pos, n_heads, site).float()  # [K, pos, (head)]
        per_patch = torch.stack([per_layer[l] for l, _, _ in grid], 1)  # [2, K, pos, (head)]
        estimate = (per_patch * masks.to(per_patch)).flatten(2).sum(-1)  # [2, K]
        frame = patch_frame(grid, {"recovery_mask": estimate[0], "recovery_obs": estimate[1]})
        frames.append(frame.assign(site=site, granularity=granularity))
    return pd.concat(frames, ignore_index=True)


def attribution_sweep(model: torch.nn.Module, clean: Batch, corrupted: Batch,
                      sites: dict[str, tuple[str, ...]] | None = None, anatomy: Anatomy | None = None) -> pd.DataFrame:
    """First-order recovery of every patch of every (site, granularity) in `sites` (default
    `DEFAULT_SITES`) from one clean forward, one corrupted forward and one backward. One row per
    (site, granularity, layer, pos, head) as `batched_sweep` (-1: all positions / heads)."""
    sites = sites or DEFAULT_SITES
    reader = SiteReader(model, anatomy)
    device = next(model.parameters()).device
    clean_tokens, corrupt_tokens = clean.tokens.to(device), corrupted.tokens.to(device)
    grids = {(s, g): reader.grid(s, g, clean_tokens.shape[1]) for s, grans in sites.items() for g in grans}
    names = sorted({reader.name(s, l) for (s, _), grid in grids.items() for l, _, _ in grid})
    clean_pred, clean_cache = reader.run(clean_tokens, names)
    corrupt_pred, _ = reader.run(corrupt_tokens, [])
    weights = metric_weights(clean_pred, corrupt_pred, clean.observed.to(device))
    corrupt_acts, grads = (_gradients(model, corrupt_tokens, names, weights) if reader.anatomy is None
                           else _anatomy_gradients(model, reader.anatomy, corrupt_tokens, names, weights))
    # per name: the estimate of each entry, summed over the batch and the feature axis [2, pos, (head)]
    per_entry = {n: ((clean_cache[n] - corrupt_acts[n]) * grads[n]).sum(-1).sum(1) for n in names}
    entries = {(s, g): {l: per_entry[reader.name(s, l)] for l, _, _ in grid} for (s, g), grid in grids.items()}
    return patch_estimates(grids, entries, reader.n_heads, clean_tokens.shape[1])


def _anatomy_gradients(model: torch.nn.Module, anatomy: Anatomy, tokens: torch.Tensor, names: list[str],
                       weights: torch.Tensor):
    """`_gradients` for any model, through its anatomy."""
    b = tokens.shape[0]
    with torch.enable_grad():
        pred, acts = anatomy.run(model, torch.cat([tokens, tokens]), read=names, grad=True)
        total = (pred.reshape(2, b, -1) * weights).sum()
        grads = torch.autograd.grad(total, [acts[n] for n in names])
    return {n: acts[n][:b].detach() for n in names}, {n: g.view(2, b, *g.shape[1:]) for n, g in zip(names, grads)}


def attribution(model: torch.nn.Module, batch: Batch, data_cfg: DataConfig, corruption: str = "negate",
                sites: dict[str, tuple[str, ...]] | None = None, seed: int = 0, anatomy: Anatomy | None = None
                ) -> pd.DataFrame:
    """Attribution patching of `batch` against one corruption: the table of `patching` (same
    columns and rows) with `method="attribution"`. Maps over a run with `across_checkpoints`."""
    corrupted = corrupt(batch, corruption, data_cfg, seed)
    return attribution_sweep(model, batch, corrupted, sites, anatomy).assign(corruption=corruption, method="attribution")


