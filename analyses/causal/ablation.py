"""Head ablation (finding 5, docs/FINDINGS.md): knock out heads through hooks and measure L, L_obs, L_mask.

Three kinds, each for any set of (layer, head):
- "zero": the head's output `hook_z` is set to 0 (the paper's head masking);
- "mean": `hook_z` is replaced by its mean over a reference batch, per position [pos, d_head];
- "uniform": the head's pattern is replaced by uniform attention over all keys.
Deltas are against the unablated model on the same batch.
"""

from __future__ import annotations

from functools import partial

import pandas as pd
import torch
from tqdm.auto import tqdm

from mechlrmc.errors import OptionError
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import Batch, split_losses

KINDS = ("zero", "mean", "uniform")


Heads = list[tuple[int, int]]


def _check_heads(model: HookedEncoder, heads: Heads) -> None:
    cfg = model.cfg
    bad = [(l, h) for l, h in heads if not (0 <= l < cfg.n_layers and 0 <= h < cfg.n_heads)]
    if bad:
        raise OptionError(f"heads {bad} are out of range: allowed layer < {cfg.n_layers}, head < {cfg.n_heads}")


def mean_z(model: HookedEncoder, batch: Batch) -> dict[int, torch.Tensor]:
    """Mean head outputs over the batch, {layer: [pos, head, d_head]}."""
    names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in names)
    return {l: cache[name].mean(0) for l, name in enumerate(names)}


def _set_z(z, hook, heads, value):  # z [batch, pos, head, d_head]
    z = z.clone()
    for h in heads:
        z[:, :, h] = 0.0 if value is None else value[:, h]
    return z


def _set_uniform(pattern, hook, heads):  # pattern [batch, head, q, k]
    pattern = pattern.clone()
    pattern[:, heads] = 1.0 / pattern.shape[-1]
    return pattern


def ablation_hooks(heads: Heads, kind: str, means: dict[int, torch.Tensor] | None = None) -> list:
    """Forward hooks ablating `heads` ((layer, head) pairs); "mean" needs `means` from `mean_z`."""
    if kind not in KINDS:
        raise OptionError(f"kind={kind!r} is invalid: allowed one of {KINDS}")
    if kind == "mean" and means is None:
        raise OptionError("kind='mean' needs the reference means: pass means=mean_z(model, batch)")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    if kind == "uniform":
        return [(f"blocks.{l}.attn.hook_pattern", partial(_set_uniform, heads=hs)) for l, hs in by_layer.items()]
    return [(f"blocks.{l}.attn.hook_z", partial(_set_z, heads=hs, value=None if kind == "zero" else means[l]))
            for l, hs in by_layer.items()]


def _losses(model: HookedEncoder, batch: Batch, hooks: list) -> dict[str, float]:
    with torch.no_grad():
        pred = model.run_with_hooks(batch.tokens, fwd_hooks=hooks)
    return {k: float(v) for k, v in split_losses(pred, batch.values, batch.observed).items()}


def ablate(
    model: HookedEncoder, batch: Batch, heads: Heads, kind: str = "zero", reference: Batch | None = None
) -> dict[str, float]:
    """Losses with `heads` ablated and their change vs the intact model on the same batch.
    "mean" ablation averages over `reference` (default: the batch itself)."""
    _check_heads(model, heads)
    means = mean_z(model, batch if reference is None else reference) if kind == "mean" else None
    base = _losses(model, batch, [])
    ablated = _losses(model, batch, ablation_hooks(heads, kind, means))
    return {**ablated, **{f"delta_{k}": ablated[k] - base[k] for k in base}}


def head_ablation_sweep(
    model: HookedEncoder, batch: Batch, kinds: tuple[str, ...] = KINDS, reference: Batch | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Every head ablated alone with every kind: one row per (layer, head, kind) with L, L_obs,
    L_mask and their deltas vs the intact model (finding 5, docs/FINDINGS.md)."""
    means = mean_z(model, batch if reference is None else reference) if "mean" in kinds else None
    base = _losses(model, batch, [])
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    rows = []
    for kind in kinds:
        for layer, head in tqdm(heads, desc=f"{kind} ablation", disable=not progress):
            losses = _losses(model, batch, ablation_hooks([(layer, head)], kind, means))
            rows.append({"layer": layer, "head": head, "kind": kind, **losses,
                         **{f"delta_{k}": losses[k] - base[k] for k in base}})
    return pd.DataFrame(rows)
