"""Embedding geometry (finding 8, docs/FINDINGS.md): what the token and position tables learn.

For the value tokens in the range the data actually uses:
- `norm_symmetry`: correlation of ||E(x)|| with ||E(-x)|| (1: the norm depends on |x| only);
  `norm_abs_corr`: correlation of ||E(x)|| with |x|;
- top-2 PCA of the token embeddings: `pc_sign_accuracy` (a linear classifier of sign(x) in the
  PC plane, cross-validated) and `pc_magnitude_r2` (linear fit of |x| from the two PCs);
- positions: cosine silhouette of the position embeddings grouped by column and by row
  (`pos_silhouette_col`, `pos_silhouette_row`; > 0 means they cluster);
- `loss_mask_permuted_pos` etc.: the losses after randomly permuting the position table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.model_selection import cross_val_score

from mechlrmc.anatomy import Anatomy
from mechlrmc.measures import logits_of
from mechlrmc.tasks.lrmc import Batch, decode_tokens, evaluate, row_col_index, split_losses


def tables(model: torch.nn.Module, anatomy: Anatomy | None = None) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """The token and position tables [rows, d_model] (mechlrmc's W_E and W_pos; another model's named
    by its anatomy's `embed` and `pos_embed` groups)."""
    anatomy = Anatomy.of(model) if anatomy is None else anatomy
    return anatomy.table(model, "embed"), anatomy.table(model, "pos_embed")


def value_tokens(model: torch.nn.Module, batch: Batch, precision: float, value_max: float,
                 quantile: float = 0.99, anatomy: Anatomy | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and values of the grid values within the `quantile` of |X| seen in `batch`."""
    limit = float(batch.values.abs().quantile(quantile))
    ids = torch.arange(1, tables(model, anatomy)[0].shape[0])
    values = decode_tokens(ids, precision, value_max)
    keep = values.abs() <= limit
    return ids[keep], values[keep]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


@torch.no_grad()
def token_embedding_geometry(embeddings: np.ndarray, values: np.ndarray, precision: float) -> dict[str, float]:
    """Symmetry of the norms and sign / magnitude in the top-2 PCs. embeddings [n_tokens, d], values [n_tokens]."""
    norms = np.linalg.norm(embeddings, axis=1)
    index = {round(v / precision): i for i, v in enumerate(values)}
    pairs = [(i, index[-k]) for k, i in index.items() if k > 0 and -k in index]
    pos, neg = (np.array(p) for p in zip(*pairs))
    pcs = PCA(n_components=2).fit(embeddings)
    plane = pcs.transform(embeddings)
    nonzero = values != 0
    sign = (values[nonzero] > 0).astype(int)
    accuracy = cross_val_score(LogisticRegression(), plane[nonzero], sign, cv=5).mean()
    magnitude = np.abs(values)
    return {
        "norm_symmetry": _corr(norms[pos], norms[neg]),
        "norm_abs_corr": _corr(norms, magnitude),
        "pc_sign_accuracy": float(accuracy),
        "pc_magnitude_r2": float(LinearRegression().fit(plane, magnitude).score(plane, magnitude)),
        "pc_explained": float(pcs.explained_variance_ratio_.sum()),
    }


def position_silhouettes(w_pos: np.ndarray, m: int, n: int) -> dict[str, float]:
    """Cosine silhouette of the position embeddings [m*n, d] grouped by column and by row."""
    rows, cols = row_col_index(m, n)
    out = {}
    for name, labels in (("col", cols), ("row", rows)):
        groups = len(set(labels.tolist()))
        ok = 1 < groups < len(labels)
        out[f"pos_silhouette_{name}"] = float(silhouette_score(w_pos, labels.numpy(), metric="cosine")) if ok else float("nan")
    return out


@torch.no_grad()
def permuted_position_losses(model: torch.nn.Module, batch: Batch, n_perm: int = 5, seed: int = 0,
                             anatomy: Anatomy | None = None) -> dict[str, float]:
    """Mean L, L_obs, L_mask over `n_perm` random permutations of the position table rows."""
    pos = batch.tokens.shape[1]
    table = tables(model, anatomy)[1]
    original = table.data.clone()
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    try:
        for _ in range(n_perm):
            table.data[:pos] = original[:pos][torch.randperm(pos, generator=generator)]
            pred = logits_of(model)(batch.tokens.to(original.device)).reshape(batch.tokens.shape).cpu()
            for k, v in split_losses(pred, batch.values, batch.observed).items():
                totals[k] = totals.get(k, 0.0) + float(v) / n_perm
    finally:
        table.data.copy_(original)
    return {f"{k}_permuted_pos": v for k, v in totals.items()}


@torch.no_grad()
def embedding_geometry(model: torch.nn.Module, batch: Batch, precision: float = 0.01, value_max: float = 10.0,
                       n_perm: int = 5, anatomy: Anatomy | None = None) -> pd.DataFrame:
    """One row: token-embedding symmetry and PCA, position clustering, and the losses with the
    original and with permuted position embeddings (any model whose anatomy names its two tables)."""
    token_table, pos_table = tables(model, anatomy)
    ids, values = value_tokens(model, batch, precision, value_max, anatomy=anatomy)
    emb = token_table[ids].float().cpu().numpy()
    pos = batch.tokens.shape[1]
    row = {
        **token_embedding_geometry(emb, values.numpy(), precision),
        **position_silhouettes(pos_table[:pos].float().cpu().numpy(), batch.m, batch.n),
        **{k: v for k, v in evaluate(model, batch).items() if k != "corr_mask"},
        **permuted_position_losses(model, batch, n_perm, anatomy=anatomy),
    }
    return pd.DataFrame([row])


@torch.no_grad()
def token_embedding_plane(model: torch.nn.Module, batch: Batch, precision: float = 0.01, value_max: float = 10.0,
                          anatomy: Anatomy | None = None) -> pd.DataFrame:
    """One row per value token: its `value`, its embedding's top-2 principal components (`pc1`,
    `pc2`) and its L2 `norm` (finding 8: sign and magnitude along the PCs, a norm symmetric in x)."""
    ids, values = value_tokens(model, batch, precision, value_max, anatomy=anatomy)
    emb = tables(model, anatomy)[0][ids].float().cpu().numpy()
    plane = PCA(n_components=2).fit_transform(emb)
    return pd.DataFrame({"value": values.numpy(), "pc1": plane[:, 0], "pc2": plane[:, 1],
                         "norm": np.linalg.norm(emb, axis=1)})


@torch.no_grad()
def position_tsne(model: torch.nn.Module, m: int, n: int, seed: int = 0, anatomy: Anatomy | None = None) -> pd.DataFrame:
    """t-SNE of the position embeddings: one row per position, `x`, `y`, its `row` and `column`
    and a `label` "(row,col)" (finding 8: clusters by column)."""
    from sklearn.manifold import TSNE

    w = tables(model, anatomy)[1][: m * n].float().cpu().numpy()
    xy = TSNE(n_components=2, perplexity=min(5.0, m * n - 1.0), random_state=seed, init="pca").fit_transform(w)
    rows, cols = row_col_index(m, n)
    return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "row": rows.numpy(), "column": cols.numpy(),
                         "label": [f"({r},{c})" for r, c in zip(rows.tolist(), cols.tolist())]})
