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

from analyses.causal.patching import DEFAULT_SITES, corrupt, hook_name, patch_frame, patch_grid, patch_masks
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


def attribution_sweep(model: HookedEncoder, clean: Batch, corrupted: Batch,
                      sites: dict[str, tuple[str, ...]] | None = None) -> pd.DataFrame:
    """First-order recovery of every patch of every (site, granularity) in `sites` (default
    `DEFAULT_SITES`) from one clean forward, one corrupted forward and one backward. One row per
    (site, granularity, layer, pos, head) as `batched_sweep` (-1: all positions / heads)."""
    sites = sites or DEFAULT_SITES
    device = next(model.parameters()).device
    clean_tokens, corrupt_tokens = clean.tokens.to(device), corrupted.tokens.to(device)
    grids = {(s, g): patch_grid(model, s, g, clean_tokens.shape[1]) for s, grans in sites.items() for g in grans}
    names = sorted({hook_name(s, l) for (s, _), grid in grids.items() for l, _, _ in grid})
    with torch.no_grad():
        clean_pred, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: n in names)
        corrupt_pred = model(corrupt_tokens)
    weights = metric_weights(clean_pred, corrupt_pred, clean.observed.to(device))
    corrupt_acts, grads = _gradients(model, corrupt_tokens, names, weights)
    # per name: the estimate of each entry, summed over the batch and the feature axis [2, pos, (head)]
    per_entry = {n: ((clean_cache[n] - corrupt_acts[n]) * grads[n]).sum(-1).sum(1) for n in names}
    entries = {(s, g): {l: per_entry[hook_name(s, l)] for l, _, _ in grid} for (s, g), grid in grids.items()}
    return patch_estimates(grids, entries, model.cfg.n_heads, clean_tokens.shape[1])


def attribution(model: HookedEncoder, batch: Batch, data_cfg: DataConfig, corruption: str = "negate",
                sites: dict[str, tuple[str, ...]] | None = None, seed: int = 0) -> pd.DataFrame:
    """Attribution patching of `batch` against one corruption: the table of `patching` (same
    columns and rows) with `method="attribution"`. Maps over a run with `across_checkpoints`."""
    corrupted = corrupt(batch, corruption, data_cfg, seed)
    return attribution_sweep(model, batch, corrupted, sites).assign(corruption=corruption, method="attribution")


