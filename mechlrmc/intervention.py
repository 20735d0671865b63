"""Attention intervention during training (docs/FINDINGS.md, P5): bias every head toward the LRMC
"optimal map", the observed keys in the query's own row or column.

With scale c, each pattern row is reweighted as p'(k) ∝ p(k) * (c if k is on the map else 1) and
renormalised. c > 1 pulls attention toward the map, c < 1 pushes it away, c = 1 changes nothing.
"""

from __future__ import annotations

import torch

from mechlrmc.data import MASK_ID, row_col_index


def optimal_attention_map(observed: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """[batch, query, key] bool: key is observed and shares the query's row or column
    (the query itself excluded)."""
    rows, cols = row_col_index(m, n)
    rows, cols = rows.to(observed.device), cols.to(observed.device)
    same_line = (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])
    same_line &= ~torch.eye(m * n, dtype=torch.bool, device=observed.device)
    return same_line[None] & observed[:, None, :]


def bias_pattern(pattern: torch.Tensor, on_map: torch.Tensor, scale: float) -> torch.Tensor:
    """Reweight `pattern` [batch, head, q, k] by `scale` on `on_map` [batch, q, k] and renormalise."""
    weights = 1 + (scale - 1) * on_map[:, None].to(pattern.dtype)
    biased = pattern * weights
    return biased / biased.sum(-1, keepdim=True)


class AttentionIntervention:
    """A training hook: `set_tokens` takes the batch's mask (observed = token is not MASK), then
    every `hook_pattern` is biased toward that batch's optimal map."""

    def __init__(self, scale: float, m: int, n: int):
        self.scale, self.m, self.n = scale, m, n
        self.on_map: torch.Tensor | None = None

    def set_tokens(self, tokens: torch.Tensor) -> None:
        self.on_map = optimal_attention_map(tokens != MASK_ID, self.m, self.n)

    def __call__(self, pattern: torch.Tensor, hook) -> torch.Tensor:
        return bias_pattern(pattern, self.on_map, self.scale)

    def fwd_hooks(self) -> list:
        return [(lambda name: name.endswith("attn.hook_pattern"), self)]
