"""Linear probes on hidden states (finding 7, docs/FINDINGS.md): which layer stores what, and from when.

At every position (i, j) a ridge-regularised linear map (closed form, with a bias) is fitted from
the activation of a hook point to one target:

    value   the entry's true value X_ij                                  [1]
    row     the masked-input row i (missing entries as 0)                [n]
    col     the masked-input column j (missing entries as 0)             [m]
    u, v    the top left / right singular vector of X (signs fixed together so that u's largest
            entry is positive; scored by |cosine|, so the convention does not matter)   [m] / [n]
    sigma   the top singular value of X                                  [1]

A token task declares its own targets (`Task.probe_targets`): at the query that predicts output j,
`output` y_j, `window` the sum of the inputs on its optimal map and `input` the last of them alone;
its probes are fitted and scored at the output positions. Every model is read through its anatomy
(`mechlrmc.anatomy`): the embeddings (layer 0) and each block's output (layer l + 1).

Matrices (sequences) are split into train and test (all positions of a matrix on one side); the test R^2
(variance-weighted over outputs), MSE and mean |cosine| (vector targets) are reported for all,
masked and observed positions. Across checkpoints (`analyses.base.walk.across_checkpoints`) the table
shows when each layer starts to encode each target.
"""

from __future__ import annotations

import re
from typing import Iterable

import pandas as pd
import torch

from mechlrmc.anatomy import Anatomy
from mechlrmc.errors import OptionError
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks import get_task

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


def probe_targets(batch, targets: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Each target at every position, `{name: [batch * pos, k]}` (float64), as the batch's task
    declares them (`Task.probe_targets`; LRMC: `matrix_targets`)."""
    task = get_task(batch.task)
    return task.probe_targets(batch, task.probe_defaults if targets is None else targets)


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
    model: torch.nn.Module,
    batch,
    hooks: Iterable[str] | None = None,
    targets: Iterable[str] | None = None,
    ridge: float = 1e-3,
    test_frac: float = 0.25,
    seed: int = 0,
    anatomy: Anatomy | None = None,
) -> pd.DataFrame:
    """Probe every site for every target of the batch's task (default its `probe_defaults`); one row per
    (hook, target, positions) with test r2, mse, cos and n_test. `hooks`: parts of the model's anatomy
    ("embed", "resid.1") or module / hook-point names (default: the embeddings and every block's output);
    positions: the task's groups (LRMC: all / masked / observed; a token task: outputs)."""
    if not 0 < test_frac < 1:
        raise OptionError(f"test_frac={test_frac} is invalid: allowed 0 < test_frac < 1")
    anatomy = Anatomy.of(model) if anatomy is None else anatomy
    task = get_task(batch.task)
    keys = list(hooks) if hooks is not None else ["embed", *[f"resid.{l}" for l in range(anatomy.n_layers)]]
    device = next(model.parameters(), batch.tokens).device
    _, acts = anatomy.run(model, batch.tokens.to(device), read=keys)
    b, pos = batch.tokens.shape[:2]
    order = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    test_samples = torch.zeros(b, dtype=torch.bool)
    test_samples[order[: max(1, round(b * test_frac))]] = True
    train = ~test_samples.repeat_interleave(pos)  # [b*pos]
    groups = task.probe_positions(batch)
    subsets = {name: ~train & where for name, where in groups.items()}
    train = train & torch.stack(list(groups.values())).any(0)  # fit where the task scores
    target_values = probe_targets(batch, targets)
    rows = []
    for key in keys:
        feats = acts[key].reshape(b * pos, -1).cpu()
        hook = anatomy.place(key).module
        layer = 0 if key == "embed" else int(key.split(".")[1]) + 1 if key.startswith("resid.") else hook_layer(hook)
        for name, target in target_values.items():
            pred = fit_probe(feats, target, train, ridge)
            for subset, sel in subsets.items():
                if sel.sum() < 2:
                    continue
                rows.append({"hook": hook, "layer": layer, "target": name, "positions": subset,
                             **probe_scores(pred[sel], target[sel].double()), "n_test": int(sel.sum())})
    return pd.DataFrame(rows)


def probe_summary(frame: pd.DataFrame, metric: str = "r2", positions: str | None = None) -> pd.DataFrame:
    """A (target, layer) x step table of `metric`: the compact view for reports."""
    part = frame[frame.positions == (_focus(frame) if positions is None else positions)]
    return part.pivot_table(index=["target", "layer"], columns="step", values=metric).round(3)


def first_step_encoded(frame: pd.DataFrame, threshold: float = 0.5, positions: str | None = None) -> pd.Series:
    """The first step at which each (target, layer) reaches test R^2 >= `threshold` (missing: never)."""
    part = frame[(frame.positions == (_focus(frame) if positions is None else positions)) & (frame.r2 >= threshold)]
    return part.groupby(["target", "layer"]).step.min()


def _focus(frame: pd.DataFrame) -> str:
    """The positions a summary reads by default: LRMC's masked ones, else the task's one group."""
    return "masked" if "masked" in set(frame.positions) else str(frame.positions.iloc[0])
