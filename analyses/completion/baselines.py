"""Baselines and out-of-distribution evaluation (finding 3, docs/FINDINGS.md).

Two reference predictors for the masked entries of a low-rank matrix:
- **copy-and-zero**: copy every observed entry, predict 0 at masked ones. Its L_mask is the
  plateau level E[X_ij^2] = r/9 (finding 1): the model's plateau *is* this predictor.
- **nuclear-norm minimisation**: min ||Z||_* subject to Z_ij = X_ij on the observed entries,
  solved with cvxpy, one small convex problem per matrix.

`compare_baselines` puts the model beside both across p_mask (MSE and mean nuclear norm of the
completed matrices); `evaluate_ood` does the same on other ranks, shapes and factor distributions.

Other shapes: a model trained on m x n matrices has one learned position embedding per cell of
that grid, so an m' x n' matrix with m' <= m and n' <= n is read as the top-left block of the
trained grid: entry (i, j) keeps the position of (i, j) in the m x n grid, i.e. i * n + j.
`layout="pad"` (the default) feeds the full m x n sequence with every cell outside the block
masked, so the model sees the block as a partially observed m x n matrix (consistent: any rank-r
block extends to a rank-r m x n matrix); `layout="gather"` feeds only the m'*n' block positions,
with their grid position embeddings swapped in at `hook_pos_embed`. Matrices with more rows or
columns than the trained grid have cells with no learned position: `ValueError`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechlrmc.config import DataConfig
from mechlrmc.errors import OptionError
from mechlrmc.measures import logits_of
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import Batch, sample, split_losses

P_MASKS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


LAYOUTS = ("pad", "gather")


def copy_zero_predict(batch: Batch) -> torch.Tensor:
    """Observed entries copied, masked entries 0: [batch, m*n]."""
    return torch.where(batch.observed, batch.values, torch.zeros_like(batch.values))


def nuclear_norm_complete(batch: Batch, solver: str = "CLARABEL", progress: bool = True) -> torch.Tensor:
    """min ||Z||_* s.t. Z = X on the observed entries, per matrix: [batch, m*n].

    One parametrised cvxpy problem is compiled once and re-solved for every matrix (a few ms each
    for a 4 x 4 matrix)."""
    import cvxpy as cp

    m, n = batch.m, batch.n
    weight, target = cp.Parameter((m, n)), cp.Parameter((m, n))
    z = cp.Variable((m, n))
    problem = cp.Problem(cp.Minimize(cp.normNuc(z)), [cp.multiply(weight, z) == target])
    observed = batch.observed.view(-1, m, n).cpu().numpy().astype(np.float64)  # [b, m, n]
    values = batch.matrices.cpu().numpy().astype(np.float64)  # [b, m, n]
    out = np.empty_like(values)
    for k in tqdm(range(len(batch)), desc="nuclear norm", unit="matrix", disable=not progress):
        weight.value, target.value = observed[k], observed[k] * values[k]
        problem.solve(solver=solver)
        if z.value is None:
            raise RuntimeError(f"cvxpy ({solver}) found no solution for matrix {k}: status {problem.status}")
        out[k] = z.value
    return torch.from_numpy(out).float().view(len(batch), m * n)


def nuclear_norms(pred: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Nuclear norm (sum of singular values) of each predicted matrix: [batch]."""
    return torch.linalg.svdvals(pred.double().view(-1, m, n)).sum(-1).float()


def _grid_positions(batch: Batch, trained: DataConfig) -> torch.Tensor:
    """Positions in the trained m x n grid of the entries of `batch`'s m' x n' matrices: [m'*n']."""
    if batch.m > trained.m or batch.n > trained.n:
        raise OptionError(
            f"a {batch.m} x {batch.n} matrix does not fit the model's {trained.m} x {trained.n} "
            f"position grid: allowed rows <= {trained.m} and columns <= {trained.n} "
            f"(larger matrices need position embeddings the model never learned)"
        )
    rows, cols = torch.meshgrid(torch.arange(batch.m), torch.arange(batch.n), indexing="ij")
    return (rows * trained.n + cols).reshape(-1)


@torch.no_grad()
def model_predict(model: torch.nn.Module, batch: Batch, trained: DataConfig, layout: str = "pad") -> torch.Tensor:
    """The model's completion of `batch` [batch, m'*n'], placing m' x n' matrices in the top-left
    block of the trained m x n grid (module docstring)."""
    if layout not in LAYOUTS:
        raise OptionError(f"layout={layout!r} is invalid: allowed {LAYOUTS}")
    device = next(model.parameters()).device
    tokens = batch.tokens.to(device)
    forward = logits_of(model)
    if (batch.m, batch.n) == (trained.m, trained.n):
        return forward(tokens).float().cpu()
    index = _grid_positions(batch, trained).to(device)  # [m'*n']
    if layout == "pad":
        full = torch.zeros(len(batch), trained.m * trained.n, dtype=tokens.dtype, device=device)
        full[:, index] = tokens
        return forward(full)[:, index].float().cpu()
    if not hasattr(model, "W_pos"):
        raise OptionError(f"layout='gather' needs mechlrmc's model's position table W_pos, which {type(model).__name__} "
                          f"does not have: allowed layout='pad'")

    def grid_pos_embed(pos_embed: torch.Tensor, hook) -> torch.Tensor:  # [b, m'*n', d]
        return model.W_pos[index].expand_as(pos_embed)

    return model.run_with_hooks(tokens, fwd_hooks=[("hook_pos_embed", grid_pos_embed)]).float().cpu()


def _score(preds: dict[str, torch.Tensor], batch: Batch) -> list[dict]:
    """Losses, nuclear norms and distance to the nuclear-norm solution of each predictor."""
    rows = []
    reference = preds["nuclear_norm"]
    masked = batch.masked
    for name, pred in preds.items():
        losses = split_losses(pred, batch.values, batch.observed)
        to_nn = ((pred - reference)[masked] ** 2).mean() if masked.any() else torch.tensor(float("nan"))
        rows.append({
            "predictor": name,
            "mse": float(losses["loss"]),
            "mse_obs": float(losses["loss_obs"]),
            "mse_mask": float(losses["loss_mask"]),
            "mse_mask_to_nuclear": float(to_nn),
            "nuclear_norm": float(nuclear_norms(pred, batch.m, batch.n).mean()),
        })
    return rows


def evaluate_predictors(
    model: HookedEncoder, batch: Batch, trained: DataConfig, layout: str = "pad", progress: bool = True
) -> pd.DataFrame:
    """One row per predictor (model, nuclear_norm, copy_zero, truth) on `batch`: MSE over all,
    observed and masked entries, masked-entry MSE to the nuclear-norm solution, and the mean
    nuclear norm of the completed matrices."""
    preds = {
        "model": model_predict(model, batch, trained, layout),
        "nuclear_norm": nuclear_norm_complete(batch, progress=progress),
        "copy_zero": copy_zero_predict(batch),
        "truth": batch.values.float(),
    }
    return pd.DataFrame(_score(preds, batch))


def compare_baselines(
    model: HookedEncoder,
    data_cfg: DataConfig,
    p_masks: tuple[float, ...] = P_MASKS,
    n_matrices: int = 128,
    seed: int = 2024,
    progress: bool = True,
) -> pd.DataFrame:
    """Model vs nuclear-norm minimisation vs copy-and-zero across p_mask (finding 3, docs/FINDINGS.md):
    one row per (p_mask, predictor), `n_matrices` fresh matrices per p_mask."""
    frames = []
    for p in tqdm(p_masks, desc="p_mask", disable=not progress):
        if not 0 <= p < 1:
            raise OptionError(f"p_mask={p} is invalid: allowed 0 <= p_mask < 1")
        cfg = dataclasses.replace(data_cfg, p_mask=float(p))
        batch = sample(cfg, n_matrices, torch.Generator().manual_seed(seed))
        frames.append(evaluate_predictors(model, batch, data_cfg, progress=False).assign(p_mask=p))
    out = pd.concat(frames, ignore_index=True)
    return out[["p_mask", *[c for c in out.columns if c != "p_mask"]]]


def ood_variants(data_cfg: DataConfig) -> dict[str, DataConfig]:
    """The paper's out-of-distribution variants that a model trained on `data_cfg` can read:
    another rank, one row fewer, one column fewer, Gaussian and Laplace factors."""
    variants = {"in-distribution": data_cfg}
    if data_cfg.rank + 1 <= min(data_cfg.m, data_cfg.n):
        variants[f"rank {data_cfg.rank + 1}"] = dataclasses.replace(data_cfg, rank=data_cfg.rank + 1)
    if data_cfg.m > data_cfg.rank:
        variants[f"{data_cfg.m - 1} rows"] = dataclasses.replace(data_cfg, m=data_cfg.m - 1)
    if data_cfg.n > data_cfg.rank:
        variants[f"{data_cfg.n - 1} columns"] = dataclasses.replace(data_cfg, n=data_cfg.n - 1)
    for dist in ("gaussian", "laplace"):
        if dist != data_cfg.distribution:
            variants[dist] = dataclasses.replace(data_cfg, distribution=dist)
    return variants


def evaluate_ood(
    model: HookedEncoder,
    data_cfg: DataConfig,
    variants: dict[str, DataConfig] | None = None,
    n_matrices: int = 128,
    layout: str = "pad",
    seed: int = 2024,
    progress: bool = True,
) -> pd.DataFrame:
    """Model vs baselines on out-of-distribution data (finding 3, docs/FINDINGS.md): one row per
    (variant, predictor). `data_cfg` is the training distribution (it fixes the position grid);
    `variants` defaults to `ood_variants(data_cfg)`. Each row also carries the variant's
    copy-and-zero plateau level `plateau_mask_loss` for scale."""
    variants = ood_variants(data_cfg) if variants is None else variants
    frames = []
    for name, cfg in tqdm(variants.items(), desc="ood", disable=not progress):
        batch = sample(cfg, n_matrices, torch.Generator().manual_seed(seed))
        frame = evaluate_predictors(model, batch, data_cfg, layout, progress=False)
        frames.append(frame.assign(variant=name, m=cfg.m, n=cfg.n, rank=cfg.rank,
                                   distribution=cfg.distribution, plateau_mask_loss=cfg.plateau_mask_loss))
    out = pd.concat(frames, ignore_index=True)
    first = ["variant", "m", "n", "rank", "distribution", "predictor"]
    return out[[*first, *[c for c in out.columns if c not in first]]]
