"""Copy check: a copying model follows the inserted value, a completing one the truth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from analyses.base.walk import analysis_batch
from analyses.completion.copying import copy_check, summarize_copy
from analyses.plateau.phases import detect_phases
from mechlrmc.config import DataConfig
from mechlrmc.tasks.lrmc import decode_tokens, sample

CFG = DataConfig(m=4, n=4, rank=1)


class Copier(nn.Module):
    """The plateau's copy-and-zero predictor: outputs each token's value, 0 for MASK."""

    def forward(self, tokens):
        return decode_tokens(tokens).nan_to_num(0.0)


class Oracle(nn.Module):
    """A perfect completer: outputs the true matrix whatever the input."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def forward(self, tokens):
        return self.values


def test_copier_follows_inserted_values():
    batch = sample(CFG, 256, torch.Generator().manual_seed(0))
    table = copy_check(Copier(), batch, CFG, values=(-0.24, 0.44))
    baseline, inserted = table.iloc[0], table.iloc[1:]
    assert math.isnan(baseline.inserted) and baseline.follows_inserted is None
    assert baseline.mse_vs_truth == pytest.approx(float((batch.values[batch.masked] ** 2).mean()))
    assert inserted.inserted.tolist() == pytest.approx([-0.24, 0.44])
    assert inserted.mse_vs_inserted.tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert inserted.follows_inserted.all() and (inserted.loss_obs == 0).all()
    # the copier's error vs the truth is E[(v - X)^2] = v^2 + E[X^2] at masked entries
    assert inserted.mse_vs_truth.iloc[1] == pytest.approx(0.44**2 + baseline.mse_vs_truth, abs=0.01)


def test_completer_follows_the_truth():
    batch = sample(CFG, 256, torch.Generator().manual_seed(0))
    table = copy_check(Oracle(batch.values), batch, CFG)
    inserted = table.dropna(subset=["inserted"])
    assert not inserted.follows_inserted.any() and (inserted.mse_vs_truth == 0).all()
    summary = summarize_copy(table.assign(step=7))
    assert summary.share_followed.item() == 0.0 and summary.step.item() == 7


def test_needs_masked_entries():
    batch = sample(DataConfig(m=4, n=4, rank=1, p_mask=0.0), 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no masked entries"):
        copy_check(Copier(), batch, CFG)


def test_reference_run_copies_before_the_drop_and_checks_consistency_after(reference_run):
    """Finding 2 (docs/FINDINGS.md), Table 1, on the shipped run. Before the drop the output at a replaced
    MASK is the inserted value (to ~1e-3). After it the model still mostly copies (an inserted
    token looks observed, and observed entries are copied) but pulls the entry toward the value the
    rest of the matrix implies: the error against the inserted value grows by an order of
    magnitude, while true MASK positions are now completed."""
    phases = detect_phases(reference_run).iloc[0]
    batch = analysis_batch(reference_run, 256)
    data = reference_run.config.data
    before = copy_check(reference_run.load_model(reference_run.nearest_step(phases.plateau_end)), batch, data)
    after = copy_check(reference_run.load_model(reference_run.steps[-1]), batch, data)
    inserted_before, inserted_after = before.dropna(subset=["inserted"]), after.dropna(subset=["inserted"])
    assert inserted_before.follows_inserted.all() and inserted_before.mse_vs_inserted.max() < 0.01
    assert inserted_after.mse_vs_inserted.mean() > 10 * inserted_before.mse_vs_inserted.mean()
    masked_before = before[before.inserted.isna()].mse_vs_truth.item()
    masked_after = after[after.inserted.isna()].mse_vs_truth.item()
    assert masked_after < 0.5 * masked_before
