"""Attention-head taxonomy: where each head looks, measured and labelled (finding 4, docs/FINDINGS.md).

For a query at (i, j) of the m x n matrix, `score_pattern` measures, averaged over examples and
queries, the share of the query's attention on
  row           keys in row i (the query itself included)           chance n / (m n) = 1 / m
  column        keys in column j (itself included)                  chance 1 / n
  self          the query itself                                    chance 1 / (m n)
  observed      observed keys                                       chance = share of observed keys
  row_observed  observed keys of row i; column_observed: of column j
and `entropy`, the mean per-query entropy of the pattern divided by log(m n) (1 = uniform).
"Chance" is the share a uniform pattern gives. Per-query entropy is used, not that of an averaged
pattern, so a head attending sharply to a different key in each example is not called uniform.

Labels, first match wins. A head is targeted at a set of keys when its share there is at least
half-way from chance to 1: lift = (share - chance) / (1 - chance) >= LIFT = 0.5. On 4 x 4 that is a
row / column share >= 0.625 (chance 0.25) and a self share >= 0.53 (chance 0.06); on 7 x 7 it is
>= 0.57 (chance 0.14). The half-way rule needs no per-shape tuning, and a pattern cannot pass it
for both row and column unless it puts >= 25 % on itself.
  self           self lift >= 0.5
  row / column   row (column) lift >= 0.5; the larger lift wins when both pass
  observed-only  observed lift >= OBSERVED_LIFT = 0.8: masked keys get at most a fifth of their
                 chance share (<= 6 % at p_mask = 0.3). Stricter than LIFT because uniform
                 attention already puts 1 - p_mask = 70 % on observed keys.
  uniform        entropy >= UNIFORM_ENTROPY = 0.95: spread over at least (m n)^0.95 keys
                 (>= 13.9 of 16); a pattern uniform over one row has entropy 0.5 on 4 x 4.
  other          none of the above.
A column head that also avoids masked keys is labelled "column"; its `column_observed` and
`observed` scores show the avoidance.
"""

from __future__ import annotations

import pandas as pd
import torch

from analyses.base.cache import chunked_patterns
from mechlrmc import measures
from mechlrmc.anatomy import Anatomy, subject_of
from mechlrmc.config import DataConfig
from mechlrmc.errors import OptionError
from mechlrmc.tasks import get_task
from mechlrmc.tasks.lrmc import Batch, structured_mask, with_observed

LIFT = 0.5


OBSERVED_LIFT = 0.8


UNIFORM_ENTROPY = 0.95


SCORES = ("row", "column", "self", "observed", "row_observed", "column_observed", "entropy")


QUERIES = ("all", "masked", "observed")


def _score_sums(
    pattern: torch.Tensor, observed: torch.Tensor, m: int, n: int, queries: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sums over examples and chosen queries of every score, {score: [head]}, and the number of
    (example, query) pairs summed, plus that of the observed-key fraction under key "chance"."""
    if queries not in QUERIES:
        raise OptionError(f"queries={queries!r} is invalid: allowed one of {QUERIES}")
    if pattern.dim() == 3:
        pattern = pattern[None]
    b, _, q, k = pattern.shape  # [batch, head, query, key]
    if q != m * n or k != m * n:
        raise OptionError(f"pattern has {q} queries and {k} keys: expected m*n = {m * n} each")
    observed = observed.to(pattern.device).bool().expand(b, k)
    weight = {"all": torch.ones_like(observed), "masked": ~observed, "observed": observed}[queries]
    weight = weight.to(pattern.dtype)[:, None, :]  # [b, 1, q]
    sums = {
        name: ((pattern * keys[:, None].to(pattern.dtype)).sum(-1) * weight).sum((0, 2))
        for name, keys in measures.matrix_key_masks(observed, m, n).items()
    }
    entropy = measures.query_entropy(pattern, causal=False).to(pattern.dtype)  # [b, head, q]
    sums["entropy"] = (entropy * weight).sum((0, 2))
    sums["observed_chance"] = (observed.to(pattern.dtype).mean(-1, keepdim=True) * weight[:, 0]).sum()
    return sums, weight.sum()


def label_heads(scores: pd.DataFrame, m: int, n: int) -> pd.Series:
    """The label of each row of a score table (see the module docstring for the rules)."""
    def lift(share, chance):
        return (share - chance) / (1 - chance)

    def one(s) -> str:
        if lift(s["self"], 1 / (m * n)) >= LIFT:
            return "self"
        row, col = lift(s["row"], 1 / m), lift(s["column"], 1 / n)
        if max(row, col) >= LIFT:
            return "row" if row >= col else "column"
        if s["observed_chance"] < 1 and lift(s["observed"], s["observed_chance"]) >= OBSERVED_LIFT:
            return "observed-only"
        if s["entropy"] >= UNIFORM_ENTROPY:
            return "uniform"
        return "other"

    return scores.apply(one, axis=1).rename("label")


def score_pattern(
    pattern: torch.Tensor, observed: torch.Tensor, m: int, n: int, queries: str = "all"
) -> pd.DataFrame:
    """Taxonomy scores and label per head of a pattern [head, q, k] or [batch, head, q, k] whose
    rows sum to 1, under the observed mask [k] or [batch, k]; `queries` picks which queries are
    averaged ("all", "masked" or "observed"). Pure: no model involved."""
    sums, count = _score_sums(pattern, observed, m, n, queries)
    return _table(sums, count, m, n)


def _table(sums: dict[str, torch.Tensor], count: torch.Tensor, m: int, n: int) -> pd.DataFrame:
    count = count.clamp_min(1)
    frame = pd.DataFrame({name: (sums[name] / count).tolist() for name in SCORES})
    frame.insert(0, "head", range(len(frame)))
    frame["observed_chance"] = float(sums["observed_chance"] / count)
    frame["label"] = label_heads(frame, m, n)
    return frame


def _taxonomy(model: torch.nn.Module, batch: Batch, queries: tuple[str, ...], chunk_size: int,
              anatomy: Anatomy | None = None) -> pd.DataFrame:
    model, anatomy = subject_of(model, anatomy)
    names = list(range(anatomy.n_layers))
    sums = {(name, qs): None for name in names for qs in queries}
    counts = dict.fromkeys(queries, 0.0)
    for rows, patterns in chunked_patterns(model, batch.tokens, chunk_size=chunk_size, anatomy=anatomy):
        for qs in queries:
            for name in names:
                part, count = _score_sums(patterns[name], batch.observed[rows], batch.m, batch.n, qs)
                old = sums[name, qs]
                sums[name, qs] = part if old is None else {k: old[k] + part[k] for k in part}
            counts[qs] += float(count)
    frames = [
        _table(sums[name, qs], torch.tensor(counts[qs]), batch.m, batch.n).assign(layer=layer, queries=qs)
        for qs in queries for layer, name in enumerate(names)
    ]
    out = pd.concat(frames, ignore_index=True)
    return out[["layer", "head", "queries", *[c for c in out.columns if c not in ("layer", "head", "queries")]]]


def head_taxonomy(
    model: torch.nn.Module, batch: Batch, queries: str | tuple[str, ...] = ("all", "masked"), chunk_size: int = 512,
    anatomy: Anatomy | None = None,
) -> pd.DataFrame:
    """Scores and label of every (layer, head), averaged over the batch's random masks, for each
    query group in `queries` (finding 4, docs/FINDINGS.md). Memory is bounded by `chunk_size`; the
    patterns are read through the model's anatomy."""
    return _taxonomy(model, batch, (queries,) if isinstance(queries, str) else tuple(queries), chunk_size, anatomy)


def default_structured_mask(m: int, n: int) -> torch.Tensor:
    """The mask of finding 4 (docs/FINDINGS.md) adapted to m x n: the last two rows masked except one entry each
    (first column in the second-to-last row, the middle column in the last row) [m*n]."""
    if m < 3:
        raise OptionError(f"the default structured mask needs m >= 3 rows, got m={m}")
    return structured_mask(m, n, rows=[m - 2, m - 1], keep=[(m - 2, 0), (m - 1, n // 2)])


def structured_taxonomy(
    model: torch.nn.Module,
    batch: Batch,
    data_cfg: DataConfig,
    observed: torch.Tensor | None = None,
    chunk_size: int = 512,
    anatomy: Anatomy | None = None,
) -> pd.DataFrame:
    """`head_taxonomy` with one fixed mask for the whole batch (default `default_structured_mask`),
    scored over masked and over observed queries (finding 4, docs/FINDINGS.md). In the default mask a
    masked query's row holds one observed entry: a head seeking it has `row_observed` near 1
    (chance 1 / (m n)); a column head avoiding masked keys has `column_observed` near `column`."""
    observed = default_structured_mask(batch.m, batch.n) if observed is None else observed
    structured = with_observed(batch, observed, data_cfg)
    return _taxonomy(model, structured, ("masked", "observed"), chunk_size, anatomy)


_ONSET_COLUMNS = ["layer", "head", "label", "since_step", "since_drop", "row_share", "column_share"]


def head_onsets(
    taxonomy: pd.DataFrame, drop_step: float | None, labels: tuple[str, ...] | None = ("row", "column"),
    queries: str = "all",
) -> pd.DataFrame:
    """When each head became what it is at the last step (finding 4: row and column heads form
    around the drop). One row per (layer, head) whose label at the last step is in `labels`
    (None: any label): `since_step`, the first step from which it keeps that label to the end;
    `since_drop` = since_step - drop_step (NaN without a drop); `row_share` and `column_share`,
    its row and column scores at the last step. `taxonomy` is `across_checkpoints(run,
    head_taxonomy)`, read at `queries`; rows are ordered by `labels`, then layer and head."""
    frame = taxonomy[taxonomy.queries == queries] if "queries" in taxonomy else taxonomy
    rows = []
    for (layer, head), history in frame.sort_values("step").groupby(["layer", "head"]):
        label = history.label.iloc[-1]
        if labels is not None and label not in labels:
            continue
        other = history[history.label != label]
        since = int(history[history.step > other.step.max()].step.min() if len(other) else history.step.min())
        no_drop = drop_step is None or pd.isna(drop_step)
        rows.append((int(layer), int(head), label, since, float("nan") if no_drop else since - drop_step,
                     float(history["row"].iloc[-1]), float(history["column"].iloc[-1])))
    out = pd.DataFrame(rows, columns=_ONSET_COLUMNS)
    if labels is not None:
        out = out.assign(order=out.label.map({label: i for i, label in enumerate(labels)}))
        out = out.sort_values(["order", "layer", "head"]).drop(columns="order")
    return out.reset_index(drop=True)


def map_shares(patterns, batch) -> pd.DataFrame:
    """Per (layer, head): the share of |attention| on the task's optimal map (P3), from the patterns
    of every layer (a list of [batch, head, query, key])."""
    on_map = get_task(batch.task).optimal_attention_map(batch).to(batch.tokens.device)
    rows = []
    for layer, pattern in enumerate(patterns):
        share = measures.attention_share(pattern, on_map)
        rows += [{"layer": layer, "head": h, "share_on_map": float(v)} for h, v in enumerate(share.tolist())]
    return pd.DataFrame(rows, columns=["layer", "head", "share_on_map"])


REFERENCE_LABELS = {"optimal": "map"}  # how a label names a reference map (the optimal map: "map 0.72")


@torch.no_grad()
def head_map_share(model, batch, anatomy: Anatomy | None = None) -> pd.DataFrame:
    """The head taxonomy of a token task (or any task without LRMC's matrices): per (layer, head) the
    share of |attention| on each of the task's reference maps (`Task.reference_maps`: its optimal map,
    the previous token, the query itself, the first token) over the queries that predict outputs,
    as `share_<map>` (`share_on_map`: the optimal map, as `attention_progress_native`), and a `label`
    naming the map with the largest share and that share ("map 0.72", "previous 0.91"). One forward,
    no generation; the patterns are read through the model's anatomy."""
    model, anatomy = subject_of(model, anatomy)
    keys = [f"pattern.{l}" for l in range(anatomy.n_layers)]
    _, acts = anatomy.run(model, batch.tokens, read=keys)
    task = get_task(batch.task)
    queries = task.reference_rows(batch).to(batch.tokens.device)[None].expand(len(batch), -1)
    rows = []
    for layer, pattern in enumerate(anatomy.patterns(acts)):
        shares = {name: measures.attention_share(pattern, cells.to(pattern.device), queries).tolist()
                  for name, cells in task.reference_maps(batch).items()}
        for head in range(pattern.shape[1]):
            row = {"layer": layer, "head": head, **{f"share_{n}": v[head] for n, v in shares.items()}}
            best = max(shares, key=lambda n: shares[n][head])
            rows.append({**row, "label": f"{REFERENCE_LABELS.get(best, best)} {shares[best][head]:.2f}"})
    frame = pd.DataFrame(rows)
    if "share_optimal" in frame:
        frame.insert(2, "share_on_map", frame.pop("share_optimal"))
    return frame


MAP_HALF = 0.5  # a head "is on" a reference map once half of its attention is there


def map_onsets(taxonomy: pd.DataFrame, drop_step: float | None, share: str = "share_on_map") -> pd.DataFrame:
    """A token task's `head_onsets`: per (layer, head), its share on the optimal map at the last step, the
    first step from which the share stays >= `MAP_HALF` to the end (`since_step`, NaN: not on the map at
    the end) and that step's distance to the drop (`since_drop`), best heads first."""
    rows = []
    for (layer, head), history in taxonomy.sort_values("step").groupby(["layer", "head"]):
        values = history[share].to_numpy()
        below = [i for i, v in enumerate(values) if v < MAP_HALF]
        since = float("nan") if values[-1] < MAP_HALF else float(history.step.iloc[below[-1] + 1 if below else 0])
        no_drop = drop_step is None or pd.isna(drop_step)
        rows.append({"layer": int(layer), "head": int(head), "share_at_end": float(values[-1]), "since_step": since,
                     "since_drop": float("nan") if no_drop or pd.isna(since) else since - drop_step})
    return pd.DataFrame(rows).sort_values("share_at_end", ascending=False).reset_index(drop=True)
