"""Activation patching (finding 6, docs/FINDINGS.md): which activations carry the answer.

Clean input X, corrupted input (default -X, same mask; or a resampled matrix, or X with its rows
shuffled). Clean activations of one site are patched into the corrupted run, per layer, per
(layer, position), per (layer, head) or per (layer, position, head), and the output's move toward
the clean output is measured separately at masked and observed positions:

    recovery = <y_patched - y_corrupt, y_clean - y_corrupt> / ||y_clean - y_corrupt||^2

(0: no move, 1: the clean output). Sites: `resid_pre`, `attn_out`, `mlp_out`, `resid_mid`,
`resid_post` ([batch, pos, d_model]) and `z` (per head, [batch, pos, head, d_head]).

Any model is patched through its anatomy (`mechlrmc.anatomy`, `anatomy_outputs`: one forward per
patch); on mechlrmc's own model two faster paths give the same numbers: `stock_sweep` runs `transformer_lens.patching` (one forward per
patch), and `batched_sweep` stacks many patches of one layer into one forward that starts at that
layer from the cached corrupted residual stream (the layers before it are not recomputed, and a
single-position patch recomputes only that position within its own layer).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import pandas as pd
import torch
from transformer_lens import patching as tl_patching

from mechlrmc.anatomy import Anatomy
from mechlrmc.config import DataConfig
from mechlrmc.errors import OptionError
from mechlrmc.measures import logits_of
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import Batch, sample, with_values

CORRUPTIONS = ("negate", "resample", "shuffle_rows")


SITES = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post", "z")


GRANULARITIES = ("layer", "layer_pos", "layer_head", "layer_pos_head")


DEFAULT_SITES = {"resid_pre": ("layer", "layer_pos"), "attn_out": ("layer", "layer_pos"),
                 "mlp_out": ("layer", "layer_pos"), "z": ("layer_head", "layer_pos_head")}


def hook_name(site: str, layer: int) -> str:
    if site not in SITES:
        raise OptionError(f"site={site!r} is unknown: allowed {SITES}")
    return f"blocks.{layer}.attn.hook_z" if site == "z" else f"blocks.{layer}.hook_{site}"


def corrupt(batch: Batch, kind: str, cfg: DataConfig, seed: int = 0) -> Batch:
    """The corrupted input under the same mask: -X, a fresh X', or X with its rows permuted."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "negate":
        values = -batch.values
    elif kind == "resample":
        values = sample(cfg, len(batch), generator).values
    elif kind == "shuffle_rows":
        perm = torch.stack([torch.randperm(batch.m, generator=generator) for _ in range(len(batch))])  # [b, m]
        values = batch.matrices.gather(1, perm[:, :, None].expand(-1, -1, batch.n)).reshape(len(batch), -1)
    else:
        raise OptionError(f"corruption {kind!r} is unknown: allowed {CORRUPTIONS}")
    return with_values(batch, values.to(batch.values.device), cfg)


def recovery_metrics(clean: torch.Tensor, corrupted: torch.Tensor, observed: torch.Tensor) -> dict[str, Callable]:
    """`{"recovery_mask": f, "recovery_obs": f}`: `f(pred [..., batch, pos]) -> [...]` (0-d for one run)."""
    direction = clean - corrupted  # [b, pos]

    def recovery(pred: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        den = (direction.pow(2) * where).sum()
        return ((pred - corrupted) * (direction * where)).sum((-2, -1)) / den

    return {"recovery_mask": partial(recovery, where=(~observed).float()),
            "recovery_obs": partial(recovery, where=observed.float())}


def patch_grid(model, site: str, granularity: str, pos: int) -> list[tuple[int, int, int]]:
    """(layer, pos, head) of every patch in TransformerLens' sweep order; -1 means all. `model`: a
    model with `cfg.n_layers` and `cfg.n_heads`, or an `Anatomy`."""
    if granularity not in GRANULARITIES:
        raise OptionError(f"granularity={granularity!r} is unknown: allowed {GRANULARITIES}")
    if "head" in granularity and site != "z":
        raise OptionError(f"granularity={granularity!r} needs site='z' (per-head activations), got {site!r}")
    shape = model if isinstance(model, Anatomy) else model.cfg
    heads = range(shape.n_heads) if "head" in granularity else [-1]
    positions = range(pos) if "pos" in granularity else [-1]
    return [(l, p, h) for l in range(shape.n_layers) for p in positions for h in heads]


def anatomy_part(site: str, layer: int) -> str:
    """The anatomy part (`mechlrmc.anatomy`) of a site of a layer: `resid_pre` is the embeddings at layer
    0 and block l - 1's output after; `resid_mid` has no part (mechlrmc's model only)."""
    if site == "resid_mid":
        raise OptionError("site='resid_mid' is read only on mechlrmc's own model: allowed on any model resid_pre, "
                          "attn_out, mlp_out, resid_post, z")
    if site == "resid_pre":
        return "embed" if layer == 0 else f"resid.{layer - 1}"
    return f"resid.{layer}" if site == "resid_post" else f"{site}.{layer}"


@torch.no_grad()
def anatomy_outputs(model: torch.nn.Module, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, site: str,
                    patches: list[tuple[int, int, int]], anatomy: Anatomy) -> torch.Tensor:
    """`batched_outputs` for any model, through its anatomy: one forward of the corrupted input per patch,
    with the clean activation written in [K, batch, pos]."""
    keys = {l: anatomy_part(site, l) for l in sorted({l for l, _, _ in patches})}
    _, clean = anatomy.run(model, clean_tokens, read=list(keys.values()))
    masks = patch_masks(patches, clean_tokens.shape[1], anatomy.n_heads, site).to(corrupted_tokens.device)
    forward = []
    for (layer, _, _), mask in zip(patches, masks):
        key = keys[layer]
        where = mask[None, ..., None]  # [1, pos, (head,) 1]
        out, _ = anatomy.run(model, corrupted_tokens, edit={key: lambda v, key=key, where=where: torch.where(where, clean[key], v)})
        forward.append(out.reshape(corrupted_tokens.shape).float())
    return torch.stack(forward)


def patch_masks(patches: list[tuple[int, int, int]], pos: int, n_heads: int, site: str) -> torch.Tensor:
    """Which activation entries each patch replaces: [K, pos] (or [K, pos, head] for z)."""
    mask = torch.zeros(len(patches), pos, n_heads, dtype=torch.bool)
    for k, (_, p, h) in enumerate(patches):
        mask[k, slice(None) if p < 0 else p, slice(None) if h < 0 else h] = True
    return mask if site == "z" else mask[:, :, 0]


def forward_from(model: HookedEncoder, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The model's output from the residual stream entering block `layer` [batch, pos, d] -> [batch, pos]."""
    for block in model.blocks[layer:]:
        x = block(x)
    if model.ln_final is not None:
        x = model.ln_final(x)
    return (x @ model.W_U).squeeze(-1) + model.b_U


def _block_out(model: HookedEncoder, layer: int) -> str:
    """The hook holding block `layer`'s output (the next block's input)."""
    return f"blocks.{layer}.hook_normalized_resid_post" if model.cfg.norm == "post" else f"blocks.{layer}.hook_resid_post"


@torch.no_grad()
def batched_outputs(
    model: HookedEncoder, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, site: str,
    patches: list[tuple[int, int, int]], max_rows: int = 4096,
) -> torch.Tensor:
    """Outputs of the corrupted run with each patch applied [K, batch, pos], many patches per forward.

    Every forward starts at the patched layer from the cached corrupted residual stream. A patch
    at one position of a site after the attention mixing (z, attn_out, resid_mid, mlp_out,
    resid_post) changes only that position within its layer, so that layer is run on one
    position (a length-1 sequence whose attention output is pinned to the cached one) and the
    full sequence resumes at the next layer.
    """
    b, pos = corrupted_tokens.shape
    layers = sorted({l for l, _, _ in patches})
    wanted = {hook_name(site, l) for l in layers}
    corrupt_wanted = wanted | {f"blocks.{l}.{n}" for l in layers for n in ("hook_resid_pre", "hook_attn_out")}
    corrupt_wanted |= {_block_out(model, l) for l in layers}
    _, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: n in wanted)
    _, corrupt_cache = model.run_with_cache(corrupted_tokens, names_filter=lambda n: n in corrupt_wanted)
    masks = patch_masks(patches, pos, model.cfg.n_heads, site).to(corrupted_tokens.device)
    out = torch.empty(len(patches), b, pos, device=corrupted_tokens.device, dtype=model.W_U.dtype)
    chunk = max(1, max_rows // b)
    layer_of = torch.tensor([l for l, _, _ in patches])
    pos_of = torch.tensor([p for _, p, _ in patches])
    for layer in layers:
        name = hook_name(site, layer)
        clean = clean_cache[name]  # [b, pos, ...]
        start = corrupt_cache[f"blocks.{layer}.hook_resid_pre"]  # [b, pos, d]
        for sel in (layer_of == layer).nonzero().squeeze(1).split(chunk):
            k, p = len(sel), pos_of[sel]
            if site != "resid_pre" and bool((p >= 0).all()):
                out[sel] = _local_patch(model, layer, site, clean, corrupt_cache, masks[sel, p], p)
                continue
            mask = masks[sel][:, None, ..., None]  # [k, 1, pos, (head,) 1]

            def patch(act: torch.Tensor, hook, mask=mask, clean=clean) -> torch.Tensor:
                act = act.view(mask.shape[0], b, *act.shape[1:])
                return torch.where(mask, clean, act).flatten(0, 1)

            with model.hooks(fwd_hooks=[(name, patch)]):
                out[sel] = forward_from(model, start.repeat(k, 1, 1), layer).view(k, b, pos)
    return out


def _local_patch(model: HookedEncoder, layer: int, site: str, clean: torch.Tensor, corrupt_cache,
                 mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Outputs [k, b, pos] of k single-position patches at `layer` (positions p [k], masks [k, (head)])."""
    k, (b, pos) = len(p), clean.shape[:2]
    name = hook_name(site, layer)

    def at_p(t: torch.Tensor) -> torch.Tensor:  # [b, pos, ...] -> [k * b, 1, ...]
        return t[:, p].transpose(0, 1).flatten(0, 1).unsqueeze(1)

    mask = mask.repeat_interleave(b, 0)[:, None, ..., None]  # [k * b, 1, (head,) 1]
    patched = torch.where(mask, at_p(clean), at_p(corrupt_cache[name]))
    hooks = [(name, lambda act, hook: patched)]
    if site not in ("z", "attn_out"):  # pin the attention output to the full-sequence one
        attn_out = at_p(corrupt_cache[f"blocks.{layer}.hook_attn_out"])
        hooks.append((f"blocks.{layer}.hook_attn_out", lambda act, hook: attn_out))
    with model.hooks(fwd_hooks=hooks):
        y = model.blocks[layer](at_p(corrupt_cache[f"blocks.{layer}.hook_resid_pre"]))  # [k * b, 1, d]
    x = corrupt_cache[_block_out(model, layer)].unsqueeze(0).repeat(k, 1, 1, 1)  # [k, b, pos, d]
    x[torch.arange(k), :, p] = y.view(k, b, -1)
    return forward_from(model, x.flatten(0, 1), layer + 1).view(k, b, pos)


def patch_frame(patches: list[tuple[int, int, int]], values: dict[str, torch.Tensor]) -> pd.DataFrame:
    frame = pd.DataFrame(patches, columns=["layer", "pos", "head"])
    for name, v in values.items():
        frame[name] = v.float().cpu().numpy()
    return frame


@torch.no_grad()
def batched_sweep(model: torch.nn.Module, clean: Batch, corrupted: Batch, site: str = "z",
                  granularity: str = "layer_pos_head", max_rows: int = 4096, anatomy: Anatomy | None = None
                  ) -> pd.DataFrame:
    """Recovery of every patch of `site` at `granularity`, batched; one row per (layer, pos, head)
    (-1: all positions / heads). Another model than mechlrmc's (its `anatomy`) is patched one forward
    per patch (`anatomy_outputs`)."""
    device = next(model.parameters()).device
    clean_tokens, corrupt_tokens = clean.tokens.to(device), corrupted.tokens.to(device)
    forward = logits_of(model)
    if anatomy is not None and anatomy.source != "mechlrmc":
        patches = patch_grid(anatomy, site, granularity, clean_tokens.shape[1])
        preds = anatomy_outputs(model, clean_tokens, corrupt_tokens, site, patches, anatomy)
    else:
        patches = patch_grid(model, site, granularity, clean_tokens.shape[1])
        preds = batched_outputs(model, clean_tokens, corrupt_tokens, site, patches, max_rows)  # [K, b, pos]
    shape = clean_tokens.shape
    metrics = recovery_metrics(forward(clean_tokens).reshape(shape), forward(corrupt_tokens).reshape(shape),
                               clean.observed.to(device))
    return patch_frame(patches, {name: f(preds) for name, f in metrics.items()})


def _whole_layer_setter(corrupted_activation, index, clean_activation):
    corrupted_activation[...] = clean_activation
    return corrupted_activation


_STOCK = {
    ("resid_pre", "layer_pos"): tl_patching.get_act_patch_resid_pre,
    ("resid_mid", "layer_pos"): tl_patching.get_act_patch_resid_mid,
    ("attn_out", "layer_pos"): tl_patching.get_act_patch_attn_out,
    ("mlp_out", "layer_pos"): tl_patching.get_act_patch_mlp_out,
    ("z", "layer_pos_head"): tl_patching.get_act_patch_attn_head_out_by_pos,
    ("z", "layer_head"): tl_patching.get_act_patch_attn_head_out_all_pos,
}


@torch.no_grad()
def stock_sweep(model: HookedEncoder, clean: Batch, corrupted: Batch, site: str = "z",
                granularity: str = "layer_pos_head") -> pd.DataFrame:
    """The same sweep as `batched_sweep` through `transformer_lens.patching` (one forward per patch)."""
    device = next(model.parameters()).device
    clean_tokens, corrupt_tokens = clean.tokens.to(device), corrupted.tokens.to(device)
    patches = patch_grid(model, site, granularity, clean_tokens.shape[1])
    clean_pred, clean_cache = model.run_with_cache(clean_tokens)
    metrics = recovery_metrics(clean_pred, model(corrupt_tokens), clean.observed.to(device))
    if granularity == "layer" or (site, granularity) not in _STOCK:
        if granularity != "layer":
            raise OptionError(f"no TransformerLens sweep for site={site!r} at {granularity!r}: "
                             f"allowed {sorted(_STOCK)} or granularity='layer'")
        result = tl_patching.generic_activation_patch(
            model, corrupt_tokens, clean_cache, metrics, patch_setter=_whole_layer_setter,
            activation_name=hook_name(site, 0).split(".")[-1].removeprefix("hook_"), index_axis_names=("layer",))
    else:
        result = _STOCK[(site, granularity)](model, corrupt_tokens, clean_cache, metrics)
    return patch_frame(patches, {name: result[name].values.reshape(-1) for name in metrics})


@torch.no_grad()
def patching(model: torch.nn.Module, batch: Batch, data_cfg: DataConfig, corruption: str = "negate",
             sites: dict[str, tuple[str, ...]] | None = None, seed: int = 0, anatomy: Anatomy | None = None
             ) -> pd.DataFrame:
    """Batched patching sweeps for one corruption, by default (`DEFAULT_SITES`) per layer and per
    (layer, position) for resid_pre / attn_out / mlp_out, and per (layer, head) and (layer,
    position, head) for z; any model through its `anatomy`."""
    sites = sites or DEFAULT_SITES
    corrupted = corrupt(batch, corruption, data_cfg, seed)
    frames = [batched_sweep(model, batch, corrupted, site, g, anatomy=anatomy).assign(site=site, granularity=g)
              for site, grans in sites.items() for g in grans]
    return pd.concat(frames, ignore_index=True).assign(corruption=corruption)
