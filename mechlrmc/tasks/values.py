"""LRMC's value tokens: real matrix entries on a grid of `precision` in [-value_max, value_max],
token 0 the MASK (`mechlrmc.tasks.lrmc`)."""

from __future__ import annotations

import torch

MASK_ID = 0


def half_width(precision: float, value_max: float) -> int:
    return round(value_max / precision)


def encode_values(values: torch.Tensor, precision: float = 0.01, value_max: float = 10.0) -> torch.Tensor:
    """Token ids of real values: the nearest grid point, clipped to [-value_max, value_max].

    Rounds in float64, so every grid value maps to its own token (float32 0.29 is 0.2899999...,
    which truncation would send to the token of 0.28).
    """
    half = half_width(precision, value_max)
    grid = torch.round(values.to(torch.float64) / precision).clamp_(-half, half)
    return (grid + half + 1).to(torch.long)


def decode_tokens(ids: torch.Tensor, precision: float = 0.01, value_max: float = 10.0) -> torch.Tensor:
    """Values of token ids (float32); MASK decodes to NaN. Ids outside the vocabulary raise."""
    half = half_width(precision, value_max)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > 2 * half + 1):
        raise ValueError(f"token ids must lie in [0, {2 * half + 1}], got [{int(ids.min())}, {int(ids.max())}]")
    values = (ids.to(torch.float64) - half - 1) * precision
    return torch.where(ids == MASK_ID, torch.nan, values).to(torch.float32)
