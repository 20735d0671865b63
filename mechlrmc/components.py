"""The one component vocabulary: names of the parts of a hooked transformer, and the parameters each holds.

A component spec is a comma-separated list of names; a name may carry a layer (`attn.2`) and a
leading `~` takes the complement (`~attn`: everything but attention, finding 9 of docs/FINDINGS.md).

    embed        token embedding W_E            pos_embed   position embedding W_pos
    ln_embed     LayerNorm after the embedding  unembed     read-out W_U, b_U
    embeddings   embed, pos_embed and ln_embed  ln_final    the final LayerNorm (pre-LN models)
    attn[.l]     whole attention (Q, K, V, O)   mlp[.l]     MLP (W_in, b_in, W_out, b_out)
    attn.l.h     one head: its slices of Q, K, V (weights and biases) and of W_O (a mask, `head_masks`)
    q|k|v|o[.l]  one attention projection       qk[.l]      Q and K (the attention pattern)
    qkv[.l]      Q, K and V                     ln[.l]      LayerNorms (all, or ln1/ln2 of layer l)
    all          every parameter

Every part of the toolkit that names components uses these names: swaps (which components come
from checkpoint A), component-wise training (which are trained), the per-component LLC, and the
weight and gradient norms of telemetry and early warnings (`component_of` groups every parameter
into `embed`, `pos_embed`, `ln_embed`, `attn.l`, `mlp.l`, `ln.l`, `ln_final`, `unembed`).
"""

from __future__ import annotations

import re
from typing import Iterable

from mechlrmc.errors import OptionError

HEAD = re.compile(r"attn\.(\d+)\.(\d+)")  # one head: attn.LAYER.HEAD

_LAYERED = {
    "attn": r"attn\.\w+",
    "mlp": r"mlp\.\w+",
    "q": r"attn\.[Wb]_Q",
    "k": r"attn\.[Wb]_K",
    "v": r"attn\.[Wb]_V",
    "o": r"attn\.[Wb]_O",
    "qk": r"attn\.[Wb]_[QK]",
    "qkv": r"attn\.[Wb]_[QKV]",
    "ln": r"ln[12]\.[wb]",
}


_GLOBAL = {
    "embed": [r"W_E"],
    "pos_embed": [r"W_pos"],
    "ln_embed": [r"ln_embed\.[wb]"],
    "unembed": [r"W_U", r"b_U"],
    "embeddings": [r"W_E", r"W_pos", r"ln_embed\.[wb]"],
    "ln_final": [r"ln_final\.[wb]"],
    "all": [r".+"],
}


COMPONENTS = tuple(sorted([*_LAYERED, *_GLOBAL]))


# Findings 9 (pre <-> post swaps) and 10 (one component trained, the rest fixed).
SWAP_SET = ("embed", "pos_embed", "ln", "qkv", "qk", "attn", "mlp", "unembed", "~attn", "all")


FREEZE_SET = ("embed", "pos_embed", "attn", "mlp", "all")


def _patterns(name: str, n_layers: int) -> list[str]:
    if HEAD.fullmatch(name):
        raise OptionError(f"component {name!r} is one head: it selects slices of tensors, so it is a mask "
                          f"(`head_masks`), not a set of parameters: allowed here {list(COMPONENTS)}")
    base, _, layer = name.partition(".")
    if base in _GLOBAL and not layer:
        return _GLOBAL[base]
    if base not in _LAYERED:
        raise OptionError(f"component {name!r} is unknown: allowed {list(COMPONENTS)}, a layered one "
                         f"with '.layer' (e.g. attn.0), and '~' for the complement")
    if not layer:
        out = [rf"blocks\.\d+\.{_LAYERED[base]}"]
        return out + [r"ln_embed\.[wb]", r"ln_final\.[wb]"] if base == "ln" else out
    if not layer.isdigit() or not 0 <= int(layer) < n_layers:
        raise OptionError(f"layer {layer!r} of component {name!r} is out of range: allowed 0..{n_layers - 1}")
    return [rf"blocks\.{int(layer)}\.{_LAYERED[base]}"]


def parse_spec(spec: str | Iterable[str]) -> list[str]:
    """`"attn.0, mlp"` or `["attn.0", "mlp"]` -> `["attn.0", "mlp"]`."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip() for s in names if s.strip()]
    if not names:
        raise OptionError(f"component spec {spec!r} is empty: name at least one of {list(COMPONENTS)}")
    return names


def component_params(spec: str | Iterable[str], param_names: Iterable[str], n_layers: int) -> list[str]:
    """The parameter names (in `param_names` order) that the component spec selects.

    The spec is a union of its names; a `~name` entry adds the complement of `name`.
    """
    param_names = list(param_names)
    chosen: set[str] = set()
    for name in parse_spec(spec):
        negate = name.startswith("~")
        regex = re.compile("|".join(f"(?:{p})" for p in _patterns(name.lstrip("~"), n_layers)))
        hits = {p for p in param_names if regex.fullmatch(p)}
        chosen |= set(param_names) - hits if negate else hits
    return [p for p in param_names if p in chosen]


def model_component_params(model, spec: str | Iterable[str]) -> list[str]:
    """`component_params` for a `HookedEncoder`."""
    return component_params(spec, [n for n, _ in model.named_parameters()], model.cfg.n_layers)


def component_of(param: str) -> str:
    """The component a parameter belongs to, for per-component sums (norms): `blocks.0.attn.W_Q` ->
    `attn.0`, `blocks.1.ln2.w` -> `ln.1`, `W_pos` -> `pos_embed`, `ln_final.b` -> `ln_final`; in
    another model's naming, the module that owns it (`transformer.h.0.attn.c_attn.weight` ->
    `transformer.h.0.attn.c_attn`)."""
    parts = param.split(".")
    if parts[0] == "blocks" and len(parts) >= 3:
        kind = "ln" if parts[2].startswith("ln") else parts[2]
        return f"{kind}.{parts[1]}"
    fallback = parts[0] if len(parts) <= 2 else ".".join(parts[:-1])
    return {"W_E": "embed", "W_pos": "pos_embed", "W_U": "unembed", "b_U": "unembed"}.get(param, fallback)


def head_masks(model, name: str) -> dict | None:
    """{parameter: bool mask of its entries} of one head `attn.l.h`: its slices of W_Q, W_K, W_V
    (and their biases) and of W_O along the head axis; None where `name` is not a head."""
    import torch

    match = HEAD.fullmatch(name)
    if match is None:
        return None
    layer, head = int(match.group(1)), int(match.group(2))
    if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
        raise OptionError(f"component {name!r} is out of range: allowed attn.L.H with 0 <= L < "
                          f"{model.cfg.n_layers} and 0 <= H < {model.cfg.n_heads}")
    prefix, masks = f"blocks.{layer}.attn.", {}
    for pname, p in model.named_parameters():
        if pname.startswith(prefix) and pname[len(prefix):] in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
            mask = torch.zeros_like(p, dtype=torch.bool)
            mask[head] = True
            masks[pname] = mask
    return masks
