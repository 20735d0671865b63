"""Caching only what an analysis needs, and averaging attention over large batches in bounded memory.

`run_with_cache` on a whole batch keeps every hook of every example. These helpers keep only the
named hooks, optionally move the model and batch to another device, and walk a large batch in
chunks so that memory is set by the chunk, not the batch.

Peak memory, `cpu` preset (4 layers, 8 heads, 16 positions, d_mlp 256), patterns of all layers,
batch 4096, one thread, measured as the growth of the process's maximum resident set: one
`run_with_cache` over the whole batch +320 to +450 MB (a plain forward alone +384 MB: the MLP and
attention intermediates of 4096 examples dominate, the cached patterns are 4 x 33.5 MB);
`mean_patterns` with `chunk_size=512` +100 MB, with `chunk_size=128` +23 MB.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from transformer_lens import ActivationCache

from mechlrmc.errors import OptionError
from mechlrmc.model import HookedEncoder

Names = str | list[str] | Callable[[str], bool]


def _names_filter(names: Names) -> Callable[[str], bool]:
    if callable(names):
        return names
    wanted = {names} if isinstance(names, str) else set(names)
    return lambda name: name in wanted


def check_hook_names(model: HookedEncoder, names: Names) -> None:
    """Raise if a listed hook name does not exist (a typo would otherwise cache nothing)."""
    if callable(names):
        return
    listed = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in listed if n not in model.hook_dict]
    if unknown:
        raise KeyError(f"unknown hook name(s) {unknown}: e.g. {list(model.hook_dict)[:4]} ...")


def cache_hooks(
    model: HookedEncoder, tokens: torch.Tensor, names: Names, device: str | torch.device | None = None
) -> tuple[torch.Tensor, ActivationCache]:
    """`model.run_with_cache(tokens)` keeping only `names` (a name, a list, or a predicate).

    With `device`, the model and tokens are moved there first. Returns (output [batch, pos], cache).
    """
    check_hook_names(model, names)
    if device is not None:
        model = model.to(device)
        tokens = tokens.to(device)
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=_names_filter(names))


def chunked_cache(
    model: HookedEncoder,
    tokens: torch.Tensor,
    names: Names,
    chunk_size: int = 512,
    device: str | torch.device | None = None,
) -> Iterator[tuple[slice, torch.Tensor, ActivationCache]]:
    """Yield (rows of the batch, output, cache of `names`) chunk by chunk; only one chunk's
    activations are alive at a time, so memory stays bounded whatever the batch size."""
    for rows in _chunks(tokens.shape[0], chunk_size):
        out, cache = cache_hooks(model, tokens[rows], names, device)
        yield rows, out, cache


def _chunks(n: int, chunk_size: int) -> Iterator[slice]:
    """The rows of a batch of `n`, `chunk_size` at a time."""
    if chunk_size < 1:
        raise OptionError(f"chunk_size={chunk_size} is invalid: allowed an integer >= 1")
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def _layers(layers: list[int] | None, n_layers: int) -> list[int]:
    """The chosen layers (all by default), each checked to be in range."""
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise OptionError(f"layers {bad} are out of range: allowed 0 <= layer < {n_layers}")
    return layers


def pattern_names(model: HookedEncoder, layers: list[int] | None = None) -> list[str]:
    """`blocks.{l}.attn.hook_pattern` of the chosen layers (all by default)."""
    return [f"blocks.{l}.attn.hook_pattern" for l in _layers(layers, model.cfg.n_layers)]


def mean_patterns(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    layers: list[int] | None = None,
    chunk_size: int = 512,
    device: str | torch.device | None = None,
    anatomy=None,
) -> torch.Tensor:
    """Attention patterns averaged over the batch, [layer, head, query, key], computed chunk by
    chunk (finding 4 of docs/FINDINGS.md averages patterns over many samples), read through the
    model's anatomy (`mechlrmc.anatomy`; default derived from the model)."""
    total = None
    for _, patterns in chunked_patterns(model, tokens, layers, chunk_size, device, anatomy):
        summed = torch.stack([p.sum(0) for p in patterns]).cpu()  # [layer, head, q, k]
        total = summed if total is None else total + summed
    return total / tokens.shape[0]


def chunked_patterns(model: torch.nn.Module, tokens: torch.Tensor, layers: list[int] | None = None,
                     chunk_size: int = 512, device: str | torch.device | None = None, anatomy=None
                     ) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """Yield (rows of the batch, [pattern [rows, head, q, k] of each chosen layer]) chunk by chunk."""
    from mechlrmc.anatomy import Anatomy

    anatomy = Anatomy.of(model) if anatomy is None else anatomy
    anatomy.require(["pattern"], "attention patterns")
    keys = [f"pattern.{l}" for l in _layers(layers, anatomy.n_layers)]
    if device is not None:
        model, tokens = model.to(device), tokens.to(device)
    for rows in _chunks(tokens.shape[0], chunk_size):
        with torch.no_grad():
            _, acts = anatomy.run(model, tokens[rows], read=keys)
        yield rows, [acts[k] if acts[k].dim() == 4 else acts[k][:, None] for k in keys]
