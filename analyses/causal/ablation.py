"""Head and component ablation (finding 5, docs/FINDINGS.md): knock out heads, or a layer's attention or
MLP output, and measure the task's losses (LRMC: L, L_obs, L_mask; a token task: its cross-entropy
and accuracy on the outputs).

Three kinds, each for any set of (layer, head), on any model through its anatomy (`mechlrmc.anatomy`):
- "zero": the head's output `z` is set to 0 (the paper's head masking);
- "mean": `z` is replaced by its mean over a reference batch, per position [pos, d_head];
- "uniform": the head's pattern is replaced by uniform attention over all keys.
Deltas are against the unablated model on the same batch.
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from mechlrmc.anatomy import Anatomy, subject_of
from mechlrmc.errors import OptionError
from mechlrmc.tasks import get_task

KINDS = ("zero", "mean", "uniform")


Heads = list[tuple[int, int]]


def _check_heads(anatomy: Anatomy, heads: Heads) -> None:
    for layer, head in heads:
        anatomy.check_head(layer, head)


def mean_z(model: torch.nn.Module, batch, anatomy: Anatomy | None = None) -> dict[int, torch.Tensor]:
    """Mean head outputs over the batch, {layer: [pos, head, d_head]}."""
    model, anatomy = subject_of(model, anatomy)
    keys = [f"z.{l}" for l in range(anatomy.n_layers)]
    with torch.no_grad():
        _, acts = anatomy.run(model, batch.tokens, read=keys)
    return {l: acts[key].mean(0) for l, key in enumerate(keys)}


def _set_z(heads: list[int], value: torch.Tensor | None):
    def edit(z: torch.Tensor) -> torch.Tensor:  # z [batch, pos, head, d_head]
        z = z.clone()
        for h in heads:
            z[:, :, h] = 0.0 if value is None else value[:, h]
        return z
    return edit


def _set_uniform(heads: list[int]):
    def edit(pattern: torch.Tensor) -> torch.Tensor:  # pattern [batch, head, q, k]
        pattern = pattern.clone()
        pattern[:, heads] = 1.0 / pattern.shape[-1]
        return pattern
    return edit


def ablation_edits(heads: Heads, kind: str, means: dict[int, torch.Tensor] | None = None) -> dict:
    """{anatomy part: edit} ablating `heads` ((layer, head) pairs); "mean" needs `means` from `mean_z`."""
    if kind not in KINDS:
        raise OptionError(f"kind={kind!r} is invalid: allowed one of {KINDS}")
    if kind == "mean" and means is None:
        raise OptionError("kind='mean' needs the reference means: pass means=mean_z(model, batch)")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    if kind == "uniform":
        return {f"pattern.{l}": _set_uniform(hs) for l, hs in by_layer.items()}
    return {f"z.{l}": _set_z(hs, None if kind == "zero" else means[l]) for l, hs in by_layer.items()}


def _losses(model: torch.nn.Module, batch, anatomy: Anatomy, edits: dict) -> dict[str, float]:
    with torch.no_grad():
        output, _ = anatomy.run(model, batch.tokens, edit=edits)
    return get_task(batch.task).lens_losses(output, batch)


def ablate(model: torch.nn.Module, batch, heads: Heads, kind: str = "zero", reference=None,
           anatomy: Anatomy | None = None) -> dict[str, float]:
    """Losses with `heads` ablated and their change vs the intact model on the same batch.
    "mean" ablation averages over `reference` (default: the batch itself)."""
    model, anatomy = subject_of(model, anatomy)
    _check_heads(anatomy, heads)
    means = mean_z(model, batch if reference is None else reference, anatomy) if kind == "mean" else None
    base = _losses(model, batch, anatomy, {})
    ablated = _losses(model, batch, anatomy, ablation_edits(heads, kind, means))
    return {**ablated, **{f"delta_{k}": ablated[k] - base[k] for k in base}}


def head_ablation_sweep(model: torch.nn.Module, batch, kinds: tuple[str, ...] = KINDS, reference=None,
                        progress: bool = False, anatomy: Anatomy | None = None) -> pd.DataFrame:
    """Every head ablated alone with every kind: one row per (layer, head, kind) with the task's
    losses and their deltas vs the intact model (finding 5, docs/FINDINGS.md)."""
    model, anatomy = subject_of(model, anatomy)
    anatomy.require(["pattern" if k == "uniform" else "z" for k in kinds], "head ablation")
    means = mean_z(model, batch if reference is None else reference, anatomy) if "mean" in kinds else None
    base = _losses(model, batch, anatomy, {})
    heads = [(l, h) for l in range(anatomy.n_layers) for h in range(anatomy.n_heads)]
    rows = []
    for kind in kinds:
        for layer, head in tqdm(heads, desc=f"{kind} ablation", disable=not progress):
            losses = _losses(model, batch, anatomy, ablation_edits([(layer, head)], kind, means))
            rows.append({"layer": layer, "head": head, "kind": kind, **losses,
                         **{f"delta_{k}": losses[k] - base[k] for k in base}})
    return pd.DataFrame(rows)


COMPONENT_KINDS = ("zero", "mean")


def component_ablation_sweep(model: torch.nn.Module, batch, kinds: tuple[str, ...] = COMPONENT_KINDS, reference=None,
                             anatomy: Anatomy | None = None) -> pd.DataFrame:
    """Every layer's attention output and MLP output ablated alone ("zero": 0; "mean": its mean over
    `reference`, default the batch, per position): one row per (component `attn.L` / `mlp.L`, kind)
    with the task's losses and their deltas vs the intact model."""
    model, anatomy = subject_of(model, anatomy)
    bad = [k for k in kinds if k not in COMPONENT_KINDS]
    if bad:
        raise OptionError(f"kind={bad[0]!r} is invalid for a component: allowed one of {COMPONENT_KINDS}")
    anatomy.require(["attn_out", "mlp_out"], "component ablation")
    keys = {f"{kind}.{l}": f"{part}.{l}" for l in range(anatomy.n_layers)
            for kind, part in (("attn", "attn_out"), ("mlp", "mlp_out"))}
    means = {}
    if "mean" in kinds:
        with torch.no_grad():
            _, acts = anatomy.run(model, (batch if reference is None else reference).tokens, read=list(keys.values()))
        means = {key: value.mean(0) for key, value in acts.items()}  # [pos, d]
    base = _losses(model, batch, anatomy, {})
    rows = []
    for kind in kinds:
        for component, key in keys.items():
            edit = (lambda v: torch.zeros_like(v)) if kind == "zero" else (lambda v, m=means[key]: m.expand_as(v))
            losses = _losses(model, batch, anatomy, {key: edit})
            rows.append({"component": component, "kind": kind, **losses,
                         **{f"delta_{k}": losses[k] - base[k] for k in base}})
    return pd.DataFrame(rows)
