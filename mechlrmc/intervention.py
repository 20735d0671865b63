"""Attention intervention during training (docs/FINDINGS.md, P5): scale every
head's attention on the task's optimal attention map (`Task.optimal_attention_map`) by c.

Softmax attention: each pattern row is reweighted as p'(k) ∝ p(k) * (c if k is on the map else 1)
and renormalised. Linear attention (the plateau paper's): the pattern is the scores themselves, and
the scores on the map are multiplied by c, with no renormalisation. c > 1 pulls attention toward
the map, c < 1 pushes it away, c = 1 changes nothing.
"""

from __future__ import annotations

import torch


def bias_pattern(pattern: torch.Tensor, on_map: torch.Tensor, scale: float) -> torch.Tensor:
    """Reweight `pattern` [batch, head, q, k] by `scale` on `on_map` [batch, q, k] and renormalise."""
    weights = 1 + (scale - 1) * on_map[:, None].to(pattern.dtype)
    biased = pattern * weights
    return biased / biased.sum(-1, keepdim=True)


def scale_scores(pattern: torch.Tensor, on_map: torch.Tensor, scale: float) -> torch.Tensor:
    """Multiply `pattern` [batch, head, q, k] by `scale` on `on_map` [batch, q, k] (linear attention)."""
    return pattern * (1 + (scale - 1) * on_map[:, None].to(pattern.dtype))


class AttentionIntervention:
    """A training hook: `set_map(task.optimal_attention_map(batch))` before each forward pass, then
    every `hook_pattern` is scaled on that map (renormalised for softmax attention)."""

    def __init__(self, scale: float, renormalise: bool = True):
        self.scale, self.renormalise = scale, renormalise
        self.on_map: torch.Tensor | None = None

    def set_map(self, on_map: torch.Tensor) -> None:
        """`on_map` [batch, query, key] bool, for a batch of the length the model will read."""
        self.on_map = on_map

    def __call__(self, pattern: torch.Tensor, hook) -> torch.Tensor:
        q, k = pattern.shape[-2:]
        on_map = self.on_map[:, :q, :k].to(pattern.device)
        return (bias_pattern if self.renormalise else scale_scores)(pattern, on_map, self.scale)

    def fwd_hooks(self) -> list:
        return [(lambda name: name.endswith("attn.hook_pattern"), self)]
