"""Linear probes on hidden states (finding 7, docs/FINDINGS.md): which layer stores what, and from when.

At every position (i, j) a ridge-regularised linear map (closed form, with a bias) is fitted from
the activation of a hook point to one target:

    value   the entry's true value X_ij                                  [1]
    row     the masked-input row i (missing entries as 0)                [n]
    col     the masked-input column j (missing entries as 0)             [m]
    u, v    the top left / right singular vector of X (signs fixed together so that u's largest
            entry is positive; scored by |cosine|, so the convention does not matter)   [m] / [n]
    sigma   the top singular value of X                                  [1]

Matrices are split into train and test (all positions of a matrix on one side); the test R^2
(variance-weighted over outputs), MSE and mean |cosine| (vector targets) are reported for all,
masked and observed positions. Across checkpoints (`analyses.base.walk.across_checkpoints`) the table
shows when each layer starts to encode each target.
"""

from __future__ import annotations

import re
from typing import Iterable

import pandas as pd
import torch

from mechlrmc.errors import OptionError
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import Batch, row_col_index

TARGETS = ("value", "row", "col", "u", "v", "sigma")


DEFAULT_TARGETS = ("value", "row", "col", "u", "v")


def default_hooks(model: HookedEncoder) -> list[str]:
    """The residual stream entering block 0 (the embeddings) and after each block."""
    after = "hook_normalized_resid_post" if model.cfg.norm == "post" else "hook_resid_post"
    return ["blocks.0.hook_resid_pre", *[f"blocks.{l}.{after}" for l in range(model.cfg.n_layers)]]


def hook_layer(hook: str) -> int:
    """0 for the embeddings (`hook_embed`, `blocks.0.hook_resid_pre`, ...), l + 1 inside or after block l."""
    match = re.match(r"blocks\.(\d+)\.", hook)
    if match is None or hook == "blocks.0.hook_resid_pre":
        return 0
    return int(match.group(1)) + (0 if hook.endswith("hook_resid_pre") else 1)


def probe_targets(batch: Batch, targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
    """Each target at every position, `{name: [batch * m*n, k]}` (float64)."""
    b, m, n = len(batch), batch.m, batch.n
    x = batch.matrices.double()  # [b, m, n]
    x_in = (batch.values * batch.observed).double().view(b, m, n)
    rows, cols = row_col_index(m, n)
    out = {}
    for name in targets:
        if name not in TARGETS:
            raise OptionError(f"probe target {name!r} is unknown: allowed {TARGETS}")
        if name == "value":
            t = x.reshape(b, m * n, 1)
        elif name == "row":
            t = x_in[:, rows, :]  # [b, m*n, n]
        elif name == "col":
            t = x_in.transpose(1, 2)[:, cols, :]  # [b, m*n, m]
        else:
            u, s, vh = torch.linalg.svd(x)
            u, v = u[..., 0], vh[:, 0, :]  # [b, m], [b, n]
            flip = torch.where(u.gather(1, u.abs().argmax(1, keepdim=True)) < 0, -1.0, 1.0)  # [b, 1]
            vec = {"u": u * flip, "v": v * flip, "sigma": s[:, :1]}[name]  # [b, k]: X ~ sigma u v^T
            t = vec[:, None, :].expand(b, m * n, vec.shape[1])
        out[name] = t.reshape(b * m * n, -1)
    return out


def fit_probe(features: torch.Tensor, targets: torch.Tensor, train: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Ridge regression with a bias on the `train` rows; returns predictions for every row.

    features [N, d], targets [N, k], train [N] bool. The penalty is `ridge` x the mean feature
    variance, so it is scale-free.
    """
    f, t = features.double(), targets.double()
    mu_f, mu_t = f[train].mean(0), t[train].mean(0)
    fc, tc = f[train] - mu_f, t[train] - mu_t
    gram = fc.T @ fc
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), fc.T @ tc)  # [d, k]
    return (f - mu_f) @ w + mu_t


def probe_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Test R^2 (variance-weighted), MSE and mean |cosine| (NaN for scalar targets)."""
    sse = ((pred - target) ** 2).sum()
    sst = ((target - target.mean(0)) ** 2).sum()
    cos = float("nan")
    if target.shape[1] > 1:
        norms = pred.norm(dim=1) * target.norm(dim=1)
        ok = norms > 1e-9
        cos = float(((pred * target).sum(1)[ok] / norms[ok]).abs().mean()) if ok.any() else float("nan")
    return {"r2": float(1 - sse / sst) if sst > 0 else float("nan"),
            "mse": float(sse / target.numel()), "cos": cos}


@torch.no_grad()
def probe(
    model: HookedEncoder,
    batch: Batch,
    hooks: Iterable[str] | None = None,
    targets: Iterable[str] = DEFAULT_TARGETS,
    ridge: float = 1e-3,
    test_frac: float = 0.25,
    seed: int = 0,
) -> pd.DataFrame:
    """Probe every hook for every target; one row per (hook, target, positions) with test r2, mse,
    cos and n_test (positions: all / masked / observed)."""
    if not 0 < test_frac < 1:
        raise OptionError(f"test_frac={test_frac} is invalid: allowed 0 < test_frac < 1")
    hooks = list(hooks) if hooks is not None else default_hooks(model)
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(batch.tokens.to(device), names_filter=lambda name: name in hooks)
    missing = [h for h in hooks if h not in cache]
    if missing:
        raise OptionError(f"hook(s) {missing} do not exist: e.g. {default_hooks(model)}")
    b, pos = batch.tokens.shape
    order = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    test_samples = torch.zeros(b, dtype=torch.bool)
    test_samples[order[: max(1, round(b * test_frac))]] = True
    train = ~test_samples.repeat_interleave(pos)  # [b*pos]
    observed = batch.observed.reshape(-1).cpu()
    subsets = {"all": ~train, "masked": ~train & ~observed, "observed": ~train & observed}
    target_values = probe_targets(batch, targets)
    rows = []
    for hook in hooks:
        feats = cache[hook].reshape(b * pos, -1).cpu()
        for name, target in target_values.items():
            pred = fit_probe(feats, target, train, ridge)
            for subset, sel in subsets.items():
                if sel.sum() < 2:
                    continue
                rows.append({"hook": hook, "layer": hook_layer(hook), "target": name, "positions": subset,
                             **probe_scores(pred[sel], target[sel].double()), "n_test": int(sel.sum())})
    return pd.DataFrame(rows)


def probe_summary(frame: pd.DataFrame, metric: str = "r2", positions: str = "masked") -> pd.DataFrame:
    """A (target, layer) x step table of `metric`: the compact view for reports."""
    part = frame[frame.positions == positions]
    return part.pivot_table(index=["target", "layer"], columns="step", values=metric).round(3)


def first_step_encoded(frame: pd.DataFrame, threshold: float = 0.5, positions: str = "masked") -> pd.Series:
    """The first step at which each (target, layer) reaches test R^2 >= `threshold` (missing: never)."""
    part = frame[(frame.positions == positions) & (frame.r2 >= threshold)]
    return part.groupby(["target", "layer"]).step.min()
