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
import plotly.express as px
import torch
from plotly.subplots import make_subplots
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from sklearn.model_selection import cross_val_score

from mechlrmc.tasks.lrmc import Batch, decode_tokens, row_col_index
from mechlrmc.tasks.lrmc import split_losses
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import evaluate


def value_tokens(model: HookedEncoder, batch: Batch, precision: float, value_max: float,
                 quantile: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and values of the grid values within the `quantile` of |X| seen in `batch`."""
    limit = float(batch.values.abs().quantile(quantile))
    ids = torch.arange(1, model.cfg.d_vocab)
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
def permuted_position_losses(model: HookedEncoder, batch: Batch, n_perm: int = 5, seed: int = 0) -> dict[str, float]:
    """Mean L, L_obs, L_mask over `n_perm` random permutations of the position table rows."""
    pos = batch.tokens.shape[1]
    original = model.W_pos.data.clone()
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    try:
        for _ in range(n_perm):
            model.W_pos.data[:pos] = original[:pos][torch.randperm(pos, generator=generator)]
            pred = model(batch.tokens.to(original.device)).cpu()
            for k, v in split_losses(pred, batch.values, batch.observed).items():
                totals[k] = totals.get(k, 0.0) + float(v) / n_perm
    finally:
        model.W_pos.data.copy_(original)
    return {f"{k}_permuted_pos": v for k, v in totals.items()}


@torch.no_grad()
def embedding_geometry(model: HookedEncoder, batch: Batch, precision: float = 0.01, value_max: float = 10.0,
                       n_perm: int = 5) -> pd.DataFrame:
    """One row: token-embedding symmetry and PCA, position clustering, and the losses with the
    original and with permuted position embeddings."""
    ids, values = value_tokens(model, batch, precision, value_max)
    emb = model.W_E[ids].float().cpu().numpy()
    pos = batch.tokens.shape[1]
    row = {
        **token_embedding_geometry(emb, values.numpy(), precision),
        **position_silhouettes(model.W_pos[:pos].float().cpu().numpy(), batch.m, batch.n),
        **{k: v for k, v in evaluate(model, batch).items() if k != "corr_mask"},
        **permuted_position_losses(model, batch, n_perm),
    }
    return pd.DataFrame([row])


def plot_embedding_geometry(frame: pd.DataFrame):
    """The geometry scores against step (top) and the losses with permuted positions (bottom)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("embedding geometry", "L_mask: original vs permuted positions"))
    for col in ("norm_symmetry", "norm_abs_corr", "pc_sign_accuracy", "pc_magnitude_r2",
                "pos_silhouette_col", "pos_silhouette_row"):
        fig.add_scatter(x=frame.step, y=frame[col], name=col, mode="lines+markers", row=1, col=1)
    for col in ("loss_mask", "loss_mask_permuted_pos"):
        fig.add_scatter(x=frame.step, y=frame[col], name=col, mode="lines+markers", row=2, col=1)
    fig.update_yaxes(type="log", row=2, col=1)
    return fig.update_layout(template="plotly_white", height=700, title="Embeddings (finding 8)")


@torch.no_grad()
def plot_token_embeddings(model: HookedEncoder, batch: Batch, precision: float = 0.01, value_max: float = 10.0):
    """Token embeddings in their top-2 PCs coloured by value (left), embedding norm vs value (right)."""
    ids, values = value_tokens(model, batch, precision, value_max)
    emb = model.W_E[ids].float().cpu().numpy()
    plane = PCA(n_components=2).fit_transform(emb)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("top-2 PCs of token embeddings", "||E(x)|| vs x"))
    fig.add_scatter(x=plane[:, 0], y=plane[:, 1], mode="markers", text=[f"{v:.2f}" for v in values],
                    marker=dict(color=values.numpy(), colorscale="RdBu", showscale=True, size=5), row=1, col=1)
    fig.add_scatter(x=values.numpy(), y=np.linalg.norm(emb, axis=1), mode="lines", row=1, col=2)
    return fig.update_layout(template="plotly_white", showlegend=False)


@torch.no_grad()
def plot_position_tsne(model: HookedEncoder, m: int, n: int, seed: int = 0):
    """t-SNE of the position embeddings, labelled (row, col) and coloured by column."""
    w = model.W_pos[: m * n].float().cpu().numpy()
    xy = TSNE(n_components=2, perplexity=min(5.0, m * n - 1.0), random_state=seed, init="pca").fit_transform(w)
    rows, cols = row_col_index(m, n)
    frame = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "column": cols.numpy().astype(str),
                          "row": rows.numpy(), "label": [f"({r},{c})" for r, c in zip(rows.tolist(), cols.tolist())]})
    fig = px.scatter(frame, x="x", y="y", color="column", text="label", title="t-SNE of position embeddings")
    return fig.update_traces(textposition="top center").update_layout(template="plotly_white")


# ----- registry entry (analyses.registry) -------------------------------------------------------

def embeddings_tables(ctx) -> dict[str, pd.DataFrame]:
    data = ctx.run.config.data
    return {"embeddings": ctx.walk(embedding_geometry, precision=data.precision, value_max=data.value_max)}


def embeddings_figures(ctx, tables: dict[str, pd.DataFrame]) -> dict:
    data = ctx.run.config.data
    model = ctx.model(int(tables["embeddings"].step.max()))
    return {"embeddings": plot_embedding_geometry(tables["embeddings"]),
            "token_embeddings": plot_token_embeddings(model, ctx.batch, data.precision, data.value_max),
            "position_tsne": plot_position_tsne(model, data.m, data.n)}
