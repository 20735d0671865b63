"""The one home of every measure with more than one caller: pure functions of tensors, or of a model and a batch.

Telemetry, `Task.evaluate`, the plateau dynamics, the early warnings, the LM checkpoint series and
the report all call these, so a measure means the same thing wherever it is logged or drawn.

- `attention_share`: per head, the share of attention on the task's optimal attention map
  (`Task.optimal_attention_map`), over the queries whose map row is not empty, or over chosen
  queries (docs/FINDINGS.md, P3; finding 4's row/column map on LRMC);
- `attention_entropy` (`query_entropy` per query): per head, the mean entropy of each query's
  pattern divided by the log of the number of keys it sees (1 = uniform);
- `mean_pairwise_cosine`: the collapse of hidden states across positions, over all, fixed or
  per-example positions (P2), at any site (`mechlrmc.sites`);
- `consecutive_repetition`: the fraction of consecutive equal outputs (P1), of generated tokens
  or of the truth; `prediction_spread_ratio`: its analogue for a scalar read-out (LRMC);
- `greedy_generate`: the outputs generated greedily after a prompt, for any model whose forward
  returns logits (mechlrmc's own, a Hugging Face causal LM through `logits_of`);
- `matrix_head_scores` (`matrix_key_masks`): per head, LRMC's taxonomy shares (finding 4);
- `component_norms`: the L2 norm of the weights (or gradients) of each component, grouped by the
  one component vocabulary (`mechlrmc.components.component_of`).
Linear attention has signed patterns: shares and entropies are taken of |pattern|, normalised per
query. Nothing here changes a model's state or draws a random number.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from mechlrmc.components import component_of

MATRIX_SCORES = ("row", "column", "self", "observed", "row_observed", "column_observed")


def _weights(pattern: torch.Tensor) -> torch.Tensor:
    """|pattern| [b, h, q, k] normalised to sum to 1 per query (rows of zeros stay zero)."""
    pattern = pattern.float().abs()
    return pattern / pattern.sum(-1, keepdim=True).clamp_min(1e-12)


def query_shares(pattern: torch.Tensor, on_map: torch.Tensor) -> torch.Tensor:
    """[b, h, q]: the share of each query's |attention| (pattern [b, h, q, k]) on the map [b, q, k]."""
    return (_weights(pattern) * on_map.to(pattern.device)[:, None]).sum(-1)


def attention_share(pattern: torch.Tensor, on_map: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
    """[head]: share of each head's attention (pattern [b, h, q, k]) on the optimal map [b, q, k]
    (bool), averaged over the (example, query) pairs in `queries` [b, q] (bool; default: the pairs
    whose map row has a cell)."""
    on_map = on_map.to(pattern.device)
    share = query_shares(pattern, on_map)  # [b, h, q]
    rows = (on_map.any(-1) if queries is None else queries.to(pattern.device).bool()).float()[:, None]  # [b, 1, q]
    return (share * rows).sum((0, 2)) / rows.sum((0, 2)).clamp_min(1)


def query_entropy(pattern: torch.Tensor, causal: bool) -> torch.Tensor:
    """[b, h, q]: the entropy of each query's |pattern| [b, h, q, k] divided by log(number of keys
    it sees) (all keys; keys up to itself when `causal`; NaN for a query that sees one key)."""
    _, _, q, k = pattern.shape
    p = _weights(pattern)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [b, h, q]
    seen = torch.arange(1, q + 1, device=p.device) if causal else torch.full((q,), k, device=p.device)
    return entropy / torch.where(seen >= 2, seen.float().log(), torch.nan)


def attention_entropy(pattern: torch.Tensor, causal: bool) -> torch.Tensor:
    """[head]: mean over examples and queries of `query_entropy` (1 = uniform); queries that see
    one key are left out."""
    entropy = query_entropy(pattern, causal)
    keep = ~entropy[0, 0].isnan()  # [q]
    return entropy[..., keep].mean((0, 2))


def mean_pairwise_cosine(hidden: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Mean cosine similarity of hidden states [..., pos, d] over the pairs of distinct kept
    positions of the same example, pooled over examples (1: all parallel, i.e. collapsed). `keep`:
    None (every position), [pos] or [..., pos] bool (positions that differ per example, e.g. LRMC's
    masked entries). NaN where no pair is kept."""
    pos = hidden.shape[-2]
    unit = F.normalize(hidden.float(), dim=-1)
    cos = unit @ unit.transpose(-2, -1)  # [..., pos, pos]
    pairs = ~torch.eye(pos, dtype=torch.bool, device=hidden.device)
    if keep is not None:
        keep = keep.to(hidden.device).bool()
        pairs = pairs & keep[..., :, None] & keep[..., None, :]
    pairs = pairs.expand(cos.shape)
    return float(cos[pairs].mean()) if bool(pairs.any()) else math.nan


def block_output_names(model: torch.nn.Module) -> list[str]:
    """Hook names of each block's output (after its LayerNorm in the post-LN model)."""
    last = "hook_normalized_resid_post" if model.cfg.norm == "post" else "hook_resid_post"
    return [f"blocks.{layer}.{last}" for layer in range(model.cfg.n_layers)]


def consecutive_repetition(outputs: torch.Tensor | Sequence[int]) -> float:
    """The fraction of consecutive equal entries along the last axis of outputs [..., n] (the
    plateau paper's repetition), pooled over any leading axes; NaN for fewer than 2 entries."""
    outputs = torch.as_tensor(outputs)
    if outputs.dim() == 0 or outputs.shape[-1] < 2:
        return math.nan
    return float((outputs[..., 1:] == outputs[..., :-1]).float().mean())


def masked_variance(x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Variance of x [b, pos] over the masked entries of each row -> [b] (rows with < 2 masked: NaN)."""
    count = masked.sum(-1).float()
    mean = (x * masked).sum(-1) / count
    var = (((x - mean[:, None]) ** 2) * masked).sum(-1) / (count - 1)
    return torch.where(count >= 2, var, torch.nan)


def prediction_spread_ratio(pred: torch.Tensor, values: torch.Tensor, masked: torch.Tensor) -> float:
    """Repetition for a scalar read-out: the mean over examples of the variance of the predictions
    across an example's masked entries, divided by the same for the true values (0: one value
    repeated; 1: as varied as the truth)."""
    spread_pred, spread_true = masked_variance(pred.float(), masked), masked_variance(values.float(), masked)
    keep = ~spread_true.isnan()
    return float(spread_pred[keep].mean() / spread_true[keep].mean())


def logits_of(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward that returns logits [b, pos, vocab] for `greedy_generate`: mechlrmc's model as it
    is, a Hugging Face causal LM through its output's `.logits`."""
    def forward(ids: torch.Tensor) -> torch.Tensor:
        out = model(ids)
        return out if isinstance(out, torch.Tensor) else out.logits
    return forward


@torch.no_grad()
def greedy_generate(model: torch.nn.Module | Callable, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """`n` tokens generated greedily after `prompt` [batch, p] -> [batch, n]: each step appends
    the argmax of the last position's logits (`model` returns logits [b, pos, vocab], or wrap it
    with `logits_of`)."""
    forward = model if not isinstance(model, torch.nn.Module) else logits_of(model)
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, forward(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:]


def matrix_key_masks(observed: torch.Tensor, m: int, n: int) -> dict[str, torch.Tensor]:
    """For LRMC's m x n matrices, which keys each taxonomy score counts (finding 4): {score: [b or 1,
    q, k] bool} for the query's row, column, itself, the observed keys (observed [b, k] bool), and
    the observed keys of its row and of its column."""
    pos = torch.arange(m * n, device=observed.device)
    same_row = (pos[:, None] // n == pos[None, :] // n)[None]  # [1, q, k]
    same_col = (pos[:, None] % n == pos[None, :] % n)[None]
    obs = observed.bool()[:, None, :]  # [b, 1, k]
    itself = torch.eye(m * n, dtype=torch.bool, device=observed.device)[None]
    return {"row": same_row, "column": same_col, "self": itself, "observed": obs,
            "row_observed": same_row & obs, "column_observed": same_col & obs}


def matrix_head_scores(pattern: torch.Tensor, observed: torch.Tensor, m: int, n: int) -> dict[str, torch.Tensor]:
    """{score: [head]}: per head, the share of attention (pattern [b, h, q, k], rows summing to 1)
    on each of `matrix_key_masks`, averaged over examples and queries (finding 4)."""
    keys = matrix_key_masks(observed.to(pattern.device), m, n)
    pattern = pattern.float()
    return {name: (pattern * keys[name][:, None]).sum(-1).mean((0, 2)) for name in MATRIX_SCORES}


def norms_by_component(named: Iterable[tuple[str, torch.Tensor | None]]) -> dict[str, float]:
    """{component: L2 norm} of (parameter name, tensor) pairs, grouped by
    `mechlrmc.components.component_of` (None tensors are left out)."""
    squares: dict[str, float] = {}
    for name, tensor in named:
        if tensor is not None:
            key = component_of(name)
            squares[key] = squares.get(key, 0.0) + float(tensor.detach().float().pow(2).sum())
    return {k: math.sqrt(v) for k, v in squares.items()}


def component_norms(model: torch.nn.Module, grads: bool = False) -> dict[str, float]:
    """{component: L2 norm of its parameters (or of their gradients; parameters without one are
    left out)}."""
    return norms_by_component((name, p.grad if grads else p) for name, p in model.named_parameters())


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
