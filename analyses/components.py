"""Named components of the encoder -> parameter names: the one vocabulary of swaps and freezing.

A component spec is a comma-separated list of names; a name may carry a layer (`attn.2`) and a
leading `~` takes the complement (`~attn`: everything but attention, finding 9 of docs/FINDINGS.md).

    embed        token embedding W_E            pos_embed   position embedding W_pos
    ln_embed     LayerNorm after the embedding  unembed     read-out W_U, b_U
    attn[.l]     whole attention (Q, K, V, O)   mlp[.l]     MLP (W_in, b_in, W_out, b_out)
    q|k|v|o[.l]  one attention projection       qk[.l]      Q and K (the attention pattern)
    qkv[.l]      Q, K and V                     ln[.l]      LayerNorms (all, or ln1/ln2 of layer l)
    all          every parameter

Used by `analyses.swaps` (which components come from checkpoint A) and `analyses.freeze` (which
components are trained), so both read the same names the same way.
"""

from __future__ import annotations

import re
from typing import Iterable

from mechlrmc.errors import OptionError

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
    "all": [r".+"],
}
COMPONENTS = tuple(sorted([*_LAYERED, *_GLOBAL]))

# Findings 9 (pre <-> post swaps) and 10 (one component trained, the rest fixed).
SWAP_SET = ("embed", "pos_embed", "ln", "qkv", "qk", "attn", "mlp", "unembed", "~attn", "all")
FREEZE_SET = ("embed", "pos_embed", "attn", "mlp", "all")


def _patterns(name: str, n_layers: int) -> list[str]:
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
