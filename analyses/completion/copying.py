"""Copy check: does the model copy whatever token sits at a masked position? (finding 2, docs/FINDINGS.md,
Table 1.)

At every masked position the MASK token is replaced by the token of a chosen value v. A model in
the copying phase outputs v there (MSE vs the inserted value << MSE vs the truth). A model that
completes matrices still sees v as an observed entry, which it was trained to copy; on the shipped
run it keeps mostly copying after the drop but pulls the entry toward the value the rest of the
matrix implies, so the MSE vs the inserted value grows by one to three orders of magnitude.
L_obs shows whether the observed entries are still copied.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from mechlrmc.config import DataConfig
from mechlrmc.errors import OptionError
from mechlrmc.measures import logits_of
from mechlrmc.tasks.lrmc import Batch, decode_tokens, encode_values, split_losses

DEFAULT_VALUES = (-0.8, -0.24, 0.0, 0.44, 0.8)


def copy_check(
    model: torch.nn.Module, batch: Batch, data_cfg: DataConfig, values: tuple[float, ...] = DEFAULT_VALUES
) -> pd.DataFrame:
    """One row per inserted value (and one with the MASK token kept, `inserted` NaN): the MSE of
    the output at masked positions against the inserted value and against the truth, L_obs, and
    `follows_inserted` = MSE vs inserted < MSE vs truth."""
    masked = batch.masked  # [batch, pos]
    if not masked.any():
        raise OptionError("the batch has no masked entries: the copy check needs some")
    rows = []
    for value in (math.nan, *values):
        if math.isnan(value):
            tokens, inserted = batch.tokens, math.nan
        else:
            token = encode_values(torch.tensor([value]), data_cfg.precision, data_cfg.value_max)
            inserted = float(decode_tokens(token, data_cfg.precision, data_cfg.value_max))
            tokens = torch.where(masked, token.to(batch.tokens.device), batch.tokens)
        with torch.no_grad():
            pred = logits_of(model)(tokens)  # [batch, pos]
        at_masked = pred[masked]
        vs_truth = float(((at_masked - batch.values[masked]) ** 2).mean())
        vs_inserted = float(((at_masked - inserted) ** 2).mean()) if not math.isnan(inserted) else math.nan
        rows.append({
            "inserted": inserted,
            "mse_vs_inserted": vs_inserted,
            "mse_vs_truth": vs_truth,
            "mean_output_masked": float(at_masked.mean()),
            "loss_obs": float(split_losses(pred, batch.values, batch.observed)["loss_obs"]),
            "follows_inserted": vs_inserted < vs_truth if not math.isnan(inserted) else None,
        })
    return pd.DataFrame(rows)


def summarize_copy(copies: pd.DataFrame) -> pd.DataFrame:
    """Per step: the mean over inserted values of MSE vs inserted and vs truth, the share of values
    followed, and the MASK-token baseline (needs a `step` column)."""
    inserted = copies.dropna(subset=["inserted"])
    baseline = copies[copies.inserted.isna()].set_index("step")
    out = inserted.groupby("step").agg(
        mse_vs_inserted=("mse_vs_inserted", "mean"),
        mse_vs_truth=("mse_vs_truth", "mean"),
        loss_obs=("loss_obs", "mean"),
        share_followed=("follows_inserted", "mean"),
    )
    out["mask_token_mse_vs_truth"] = baseline.mse_vs_truth
    out["mask_token_mean_output"] = baseline.mean_output_masked
    return out.reset_index()
