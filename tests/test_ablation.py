"""Head ablation: each kind equals its by-hand weight surgery; ablating a dead head is a no-op."""

from __future__ import annotations

import copy

import pytest
import torch

from analyses.causal.ablation import ablate, head_ablation_sweep
from mechlrmc.config import preset
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import sample, split_losses


@pytest.fixture(scope="module")
def setup():
    cfg = preset("tiny")
    model = HookedEncoder(cfg, seed=3).eval()
    with torch.no_grad():  # sharper attention than at init, so ablations matter
        for block in model.blocks:
            block.attn.W_Q.mul_(30)
            block.attn.W_K.mul_(30)
            block.attn.W_O.mul_(10)
    return cfg, model, sample(cfg.data, 64, torch.Generator().manual_seed(0))


def _losses(model, batch):
    with torch.no_grad():
        return {k: float(v) for k, v in split_losses(model(batch.tokens), batch.values, batch.observed).items()}


def test_zero_ablation_equals_zeroing_w_o(setup):
    cfg, model, batch = setup
    surgery = copy.deepcopy(model)
    with torch.no_grad():
        surgery.blocks[1].attn.W_O[0].zero_()
    result = ablate(model, batch, [(1, 0)], "zero")
    assert result["loss_mask"] == pytest.approx(_losses(surgery, batch)["loss_mask"], rel=1e-5)
    assert abs(result["delta_loss"]) > 1e-6
    assert result["delta_loss"] == pytest.approx(result["loss"] - _losses(model, batch)["loss"])


def test_uniform_ablation_equals_zero_queries(setup):
    cfg, model, batch = setup
    surgery = copy.deepcopy(model)
    with torch.no_grad():  # all scores 0 -> softmax is uniform over the keys
        surgery.blocks[0].attn.W_Q[1].zero_()
        surgery.blocks[0].attn.b_Q[1].zero_()
    result = ablate(model, batch, [(0, 1)], "uniform")
    assert result["loss"] == pytest.approx(_losses(surgery, batch)["loss"], rel=1e-5)


def test_mean_ablation_of_identical_examples_is_a_no_op(setup):
    cfg, model, batch = setup
    same = batch[torch.zeros(16, dtype=torch.long)]  # one example, 16 times
    result = ablate(model, same, [(0, 0), (1, 1)], "mean")
    assert result["delta_loss"] == pytest.approx(0.0, abs=1e-6)
    assert abs(ablate(model, same, [(0, 0), (1, 1)], "zero")["delta_loss"]) > 1e-6


def test_dead_head_sweep(setup):
    """A head with W_O = 0 changes nothing under any ablation; the others do."""
    cfg, model, batch = setup
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.blocks[1].attn.W_O[1].zero_()
    sweep = head_ablation_sweep(dead, batch).set_index(["kind", "layer", "head"])
    n = cfg.model.n_layers * cfg.model.n_heads
    assert len(sweep) == 3 * n
    assert (sweep.xs((1, 1), level=["layer", "head"])[["delta_loss", "delta_loss_obs", "delta_loss_mask"]]
            .abs().to_numpy() < 1e-7).all()
    assert sweep.delta_loss.abs().max() > 1e-4
    single = ablate(dead, batch, [(0, 1)], "mean")
    assert sweep.loc[("mean", 0, 1), "delta_loss_mask"] == pytest.approx(single["delta_loss_mask"], abs=1e-7)


def test_bad_arguments_are_named(setup):
    _, model, batch = setup
    with pytest.raises(ValueError, match="kind='half'"):
        ablate(model, batch, [(0, 0)], "half")
    with pytest.raises(ValueError, match=r"head \(5, 0\) is out of range"):
        ablate(model, batch, [(5, 0)])


def test_zeroing_a_layers_mlp_output_equals_zeroing_its_weights_out(setup):
    """Component ablation: zeroing `mlp_out.0` is the MLP with W_out and b_out zeroed, and the mean
    kind over one example is that example's own output (a no-op on it)."""
    from analyses.causal.ablation import component_ablation_sweep

    cfg, model, batch = setup
    surgery = copy.deepcopy(model)
    with torch.no_grad():
        surgery.blocks[0].mlp.W_out.zero_()
        surgery.blocks[0].mlp.b_out.zero_()
    sweep = component_ablation_sweep(model, batch).set_index(["component", "kind"])
    assert list(sweep.index.get_level_values(0).unique()) == ["attn.0", "mlp.0", "attn.1", "mlp.1"]
    assert sweep.loc[("mlp.0", "zero"), "loss_mask"] == pytest.approx(_losses(surgery, batch)["loss_mask"], rel=1e-5)
    assert abs(sweep.loc[("mlp.0", "zero"), "delta_loss"]) > 1e-6
    one = batch[:1] if hasattr(batch, "__getitem__") else batch
    itself = component_ablation_sweep(model, one, kinds=("mean",)).set_index("component")
    assert itself.delta_loss.abs().max() < 1e-6
    with pytest.raises(ValueError, match="kind='uniform' is invalid for a component"):
        component_ablation_sweep(model, batch, kinds=("uniform",))
