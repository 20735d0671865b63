"""Hugging Face models through TransformerLens 4's `TransformerBridge` (`mechlrmc.anatomy`).

The bridge maps many architectures onto TransformerLens hook names (`blocks.L.attn.hook_pattern`,
`hook_z`, ...), so no architecture table is written here. It changes the module it wraps (new
submodules, split q/k/v beside a fused weight) and keeps the model's attention implementation, so
the lenses bridge a *copy* with eager attention (its patterns), never the user's live model; the
component groups name the Hugging Face model's own parameters, which the parameter lenses change.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def supports(model: torch.nn.Module) -> bool:
    """Whether `model` is a Hugging Face model whose class the bridge has an adapter for."""
    try:
        import transformers
        from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    except ImportError:
        return False
    return isinstance(model, transformers.PreTrainedModel) and type(model).__name__ in SUPPORTED_ARCHITECTURES


def bridged(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[int, str]]:
    """A `TransformerBridge` around a copy of a Hugging Face model with eager attention, and
    {id(module): its path in the model}, taken before the bridge replaces the copy's submodules."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    paths = {id(m): n for n, m in twin.named_modules()}
    return build_bridge_from_module(twin, type(model).__name__, hf_config=twin.config).eval(), paths


def bridge(model: torch.nn.Module) -> torch.nn.Module:
    """A `TransformerBridge` around a copy of a Hugging Face model, with eager attention (patterns)."""
    return bridged(model)[0]


def _original(component: Any, paths: dict[int, str]) -> str | None:
    """The path, in the Hugging Face model, of the module a bridge component wraps."""
    original = getattr(component, "original_component", None)
    return paths.get(id(original)) if original is not None else None


def hf_groups(model: torch.nn.Module, wrapped: torch.nn.Module, paths: dict[int, str]) -> dict[str, tuple[str, ...]]:
    """The component groups (`attn.L`, `mlp.L`, `embeddings`, `embed`, `pos_embed`, `ln_final`,
    `unembed`) as the Hugging Face model's own parameter names (`transformer.h.0.attn.c_attn.weight`)."""
    own = [n for n, _ in model.named_parameters()]

    def owned(*components: Any) -> tuple[str, ...]:
        prefixes = [p for p in (_original(c, paths) for c in components) if p is not None]
        return tuple(n for n in own if any(n.startswith(p + ".") for p in prefixes))

    groups: dict[str, tuple[str, ...]] = {}
    for layer, block in enumerate(wrapped.blocks):
        groups[f"attn.{layer}"], groups[f"mlp.{layer}"] = owned(block.attn), owned(block.mlp)
    groups["embeddings"] = owned(*[getattr(wrapped, c) for c in ("embed", "pos_embed") if hasattr(wrapped, c)])
    for name in ("embed", "pos_embed", "ln_final", "unembed"):
        groups[name] = owned(getattr(wrapped, name)) if hasattr(wrapped, name) else ()
    return {k: v for k, v in groups.items() if v}


def hf_sites(model: torch.nn.Module) -> dict[str, Any]:
    """The recorder's `sites="auto"` for a Hugging Face model: each block's output ("0", "1", ...) and
    the final LayerNorm ("final") at their module paths in the model itself; its patterns come from the
    bridged checkpoints at analysis time. Empty for a model the bridge does not support."""
    if not supports(model):
        return {}
    wrapped, paths = bridged(model)
    hidden = {str(layer): _original(block, paths) for layer, block in enumerate(wrapped.blocks)}
    final = _original(getattr(wrapped, "ln_final", None), paths)
    return {"hidden": {**hidden, **({"final": final} if final else {})}}
