"""LRMC data: the value <-> token codec, the online sampler, and structured masks.

A matrix X = U V^T [m, n] is flattened row-major into m*n tokens. Value x gets token
1 + round(x / precision) + round(value_max / precision); MASK is token 0 (docs/FINDINGS.md, S1).
Sampling runs on the CPU from a `torch.Generator`, so one seed gives one data stream on any device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable

import torch

from mechlrmc.config import DataConfig

if TYPE_CHECKING:
    from mechlrmc.config import RunConfig

MASK_ID = 0


def _half_width(precision: float, value_max: float) -> int:
    return round(value_max / precision)


def encode_values(values: torch.Tensor, precision: float = 0.01, value_max: float = 10.0) -> torch.Tensor:
    """Token ids of real values: the nearest grid point, clipped to [-value_max, value_max].

    Rounds in float64, so every grid value maps to its own token (float32 0.29 is 0.2899999...,
    which truncation would send to the token of 0.28).
    """
    half = _half_width(precision, value_max)
    grid = torch.round(values.to(torch.float64) / precision).clamp_(-half, half)
    return (grid + half + 1).to(torch.long)


def decode_tokens(ids: torch.Tensor, precision: float = 0.01, value_max: float = 10.0) -> torch.Tensor:
    """Values of token ids (float32); MASK decodes to NaN. Ids outside the vocabulary raise."""
    half = _half_width(precision, value_max)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > 2 * half + 1):
        raise ValueError(f"token ids must lie in [0, {2 * half + 1}], got [{int(ids.min())}, {int(ids.max())}]")
    values = (ids.to(torch.float64) - half - 1) * precision
    return torch.where(ids == MASK_ID, torch.nan, values).to(torch.float32)


@dataclass
class Batch:
    """One batch of masked matrices. Masks and targets travel beside the tokens, never inside."""

    tokens: torch.Tensor  # [batch, m*n] long, MASK = 0 at masked entries
    values: torch.Tensor  # [batch, m*n] float32, the rounded true X
    observed: torch.Tensor  # [batch, m*n] bool
    m: int
    n: int

    @property
    def masked(self) -> torch.Tensor:
        return ~self.observed

    @property
    def matrices(self) -> torch.Tensor:
        """The true matrices [batch, m, n]."""
        return self.values.view(-1, self.m, self.n)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            tokens=self.tokens.to(device),
            values=self.values.to(device),
            observed=self.observed.to(device),
        )

    def __getitem__(self, index: slice | torch.Tensor) -> Batch:
        return replace(
            self, tokens=self.tokens[index], values=self.values[index], observed=self.observed[index]
        )


def _factors(cfg: DataConfig, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if cfg.distribution == "uniform":
        return torch.rand(shape, generator=generator) * 2 - 1
    if cfg.distribution == "gaussian":
        return torch.randn(shape, generator=generator)
    # Laplace(0, 1) by inverting its CDF.
    u = torch.rand(shape, generator=generator) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-7))


def sample(cfg: DataConfig, batch_size: int, generator: torch.Generator) -> Batch:
    """A fresh batch of rank-`cfg.rank` matrices with each entry masked with prob `cfg.p_mask`."""
    u = _factors(cfg, (batch_size, cfg.m, cfg.rank), generator)
    v = _factors(cfg, (batch_size, cfg.n, cfg.rank), generator)
    x = (u @ v.transpose(1, 2)).reshape(batch_size, cfg.seq_len)  # [batch, m*n]
    ids = encode_values(x, cfg.precision, cfg.value_max)
    values = decode_tokens(ids, cfg.precision, cfg.value_max)
    observed = torch.rand(batch_size, cfg.seq_len, generator=generator) >= cfg.p_mask
    tokens = torch.where(observed, ids, MASK_ID)
    return Batch(tokens=tokens, values=values, observed=observed, m=cfg.m, n=cfg.n)


def with_observed(batch: Batch, observed: torch.Tensor, cfg: DataConfig) -> Batch:
    """The same matrices under another mask; `observed` is [m*n] (one mask for the whole batch)
    or [batch, m*n]."""
    observed = observed.to(batch.tokens.device).expand_as(batch.observed).clone()
    ids = encode_values(batch.values, cfg.precision, cfg.value_max).to(batch.tokens.device)
    return replace(batch, tokens=torch.where(observed, ids, MASK_ID), observed=observed)


def with_values(batch: Batch, values: torch.Tensor, cfg: DataConfig) -> Batch:
    """Other matrices (e.g. -X for patching) under the same mask."""
    ids = encode_values(values, cfg.precision, cfg.value_max).to(batch.tokens.device)
    values = decode_tokens(ids, cfg.precision, cfg.value_max)
    return replace(batch, tokens=torch.where(batch.observed, ids, MASK_ID), values=values)


def structured_mask(
    m: int,
    n: int,
    rows: Iterable[int] = (),
    cols: Iterable[int] = (),
    keep: Iterable[tuple[int, int]] = (),
) -> torch.Tensor:
    """An observed-mask [m*n] with the given rows and columns masked, except the `keep` entries.

    `structured_mask(7, 7, rows=[3, 6], keep=[(3, 0), (6, 4)])` is the mask of finding 4 (docs/FINDINGS.md):
    rows 3 and 6 masked except one observed entry each.
    """
    observed = torch.ones(m, n, dtype=torch.bool)
    for r in rows:
        if not 0 <= r < m:
            raise ValueError(f"row {r} is out of range: allowed 0 <= row < m={m}")
        observed[r] = False
    for c in cols:
        if not 0 <= c < n:
            raise ValueError(f"column {c} is out of range: allowed 0 <= column < n={n}")
        observed[:, c] = False
    for r, c in keep:
        if not (0 <= r < m and 0 <= c < n):
            raise ValueError(f"kept entry {(r, c)} is out of range: allowed [0, {m}) x [0, {n})")
        observed[r, c] = True
    return observed.reshape(m * n)


def row_col_index(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every position of the flattened m x n matrix, each [m*n]."""
    pos = torch.arange(m * n)
    return pos // n, pos % n


def eval_batch(cfg: RunConfig, size: int | None = None, seed: int | None = None) -> Batch:
    """The fixed evaluation batch of a run: the same matrices for every checkpoint."""
    generator = torch.Generator().manual_seed(cfg.train.eval_seed if seed is None else seed)
    return sample(cfg.data, size or cfg.train.eval_batch_size, generator)
