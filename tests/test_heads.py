"""Head taxonomy: planted patterns get their label; a hand-made model's row and column heads are
found through the whole pipeline (hooks, chunks, structured masks)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from analyses.attention.heads import (default_structured_mask, head_onsets, head_taxonomy, score_pattern,
    structured_taxonomy)
from mechlrmc.config import DataConfig, ModelConfig, RunConfig
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import row_col_index, sample


def _uniform_over(keys: torch.Tensor) -> torch.Tensor:
    """Rows of a pattern uniform over the True keys [q, k]."""
    keys = keys.float()
    return keys / keys.sum(-1, keepdim=True)


def _planted(m: int, n: int, observed: torch.Tensor) -> torch.Tensor:
    rows, cols = row_col_index(m, n)
    return torch.stack([
        _uniform_over(rows[:, None] == rows[None, :]),  # row
        _uniform_over(cols[:, None] == cols[None, :]),  # column
        torch.eye(m * n),  # self
        torch.full((m * n, m * n), 1.0 / (m * n)),  # uniform
        _uniform_over(observed[None, :].expand(m * n, -1)),  # observed-only
    ])  # [head, q, k]


@pytest.mark.parametrize("m, n", [(4, 4), (3, 5), (7, 7)])
def test_planted_patterns_get_their_labels(m, n):
    observed = torch.rand(m * n, generator=torch.Generator().manual_seed(0)) > 0.3
    scores = score_pattern(_planted(m, n, observed), observed, m, n)
    assert scores.label.tolist() == ["row", "column", "self", "uniform", "observed-only"]
    row = scores.iloc[0]
    assert row["row"] == pytest.approx(1.0) and row["column"] == pytest.approx(1 / n)
    assert row["self"] == pytest.approx(1 / n) and row["entropy"] == pytest.approx(torch.tensor(n).log() / torch.tensor(m * n).log())
    assert scores.iloc[3][["row", "column", "self"]].tolist() == pytest.approx([1 / m, 1 / n, 1 / (m * n)])
    assert scores.iloc[4]["observed"] == pytest.approx(1.0)


def test_label_threshold_is_half_way_from_chance():
    m = n = 4
    observed = torch.ones(m * n, dtype=torch.bool)
    row, _, _, uniform, _ = _planted(m, n, observed)
    # row share = w + (1 - w) / 4: lift = w, the label needs lift >= 0.5
    mixtures = torch.stack([w * row + (1 - w) * uniform for w in (0.4, 0.6)])
    assert score_pattern(mixtures, observed, m, n).label.tolist() == ["other", "row"]


def test_batched_patterns_and_query_groups():
    m, n = 4, 4
    gen = torch.Generator().manual_seed(1)
    observed = torch.rand(8, m * n, generator=gen) > 0.3  # [b, k]
    rows, cols = row_col_index(m, n)
    row, col = _uniform_over(rows[:, None] == rows[None]), _uniform_over(cols[:, None] == cols[None])
    # one head: row attention at masked queries, column attention at observed ones
    pattern = torch.where(observed[:, :, None], col, row)[:, None]  # [b, 1, q, k]
    assert score_pattern(pattern, observed, m, n, "masked").label.item() == "row"
    assert score_pattern(pattern, observed, m, n, "observed").label.item() == "column"
    # 3-d and 4-d inputs agree
    single = score_pattern(pattern[0], observed[0], m, n)
    assert single.drop(columns="label").equals(score_pattern(pattern[:1], observed[:1], m, n).drop(columns="label"))


def test_sharp_but_random_attention_is_not_uniform():
    """Per-query entropy: a head attending to one random key per example averages to a flat
    pattern but is not 'uniform'."""
    m = n = 4
    gen = torch.Generator().manual_seed(2)
    keys = torch.randint(0, m * n, (256, m * n), generator=gen)
    pattern = torch.nn.functional.one_hot(keys, m * n).float()[:, None]  # [b, 1, q, k]
    scores = score_pattern(pattern, torch.ones(256, m * n, dtype=torch.bool), m, n)
    assert scores.entropy.item() == pytest.approx(0.0, abs=1e-6)
    assert scores.label.item() == "other"
    assert score_pattern(pattern.mean(0), torch.ones(m * n, dtype=torch.bool), m, n).label.item() == "uniform"


def _row_column_model(m: int = 4, n: int = 4, sharp: float = 4.0) -> HookedEncoder:
    """One layer, two heads. Position p = (i, j) embeds as e_i + e_{m+j}; every value token adds
    e_{m+n}, MASK adds e_{m+n+1} (same norm after LayerNorm). Head 0 matches rows; head 1 matches
    columns and prefers observed keys."""
    cfg = RunConfig(data=DataConfig(m=m, n=n, rank=1),
                    model=ModelConfig(d_model=16, n_layers=1, n_heads=2, d_mlp=16, mask_embedding_zero=False))
    model = HookedEncoder(cfg, seed=0)
    rows, cols = row_col_index(m, n)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_embed.w.fill_(1.0)
        model.W_E[1:, m + n] = 1.0
        model.W_E[0, m + n + 1] = 1.0
        model.W_pos[torch.arange(m * n), rows] = 1.0
        model.W_pos[torch.arange(m * n), m + cols] = 1.0
        attn = model.blocks[0].attn
        attn.W_Q[0, :m, :m] = sharp * torch.eye(m)
        attn.W_K[0, :m, :m] = sharp * torch.eye(m)
        attn.W_Q[1, m:m + n, :n] = sharp * torch.eye(n)
        attn.W_K[1, m:m + n, :n] = sharp * torch.eye(n)
        attn.b_Q[1, n] = sharp  # constant query component ...
        attn.W_K[1, m + n, n] = sharp  # ... meeting the "observed" direction of the keys
    return model


def test_hand_made_model_has_a_row_and_a_column_head():
    model = _row_column_model()
    batch = sample(DataConfig(m=4, n=4, rank=1), 300, torch.Generator().manual_seed(0))
    taxonomy = head_taxonomy(model, batch, queries="all", chunk_size=64)
    assert taxonomy.label.tolist() == ["row", "column"]
    assert taxonomy.iloc[1]["observed"] > 0.95  # the column head avoids masked keys
    whole = head_taxonomy(model, batch, queries="all", chunk_size=1000)
    assert whole.drop(columns="label").to_numpy() == pytest.approx(taxonomy.drop(columns="label").to_numpy(), abs=1e-6)


def test_structured_mask_scores():
    """Finding 4 on the hand-made model: at masked queries of the masked rows, the row head spreads
    over its row, so the sole observed entry gets 1/n; the column head avoids masked keys."""
    m = n = 4
    data_cfg = DataConfig(m=m, n=n, rank=1)
    mask = default_structured_mask(m, n)
    assert mask.view(m, n).sum(1).tolist() == [n, n, 1, 1]
    batch = sample(data_cfg, 64, torch.Generator().manual_seed(0))
    scores = structured_taxonomy(_row_column_model(), batch, data_cfg).set_index(["queries", "head"])
    row_head, col_head = scores.loc[("masked", 0)], scores.loc[("masked", 1)]
    assert row_head["row"] > 0.99 and row_head["row_observed"] == pytest.approx(1 / n, abs=0.01)
    assert col_head["column_observed"] == pytest.approx(col_head["column"], abs=0.02)
    assert col_head["column"] > 0.9
    with pytest.raises(ValueError, match="m >= 3"):
        default_structured_mask(2, 4)


def test_bad_query_group_and_shape_are_named():
    observed = torch.ones(16, dtype=torch.bool)
    with pytest.raises(ValueError, match="queries='some'"):
        score_pattern(torch.full((1, 16, 16), 1 / 16), observed, 4, 4, "some")
    with pytest.raises(ValueError, match="m\\*n = 9"):
        score_pattern(torch.full((1, 16, 16), 1 / 16), observed, 3, 3)


def _planted_taxonomy() -> pd.DataFrame:
    """Labels over steps 0-40 of three heads of layer 0 and one of layer 1, "masked" rows as decoys."""
    history = {
        (0, 0): ["other", "row", "other", "row", "row"],  # a row head for good from step 30
        (0, 1): ["uniform", "uniform", "column", "column", "column"],  # a column head from step 20
        (0, 2): ["row", "row", "row", "row", "other"],  # was a row head, is not at the last step
        (1, 0): ["self"] * 5,  # a self head from the start
    }
    rows = []
    for (layer, head), labels in history.items():
        for i, label in enumerate(labels):
            share = 0.25 + 0.1 * i
            for queries in ("all", "masked"):
                rows.append({"step": 10 * i, "layer": layer, "head": head, "queries": queries,
                             "label": label if queries == "all" else "row", "row": share, "column": 1 - share})
    return pd.DataFrame(rows).sample(frac=1, random_state=0)  # any row order


def test_head_onsets_give_the_step_from_which_a_head_keeps_its_label():
    taxonomy = _planted_taxonomy()
    onsets = head_onsets(taxonomy, drop_step=25)
    assert list(onsets.columns) == ["layer", "head", "label", "since_step", "since_drop", "row_share", "column_share"]
    assert onsets[["layer", "head", "label", "since_step"]].values.tolist() == [[0, 0, "row", 30], [0, 1, "column", 20]]
    assert onsets.since_drop.tolist() == [5, -5]
    assert onsets.row_share.tolist() == pytest.approx([0.65, 0.65])
    assert onsets.column_share.tolist() == pytest.approx([0.35, 0.35])
    every = head_onsets(taxonomy, drop_step=float("nan"), labels=None)
    assert every[["layer", "head", "label", "since_step"]].values.tolist() == [
        [0, 0, "row", 30], [0, 1, "column", 20], [0, 2, "other", 40], [1, 0, "self", 0]]
    assert every.since_drop.isna().all()
    masked = head_onsets(taxonomy, drop_step=None, queries="masked")
    assert masked.since_step.tolist() == [0, 0, 0, 0]
    assert head_onsets(taxonomy, 25, labels=("observed-only",)).empty
