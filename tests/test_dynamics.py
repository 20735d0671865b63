from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from analyses.plateau.dynamics import (attention_progress, collapse, compare_interventions, dynamics_summary,
    repetition, track_dynamics)
from analyses.plateau.phases import detect_phases
from mechlrmc.config import preset
from mechlrmc.intervention import bias_pattern
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import MASK_ID, decode_tokens, optimal_attention_map, sample

CFG = preset("tiny").override({"data.m": 4, "data.n": 4})


def _batch(size: int = 256, seed: int = 0):
    return sample(CFG.data, size, torch.Generator().manual_seed(seed))


class Lookup(nn.Module):
    """A stand-in model that answers from a table: copy-and-zero, or the truth of a known batch."""

    def __init__(self, batch=None):
        super().__init__()
        self.batch = batch
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        if self.batch is not None:
            return self.batch.values
        return torch.nan_to_num(decode_tokens(tokens), nan=0.0)


def test_repetition_is_zero_for_copy_zero_and_one_for_the_truth():
    batch = _batch()
    copy = repetition(Lookup(), batch).iloc[0]
    assert copy.spread_ratio == 0 and copy.dist_constant == 0 and copy.dist_copy_zero == 0
    oracle = repetition(Lookup(batch), batch).iloc[0]
    assert oracle.spread_ratio == pytest.approx(1.0)
    assert oracle.dist_constant == pytest.approx(float(batch.values[batch.masked].var(unbiased=False)), rel=1e-4)
    assert oracle.dist_copy_zero > 0.02


def test_identical_positions_are_fully_collapsed_and_random_ones_are_not():
    model = HookedEncoder(CFG, seed=0)
    batch = _batch(64)
    spread = collapse(model, batch)
    assert list(spread.layer) == list(range(CFG.model.n_layers + 1))
    assert spread.cos_all.iloc[0] < 0.5
    # no position information and every token MASK: every position carries the same vector
    with torch.no_grad():
        model.W_pos.zero_()
        model.ln_embed.b.normal_()
    all_masked = batch[:]
    all_masked.tokens = torch.full_like(batch.tokens, MASK_ID)
    all_masked.observed = torch.zeros_like(batch.observed)
    same = collapse(model, all_masked)
    assert same.cos_all.to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert same.cos_masked.to_numpy() == pytest.approx(1.0, abs=1e-5)


def test_attention_on_the_optimal_map_follows_an_imposed_bias():
    """Attention forced onto the observed keys of the query's row/column scores ~1 per query that
    has such a key; attention pushed off it scores ~0; untouched attention is near uniform."""
    model = HookedEncoder(CFG, seed=0)
    batch = _batch(128)
    on_map = optimal_attention_map(batch.observed, 4, 4)
    reachable = float(on_map.any(-1).float().mean())
    plain = attention_progress(model, batch)
    assert len(plain) == CFG.model.n_layers * CFG.model.n_heads
    assert plain.share_on_map.to_numpy() == pytest.approx(plain.uniform_share.iloc[0], abs=0.05)
    for scale, low, high in ((1e6, 0.99 * reachable, 1.0), (1e-6, 0.0, 1e-3)):
        hook = (lambda name: name.endswith("hook_pattern"), lambda p, hook: bias_pattern(p, on_map, scale))
        with model.hooks(fwd_hooks=[hook]):
            share = attention_progress(model, batch).share_on_map
        assert ((share >= low) & (share <= high)).all(), (scale, share.tolist())


def test_dynamics_summary_reads_the_last_layer_and_the_best_head():
    steps = [0, 10]
    frames = {
        "repetition": pd.DataFrame({"step": steps, "spread_ratio": [0.1, 0.9], "dist_constant": [0.0, 0.2],
                                    "dist_copy_zero": [0.0, 0.3]}),
        "collapse": pd.DataFrame({"step": [0, 0, 0, 10, 10, 10], "layer": [0, 1, 2] * 2,
                                  "cos_all": 0.5, "cos_masked": [0.1, 0.2, 0.95, 0.1, 0.2, 0.4]}),
        "attention_progress": pd.DataFrame({"step": [0, 0, 10, 10], "layer": 0, "head": [0, 1, 0, 1],
                                            "share_on_map": [0.2, 0.3, 0.8, 0.1], "uniform_share": 0.25}),
    }
    summary = dynamics_summary(frames)
    assert list(summary.columns) == ["step", "spread_ratio", "dist_constant", "dist_copy_zero",
                                     "cos_masked_last_layer", "best_head_share_on_map"]
    assert summary.step.tolist() == steps and summary.spread_ratio.tolist() == [0.1, 0.9]
    assert summary.cos_masked_last_layer.tolist() == [0.95, 0.4]
    assert summary.best_head_share_on_map.tolist() == [0.3, 0.8]


@pytest.mark.ray
def test_intervention_driver_trains_one_run_per_scale(tiny_run, tmp_path):
    frame = compare_interventions(tiny_run.config, [1, 8], tiny_run.config.train.steps, tmp_path, progress=False)
    assert list(frame.scale) == [1, 8]
    runs = dict(zip(frame.scale, frame.run))
    plain = tiny_run.metrics.loss.to_numpy()
    same = pd.read_csv(f"{runs[1]}/metrics.csv").loss.to_numpy()
    biased = pd.read_csv(f"{runs[8]}/metrics.csv").loss.to_numpy()
    assert same == pytest.approx(plain, nan_ok=True)  # c = 1 is plain training
    assert not biased[1:] == pytest.approx(plain[1:], nan_ok=True)
    # a second call reuses the finished runs
    again = compare_interventions(tiny_run.config, [1, 8], tiny_run.config.train.steps, tmp_path, progress=False)
    pd.testing.assert_frame_equal(frame, again)


def test_plateau_shows_repetition_and_collapse_that_the_drop_undoes(reference_run):
    """docs/FINDINGS.md, P1 and P2, on the reference run: on the plateau masked predictions repeat one value
    and masked hidden states are nearly parallel; after the drop both recover."""
    drop = detect_phases(reference_run).iloc[0].drop_step
    plateau, final = reference_run.nearest_step(drop / 2), reference_run.steps[-1]
    frames = track_dynamics(reference_run, steps=[plateau, final], batch_size=256, progress=False)
    rep = frames["repetition"].set_index("step")
    assert rep.spread_ratio[plateau] < 0.05
    assert rep.spread_ratio[final] > 0.3
    deep = frames["collapse"].query("layer == layer.max()").set_index("step")
    assert deep.cos_masked[plateau] > 0.9
    assert deep.cos_masked[final] < deep.cos_masked[plateau]
    heads = frames["attention_progress"].groupby("step").share_on_map.max()
    assert heads[final] > heads[plateau] + 0.05
