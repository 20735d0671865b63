"""Cheap mechanistic measures of a model on one batch: what the live telemetry logs at every evaluation.

One forward pass with a cache of the attention patterns and the block outputs gives
- `attention_share`: per head, the share of attention on the task's optimal attention map
  (`Task.optimal_attention_map`), over the queries whose map row is not empty (docs/FINDINGS.md,
  P3 for the token tasks; `analyses.dynamics.attention_progress` for LRMC);
- `attention_entropy`: per head, the mean entropy of each query's pattern divided by the log of
  the number of keys it sees (1 = uniform);
- `mean_pairwise_cosine`: per layer, the collapse of the hidden states across the scored positions
  (the batch's `scored` positions where it has them, else all; docs/FINDINGS.md, P2);
- `matrix_head_scores`: per head, LRMC's taxonomy shares (row, column, self, observed, row and
  column observed; the scores of `analyses.heads.score_pattern`, finding 4), for tasks in
  `TAXONOMY_TASKS`;
- `component_norms`: the L2 norm of the weights (or gradients) of each component.
Linear attention has signed patterns: shares and entropies are taken of |pattern|, normalised per
query, as `attn_on_map` of the token tasks does. Pure functions of tensors, no model state changed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TAXONOMY_TASKS = ("lrmc",)  # tasks whose batches are m x n matrices (`observed`, `m`, `n`)
MATRIX_SCORES = ("row", "column", "self", "observed", "row_observed", "column_observed")
_TOP_LEVEL = {"W_E": "embed", "W_pos": "pos_embed", "W_U": "unembed", "b_U": "unembed"}


def _weights(pattern: torch.Tensor) -> torch.Tensor:
    """|pattern| [b, h, q, k] normalised to sum to 1 per query (rows of zeros stay zero)."""
    pattern = pattern.float().abs()
    return pattern / pattern.sum(-1, keepdim=True).clamp_min(1e-12)


def attention_share(pattern: torch.Tensor, on_map: torch.Tensor) -> torch.Tensor:
    """[head]: share of each head's attention (pattern [b, h, q, k]) on the optimal map [b, q, k]
    (bool), averaged over the (example, query) pairs whose map row has a cell."""
    on_map = on_map.to(pattern.device)
    share = (_weights(pattern) * on_map[:, None]).sum(-1)  # [b, h, q]
    rows = on_map.any(-1).float()[:, None]  # [b, 1, q]
    return (share * rows).sum((0, 2)) / rows.sum((0, 2)).clamp_min(1)


def attention_entropy(pattern: torch.Tensor, causal: bool) -> torch.Tensor:
    """[head]: mean over examples and queries of the entropy of each query's pattern, divided by
    log(number of keys it sees) (all keys; keys up to itself when `causal`); queries that see one
    key are left out."""
    _, _, q, k = pattern.shape
    p = _weights(pattern)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [b, h, q]
    seen = torch.arange(1, q + 1, device=p.device) if causal else torch.full((q,), k, device=p.device)
    keep = seen >= 2
    return (entropy[..., keep] / seen[keep].float().log()).mean((0, 2))


def mean_pairwise_cosine(hidden: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean cosine similarity of hidden states [b, pos, d] over pairs of distinct kept positions
    (keep [pos] bool) of the same example; NaN with fewer than two kept."""
    n = int(keep.sum())
    if n < 2:
        return math.nan
    unit = F.normalize(hidden[:, keep.to(hidden.device)].float(), dim=-1)  # [b, n, d]
    cos = unit @ unit.transpose(1, 2)
    return float((cos.sum((-2, -1)) - cos.diagonal(dim1=-2, dim2=-1).sum(-1)).mean() / (n * (n - 1)))


def matrix_head_scores(pattern: torch.Tensor, observed: torch.Tensor, m: int, n: int) -> dict[str, torch.Tensor]:
    """{score: [head]}: per head, the share of attention (pattern [b, h, q, k], rows summing to 1)
    on the query's row, column, itself, the observed keys (observed [b, k] bool), and the observed
    keys of its row and of its column, averaged over examples and queries (finding 4)."""
    pos = torch.arange(m * n, device=pattern.device)
    same_row = (pos[:, None] // n == pos[None, :] // n)[None]  # [1, q, k]
    same_col = (pos[:, None] % n == pos[None, :] % n)[None]
    obs = observed.to(pattern.device).bool()[:, None, :]  # [b, 1, k]
    itself = torch.eye(m * n, dtype=torch.bool, device=pattern.device)[None]
    keys = {"row": same_row, "column": same_col, "self": itself, "observed": obs,
            "row_observed": same_row & obs, "column_observed": same_col & obs}
    pattern = pattern.float()
    return {name: (pattern * keys[name][:, None]).sum(-1).mean((0, 2)) for name in MATRIX_SCORES}


def component(name: str) -> str:
    """The component a parameter belongs to: `blocks.0.attn.W_Q` -> `blocks.0.attn`, `W_E` -> `embed`."""
    return name.rpartition(".")[0] or _TOP_LEVEL.get(name, name)


def component_norms(model: torch.nn.Module, grads: bool = False) -> dict[str, float]:
    """{component: L2 norm of its parameters (or of their gradients; parameters without one are
    left out)}."""
    squares: dict[str, float] = {}
    for name, p in model.named_parameters():
        tensor = p.grad if grads else p
        if tensor is not None:
            key = component(name)
            squares[key] = squares.get(key, 0.0) + float(tensor.detach().float().pow(2).sum())
    return {k: math.sqrt(v) for k, v in squares.items()}


def block_output_names(model: torch.nn.Module) -> list[str]:
    """Hook names of each block's output (after its LayerNorm in the post-LN model)."""
    last = "hook_normalized_resid_post" if model.cfg.norm == "post" else "hook_resid_post"
    return [f"blocks.{layer}.{last}" for layer in range(model.cfg.n_layers)]


@torch.no_grad()
def attention_and_hidden(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the attention pattern [b, h, q, k] and the block output [b, pos, d] of one forward
    pass in eval mode (the model's train/eval flag is restored)."""
    patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    hidden = block_output_names(model)
    wanted = set(patterns) | set(hidden)
    was_training = model.training
    model.eval()
    try:
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    finally:
        model.train(was_training)
    return [cache[name] for name in patterns], [cache[name] for name in hidden]
