"""The paper's three losses (finding 1, docs/FINDINGS.md) and the masked-entry correlation."""

from __future__ import annotations

import torch


def split_losses(pred: torch.Tensor, values: torch.Tensor, observed: torch.Tensor) -> dict[str, torch.Tensor]:
    """MSE over all entries (`loss`, the training objective), observed entries (`loss_obs`) and
    masked entries (`loss_mask`). All inputs [batch, pos]; returns 0-d tensors (NaN when a split
    is empty)."""
    err = (pred.float() - values.float()) ** 2
    obs = observed.float()
    n_obs, n_mask = obs.sum(), (1 - obs).sum()
    return {
        "loss": err.mean(),
        "loss_obs": (err * obs).sum() / n_obs if n_obs > 0 else err.new_tensor(float("nan")),
        "loss_mask": (err * (1 - obs)).sum() / n_mask if n_mask > 0 else err.new_tensor(float("nan")),
    }


def masked_correlation(pred: torch.Tensor, values: torch.Tensor, observed: torch.Tensor) -> float:
    """Pearson correlation of predictions with the truth over masked entries (0 on the plateau)."""
    p, v = pred[~observed].double(), values[~observed].double()
    if p.numel() < 2 or p.std() == 0 or v.std() == 0:
        return 0.0
    return float(torch.corrcoef(torch.stack([p, v]))[0, 1])
